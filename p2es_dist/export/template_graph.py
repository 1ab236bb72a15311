"""The exported graph of a student built with `use_template` (calibration templates, issue 13).

Inputs, batch axis free (all in model space, as `models/base.py`'s Batch):

    ppg            (batch, 1024) float32    PPG min-max scaled to [-1, 1] per window
    template       (batch, 12, 1024) float32  the patient's mean beat placed at each PPG upstroke minus
                                            their PAT, unit peak over its leads (`data.batches.calibration_templates`,
                                            `translate.run.calibration_templates`); anything where absent
    template_mask  (batch, 12) bool         the leads the template has; all false: no calibration (zero-shot)
    upstrokes      (batch, K) int32         the window's PPG upstrokes (`data.timing.upstrokes_per_window`),
                                            padded with `data.timing.UPSTROKE_PAD` (2**30); K is free.
                                            Only when the student has a training population (below)

Output `ecg` (batch, 12, 1024) float32, model space.

Zero-shot: the PyTorch student gives a window without the patient's template (mask all false) the
training population's hedged beat at its upstrokes minus the population PAT (`PopulationTemplate`); a
student trained that way never saw an empty template when a population existed. So the graph embeds the
pooled population (beat and PAT, constants of the graph) and takes the upstrokes, and a host needs no more
than it needs for a calibrated window. Per-source populations are not embedded: a device is a source the
model never saw, which the PyTorch student also answers with the pooled one. A student without a
population (trained on data without calibration) has no `upstrokes` input, and its zero-shot input is the
empty template, as in PyTorch.

`torch.searchsorted` (what `PopulationTemplate.render` places beats with) has no ONNX export, so the
graph counts the beat starts at or before each sample instead: the same integers, the same gathered
values, so the graph's output equals `Student.forward` on the same batch (tests/test_student_template_export.py).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from p2es_dist.constants import LEAD_INDEX, N_LEADS, WINDOW
from p2es_dist.data import timing
from p2es_dist.models.base import Batch

PPG, TEMPLATE, TEMPLATE_MASK, UPSTROKES = "ppg", "template", "template_mask", "upstrokes"
# Initializers named so stay fp32 in the int8 copy (`export.quantize`): the population beat is an input
# signal, not a layer's weights.
CONSTANT_PREFIX = "population_"


def takes_template(model: nn.Module) -> bool:
    """Whether `model` is a student whose exported graph takes the calibration template."""
    config = getattr(model, "config", None)
    return hasattr(model, "forward_ppg") and bool(getattr(config, "use_template", False))


def has_population(model: nn.Module) -> bool:
    population = getattr(model, "population", None)
    return bool(getattr(population, "available", False))


def input_names(model: nn.Module) -> list[str]:
    """The exported graph's inputs, in order."""
    if not takes_template(model):
        return [PPG]
    return [PPG, TEMPLATE, TEMPLATE_MASK] + ([UPSTROKES] if has_population(model) else [])


def input_spec(model: nn.Module) -> list[dict[str, Any]]:
    """What a bundle's config.json and model card state about each input."""
    specs = {
        PPG: {"shape": ["batch", WINDOW], "dtype": "float32",
              "space": "PPG min-max scaled to [-1, 1] per window, 125 Hz"},
        TEMPLATE: {"shape": ["batch", N_LEADS, WINDOW], "dtype": "float32",
                   "space": "the patient's calibration beat per lead placed at each PPG upstroke minus their "
                            "pulse arrival time, peak |x| over its leads 1 (leads outside template_mask are "
                            "ignored)"},
        TEMPLATE_MASK: {"shape": ["batch", N_LEADS], "dtype": "bool",
                        "space": "leads the template has; all false: no calibration (zero-shot)"},
        UPSTROKES: {"shape": ["batch", "upstrokes"], "dtype": "int32",
                    "space": f"PPG upstroke sample indices of the window (margins included), padded with "
                             f"{timing.UPSTROKE_PAD}; a zero-shot window gets the embedded training-population "
                             "beat there"},
    }
    return [{"name": name, **specs[name]} for name in input_names(model)]


