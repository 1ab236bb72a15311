"""P2Es: the diffusion teacher (PPG and/or some leads -> 12-lead ECG).

schedule.py      dual-domain forward process (DCT blur + noise), posterior, DDIM, v-parameterisation
network.py       temporal multi-scale generator (dilated residual cascades, FiLM, lead mixing, deblur head)
conditioning.py  PPG encoder (swappable), condition leads, age and sex embeddings
affinity.py      demographic-aware KNN + contrastive lead affinity
model.py         the `P2Es` TranslationModel (loss, generate, init_affinity)
config.py        `P2EsConfig`, all of the above's knobs
"""

from p2es_dist.models.p2es.config import P2EsConfig
from p2es_dist.models.p2es.model import P2Es

__all__ = ["P2Es", "P2EsConfig"]
