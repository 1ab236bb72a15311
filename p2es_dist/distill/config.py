"""The `distill:` section of a distillation config, and its check against the other sections.

    distill: {teacher: runs/p2es-.../step-00001000, sampler: ddim, steps: 10, seed: 0, actors: 2,
              teacher_batch_size: 16, cache_root: s3://p2es/teacher_outputs, prune_fraction: 0.5, ...}
    model:   {name: student, ...}         # p2es_dist.models.student.StudentConfig (before pruning)
    data:    {uris: [...], ...}           # the windows to distil on (LoaderConfig); augmentation must be off
    train:   {...}                        # TrainSection of the distillation stage; the fine-tune reuses it
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from p2es_dist.config import from_dict, section
from p2es_dist.errors import ConfigError


@dataclass
class DistillSection:
    teacher: str = ""  # checkpoint / bundle / result.json URI of the teacher (`load_model`)
    sampler: Literal["ddim", "ancestral"] = "ddim"  # the teacher's few-step sampler
    steps: int = 10
    seed: int = 0
    n_samples: int = 1  # draws averaged per window
    actors: int = 1  # Ray Data actor pool size for teacher inference
    teacher_batch_size: int = 16
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    cache_root: str = "runs/teacher_outputs"  # teacher outputs land in <cache_root>/<key>/
    splits: list[str] = field(default_factory=lambda: ["train", "val"])  # never test
    teacher_weight: float = 1.0  # loss weight of the teacher's output ...
    recorded_weight: float = 1.0  # ... and of the recorded leads
    prune_fraction: float = 0.5  # share of trunk channels removed (0: no pruning, no fine-tune)
    prune_lambda_w: float = 1.0  # lambda_w of eq. 11
    prune_windows: int = 256  # training windows the significance expectation is taken over
    # Calibration templates (a student with use_template): the share of windows whose template is hidden
    # from teacher and student alike, decided per window in the data (teacher_outputs.hidden_templates).
    template_dropout: float = 0.5
    finetune_steps: int = 200
    finetune_lr: float | None = None  # default: train.lr
    onnx: bool = True  # export the final student to ONNX beside the summary
    quantize: bool = True  # and an int8-weight copy

    def __post_init__(self) -> None:
        if "test" in self.splits or not self.splits:
            raise ValueError(f"splits must be a non-empty subset of train/val (never test), got {self.splits}")
        if not 0 <= self.prune_fraction < 1:
            raise ValueError(f"prune_fraction must be in [0, 1), got {self.prune_fraction}")
        for name in ("steps", "n_samples", "actors", "teacher_batch_size", "prune_windows", "finetune_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class DistillJob:
    distill: DistillSection
    model: dict[str, Any]
    data: dict[str, Any]
    train: dict[str, Any]
    source: str


def parse_distill_config(config: dict[str, Any]) -> DistillJob:
    """Validate on the driver before anything starts; errors name the config file and key."""
    origin = config.get("_source", "config")
    unknown = sorted(set(config) - {"distill", "model", "data", "train", "_source"})
    if unknown:
        raise ConfigError(f"{origin}: {unknown[0]}: unknown section (expected distill, model, data, train)")
    try:
        distill = from_dict(DistillSection, section(config, "distill"), where="distill")
    except ConfigError as exc:
        raise ConfigError(f"{origin}: {exc}") from None
    if not distill.teacher:
        raise ConfigError(f"{origin}: distill.teacher: expected the teacher's checkpoint URI (a `p2es train` "
                          "checkpoint folder, bundle or result.json)")
    model = section(config, "model") or {"name": "student"}
    if model.get("name") != "student":
        raise ConfigError(f"{origin}: model.name: expected 'student' (the distilled model), got {model.get('name')!r}")
    if model.get("use_template"):
        # The data already hides templates per window, for teacher and student alike; a student hiding
        # more on its own would learn zero-shot answers from windows the teacher answered calibrated.
        dropout = model.get("template_dropout")
        if dropout not in (None, 0, 0.0):
            raise ConfigError(f"{origin}: model.template_dropout: must be 0 for distillation (got {dropout!r}); "
                              "distill.template_dropout hides templates in the teacher outputs instead")
        model = {**model, "template_dropout": 0.0}
    data = section(config, "data")
    if not data.get("uris"):
        raise ConfigError(f"{origin}: data.uris: expected a list of shard folders (outputs of `p2es ingest`)")
    if dict(data.get("augment") or {}).get("enabled", True):
        # Augmentation warps the PPG after the teacher saw it: the teacher's output would no longer match.
        raise ConfigError(f"{origin}: data.augment.enabled: must be false for distillation (the teacher's "
                          "outputs are computed once on the unaugmented windows)")
    return DistillJob(distill=distill, model=model, data=data, train=section(config, "train"), source=origin)
