"""`write_bundle`: a checkpoint -> a publishable bundle (README "Distillation, bundles, translation"), read back
by `p2es_dist.models.checkpoint.load_model`.

    model.safetensors   fp32 weights, no pickle (`checkpoint.encode_weights`, the writer every checkpoint uses)
    config.json         format, kind, the `model:` section, preprocessing, generation settings (stochastic
                        models), mobile-file checks, source checkpoint, weights sha256
    MODEL_CARD.md       generated from metrics.json and the training run (export.model_card)
    metrics.json        the evaluation's metrics.json, copied byte for byte ({"evaluated": false} without one)
    model.onnx, model.pt   students only: PPG -> 12 leads, checked against PyTorch (export.mobile)
    SHA256SUMS          `<sha256>  <file>` for every other file, written last (`checkpoint.format_sums`)

The bundle is assembled in a hidden folder beside `out`, loaded back and compared with the source
model, then renamed into place, so a half-written bundle never appears under `out`. On S3, where
nothing renames, the files are uploaded with SHA256SUMS last: until it lands, `load_pretrained` refuses
the folder.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from p2es_dist.constants import FS, LEADS, WINDOW
from p2es_dist.data.preprocess import PreprocessConfig
from p2es_dist.errors import UserError
from p2es_dist.export.model_card import describe_data, render_model_card
from p2es_dist.models import checkpoint as ckpt
from p2es_dist.models.base import GenerationOptions
from p2es_dist.storage import uri as uri_lib

BUNDLE_FORMAT_VERSION = 1
KINDS = ("teacher", "student", "baseline", "encoder", "classifier")
_KIND_OF_MODEL = {"p2es": "teacher", "student": "student", "encoder": "encoder", "classifier": "classifier"}
CARD = "MODEL_CARD.md"
METRICS = "metrics.json"
ECG_SCALE_MV = 1.0  # translate's default mV per model unit: a convention, stated as such


def kind_of(model_name: str) -> str:
    """The bundle kind a registered model publishes as by default (everything else is a baseline)."""
    return _KIND_OF_MODEL.get(model_name, "baseline")


def read_metrics(path: str) -> tuple[dict[str, Any], bytes]:
    """A metrics.json from `p2es evaluate` -> (parsed, raw bytes to copy)."""
    with uri_lib.storage_errors(path):
        if not uri_lib.exists(path):
            raise UserError(f"--metrics {path}: no such file (expected the metrics.json of `p2es evaluate`)")
        raw = uri_lib.read_bytes(path)
    try:
        metrics = json.loads(raw)
    except ValueError as exc:
        raise UserError(f"--metrics {path}: not valid JSON ({exc})") from None
    # Generators are evaluated on signals ('spaces'); encoders by `p2es evaluate --probe` ('probe').
    if not isinstance(metrics, dict) or not ("spaces" in metrics or "probe" in metrics):
        raise UserError(f"--metrics {path}: expected the metrics.json of `p2es evaluate` (an object with 'spaces', "
                        "or with 'probe' for an encoder)")
    return metrics, raw


def training_uris(checkpoint: str, train_result: str | None) -> tuple[list[str], str | None]:
    """The training run's `config.data.uris` and the result.json they came from ([] and None when unknown)."""
    candidates = [train_result] if train_result else []
    if not train_result:
        if checkpoint.endswith(".json"):
            candidates.append(checkpoint)
        else:
            candidates.append(uri_lib.join(checkpoint, "result.json"))
    for candidate in candidates:
        with uri_lib.storage_errors(candidate):
            if not uri_lib.exists(candidate):
                if train_result:
                    raise UserError(f"--train-result {candidate}: no such file")
                continue
            summary = json.loads(uri_lib.read_text(candidate))
        uris = ((summary.get("config") or {}).get("data") or {}).get("uris")
        if uris:
            return [str(u) for u in ([uris] if isinstance(uris, str) else uris)], candidate
        if train_result:
            raise UserError(f"--train-result {candidate}: has no config.data.uris (expected a train/distill "
                            "result.json)")
    return [], None


def fp32_weights(model: torch.nn.Module, model_config: dict[str, Any]) -> bytes:
    """The state dict as safetensors bytes, floating tensors in fp32 (the checkpoints' writer, bundle format)."""
    return ckpt.encode_weights(model, model_config, format=ckpt.BUNDLE_FORMAT)


def preprocessing() -> dict[str, Any]:
    pre = PreprocessConfig()
    return {
        "fs": FS, "window": WINDOW, "leads": list(LEADS), "units": "mV",
        "ppg": f"resampled to {FS} Hz, band-pass {pre.ppg_band_hz[0]}-{pre.ppg_band_hz[1]} Hz (Butterworth order "
               f"{pre.filter_order}, zero phase), min-max scaled to [-1, 1] per window",
        "ecg": f"{len(LEADS)} leads divided together by one factor per window (max |x| over recorded leads); "
               "multiply by that factor to get mV back (generated ECG has no absolute scale)",
        "ppg_band_hz": list(pre.ppg_band_hz), "ecg_band_hz": list(pre.ecg_band_hz),
        "filter_order": pre.filter_order, "max_gap_s": pre.max_gap_s, "hop": pre.hop,
        "ecg_scale_mv": ECG_SCALE_MV,
    }