class CalibratedGraph(nn.Module):
    """`Student.forward` on a batch of (ppg, template, template_mask[, upstrokes]) with PPG present and no
    `source`, in ops the ONNX exporter and `torch.jit.trace` take."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if not takes_template(model):
            raise TypeError(f"{type(model).__name__}: not a student built with use_template")
        self.model = model
        self.with_population = has_population(model)
        population = model.population
        # Row 0 is the pooled population; (BEAT_SAMPLES, 12) so that indexing by sample gathers all leads.
        self.register_buffer(f"{CONSTANT_PREFIX}beat", population.beats[0].t().contiguous().clone())
        self.register_buffer(f"{CONSTANT_PREFIX}mask", population.masks[0].clone())
        self.shift = int(population.shifts[0])

    def render(self, upstrokes: Tensor, length: int) -> Tensor:
        """(B, K) upstrokes -> (B, 12, length): `PopulationTemplate.render` of the pooled population."""
        beat = getattr(self, f"{CONSTANT_PREFIX}beat")
        starts, _ = torch.sort(upstrokes.long() - self.shift, dim=1)
        t = torch.arange(length, device=upstrokes.device)
        # searchsorted(starts, t, right=True) - 1: the last beat that starts at or before t.
        owner = (starts[:, None, :] <= t[None, :, None]).long().sum(dim=-1) - 1
        offset = t[None, :] - torch.gather(starts, 1, owner.clamp_min(0))
        covered = (owner >= 0) & (offset < beat.shape[0])
        values = beat[offset.clamp(0, beat.shape[0] - 1)]  # (B, L, 12)
        return values.permute(0, 2, 1) * covered[:, None, :].to(values.dtype)

    def forward(self, ppg: Tensor, template: Tensor, template_mask: Tensor,
                upstrokes: Tensor | None = None) -> Tensor:
        given = template_mask.bool()
        zeros = torch.zeros_like(template)
        own = torch.where(given[:, :, None], template.to(ppg.dtype), zeros)
        if self.with_population and upstrokes is not None:
            # PopulationTemplate.fill, then template_input: windows without any lead of their own take
            # the population's beat on the population's leads.
            use = ~given.any(dim=1, keepdim=True)  # (B, 1)
            population = self.render(upstrokes, ppg.shape[-1]).to(ppg.dtype)
            # torch.where of bools: onnxruntime has no Where for them
            mask = (use & getattr(self, f"{CONSTANT_PREFIX}mask")[None, :]) | (~use & given)
            own = torch.where(mask[:, :, None], torch.where(use[:, :, None], population, own), zeros)
        return self.model.forward_ppg(ppg, own)


def reference_batch(inputs: dict[str, Tensor]) -> Batch:
    """The Batch the PyTorch student answers for the graph's `inputs` (PPG present, nothing recorded)."""
    ppg = inputs[PPG]
    batch = {"ppg": ppg, "ppg_mask": torch.ones(ppg.shape[0], dtype=torch.bool),
             "ecg_mask": torch.zeros(ppg.shape[0], N_LEADS, dtype=torch.bool),
             "template": inputs[TEMPLATE], "template_mask": inputs[TEMPLATE_MASK].bool()}
    if UPSTROKES in inputs:
        batch["upstrokes"] = inputs[UPSTROKES]
    return batch


def uncalibrated(names: list[str], n: int, length: int = WINDOW) -> dict[str, Tensor]:
    """Template inputs of `n` windows without calibration: empty template, mask false, no upstroke."""
    values = {TEMPLATE: torch.zeros(n, N_LEADS, length), TEMPLATE_MASK: torch.zeros(n, N_LEADS, dtype=torch.bool),
              UPSTROKES: torch.full((n, 1), timing.UPSTROKE_PAD, dtype=torch.int32)}
    return {name: values[name] for name in names if name in values}


