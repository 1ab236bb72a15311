"""ONNX export of a student and its parity check against PyTorch.

    path = export_onnx(student, "out/model.onnx")          # input `ppg` (B, L) float32 -> `ecg` (B, 12, L)
    diff = onnx_max_abs_diff(student, path, batch)         # max |torch - onnxruntime| on that batch

The graph takes model-space PPG (min-max [-1, 1] per window, `p2es_dist.data.normalize`) and returns
model-space ECG; the batch axis is dynamic, the window length is fixed by the export example (L = 1024).
A student built with `use_template` also takes `template`, `template_mask` and (with a training
population) `upstrokes`: `export.template_graph` says what each means and how zero-shot works.
torch's TorchScript-based exporter is used (`dynamo=False`): the dynamo exporter needs `onnxscript`,
which this project does not depend on.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from p2es_dist.constants import WINDOW
from p2es_dist.export import template_graph as tg
from p2es_dist.models.base import Batch

INPUT_NAME = "ppg"
OUTPUT_NAME = "ecg"


class PpgToEcg(nn.Module):
    """Wraps a model with `forward_ppg(ppg)` so the exported graph has one tensor in and one out."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if not hasattr(model, "forward_ppg"):
            raise TypeError(f"{type(model).__name__} has no forward_ppg(ppg): only PPG-only students export to ONNX")
        self.model = model

    def forward(self, ppg: Tensor) -> Tensor:
        return self.model.forward_ppg(ppg)


def example_ppg(n: int = 2, length: int = WINDOW, *, seed: int = 0) -> Tensor:
    """(n, length) PPG-like inputs in [-1, 1]: a pulse train at 60-100 bpm with its harmonic."""
    generator = torch.Generator().manual_seed(seed)
    t = torch.arange(length, dtype=torch.float32) / 125.0
    rate = 1.0 + 0.67 * torch.rand(n, 1, generator=generator)
    phase = 6.28 * torch.rand(n, 1, generator=generator)
    wave = torch.sin(6.283 * rate * t + phase) + 0.4 * torch.sin(12.566 * rate * t + 2 * phase)
    low, high = wave.amin(dim=1, keepdim=True), wave.amax(dim=1, keepdim=True)
    return 2 * (wave - low) / (high - low) - 1


def export_onnx(model: nn.Module, path: str | Path, *, opset: int = 17, length: int = WINDOW) -> Path:
    """Write `model` (anything with `forward_ppg`) as ONNX at `path`; returns the path.

    Inputs: `tg.input_names(model)` (`ppg`, plus the template inputs for a student with `use_template`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = tg.input_names(model)
    if tg.takes_template(model):
        wrapper: nn.Module = tg.CalibratedGraph(model).eval()
        example = tg.example_inputs(model, 2, length=length)
        args = tuple(example[name] for name in names)
    else:
        wrapper, args = PpgToEcg(model).eval(), (example_ppg(2, length),)
    axes = {name: {0: "batch"} for name in [*names, OUTPUT_NAME]}
    if tg.UPSTROKES in axes:
        axes[tg.UPSTROKES][1] = "upstrokes"
    with torch.no_grad():
        torch.onnx.export(wrapper, args, str(path), opset_version=opset, dynamo=False,
                          input_names=names, output_names=[OUTPUT_NAME], dynamic_axes=axes)
    return path


def onnx_session(path: str | Path, *, threads: int = 1):
    """An onnxruntime CPU session with `threads` intra-op threads and sequential execution."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def run_onnx(session, ppg: np.ndarray, extra: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """The graph's `ecg` for `ppg` (and `extra` inputs by name); a template graph's inputs not given are
    those of a window without calibration (empty template, no upstroke)."""
    feed = {INPUT_NAME: np.ascontiguousarray(ppg, dtype=np.float32), **(extra or {})}
    missing = [i.name for i in session.get_inputs() if i.name not in feed]
    if missing:
        n, length = feed[INPUT_NAME].shape
        feed.update(tg.as_feed(tg.uncalibrated(missing, n, length)))
    return session.run([OUTPUT_NAME], feed)[0]


def _ppg_of(batch: Batch | Tensor) -> Tensor:
    """The PPG the student sees: a raw (B, L) tensor, or a Batch's PPG zeroed where absent."""
    if isinstance(batch, Tensor):
        return batch.float()
    present = batch["ppg_mask"].to(batch["ppg"].dtype)[:, None]
    return (batch["ppg"] * present).float()


def onnx_max_abs_diff(model: nn.Module, onnx_path: str | Path, batch: Batch | Tensor) -> float:
    """Max |PyTorch - onnxruntime| over the batch's outputs (a Batch dict or a (B, L) PPG tensor).

    A template student is compared on the windows with PPG, each with its own template, mask and
    upstrokes where the batch has them (none for a bare tensor), against `Student.forward`."""
    if tg.takes_template(model):
        inputs = tg.graph_inputs(model, batch)
        with torch.no_grad():
            expected = model.eval()(tg.reference_batch(inputs)).numpy()
        actual = onnx_session(onnx_path).run([OUTPUT_NAME], tg.as_feed(inputs))[0]
        return float(np.abs(expected - actual).max())
    ppg = _ppg_of(batch)
    with torch.no_grad():
        expected = model.eval().forward_ppg(ppg).numpy()
    actual = run_onnx(onnx_session(onnx_path), ppg.numpy())
    return float(np.abs(expected - actual).max())
