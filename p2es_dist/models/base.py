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
| `source`        | (B,) int64, optional     | stable hash of the shard's `source` (picks the zero-shot population) |
| `upstrokes`     | (B, K) int32, optional   | PPG upstroke positions, padded with `data.timing.UPSTROKE_PAD`        |
| `pat_s`         | (B,) float32, optional   | the record's calibrated PAT in s (NaN: none); training only, never an |
|                 |                          | input (evaluation drops it under the zero-shot protocol)             |

Leads are in `constants.LEADS` order, L = `constants.WINDOW`. A batch without `template` /
`template_mask` (old shards, 12-lead corpora) has no template for any window; models read it only
when built with `use_template: true`, and never learn from (or score) a lead they were given as input.
`cond_leads` may differ from window to window (`data.condition_subsets`: one model, any subset).

Lead physics at the output: every `generate` of a model that reads `cond_leads` (`takes_leads`) returns
the given leads exactly as recorded and, where two limb leads are given, all six derived from them
(`models.leads.impose_given_leads`). `TranslationModel` wraps each subclass's `generate` with it, so no
model can forget it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from p2es_dist.constants import FS, N_LEADS
from p2es_dist.models.leads import impose_given_leads

Batch = dict[str, Tensor]


@dataclass(frozen=True)
class GenerationOptions:
    """How `generate` draws. Every model takes it; a deterministic model (`stochastic = False`) reads none of it.

    `sampler` / `steps` / `n_samples` None mean the model's default (`TranslationModel.generation_options`
    fills them in); `n_samples` draws are averaged. A stochastic model is deterministic under `seed`. `calibration`, a
    `data.calibration.CalibrationProfile`, gives a model built with `use_template` the patient's template
    in every window of the batch (`with_calibration`; the batch must carry `upstrokes`).
    """

    seed: int = 0
    sampler: str | None = None
    steps: int | None = None
    n_samples: int | None = None
    calibration: Any = None

    def with_seed(self, seed: int) -> GenerationOptions:
        return replace(self, seed=seed)

    @classmethod
    def from_settings(cls, settings: dict[str, Any] | None, **overrides: Any) -> GenerationOptions:
        """From a recorded `generation` section (metrics.json, a bundle's config.json); unknown keys ignored."""
        known = {k: v for k, v in (settings or {}).items() if k in ("seed", "sampler", "steps", "n_samples")}
        return cls(**{**known, **overrides})

    def as_dict(self) -> dict[str, Any]:
        return {"sampler": self.sampler, "steps": self.steps, "seed": self.seed, "n_samples": self.n_samples}