def generation_settings(model: torch.nn.Module, metrics: dict[str, Any] | None) -> dict[str, Any] | None:
    """Sampler settings of a stochastic model: those the evaluation used, else the model's defaults.

    None for a deterministic model, and for models that do not generate (encoder, classifier).
    """
    if not getattr(model, "stochastic", False):
        return None
    settings = model.generation_options(GenerationOptions()).as_dict()
    settings.update({k: v for k, v in ((metrics or {}).get("generation") or {}).items() if k in settings})
    return settings


def _stage(folder: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        (folder / name).write_bytes(data)


def _sums(folder: Path) -> bytes:
    files = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and p.name != ckpt.SUMS}
    return ckpt.format_sums(files).encode()


def _check_round_trip(folder: Path, model: torch.nn.Module) -> None:
    """The staged bundle loads with `load_model` and holds exactly the source model's weights."""
    loaded = ckpt.load_model(str(folder)).model.state_dict()
    for name, tensor in model.state_dict().items():
        if not torch.equal(loaded[name], tensor.to(loaded[name].dtype)):
            raise RuntimeError(f"bundle round trip changed {name}")


def _publish(staging: Path, out: str, *, overwrite: bool) -> None:
    if uri_lib.is_s3(out):
        if uri_lib.exists(uri_lib.join(out, ckpt.SUMS)) and not overwrite:
            raise UserError(f"--out {out}: a bundle is already there (pass --overwrite to replace it)")
        for path in sorted(staging.iterdir(), key=lambda p: p.name == ckpt.SUMS):  # sums last
            uri_lib.write_bytes_atomic(uri_lib.join(out, path.name), path.read_bytes())
        return
    target = Path(out.removeprefix("file://"))
    old = None
    if target.exists():
        if not overwrite:
            raise UserError(f"--out {out}: already exists (pass --overwrite to replace it)")
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
    os.replace(staging, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_bundle(checkpoint: str, out: str, *, metrics: str | None = None, no_metrics: bool = False,
                 kind: str | None = None, train_result: str | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Export `checkpoint` (any URI `load_model` reads) as a bundle at `out`; returns a summary."""
    from p2es_dist import __version__
    from p2es_dist.export.mobile import write_mobile_artefacts
    from p2es_dist.models.base import count_parameters

    if metrics is None and not no_metrics:
        raise UserError("--metrics: required (the metrics.json of `p2es evaluate` on this model); pass "
                        "--no-metrics to publish an unevaluated model, which the card then says in bold")
    if metrics is not None and no_metrics:
        raise UserError("--metrics and --no-metrics: give one or the other")
    if kind is not None and kind not in KINDS:
        raise UserError(f"--kind: expected one of {', '.join(KINDS)}, got {kind!r}")
    metrics_dict, metrics_raw = read_metrics(metrics) if metrics else (None, b'{"evaluated": false}\n')
    loaded = ckpt.load_model(checkpoint)
    kind = kind or kind_of(loaded.name)
    if kind == "student" and getattr(loaded.model, "stochastic", False):
        raise UserError(f"--kind student: model {loaded.name!r} samples iteratively; a mobile student is one "
                        "forward pass from PPG (distill it first with `p2es distill`)")
    model_config = dict(loaded.model_config)
    if model_config.get("init_weights"):  # a training-time pointer to other weights; the bundle has its own
        model_config["init_weights"] = None
    uris, origin = training_uris(checkpoint, train_result)
    training = describe_data(uris)
    weights = fp32_weights(loaded.model, model_config)

    staging_parent = None if uri_lib.is_s3(out) else Path(out.removeprefix("file://")).resolve().parent
    if staging_parent is not None:
        staging_parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=staging_parent, prefix=".bundle-") as scratch:
        staging = Path(scratch) / "bundle"
        staging.mkdir()
        mobile = None
        if kind == "student":
            try:
                mobile = write_mobile_artefacts(loaded.model, staging)
            except RuntimeError as exc:
                raise UserError(f"--checkpoint {checkpoint}: {exc}; not publishing a mobile model that "
                                "disagrees with its weights") from None
        config = {
            "format": ckpt.BUNDLE_FORMAT, "format_version": BUNDLE_FORMAT_VERSION, "package_version": __version__,
            "kind": kind, "model": model_config, "preprocessing": preprocessing(),
            **({"generation": gen} if (gen := generation_settings(loaded.model, metrics_dict)) else {}),
            "source_checkpoint": loaded.uri, "source_weights_sha256": loaded.digest,
            "weights_sha256": ckpt.sha256_bytes(weights), "parameters": count_parameters(loaded.model),
            "evaluated": metrics_dict is not None, "training_data": training,
            **({"mobile": mobile} if mobile else {}),
        }
        card = render_model_card(config, metrics=metrics_dict, training=training, training_origin=origin)
        _stage(staging, {ckpt.WEIGHTS: weights, ckpt.BUNDLE_CONFIG: json.dumps(config, indent=2).encode(),
                         CARD: card.encode(), METRICS: metrics_raw})
        (staging / ckpt.SUMS).write_bytes(_sums(staging))
        _check_round_trip(staging, loaded.model)
        files = sorted(p.name for p in staging.iterdir())
        _publish(staging, out, overwrite=overwrite)
    summary = {"bundle": out, "kind": kind, "model": loaded.name, "files": files, "evaluated": metrics is not None,
               "weights_sha256": config["weights_sha256"], "training_data": [r["source"] for r in training]}
    if mobile:
        summary.update({f"{name}_max_abs_diff": m["max_abs_diff"] for name, m in mobile.items()})
    return summary
