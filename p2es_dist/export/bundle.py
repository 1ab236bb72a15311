"""`write_bundle`: a checkpoint -> a publishable bundle (README "Distillation, bundles, translation"), read back
by `p2es_dist.models.checkpoint.load_model`.

    model.safetensors   fp32 weights, no pickle (`checkpoint.encode_weights`, the writer every checkpoint uses)
    config.json         format, kind, the `model:` section, preprocessing, generation settings (stochastic
                        models), mobile-file checks, source checkpoint, weights sha256
    MODEL_CARD.md       generated from metrics.json and the training run (export.model_card)
    metrics.json        the evaluation's metrics.json, copied byte for byte ({"evaluated": false} without one)
    model.onnx, model.pt   students only: PPG -> 12 leads, checked against PyTorch (export.mobile)
    thresholds.json     classifiers only, when fitted (`p2es thresholds`): per-label validation thresholds
    SHA256SUMS          `<sha256>  <file>` for every other file, written last (`checkpoint.format_sums`)

The bundle is assembled in a hidden folder beside `out`, loaded back and compared with the source
model, then renamed into place, so a half-written bundle never appears under `out`. On S3, where
nothing renames, the files are uploaded with SHA256SUMS last: until it lands, `load_pretrained` refuses
the folder.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from p2es_dist.constants import FS, LABELS, LEADS, WINDOW
from p2es_dist.data.preprocess import PreprocessConfig
from p2es_dist.errors import UserError
from p2es_dist.export.model_card import FROM_DEFAULTS, FROM_MANIFESTS, describe_data, render_model_card
from p2es_dist.models import checkpoint as ckpt
from p2es_dist.models.base import GenerationOptions
from p2es_dist.storage import uri as uri_lib

log = logging.getLogger(__name__)

BUNDLE_FORMAT_VERSION = 1
KINDS = ("teacher", "student", "baseline", "encoder", "classifier")
_KIND_OF_MODEL = {"p2es": "teacher", "student": "student", "encoder": "encoder", "classifier": "classifier"}
CARD = "MODEL_CARD.md"
METRICS = "metrics.json"
THRESHOLDS = "thresholds.json"  # a classifier's validation thresholds (evaluate/thresholds.py THRESHOLDS_FILE)
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


class TrainingDataUnreadable(UserError):
    """The training data's manifests or shards cannot be read (--preprocessing-from-defaults falls back)."""


# What translate and calibrate take from a bundle as one value for all the training data (`preprocess_config`,
# the 125 Hz / 1024-sample framing): training folders that disagree on one have no single answer to record.
AGREED = ("fs", "window", "ppg_band_hz", "ecg_band_hz", "filter_order", "max_gap_s", "flat_s")
_STATED = (*AGREED, "hop")


def read_manifests(uris: list[str], *, checkpoint: str) -> dict[str, dict[str, Any]]:
    """manifest.json of each training folder; TrainingDataUnreadable when the data is unknown or unreachable."""
    if not uris:
        raise TrainingDataUnreadable(
            f"--checkpoint {checkpoint}: no result.json beside it names the training data (config.data.uris), so "
            "the bundle cannot state the preprocessing the model was trained with; pass --train-result <the "
            "training run's result.json>")
    manifests = {}
    for uri in uris:
        manifest = uri_lib.join(uri, "manifest.json")
        # Without a configured endpoint an s3:// URI would be looked up on AWS itself.
        if uri_lib.is_s3(uri) and not uri_lib.endpoint():
            raise TrainingDataUnreadable(f"training data {uri}: no S3 endpoint configured to read its manifest.json")
        try:
            with uri_lib.storage_errors(manifest):
                if not uri_lib.exists(manifest):
                    raise TrainingDataUnreadable(f"training data {uri}: no manifest.json there (moved or deleted?)")
                manifests[uri] = json.loads(uri_lib.read_text(manifest))
        except ValueError as exc:
            raise TrainingDataUnreadable(f"training data {manifest}: not valid JSON ({exc})") from None
        except TrainingDataUnreadable:
            raise
        except UserError as exc:  # storage failures, already one line
            raise TrainingDataUnreadable(str(exc)) from None
    return manifests


def ingested_settings(uri: str, manifest: dict[str, Any]) -> dict[str, Any]:
    """The preprocessing one folder was ingested with: its manifest's fs, window and config.preprocess."""
    stated = {**((manifest.get("config") or {}).get("preprocess") or {}),
              "fs": manifest.get("fs"), "window": manifest.get("window")}
    missing = [key for key in _STATED if stated.get(key) is None]
    if missing:
        raise TrainingDataUnreadable(f"training data {uri}: manifest.json states no {', '.join(missing)} (not "
                                     "written by `p2es ingest`, or by an older one: re-ingest it)")
    settings: dict[str, Any] = {key: [float(f) for f in stated[key]] if key.endswith("_band_hz") else stated[key]
                                for key in _STATED}
    settings.update(fs=int(settings["fs"]), window=int(settings["window"]), hop=int(settings["hop"]),
                    filter_order=int(settings["filter_order"]), max_gap_s=float(settings["max_gap_s"]),
                    flat_s=float(settings["flat_s"]))
    return settings


