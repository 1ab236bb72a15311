"""Imports every model module so its @register runs. Add new models here."""

from p2es_dist.models import (  # noqa: F401  (baselines)
    classifier,
    dct,
    li2021,
    p2es,  # noqa: F401  (the P2Es teacher)
    unet,
)
