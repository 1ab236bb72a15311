"""The sections of a training config: `model` (see `p2es_dist.models`), `data`, `train`, `fault`.

    model: {name: p2es, ...}          # the model's own config dataclass
    data:  {uris: [s3://p2es/bidmc], batch_size: 16, augment: {...}}   # p2es_dist.data.loader.LoaderConfig
    train: {num_workers: 2, max_steps: 2000, deepspeed: {zero_stage: 2}, storage_path: s3://p2es/runs,
            tracking: tensorboard}   # or none; events in <run>/tensorboard (train/tracking.py)
    fault: {kill_rank: 1, at_step: 25}  # tests the recovery path: that worker kills itself once
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from p2es_dist.config import from_dict, section
from p2es_dist.data.loader import LoaderConfig
from p2es_dist.errors import ConfigError
from p2es_dist.train.tracking import Tracking

if TYPE_CHECKING:
    from p2es_dist.models.registry import ModelSpec

# What training selects checkpoints by, and Tune searches on by default: the validation reconstruction
# error (P2Es' x0 MSE, a regressor's MSE), not the total loss, which for P2Es is mostly its contrastive
# term. `loop._validate` reports it under this name for every model.
SELECTION_METRIC = "val_x0_mse"
SELECTION_MODE = "min"


@dataclass
class DeepSpeedSection:
    zero_stage: int = 0
    extra: dict[str, Any] = field(default_factory=dict)  # merged last into the DeepSpeed config

    def __post_init__(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")


@dataclass
class TrainSection:
    num_workers: int = 1
    cpus_per_worker: float = 1.0  # logical CPUs reserved per worker; torch threads = max(1, round(this))
    use_gpu: bool = False
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on GPUs that support it, else fp32
    lr: float = 3e-4
    weight_decay: float = 0.01
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    warmup_steps: int = 50
    grad_clip: float = 1.0
    grad_accum: int = 1
    max_steps: int = 1000
    eval_every: int = 100  # steps between validation reports (on `val`, never `test`)
    val_batches: int = 8  # per worker; 0 means the whole val split
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    max_failures: int = 1  # worker-group restarts by Ray Train, each from the latest checkpoint
    storage_retries: int = 3  # fits again after a transient storage failure (trainer.fit_with_storage_retries)
    storage_retry_delay_s: float = 10.0  # before the first of those; doubles each time
    storage_path: str = "runs"
    run_name: str | None = None  # default: stable per config and --out, so the same command resumes its run
    seed: int = 0
    # TensorBoard event files of rank 0 (train/tracking.py; `p2es runs` compares them): in <run>/tensorboard,
    # or <tracking_dir>/<run name> to gather runs under one logdir. `none` writes nothing.
    tracking: Tracking = "tensorboard"
    tracking_dir: str | None = None
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)

    def __post_init__(self) -> None:
        for name in ("num_workers", "max_steps", "eval_every", "checkpoint_every", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.cpus_per_worker <= 0:
            raise ValueError(f"cpus_per_worker must be > 0, got {self.cpus_per_worker}")
        for name in ("storage_retries", "storage_retry_delay_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


@dataclass
class FaultSection:
    kill_rank: int | None = None
    at_step: int | None = None


@dataclass
class JobConfig:
    """A training config parsed once, on the driver, and handed as such to every worker and trial."""

    model: ModelSpec  # the model's own config dataclass, typed by the registry
    data: LoaderConfig
    train: TrainSection
    fault: FaultSection
    source: str = ""

    def as_dict(self) -> dict[str, Any]:
        from p2es_dist.config import to_dict

        return {"model": self.model.as_dict(), "data": to_dict(self.data), "train": to_dict(self.train),
                "fault": to_dict(self.fault)}


def parse_job_config(config: dict[str, Any] | JobConfig) -> JobConfig:
    """Validate and type every section now, on the driver, so a typo fails before any worker starts; a
    JobConfig (already parsed) is returned as it is."""
    from p2es_dist.models import parse_model

    if isinstance(config, JobConfig):
        return config
    origin = config.get("_source", "config")
    unknown = sorted(set(config) - {"model", "data", "train", "fault", "_source"})
    if unknown:
        raise ConfigError(f"{origin}: {unknown[0]}: unknown section (expected model, data, train, fault)")
    model = section(config, "model")
    if "name" not in model:
        raise ConfigError(f"{origin}: model.name: missing (e.g. p2es, unet, dct, li2021, classifier)")
    try:
        job = JobConfig(
            model=parse_model(model),  # the model's own dataclass checks its keys; no module is built
            data=from_dict(LoaderConfig, section(config, "data"), where="data"),
            train=from_dict(TrainSection, section(config, "train"), where="train"),
            fault=from_dict(FaultSection, section(config, "fault"), where="fault"),
            source=origin,
        )
    except ConfigError as exc:
        raise ConfigError(f"{origin}: {exc}") from None
    if not job.data.uris:
        raise ConfigError(f"{origin}: data.uris: expected a list of shard folders (outputs of `p2es ingest`)")
    if job.fault.kill_rank is not None and job.fault.kill_rank >= job.train.num_workers:
        raise ConfigError(f"{origin}: fault.kill_rank: {job.fault.kill_rank} but train.num_workers is "
                          f"{job.train.num_workers}")
    return job
