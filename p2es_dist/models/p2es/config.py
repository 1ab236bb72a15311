"""`P2EsConfig`: every knob of the P2Es teacher, flat, so YAML keys and Ray Tune paths read `model.<field>`.

Each component owns its dataclass (schedule, network, conditioning, affinity) next to its code;
`P2EsConfig` inherits them all, so a field is declared once and each component reads the fields it
knows from the same object. The defaults build a ~5 M-parameter model (the issue caps it at 10 M).

PPG receptive field (issue 13: the pulse of a QRS arrives ~70 samples later, give or take ~6 between
patients, so every model must see >= +-125 samples, 1 s, of PPG): the PPG encoder's
3 * (1 + sum(ppg_dilations)) plus the generator's cascades * (kernel_size // 2) * (2^dilation_depth - 1)
samples each side of an output sample: +-(48 + 765) = +-813 (more than the 1024-sample window) for
these defaults, +-224 for `p2es_bidmc.yaml` (162 + 62, its encoder dilated to [1, 4, 16, 32]).
`tests/test_receptive_field.py` measures it for every shipped config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from p2es_dist.models.p2es.affinity import AffinityConfig
from p2es_dist.models.p2es.conditioning import ConditioningConfig
from p2es_dist.models.p2es.network import NetworkConfig
from p2es_dist.models.p2es.schedule import ScheduleConfig

Objective = Literal["x0", "v"]
Sampler = Literal["ddim", "ancestral"]


@dataclass(kw_only=True)
class P2EsConfig(ScheduleConfig, NetworkConfig, ConditioningConfig, AffinityConfig):
    # PPG receptive field with these defaults: +-(48 + 765) = +-813 samples, beyond the whole window.
    objective: Objective = "x0"  # what the network predicts: the clean ECG, or v (per DCT coefficient)
    lead_physics: bool = True  # generate I, II, V1-V6 and derive III, aVR, aVL, aVF; off: all 12
    cond_lead_prob: float = 0.25  # in training, chance that a window gets a random subset of its leads as input
    sampler: Sampler = "ddim"  # default of `generate`
    sample_steps: int = 20  # default DDIM steps (ancestral defaults to all T)
    sample_draws: int = 1  # default draws `generate` averages (their mean: a point estimate of the ECG)

    def __post_init__(self) -> None:
        for component in (ScheduleConfig, NetworkConfig, ConditioningConfig, AffinityConfig):
            component.__post_init__(self)
        if self.objective not in ("x0", "v"):
            raise ValueError(f"objective must be 'x0' or 'v', got {self.objective!r}")
        if self.sampler not in ("ddim", "ancestral"):
            raise ValueError(f"sampler must be 'ddim' or 'ancestral', got {self.sampler!r}")
        if not 1 <= self.sample_steps <= self.timesteps:
            raise ValueError(f"sample_steps must be in [1, timesteps={self.timesteps}], got {self.sample_steps}")
        if self.sample_draws < 1:
            raise ValueError(f"sample_draws must be >= 1, got {self.sample_draws}")
        if self.use_template and self.template_residual and self.objective != "x0":
            raise ValueError("template_residual needs objective 'x0' (a correction to x0); set one or the other")
        if not 0.0 <= self.cond_lead_prob <= 1.0:
            raise ValueError(f"cond_lead_prob must be in [0, 1], got {self.cond_lead_prob}")