def _imposing_given_leads(generate: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """`generate` followed by `impose_given_leads` for models that take leads and batches that give some.

    Without `cond_leads` in the batch it returns the output untouched, by a key test alone, so a traced
    PPG-only graph (export) holds nothing of it."""

    @functools.wraps(generate)
    def wrapper(self: TranslationModel, batch: Batch, *args: Any, **kwargs: Any) -> Tensor:
        output = generate(self, batch, *args, **kwargs)
        if "cond_leads" not in batch or not self.takes_leads:
            return output
        with torch.no_grad():
            return impose_given_leads(output, batch["ecg"], condition_leads(batch))

    wrapper.imposes_given_leads = True  # type: ignore[attr-defined]
    return wrapper


class TranslationModel(nn.Module):
    """A model that maps a condition (PPG and/or some leads, demographics) to 12 ECG leads."""

    name: ClassVar[str]
    stochastic: ClassVar[bool] = False  # True: `generate` samples, and reads GenerationOptions' sampler fields

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        generate = cls.__dict__.get("generate")
        if generate is not None and not getattr(generate, "imposes_given_leads", False):
            cls.generate = _imposing_given_leads(generate)

    @property
    def takes_leads(self) -> bool:
        """Whether the model reads `cond_leads` (recorded leads) as input: its config's `condition_on_leads`."""
        return bool(getattr(getattr(self, "config", None), "condition_on_leads", False))

    def loss(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        """Scalar training loss (masked to recorded leads) and named parts for logging."""
        raise NotImplementedError

    def generation_options(self, options: GenerationOptions | None = None) -> GenerationOptions:
        """`options` with this model's defaults filled in: what `generate` will actually do.

        A deterministic model has no sampler: it resolves to sampler/steps None and one sample, whatever
        was asked (the seed is kept, as callers record it). Stochastic models override this.
        """
        return GenerationOptions(seed=(options or GenerationOptions()).seed, n_samples=1)

    @torch.no_grad()
    def generate(self, batch: Batch, options: GenerationOptions | None = None) -> Tensor:
        """12-lead ECG in model space, (B, 12, L), drawn as `options` says (defaults: `GenerationOptions()`)."""
        raise NotImplementedError


def with_calibration(batch: Batch, options: GenerationOptions | None) -> Batch:
    """`batch` with `options.calibration`'s template in every window with PPG upstrokes (unchanged without
    a calibration): the patient's beat at each upstroke minus their PAT, unit peak over its leads, as the
    loader builds it from a record's stored calibration (`data.batches.calibration_templates`)."""
    profile = options.calibration if options is not None else None
    if profile is None:
        return batch
    if "upstrokes" not in batch:
        raise ValueError("calibration needs batch['upstrokes'] (the PPG upstrokes of each window, padded with "
                         "data.timing.UPSTROKE_PAD: data.timing.upstrokes_per_window, data.batches.upstroke_array)")
    import numpy as np

    from p2es_dist.data import timing

    upstrokes = batch["upstrokes"].cpu().numpy()
    length = batch["ppg"].shape[-1]
    beat, leads = profile.beat_array()
    rendered = np.stack([timing.template_from_upstrokes(beat, row, profile.pat_s, length, profile.fs)
                         for row in upstrokes])
    usable = (upstrokes[:, 0] != timing.UPSTROKE_PAD) & batch["ppg_mask"].bool().cpu().numpy()
    mask = leads[None, :] & usable[:, None]
    template = timing.normalise_template(rendered, mask) * mask[:, :, None]
    device = batch["ppg"].device
    return {**batch, "template": torch.from_numpy(template.astype(np.float32)).to(device),
            "template_mask": torch.from_numpy(mask).to(device)}


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
    """The training population's hedged beat and pulse arrival time: the zero-shot stand-in for a template.

    `population` is `data.calibration.population_json`: a pooled profile plus one per training source
    (`by_source`), which the trainer fills in from the train split of the training data (`model.population`
    in the config, so it travels with every checkpoint). `fill` gives each window that has no calibration
    template its source's population beat, hedged against that population's PAT spread
    (`calibration.hedged_beat`), placed at its PPG upstrokes (batch key `upstrokes`) minus the population
    PAT; windows of a source the model never saw (or a batch without `source`) get the pooled population.
    It also says which windows are calibrated (`template_calibrated`). Without a population, or without
    upstrokes in the batch, it changes nothing.
    """

    def __init__(self, population: dict | None) -> None:
        super().__init__()
        population = population or {}
        # Row 0 is the pooled population; rows 1.. follow `by_source`.
        entries = [population, *(population.get("by_source") or {}).values()]
        beats, masks, shifts, spreads = zip(*(self._entry(entry) for entry in entries), strict=True)
        self.available = bool(masks[0].any())
        self.register_buffer("beats", torch.stack(beats), persistent=False)  # (S, 12, BEAT_SAMPLES)
        self.register_buffer("masks", torch.stack(masks), persistent=False)  # (S, 12)
        self.register_buffer("shifts", torch.tensor(shifts, dtype=torch.long), persistent=False)
        self.register_buffer("spreads", torch.tensor(spreads, dtype=torch.float32), persistent=False)  # samples
        from p2es_dist.data.splits import subject_hash

        keys = [subject_hash(name) for name in (population.get("by_source") or {})]
        self.register_buffer("source_keys", torch.tensor(keys, dtype=torch.long), persistent=False)

    @staticmethod
    def _entry(population: dict) -> tuple[Tensor, Tensor, int, float]:
        import math

        import numpy as np

        from p2es_dist.constants import LEAD_INDEX
        from p2es_dist.data.calibration import IQR_PER_SIGMA, hedged_beat
        from p2es_dist.data.timing import BEAT_PRE, BEAT_SAMPLES

        beat = np.zeros((N_LEADS, BEAT_SAMPLES), dtype=np.float32)
        mask = torch.zeros(N_LEADS, dtype=torch.bool)
        for name, values in (population.get("beat") or {}).items():
            beat[LEAD_INDEX[name]] = values
            mask[LEAD_INDEX[name]] = True
        fs = float(population.get("fs", 125))
        spread = population.get("pat_iqr_s")
        spread = float(spread) if spread is not None and math.isfinite(float(spread)) else 0.0
        shift = int(round(float(population.get("pat_s", 0.0)) * fs)) + BEAT_PRE
        sigma = spread / IQR_PER_SIGMA * fs
        return torch.from_numpy(hedged_beat(beat, spread, int(fs))), mask, shift, sigma

    def rows(self, batch: Batch) -> Tensor:
        """(B,) which population serves each window: its source's, else the pooled one (row 0)."""
        n = batch["ecg_mask"].shape[0]
        if "source" not in batch or not len(self.source_keys):
            return torch.zeros(n, dtype=torch.long, device=self.beats.device)
        match = batch["source"].long()[:, None] == self.source_keys[None, :]
        return torch.where(match.any(dim=1), match.long().argmax(dim=1) + 1, torch.zeros_like(match[:, 0].long()))

    def render(self, upstrokes: Tensor, length: int, rows: Tensor | None = None) -> Tensor:
        """(B, K) upstroke positions -> (B, 12, length) in the beats' unit-peak scale.

        The same placement as `data.timing.render_template`: each sample takes the beat that started last.
        """
        rows = torch.zeros(len(upstrokes), dtype=torch.long, device=upstrokes.device) if rows is None else rows
        starts, _ = torch.sort(upstrokes.long() - self.shifts[rows][:, None], dim=1)
        t = torch.arange(length, device=starts.device).expand(len(starts), length).contiguous()
        owner = torch.searchsorted(starts, t, right=True) - 1
        offset = t - torch.gather(starts, 1, owner.clamp_min(0))
        beat_length = self.beats.shape[-1]
        covered = (owner >= 0) & (offset < beat_length)
        index = offset.clamp(0, beat_length - 1)[:, None, :].expand(-1, N_LEADS, -1)
        values = torch.gather(self.beats[rows], 2, index)  # (B, 12, L)
        return values * covered[:, None, :].to(values.dtype)

    def jitter_targets(self, batch: Batch, *, realign: bool = False) -> Tensor:
        """(B, 12, L) the batch's ECG, shifted in time by a lag ~ N(0, sigma of the PAT spread) in every window
        that `fill` gave the population template (edges repeat the first or last sample).

        Training only. The training patients' own PATs are learnable from their PPG, so without it a
        model memorises them and places sharp QRS complexes at the wrong time for a new patient; with it,
        each zero-shot window is shown as if its patient's PAT were any of the population's, and the
        MSE-optimal answer hedges as `hedged_beat` does. Draws from torch's global generator.

        `realign` (windows whose record has a PAT, batch key `pat_s`): first move the ECG by the record's PAT
        minus the population's, so the lag is drawn around the population PAT rather than the patient's
        own. The jitter alone still lets a model recognise a training patient from the PPG and centre its
        QRS on that patient's PAT: a wrong place for the next patient.
        """
        from p2es_dist.data.timing import BEAT_PRE

        ecg = batch["ecg"]
        population = batch["template_mask"].any(dim=1) & ~batch["template_calibrated"]
        rows = self.rows(batch)
        lag = torch.round(torch.randn(len(ecg), device=ecg.device) * self.spreads[rows])
        if realign and "pat_s" in batch:
            pat = batch["pat_s"].to(ecg.device).float() * FS
            offset = torch.where(torch.isfinite(pat), pat - (self.shifts[rows] - BEAT_PRE).float(), 0.0)
            lag = lag + torch.round(offset)
        lag = lag.long() * population.long()
        t = torch.arange(ecg.shape[-1], device=ecg.device)
        index = (t[None, :] - lag[:, None]).clamp(0, ecg.shape[-1] - 1)
        return torch.gather(ecg, 2, index[:, None, :].expand(-1, ecg.shape[1], -1))

    def fill(self, batch: Batch) -> Batch:
        has_own = template_leads(batch).any(dim=1)
        out = {**batch, "template_calibrated": has_own}
        if not self.available or "upstrokes" not in batch:
            return out
        length = batch["ppg"].shape[-1]
        rows = self.rows(batch)
        population = self.render(batch["upstrokes"], length, rows).to(batch["ppg"].dtype)
        own = template_input(batch) if "template" in batch else torch.zeros_like(population)
        use = (~has_own & batch["ppg_mask"].bool())[:, None]
        mask = torch.where(use, self.masks[rows], template_leads(batch))
        out["template"] = torch.where(use[:, :, None], population, own)
        out["template_mask"] = mask
        return out


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
