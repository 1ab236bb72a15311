"""Checkpoints and bundles' weights: the one writer and the one reader of the format, and `load_model`.

    from p2es_dist import load_pretrained
    model = load_pretrained("bundles/p2es-student")          # a published bundle (sums verified)

    loaded = load_model("s3://p2es/runs/p2es-.../step-00001000")  # a training checkpoint
    loaded.model, loaded.model_config, loaded.digest

    save_checkpoint(model, {"name": "student", ...}, "runs/x/pruned")   # model.safetensors + model.json

Two layouts are understood:

- **checkpoint** (what `p2es train`, `pretrain` and `distill` leave beside each final DeepSpeed
  checkpoint, all through `save_checkpoint`): `model.safetensors` (fp32) + `model.json` (the config's
  `model:` section). A job's `--out` folder or its `result.json` also work: their `checkpoint` field is
  followed.
- **bundle** (`p2es export`, `p2es_dist/export/bundle.py`; README "Distillation, bundles, translation"):
  `model.safetensors` (`encode_weights`), `config.json` (`model` section plus preprocessing),
  `SHA256SUMS` (`format_sums`). Every file the sums list is checked before anything is read.

Weights are safetensors and configs JSON, so loading never runs code from the files. `read_weights` is
the only place safetensors are decoded, `encode_weights` the only place they are encoded.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from p2es_dist.errors import UserError
from p2es_dist.storage import uri as uri_lib

WEIGHTS = "model.safetensors"
CHECKPOINT_CONFIG = "model.json"
BUNDLE_CONFIG = "config.json"
SUMS = "SHA256SUMS"
BUNDLE_FORMAT = "p2es-dist-bundle"
WEIGHTS_FORMAT = "p2es-dist"  # safetensors header `format` of a checkpoint's weights (a bundle's: BUNDLE_FORMAT)
# What a bundle may make us read into memory: far above the models this project trains, far below what
# would exhaust a worker; a bigger (or endless) file is refused before it is read.
MAX_BUNDLE_FILE_BYTES = 4 * 1024**3
MAX_SUMS_BYTES = 1024**2


@dataclass
class LoadedModel:
    model: nn.Module  # in eval mode, on CPU
    model_config: dict[str, Any]  # the `model:` section it was built from (includes `name`)
    uri: str  # the folder the weights came from
    kind: str  # "checkpoint" or "bundle"
    digest: str  # sha256 of model.safetensors: a stable key for caches of this model's outputs
    metadata: dict[str, Any] = field(default_factory=dict)  # a bundle's config.json; {} for checkpoints

    @property
    def name(self) -> str:
        return str(self.model_config.get("name"))


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- writing ------------------------------------------------------------------------------------------
def encode_weights(weights: nn.Module | Mapping[str, Tensor], model_section: Mapping[str, Any], *,
                   format: str = WEIGHTS_FORMAT) -> bytes:
    """A module's state dict (or a state dict) as safetensors bytes: floating tensors in fp32, contiguous,
    on CPU; the header metadata holds `format` and the `model:` section as JSON."""
    from safetensors.torch import save

    state = weights.state_dict() if isinstance(weights, nn.Module) else weights
    tensors = {name: (t.detach().float() if t.is_floating_point() else t.detach()).contiguous().cpu()
               for name, t in state.items()}
    return save(tensors, metadata={"format": format, "model": json.dumps(dict(model_section))})


def save_checkpoint(weights: nn.Module | Mapping[str, Tensor], model_section: Mapping[str, Any],
                    folder: str | Path) -> str:
    """`model.safetensors` + `model.json` in `folder` (a path or URI), the layout `load_model` reads.

    Each file is written atomically, weights first. Returns the weights' URI.
    """
    folder = str(folder)
    weights_uri = uri_lib.join(folder, WEIGHTS)
    with uri_lib.storage_errors(folder):
        uri_lib.write_bytes_atomic(weights_uri, encode_weights(weights, model_section))
        uri_lib.write_text_atomic(uri_lib.join(folder, CHECKPOINT_CONFIG), json.dumps(dict(model_section), indent=2))
    return weights_uri


def format_sums(files: Mapping[str, bytes]) -> str:
    """`SHA256SUMS` text for `files` ({name: bytes}), sorted by name; `read_sums` reads it back."""
    return "".join(f"{sha256_bytes(data)}  {name}\n" for name, data in sorted(files.items()))


# --- reading ------------------------------------------------------------------------------------------
def read_weights(source: str | bytes, *, where: str | None = None) -> dict[str, Tensor]:
    """A safetensors file (URI) or its bytes -> state dict; an unreadable file is a UserError naming `where`."""
    from safetensors.torch import load as load_safetensors

    if isinstance(source, str):
        where = where or source
        with uri_lib.storage_errors(source):
            source = uri_lib.read_bytes(source)
    try:
        return load_safetensors(source)
    except Exception as exc:  # safetensors raises its own error types for truncated headers
        raise UserError(f"{where or 'weights'}: not a readable safetensors file ({exc})") from exc


def _plain_name(name: str) -> bool:
    """A file name directly inside the bundle: no folder part, no `..`, nothing absolute (`/etc/x`, `C:\\x`)."""
    return bool(name) and name not in (".", "..") and not any(c in name for c in "/\\:\0")


def _check_regular(uri: str, *, limit: int, missing: str) -> None:
    """Refuse, before any read, what is not a regular file of at most `limit` bytes: a link, a device, a
    folder (a bundle's sums must never make us read /dev/zero or a multi-gigabyte decoy)."""
    fs, path = uri_lib.filesystem(uri)
    try:
        with uri_lib.storage_errors(uri):
            info = fs.info(path)
    except FileNotFoundError:
        raise UserError(f"{uri}: {missing}") from None
    if info.get("islink") or info.get("type") != "file":
        raise UserError(f"{uri}: not a regular file; a bundle holds plain files only (refusing to read it)")
    size = int(info.get("size") or 0)
    if size > limit:
        raise UserError(f"{uri}: {size} bytes, over the {limit}-byte limit for a bundle file (refusing to read it)")


def _read_bounded(uri: str, limit: int) -> bytes:
    """At most `limit` bytes of `uri`: a file that grows after its size was checked is refused, not slurped."""
    with uri_lib.storage_errors(uri), uri_lib.open_input(uri) as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise UserError(f"{uri}: grew past the {limit}-byte limit for a bundle file while being read")
    return data


def read_sums(directory: str) -> dict[str, str]:
    """`SHA256SUMS` (the `sha256sum` format: `<hex>  <name>`) -> {name: hex}.

    Every name must be a plain file name inside the bundle; a path (`../x`, `/etc/hostname`, `sub/x`) is
    refused here, so verification never reads outside the bundle."""
    sums_uri = uri_lib.join(directory, SUMS)
    _check_regular(sums_uri, limit=MAX_SUMS_BYTES, missing=f"no {SUMS}")
    sums: dict[str, str] = {}
    for number, line in enumerate(_read_bounded(sums_uri, MAX_SUMS_BYTES).decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        digest, _, name = line.partition("  ")
        if len(digest) != 64 or not name or any(c not in "0123456789abcdefABCDEF" for c in digest):
            raise UserError(f"{sums_uri} line {number}: expected '<sha256>  <file>'")
        name = name.strip().removeprefix("*")  # `*`: sha256sum's binary-mode marker
        if not _plain_name(name):
            raise UserError(f"{sums_uri} line {number}: {name!r} is not a plain file name inside the bundle "
                            "(no folders, '..' or absolute paths); refusing to read it")
        sums[name] = digest.lower()
    return sums


def verify_bundle(directory: str) -> dict[str, bytes]:
    """Check every file `SHA256SUMS` lists; returns their bytes. A missing or altered file is a UserError."""
    sums = read_sums(directory)
    for required in (WEIGHTS, BUNDLE_CONFIG):
        if required not in sums:
            raise UserError(f"{uri_lib.join(directory, SUMS)}: does not list {required}; not a p2es bundle")
    contents: dict[str, bytes] = {}
    for name, expected in sums.items():
        path = uri_lib.join(directory, name)
        _check_regular(path, limit=MAX_BUNDLE_FILE_BYTES,
                       missing=f"listed in {SUMS} but missing; the bundle is incomplete")
        data = _read_bounded(path, MAX_BUNDLE_FILE_BYTES)
        if sha256_bytes(data) != expected:
            raise UserError(f"{path}: sha256 does not match {SUMS}; the file was altered or corrupted "
                            "(refusing to load it)")
        contents[name] = data
    return contents


def _build(model_config: dict[str, Any], weights: bytes, where: str) -> nn.Module:
    from p2es_dist.models.registry import build_model  # lazily: the registry imports every model

    state = read_weights(weights, where=where)
    model = build_model(model_config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Non-persistent buffers never reach the state dict; anything else missing means another architecture.
    if missing or unexpected:
        raise UserError(f"{where}: weights do not fit model {model_config.get('name')!r} "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.eval()


def resolve_checkpoint(uri: str) -> str:
    """A checkpoint or bundle folder from a folder, a job's `--out` folder or its `result.json`."""
    uri = str(uri)
    if uri.endswith(".json"):
        if not uri_lib.exists(uri):
            raise UserError(f"{uri}: no such file")
        summary = json.loads(uri_lib.read_text(uri))
        if "checkpoint" not in summary:
            raise UserError(f"{uri}: has no 'checkpoint' field (expected a result.json of train/pretrain/distill)")
        return str(summary["checkpoint"])
    if uri_lib.exists(uri_lib.join(uri, WEIGHTS)):
        return uri
    if uri_lib.exists(uri_lib.join(uri, "result.json")):
        return resolve_checkpoint(uri_lib.join(uri, "result.json"))
    raise UserError(f"{uri}: no {WEIGHTS} there (expected a checkpoint folder, a bundle from `p2es export`, "
                    "or a job's --out folder with result.json)")


def load_model(uri: str) -> LoadedModel:
    """Checkpoint or bundle (see the module docstring) -> LoadedModel, in eval mode on CPU."""
    with uri_lib.storage_errors(uri):
        folder = resolve_checkpoint(uri)
        if uri_lib.exists(uri_lib.join(folder, SUMS)):
            files = verify_bundle(folder)
            metadata = json.loads(files[BUNDLE_CONFIG])
            if metadata.get("format") != BUNDLE_FORMAT or "model" not in metadata:
                raise UserError(f"{uri_lib.join(folder, BUNDLE_CONFIG)}: expected format {BUNDLE_FORMAT!r} "
                                "with a 'model' section")
            weights, model_config, kind = files[WEIGHTS], dict(metadata["model"]), "bundle"
        else:
            config_uri = uri_lib.join(folder, CHECKPOINT_CONFIG)
            if not uri_lib.exists(config_uri):
                raise UserError(f"{folder}: has {WEIGHTS} but neither {CHECKPOINT_CONFIG} nor {SUMS}")
            weights = uri_lib.read_bytes(uri_lib.join(folder, WEIGHTS))
            model_config, metadata, kind = json.loads(uri_lib.read_text(config_uri)), {}, "checkpoint"
    model = _build(model_config, weights, uri_lib.join(folder, WEIGHTS))
    return LoadedModel(model=model, model_config=model_config, uri=folder, kind=kind,
                       digest=sha256_bytes(weights), metadata=metadata)


def load_pretrained(directory: str | Path) -> nn.Module:
    """A published bundle -> the model (eval mode, CPU). Verifies `SHA256SUMS` first; never unpickles."""
    directory = str(directory)
    if not uri_lib.exists(uri_lib.join(directory, SUMS)):
        raise UserError(f"{directory}: no {SUMS}; load_pretrained only loads bundles written by `p2es export`")
    return load_model(directory).model
