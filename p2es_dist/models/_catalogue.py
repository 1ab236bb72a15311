"""Imports every model module so its @register runs. Add new models here."""

from p2es_dist.models import (  # noqa: F401  (baselines)
    classifier,
    dct,
    encoder,  # noqa: F401  (the foundation ECG/PPG encoder)
    li2021,
    p2es,  # noqa: F401  (the P2Es teacher)
    student,  # noqa: F401  (the distilled mobile student)
    unet,
)
from p2es_dist.models.p2es import foundation  # noqa: F401,E402  (ppg_encoder: foundation)
