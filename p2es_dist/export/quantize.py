"""int8 weights for the student's ONNX graph: each large initializer stored as int8 plus one scale per
output row, restored at load time by a `DequantizeLinear` node (weight-only, symmetric, per-axis).

    quantize_int8("model.onnx", "model.int8.onnx")      # ~4x smaller weights; arithmetic stays fp32

Why weight-only rather than `onnxruntime.quantization.quantize_dynamic/static`: on this graph the
dynamic quantiser leaves the transposed convolutions (the generation layer holds 40 % of the weights)
in fp32 and duplicates the recursively shared FEM/FTM weights per use, so the file grows; the static
QDQ quantiser also quantises activations and costs 0.07 in output error. Storage is the constraint on
a watch, so this keeps the compute in fp32 and only shrinks what is stored; the output error it costs is
what `p2es bench infer` reports as `int8_max_abs_diff`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from p2es_dist.export.template_graph import CONSTANT_PREFIX

MIN_ELEMENTS = 256  # smaller tensors (biases, norm affines) stay fp32: they are a few hundred bytes in all
# A template student's embedded population beat (`export.template_graph`) is a signal the graph adds to its
# input, not a layer's weights: it stays fp32 (1,200 values), so int8 changes only what weights do.
KEEP_PREFIXES = (CONSTANT_PREFIX,)


def _quantize_rows(weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per row of axis 0: (int8 tensor, fp32 scales of shape (rows,))."""
    rows = weights.reshape(weights.shape[0], -1)
    scale = np.abs(rows).max(axis=1) / 127.0
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)  # an all-zero row dequantises to zeros anyway
    shape = (-1,) + (1,) * (weights.ndim - 1)
    quantized = np.clip(np.rint(weights / scale.reshape(shape)), -127, 127).astype(np.int8)
    return quantized, scale


def quantize_int8(source: str | Path, target: str | Path, *, min_elements: int = MIN_ELEMENTS,
                  keep_prefixes: tuple[str, ...] = KEEP_PREFIXES) -> Path:
    """Write an int8-weight copy of the ONNX model at `source` to `target`; returns `target`.

    Initializers whose name starts with one of `keep_prefixes` stay fp32."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(source))
    graph = model.graph
    kept, dequantize_nodes = [], []
    for initializer in graph.initializer:
        weights = numpy_helper.to_array(initializer)
        if (weights.dtype != np.float32 or weights.ndim < 2 or weights.size < min_elements
                or initializer.name.startswith(keep_prefixes)):
            kept.append(initializer)
            continue
        quantized, scale = _quantize_rows(weights)
        name = initializer.name
        kept += [numpy_helper.from_array(quantized, f"{name}_int8"),
                 numpy_helper.from_array(scale, f"{name}_scale"),
                 numpy_helper.from_array(np.zeros_like(scale, dtype=np.int8), f"{name}_zero")]
        dequantize_nodes.append(helper.make_node(
            "DequantizeLinear", [f"{name}_int8", f"{name}_scale", f"{name}_zero"], [name],
            name=f"dequantize/{name}", axis=0))
    del graph.initializer[:]
    graph.initializer.extend(kept)
    nodes = dequantize_nodes + list(graph.node)  # dequantisation first keeps the graph topologically sorted
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.checker.check_model(model)
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(target))
    return target
