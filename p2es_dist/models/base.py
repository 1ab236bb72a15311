"""The interface every model follows, so the trainer, evaluator and distiller treat them alike.

A batch is a dict of tensors in model space (`p2es_dist/data/normalize.py`), as the Ray Data loader yields it
(`p2es_dist/data/batches.py`):

| key             | shape / dtype            | meaning                                                              |
|-----------------|--------------------------|----------------------------------------------------------------------|
| `ppg`           | (B, L) float32           | PPG min-max scaled to [-1, 1]; zeros where absent                    |
| `ppg_mask`      | (B,) bool                | whether the window has PPG                                           |
| `ecg`           | (B, 12, L) float32       | 12 leads, one scale factor per window; zeros where absent            |
| `ecg_mask`      | (B, 12) bool             | which leads were recorded                                            |
| `cond_leads`    | (B, 12) bool, optional   | recorded leads given to the model as input (`--condition`)           |
| `template`      | (B, 12, L) float32, opt. | the patient's calibrated ECG template: their mean beat per lead      |
|                 |                          | placed at each PPG upstroke minus their PAT (`data/calibration.py`), |
|                 |                          | peak absolute value over its leads 1; zeros where absent             |
| `template_mask` | (B, 12) bool, optional   | leads the template has; all false: no calibration (zero-shot)        |
| `age`           | (B,) float32             | years, NaN when unknown                                              |
| `sex`           | (B,) int64               | 0 female, 1 male, -1 unknown                                         |
| `labels`        | (B, 13) float32          | multi-hot over `constants.LABELS`                                    |
| `subject`       | (B,) int64               | stable hash of `subject_id` (same patient -> same value)             |

Leads are in `constants.LEADS` order, L = `constants.WINDOW`. A batch without `template` /
`template_mask` (old shards, 12-lead corpora) has no template for any window; models read it only
when built with `use_template: true`, and never learn from (or score) a lead they were given as input.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from p2es_dist.constants import N_LEADS

Batch = dict[str, Tensor]


@dataclass(frozen=True)
class GenerationOptions:
    """How `generate` draws. Every model takes it; a deterministic model (`stochastic = False`) reads none of it.

    `sampler` / `steps` None mean the model's default (`TranslationModel.generation_options` fills them in);
    `n_samples` draws are averaged. A stochastic model is deterministic under `seed`.
    """

    seed: int = 0
    sampler: str | None = None
    steps: int | None = None
    n_samples: int = 1

    def with_seed(self, seed: int) -> GenerationOptions:
        return replace(self, seed=seed)

    @classmethod
    def from_settings(cls, settings: dict[str, Any] | None, **overrides: Any) -> GenerationOptions:
        """From a recorded `generation` section (metrics.json, a bundle's config.json); unknown keys ignored."""
        known = {k: v for k, v in (settings or {}).items() if k in ("seed", "sampler", "steps", "n_samples")}
        return cls(**{**known, **overrides})

    def as_dict(self) -> dict[str, Any]:
        return {"sampler": self.sampler, "steps": self.steps, "seed": self.seed, "n_samples": self.n_samples}


class TranslationModel(nn.Module):
    """A model that maps a condition (PPG and/or some leads, demographics) to 12 ECG leads."""

    name: ClassVar[str]
    stochastic: ClassVar[bool] = False  # True: `generate` samples, and reads GenerationOptions' sampler fields

    def loss(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        """Scalar training loss (masked to recorded leads) and named parts for logging."""
        raise NotImplementedError

    def generation_options(self, options: GenerationOptions | None = None) -> GenerationOptions:
        """`options` with this model's defaults filled in: what `generate` will actually do.

        A deterministic model has no sampler: it resolves to sampler/steps None and one sample, whatever
        was asked (the seed is kept, as callers record it). Stochastic models override this.
        """
        return GenerationOptions(seed=(options or GenerationOptions()).seed)

    @torch.no_grad()
    def generate(self, batch: Batch, options: GenerationOptions | None = None) -> Tensor:
        """12-lead ECG in model space, (B, 12, L), drawn as `options` says (defaults: `GenerationOptions()`)."""
        raise NotImplementedError


def condition_leads(batch: Batch) -> Tensor:
    """(B, 12) bool: recorded leads the model may see as input; none unless `cond_leads` is given."""
    if "cond_leads" in batch:
        return batch["cond_leads"] & batch["ecg_mask"]
    return torch.zeros_like(batch["ecg_mask"])


def template_leads(batch: Batch) -> Tensor:
    """(B, 12) bool: the leads the window's calibration template has; none when the batch has no template."""
    if "template_mask" in batch and "template" in batch:
        return batch["template_mask"].bool()
    return torch.zeros_like(batch["ecg_mask"], dtype=torch.bool)


def template_input(batch: Batch) -> Tensor:
    """(B, 12, L): the template's leads (`template_leads`), every other lead zeroed."""
    given = template_leads(batch)
    if "template" not in batch:
        return torch.zeros_like(batch["ecg"], dtype=batch["ppg"].dtype)
    template = batch["template"].to(batch["ppg"].dtype)
    return torch.where(given[:, :, None], template, torch.zeros_like(template))


def hide_templates(batch: Batch, fraction: float) -> Batch:
    """A copy of `batch` whose template is hidden (mask all false) in about `fraction` of its windows.

    Training only (`template_dropout`): one model then serves both the zero-shot protocol (no
    calibration) and the calibrated one. Draws from torch's global generator, like the rest of a loss.
    """
    if fraction <= 0 or "template_mask" not in batch:
        return batch
    mask = batch["template_mask"].bool()
    keep = torch.rand(mask.shape[0], device=mask.device) >= fraction
    return {**batch, "template_mask": mask & keep[:, None]}


class PopulationTemplate(nn.Module):
    """The training population's mean beat and pulse arrival time: the zero-shot stand-in for a template.

    `population` is a calibration profile as JSON (`p2es_dist/data/calibration.py`), which the trainer
    fills in from the train split of the training data (`model.population` in the config, so it travels
    with every checkpoint). `fill` gives each window that has no calibration template the population's
    beat placed at its PPG upstrokes (batch key `upstrokes`, (B, K) int, padded with `data.timing.UPSTROKE_PAD`) minus
    the population PAT, and says which windows are calibrated (`template_calibrated`). Without a
    population, or without upstrokes in the batch, it changes nothing.
    """

    def __init__(self, population: dict | None) -> None:
        super().__init__()
        from p2es_dist.constants import LEAD_INDEX
        from p2es_dist.data.timing import BEAT_PRE, BEAT_SAMPLES

        population = population or {}
        beat = torch.zeros(N_LEADS, BEAT_SAMPLES)
        mask = torch.zeros(N_LEADS, dtype=torch.bool)
        for name, values in (population.get("beat") or {}).items():
            beat[LEAD_INDEX[name]] = torch.tensor(values, dtype=torch.float32)
            mask[LEAD_INDEX[name]] = True
        self.available = bool(mask.any())
        self.shift = int(round(float(population.get("pat_s", 0.0)) * float(population.get("fs", 125)))) + BEAT_PRE
        self.register_buffer("beat", beat, persistent=False)
        self.register_buffer("mask", mask, persistent=False)

    def render(self, upstrokes: Tensor, length: int) -> Tensor:
        """(B, K) upstroke positions -> (B, 12, length), unit peak over the population's leads per window.

        The same placement as `data.timing.render_template`: each sample takes the beat that started last.
        """
        starts, _ = torch.sort(upstrokes.long() - self.shift, dim=1)
        t = torch.arange(length, device=starts.device).expand(len(starts), length).contiguous()
        owner = torch.searchsorted(starts, t, right=True) - 1
        offset = t - torch.gather(starts, 1, owner.clamp_min(0))
        covered = (owner >= 0) & (offset < self.beat.shape[1])
        values = self.beat[:, offset.clamp(0, self.beat.shape[1] - 1)].permute(1, 0, 2)  # (B, 12, L)
        values = values * covered[:, None, :].to(values.dtype)
        peak = values.abs().amax(dim=(1, 2), keepdim=True)
        return torch.where(peak > 0, values / peak.clamp_min(1e-12), torch.zeros_like(values))

    def fill(self, batch: Batch) -> Batch:
        has_own = template_leads(batch).any(dim=1)
        out = {**batch, "template_calibrated": has_own}
        if not self.available or "upstrokes" not in batch:
            return out
        length = batch["ppg"].shape[-1]
        population = self.render(batch["upstrokes"], length).to(batch["ppg"].dtype)
        own = template_input(batch) if "template" in batch else torch.zeros_like(population)
        use = (~has_own & batch["ppg_mask"].bool())[:, None]
        mask = torch.where(use, self.mask.expand(len(use), -1), template_leads(batch))
        out["template"] = torch.where(use[:, :, None], population, own)
        out["template_mask"] = mask
        return out


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
