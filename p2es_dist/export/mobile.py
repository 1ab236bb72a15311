"""Mobile artefacts of a student: `model.onnx` and `model.pt` (TorchScript), each checked against the
PyTorch model before it goes into a bundle.

Both take `ppg` (batch, 1024) float32 in model space (min-max [-1, 1] per window) and return `ecg`
(batch, 12, 1024) in model space; the batch size is free. A student built with `use_template` also takes
`template`, `template_mask` and (with a training population) `upstrokes`, in that order (TorchScript:
positionally); `export.template_graph` documents them and how zero-shot works. `PPGOnly` builds the
rest of the Batch (models/base.py) the way a watch app would: PPG present, no recorded lead, unknown
demographics.

The ONNX export and its onnxruntime parity check live in `p2es_dist.export.onnx_io` (shared with
`p2es distill`, which exports anything with `forward_ppg`); TorchScript is traced here. Both are checked on windows
other than the ones they were traced with, and with another batch size (a template student: on calibrated,
zero-shot and upstroke-less windows).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from p2es_dist.constants import LABELS, N_LEADS, WINDOW
from p2es_dist.data.normalize import ppg_to_model_space
from p2es_dist.export import template_graph as tg

TOLERANCE = 1e-4  # max |PyTorch - exported| in model space; a bundle is refused above it
ONNX_OPSET = 17


class PPGOnly(nn.Module):
    """A TranslationModel as a function of PPG alone: (B, L) -> (B, 12, L), one forward pass."""

    def __init__(self, *, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ppg: Tensor) -> Tensor:
        if hasattr(self.model, "forward_ppg"):  # a student: its own PPG-only path, nothing else traced
            return self.model.forward_ppg(ppg)
        size, length = ppg.shape
        batch = {
            "ppg": ppg,
            "ppg_mask": torch.ones(size, dtype=torch.bool, device=ppg.device),
            "ecg": torch.zeros(size, N_LEADS, length, dtype=ppg.dtype, device=ppg.device),
            "ecg_mask": torch.zeros(size, N_LEADS, dtype=torch.bool, device=ppg.device),
            "age": torch.full((size,), float("nan"), dtype=ppg.dtype, device=ppg.device),
            "sex": torch.full((size,), -1, dtype=torch.int64, device=ppg.device),
            "labels": torch.zeros(size, len(LABELS), dtype=ppg.dtype, device=ppg.device),
            "subject": torch.zeros(size, dtype=torch.int64, device=ppg.device),
        }
        return self.model.generate(batch)

    def forward_ppg(self, ppg: Tensor) -> Tensor:  # what export.onnx_io exports
        return self(ppg)


def check_inputs(n_windows: int = 3, *, seed: int = 0) -> Tensor:
    """(n, 1024) PPG-like windows in model space: a pulse train at a random rate plus noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(WINDOW) / 125.0
    rate_hz = rng.uniform(0.8, 2.0, size=(n_windows, 1))
    phase = 2 * np.pi * rate_hz * t
    pulses = np.sin(phase) + 0.4 * np.sin(2 * phase + 0.8) + 0.05 * rng.standard_normal((n_windows, WINDOW))
    return torch.from_numpy(ppg_to_model_space(pulses))


def _reference(model: nn.Module, inputs: Tensor) -> np.ndarray:
    with torch.no_grad():
        return PPGOnly(model=model).eval()(inputs).numpy()


def _trace(wrapper: nn.Module, example: tuple[Tensor, ...], path: str | Path, checks: tuple[Tensor, ...]) -> np.ndarray:
    """Trace `wrapper` on `example`, save it to `path`, and run the reloaded file on `checks`."""
    # TorchScript is deprecated in favour of torch.export, but a student bundle ships model.pt (README
    # "Distillation, bundles, translation"; `bundle.py`), which
    # mobile runtimes (PyTorch Mobile / LibTorch) still load; the warnings would only clutter the CLI.
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.trace(wrapper, example, check_trace=False).save(str(path))
        return torch.jit.load(str(path))(*checks).numpy()


def export_torchscript(model: nn.Module, path: str | Path) -> float:
    """Trace `PPGOnly(model)` (a template student: `template_graph.CalibratedGraph`) to `path`; returns max
    |diff| of the reloaded file vs PyTorch.

    Traced with 2 windows and checked with 3 (a template student: 4, one of each kind of
    `template_graph.example_inputs`), so a batch size baked into the graph shows as an error.
    """
    if tg.takes_template(model):
        names = tg.input_names(model)
        example, checks = tg.example_inputs(model, 2, seed=1), tg.example_inputs(model, 4, seed=0)
        exported = _trace(tg.CalibratedGraph(model).eval(), tuple(example[n] for n in names), path,
                          tuple(checks[n] for n in names))
        with torch.no_grad():
            expected = model.eval()(tg.reference_batch(checks)).numpy()
        return float(np.max(np.abs(exported - expected)))
    inputs = check_inputs(3)
    exported = _trace(PPGOnly(model=model).eval(), (check_inputs(2, seed=1),), path, (inputs,))
    return float(np.max(np.abs(exported - _reference(model, inputs))))


def mobile_io(model: nn.Module) -> dict:
    """What config.json states about the mobile files' inputs and output."""
    inputs = tg.input_spec(model)
    io = {"input": inputs[0], "inputs": inputs,
          "output": {"name": "ecg", "shape": ["batch", N_LEADS, WINDOW], "dtype": "float32",
                     "space": "model space: 12 leads, one scale per window (no absolute amplitude)"}}
    if tg.takes_template(model):
        io["zero_shot"] = ("template_mask all false: " + (
            "the graph places its embedded training-population beat (pooled over sources, hedged by the "
            "population's PAT spread) at `upstrokes` minus the population PAT, as the PyTorch student does"
            if tg.has_population(model) else "the student sees an empty template (it has no training population)"))
    return io


def write_mobile_artefacts(model: nn.Module, folder: Path) -> dict:
    """`model.onnx` + `model.pt` in `folder`, verified; returns what config.json records about them.

    Raises RuntimeError when either differs from PyTorch by more than TOLERANCE.
    """
    from p2es_dist.export.onnx_io import export_onnx, onnx_max_abs_diff

    if tg.takes_template(model):
        export_onnx(model, folder / "model.onnx", opset=ONNX_OPSET)
        checks = tg.reference_batch(tg.example_inputs(model, 5, seed=2))  # not the traced windows
        onnx_diff = onnx_max_abs_diff(model, folder / "model.onnx", checks)
    else:
        wrapper = PPGOnly(model=model).eval()
        export_onnx(wrapper, folder / "model.onnx", opset=ONNX_OPSET)
        onnx_diff = onnx_max_abs_diff(wrapper, folder / "model.onnx", check_inputs(3))
    results = {"onnx": onnx_diff, "torchscript": export_torchscript(model, folder / "model.pt")}
    for name, diff in results.items():
        if not diff <= TOLERANCE:
            raise RuntimeError(f"{name} export differs from PyTorch by {diff:.3g} > {TOLERANCE:g}")
    io = mobile_io(model)
    return {
        "onnx": {"file": "model.onnx", "opset": ONNX_OPSET, "exporter": "p2es_dist.export.onnx_io",
                 "max_abs_diff": results["onnx"], "tolerance": TOLERANCE,
                 "checked_with": "onnxruntime CPUExecutionProvider", **io},
        "torchscript": {"file": "model.pt", "method": "torch.jit.trace", "max_abs_diff": results["torchscript"],
                        "tolerance": TOLERANCE, **io},
    }