def _has_ppg(manifest: dict[str, Any]) -> bool:
    # Ingest writes units {"ppg": None} for ECG-only corpora; a manifest without units may hold PPG.
    units = manifest.get("units")
    return not isinstance(units, dict) or "ppg" not in units or units["ppg"] is not None


def agreed_settings(manifests: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One value per AGREED field over the training folders (the PPG band over those holding PPG); UserError
    naming the folders and their values where they disagree."""
    settings = {uri: ingested_settings(uri, manifest) for uri, manifest in manifests.items()}
    with_ppg = [uri for uri, manifest in manifests.items() if _has_ppg(manifest)] or list(manifests)
    agreed: dict[str, Any] = {}
    for key in AGREED:
        folders = with_ppg if key == "ppg_band_hz" else list(settings)
        values: dict[str, list[str]] = {}
        for uri in folders:
            values.setdefault(json.dumps(settings[uri][key]), []).append(uri)
        if len(values) > 1:
            found = "; ".join(f"{', '.join(uris)}: {value}" for value, uris in values.items())
            raise UserError(f"training data disagree on {key} ({found}); a bundle states one preprocessing for "
                            "translate: re-ingest the folders with the same settings")
        agreed[key] = settings[folders[0]][key]
    if (agreed["fs"], agreed["window"]) != (FS, WINDOW):
        raise UserError(f"training data ingested at {agreed['fs']} Hz in {agreed['window']}-sample windows; this "
                        f"package translates at {FS} Hz in {WINDOW}-sample windows")
    hops = {s["hop"] for s in settings.values()}
    agreed["hop"] = hops.pop() if len(hops) == 1 else None  # training overlap only: translate takes --hop
    return agreed


def preprocessing(settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """The bundle's `preprocessing`: the training data's agreed settings, or ingest's defaults when None."""
    if settings is None:
        pre = PreprocessConfig()
        settings = {"fs": FS, "window": WINDOW, "ppg_band_hz": list(pre.ppg_band_hz),
                    "ecg_band_hz": list(pre.ecg_band_hz), "filter_order": pre.filter_order,
                    "max_gap_s": pre.max_gap_s, "flat_s": pre.flat_s, "hop": pre.hop}
        origin = FROM_DEFAULTS
    else:
        origin = FROM_MANIFESTS
    band = settings["ppg_band_hz"]
    return {
        "fs": settings["fs"], "window": settings["window"], "leads": list(LEADS), "units": "mV",
        "ppg": f"resampled to {settings['fs']} Hz, band-pass {band[0]:g}-{band[1]:g} Hz (Butterworth order "
               f"{settings['filter_order']}, zero phase), min-max scaled to [-1, 1] per window",
        "ecg": f"{len(LEADS)} leads divided together by one factor per window (max |x| over recorded leads); "
               "multiply by that factor to get mV back (generated ECG has no absolute scale)",
        **{key: settings[key] for key in ("ppg_band_hz", "ecg_band_hz", "filter_order", "max_gap_s", "flat_s",
                                          "hop")},
        "ecg_scale_mv": ECG_SCALE_MV, "from": origin,
    }


def label_vocabulary(uris: list[str] | None, *, note: str = "the training data was not read") -> dict[str, Any]:
    """The bundle's `labels`: the package's vocabulary (the order of label outputs) and, per label, the train
    windows of the training data that carry it (None, with `note`, when `uris` is None)."""
    if uris is None:
        return {"vocabulary": list(LABELS), "train_windows": None,
                "note": f"{note}: which labels the training data holds is unknown"}
    import pyarrow.compute as pc

    from p2es_dist.data.read import read_table

    try:
        table = read_table(uris, ["labels"], split="train", option="training data")
    except (UserError, OSError) as exc:
        raise TrainingDataUnreadable(f"training data shards: {exc}") from None
    counts = {str(row["values"]): int(row["counts"])
              for row in pc.value_counts(pc.list_flatten(table["labels"])).to_pylist()}
    order = [label for label in LABELS if label in counts] + sorted(set(counts) - set(LABELS))
    return {"vocabulary": list(LABELS), "train_windows": {label: counts[label] for label in order}}


def generation_settings(model: torch.nn.Module, metrics: dict[str, Any] | None) -> dict[str, Any] | None:
    """Sampler settings of a stochastic model: those the evaluation used, else the model's defaults.

    None for a deterministic model, and for models that do not generate (encoder, classifier).
    """
    if not getattr(model, "stochastic", False):
        return None
    settings = model.generation_options(GenerationOptions()).as_dict()
    settings.update({k: v for k, v in ((metrics or {}).get("generation") or {}).items() if k in settings})
    return settings


def from_training_data(uris: list[str], *, checkpoint: str, fallback: bool
                       ) -> tuple[dict[str, dict[str, Any]], dict[str, Any] | None, dict[str, Any]]:
    """(manifests, agreed settings, labels) of the training data; with `fallback`, what cannot be read is
    replaced by ingest's defaults and the package's vocabulary ({} and None for unread manifests)."""
    def refuse(exc: TrainingDataUnreadable) -> UserError:
        return UserError(f"{exc}; or pass --preprocessing-from-defaults to state ingest's defaults, which "
                         "translate then applies whatever the data was ingested with")

    try:
        manifests = read_manifests(uris, checkpoint=checkpoint)
        settings = agreed_settings(manifests)
    except TrainingDataUnreadable as exc:
        if not fallback:
            raise refuse(exc) from None
        return {}, None, label_vocabulary(None)
    try:
        labels = label_vocabulary(uris)
    except TrainingDataUnreadable as exc:
        if not fallback:
            raise refuse(exc) from None
        labels = label_vocabulary(None, note=f"the training shards could not be read ({exc})")
    return manifests, settings, labels


def classifier_thresholds(loaded, *, bundle_digest: str) -> dict[str, bytes]:
    """The classifier's validation thresholds (`p2es thresholds`, `evaluate/thresholds.py`) re-keyed to the
    bundle's weights, so the bundle carries them under SHA256SUMS; {} when the checkpoint has none or
    they were fitted for other weights."""
    if not hasattr(loaded.model, "predict_proba"):
        return {}
    source = uri_lib.join(loaded.uri, THRESHOLDS)
    if not uri_lib.exists(source):
        log.warning("bundle without %s: the classifier has none (`p2es thresholds --classifier %s`)",
                    THRESHOLDS, loaded.uri)
        return {}
    document = json.loads(uri_lib.read_text(source))
    if document.get("classifier_digest") != loaded.digest:
        log.warning("bundle without %s: %s was fitted for other weights", THRESHOLDS, source)
        return {}
    # The bundle re-serialises the same fp32 tensors, so the same thresholds hold for its weights file.
    document.update(classifier_digest=bundle_digest, fitted_for_digest=loaded.digest)
    return {THRESHOLDS: (json.dumps(document, indent=2) + "\n").encode()}


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
                 kind: str | None = None, train_result: str | None = None, overwrite: bool = False,
                 preprocessing_from_defaults: bool = False) -> dict[str, Any]:
    """Export `checkpoint` (any URI `load_model` reads) as a bundle at `out`; returns a summary.

    The bundle's preprocessing and labels come from the training data (`config.data.uris` of the run's
    result.json): its manifests and shards. Where those cannot be read, export refuses unless
    `preprocessing_from_defaults`, which states ingest's defaults instead, marked as such.
    """
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
    manifests, settings, labels = from_training_data(uris, checkpoint=checkpoint,
                                                     fallback=preprocessing_from_defaults)
    training = describe_data(uris, manifests=manifests)
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
            "kind": kind, "model": model_config, "preprocessing": preprocessing(settings),
            "labels": labels,
            **({"generation": gen} if (gen := generation_settings(loaded.model, metrics_dict)) else {}),
            "source_checkpoint": loaded.uri, "source_weights_sha256": loaded.digest,
            "weights_sha256": ckpt.sha256_bytes(weights), "parameters": count_parameters(loaded.model),
            "evaluated": metrics_dict is not None, "training_data": training,
            **({"mobile": mobile} if mobile else {}),
        }
        card = render_model_card(config, metrics=metrics_dict, training=training, training_origin=origin)
        extra = classifier_thresholds(loaded, bundle_digest=config["weights_sha256"])
        _stage(staging, {ckpt.WEIGHTS: weights, ckpt.BUNDLE_CONFIG: json.dumps(config, indent=2).encode(),
                         CARD: card.encode(), METRICS: metrics_raw, **extra})
        (staging / ckpt.SUMS).write_bytes(_sums(staging))
        _check_round_trip(staging, loaded.model)
        files = sorted(p.name for p in staging.iterdir())
        _publish(staging, out, overwrite=overwrite)
    summary = {"bundle": out, "kind": kind, "model": loaded.name, "files": files, "evaluated": metrics is not None,
               "weights_sha256": config["weights_sha256"], "training_data": [r["source"] for r in training],
               "preprocessing_from": config["preprocessing"]["from"]}
    if mobile:
        summary.update({f"{name}_max_abs_diff": m["max_abs_diff"] for name, m in mobile.items()})
    return summary
