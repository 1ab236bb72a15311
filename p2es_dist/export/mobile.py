"""Mobile artefacts of a PPG-only student: `model.onnx` and `model.pt` (TorchScript), each checked
against the PyTorch model before it goes into a bundle.

Both take one input, `ppg` (batch, 1024) float32 in model space (min-max [-1, 1] per window), and
return `ecg` (batch, 12, 1024) in model space; the batch size is free. `PPGOnly` builds the rest of
the Batch (models/base.py) the way a watch app would: PPG present, no recorded lead, unknown
demographics.

The ONNX export and its onnxruntime parity check live in `p2es_dist.export.onnx_io` (shared with
`p2es distill`, which exports anything with `forward_ppg`); TorchScript is traced here. Both are checked on windows
other than the ones they were traced with, and with another batch size.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from p2es_dist.constants import LABELS, N_LEADS, WINDOW
from p2es_dist.data.normalize import ppg_to_model_space

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


def export_torchscript(model: nn.Module, path: str | Path) -> float:
    """Trace `PPGOnly(model)` to `path`; returns max |diff| of the reloaded file vs PyTorch.

    Traced with 2 windows and checked with 3, so a batch size baked into the graph shows as an error.
    """
    wrapper = PPGOnly(model=model).eval()
    inputs = check_inputs(3)
    # TorchScript is deprecated in favour of torch.export, but a student bundle ships model.pt (README
    # "Distillation, bundles, translation"; `bundle.py`), which
    # mobile runtimes (PyTorch Mobile / LibTorch) still load; the warnings would only clutter the CLI.
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.trace(wrapper, (check_inputs(2, seed=1),), check_trace=False).save(str(path))
        exported = torch.jit.load(str(path))(inputs).numpy()
    return float(np.max(np.abs(exported - _reference(model, inputs))))


def write_mobile_artefacts(model: nn.Module, folder: Path) -> dict:
    """`model.onnx` + `model.pt` in `folder`, verified; returns what config.json records about them.

    Raises RuntimeError when either differs from PyTorch by more than TOLERANCE.
    """
    from p2es_dist.export.onnx_io import export_onnx, onnx_max_abs_diff

    wrapper = PPGOnly(model=model).eval()
    export_onnx(wrapper, folder / "model.onnx", opset=ONNX_OPSET)
    results = {"onnx": onnx_max_abs_diff(wrapper, folder / "model.onnx", check_inputs(3)),
               "torchscript": export_torchscript(model, folder / "model.pt")}
    for name, diff in results.items():
        if not diff <= TOLERANCE:
            raise RuntimeError(f"{name} export differs from PyTorch by {diff:.3g} > {TOLERANCE:g}")
    io = {"input": {"name": "ppg", "shape": ["batch", WINDOW], "dtype": "float32",
                    "space": "PPG min-max scaled to [-1, 1] per window, 125 Hz"},
          "output": {"name": "ecg", "shape": ["batch", N_LEADS, WINDOW], "dtype": "float32",
                     "space": "model space: 12 leads, one scale per window (no absolute amplitude)"}}
    return {
        "onnx": {"file": "model.onnx", "opset": ONNX_OPSET, "exporter": "p2es_dist.export.onnx_io",
                 "max_abs_diff": results["onnx"], "tolerance": TOLERANCE,
                 "checked_with": "onnxruntime CPUExecutionProvider", **io},
        "torchscript": {"file": "model.pt", "method": "torch.jit.trace", "max_abs_diff": results["torchscript"],
                        "tolerance": TOLERANCE, **io},
    }