def graph_inputs(model: nn.Module, batch: Batch | Tensor) -> dict[str, Tensor]:
    """The graph's inputs for a (B, L) PPG tensor (no template, no upstroke) or a Batch's windows with PPG
    (its `template`, `template_mask` and `upstrokes` where it has them)."""
    if isinstance(batch, Tensor):
        batch = {PPG: batch.float(), "ppg_mask": torch.ones(len(batch), dtype=torch.bool)}
    present = batch["ppg_mask"].bool()
    if not present.any():
        raise ValueError("no window with PPG to run the exported graph on")
    ppg = batch[PPG][present].float()
    names = input_names(model)
    inputs = {PPG: ppg, **uncalibrated(names, *ppg.shape)}
    if TEMPLATE in batch and TEMPLATE_MASK in batch:  # a template without its mask is not one (template_leads)
        inputs[TEMPLATE] = batch[TEMPLATE][present].float()
        inputs[TEMPLATE_MASK] = batch[TEMPLATE_MASK][present].bool()
    if UPSTROKES in names and UPSTROKES in batch:
        inputs[UPSTROKES] = batch[UPSTROKES][present].to(torch.int32)
    return inputs


def example_inputs(model: nn.Module, n: int = 4, *, seed: int = 0, length: int = WINDOW) -> dict[str, Tensor]:
    """Inputs that exercise every branch, cycling over four kinds of window: 0 calibrated on six leads
    (with other values in the leads the mask leaves out, which the graph must ignore), 1 zero-shot with
    upstrokes (the population's beat), 2 zero-shot with no upstroke, 3 calibrated on all 12 leads.

    The PPG is a pulse train; its upstrokes are placed at the pulse period (a parity check needs
    plausible positions, not detected ones) and the template is a synthetic beat at them."""
    rng = np.random.default_rng(seed)
    t = np.arange(length) / 125.0
    rate = rng.uniform(0.9, 1.8, size=n)
    phase = rng.uniform(0, 2 * np.pi, size=n)
    wave = np.sin(2 * np.pi * rate[:, None] * t + phase[:, None])
    wave = wave + 0.4 * np.sin(4 * np.pi * rate[:, None] * t + 2 * phase[:, None])
    low, high = wave.min(axis=1, keepdims=True), wave.max(axis=1, keepdims=True)
    ppg = (2 * (wave - low) / (high - low) - 1).astype(np.float32)
    k = np.arange(timing.BEAT_SAMPLES) - timing.BEAT_PRE
    qrs, tail = np.exp(-0.5 * (k / 2.0) ** 2), np.exp(-0.5 * ((k - 35) / 8.0) ** 2)
    beat = (rng.uniform(-1, 1, (N_LEADS, 1)) * qrs + rng.uniform(-0.3, 0.3, (N_LEADS, 1)) * tail).astype(np.float32)
    six_leads = np.isin(np.arange(N_LEADS), [LEAD_INDEX[x] for x in ("I", "II", "V1", "V2", "V5", "V6")])
    upstrokes = np.full((n, 32), timing.UPSTROKE_PAD, dtype=np.int32)
    template = np.zeros((n, N_LEADS, length), dtype=np.float32)
    mask = np.zeros((n, N_LEADS), dtype=bool)
    for i in range(n):
        kind = i % 4
        period = 125.0 / rate[i]
        # Margins as `timing.upstroke_margin`: beats that start before the window still draw into it.
        found = np.arange(-timing.BEAT_POST + rng.uniform(0, period), length + 150, period).astype(np.int32)
        found = found[: upstrokes.shape[1]]
        if kind != 2:
            upstrokes[i, : len(found)] = found
        if kind in (0, 3):
            mask[i] = six_leads if kind == 0 else True
            rendered = timing.template_from_upstrokes(beat, found, 0.5, length)
            template[i] = timing.normalise_template(rendered, mask[i])
    inputs = {PPG: torch.from_numpy(ppg), TEMPLATE: torch.from_numpy(template),
              TEMPLATE_MASK: torch.from_numpy(mask)}
    if UPSTROKES in input_names(model):
        inputs[UPSTROKES] = torch.from_numpy(upstrokes)
    return inputs


def as_feed(inputs: dict[str, Tensor]) -> dict[str, np.ndarray]:
    """onnxruntime's feed: contiguous numpy arrays of the dtypes the graph declares."""
    dtypes = {PPG: np.float32, TEMPLATE: np.float32, TEMPLATE_MASK: np.bool_, UPSTROKES: np.int32}
    return {name: np.ascontiguousarray(value.cpu().numpy(), dtype=dtypes[name]) for name, value in inputs.items()}
