"""Training checkpoints are verified, then loaded without running code from them.

A DeepSpeed checkpoint is a set of pickles (`*.pt`). Two guards keep a file written over one of them from
executing in the worker that resumes or consolidates it:

- **a manifest per rank**, `MANIFEST-rank<r>.json`, written by `write_manifest` after the rank's files
  (every rank saves into its own folder and Ray Train merges them, so one shared file would be
  overwritten): the SHA-256 of every file that rank wrote. `verify_manifest` checks every rank's manifest is
  there and every file is listed and unchanged before anything is read; anything else is a one-line
  UserError naming the file. It catches corruption and edits by anyone who cannot also rewrite the
  manifest beside them.
- **weights-only unpickling** (`weights_only_loads`, `load_tensors`): whoever *can* rewrite the manifest
  still gets no code run, because every `torch.load` (ours, DeepSpeed's, `zero_to_fp32`'s) only rebuilds
  tensors, containers and the few plain DeepSpeed types in `DEEPSPEED_SAFE_GLOBALS`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import re
import stat
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import torch

from p2es_dist.errors import UserError
from p2es_dist.models.checkpoint import CHECKPOINT_CONFIG, WEIGHTS

MANIFEST_FORMAT = "p2es-checkpoint-manifest/1"
MANIFEST_PATTERN = re.compile(r"MANIFEST-rank(\d+)\.json")
MAX_MANIFEST_BYTES = 16 * 1024**2  # a few hundred bytes per file listed
# Written beside a finished checkpoint by `models.checkpoint.save_checkpoint` (safetensors and JSON, never
# unpickled), after the manifests: present in a step folder that was exported, so not "unlisted".
LATER_FILES = frozenset({WEIGHTS, CHECKPOINT_CONFIG})
FORCE, FORCE_NO = "TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


def manifest_name(rank: int) -> str:
    return f"MANIFEST-rank{rank:05d}.json"


def sha256_file(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _files_under(folder: Path) -> Iterator[tuple[str, Path]]:
    """(posix path relative to `folder`, path) of every file below it; a link or device is refused, never
    followed (a link could point the hash, or DeepSpeed's read, anywhere)."""
    for directory, subfolders, names in os.walk(folder, followlinks=False):
        for name in sorted(subfolders + names):
            path = Path(directory, name)
            mode = path.lstat().st_mode
            if stat.S_ISDIR(mode):
                continue
            if not stat.S_ISREG(mode):
                raise UserError(f"{path}: not a regular file (a link or device) in a training checkpoint; "
                                "refusing to load it")
            yield path.relative_to(folder).as_posix(), path


def write_manifest(folder: str | Path, *, rank: int, world_size: int) -> Path:
    """Hash every file under `folder` (this rank's part of a checkpoint) into `MANIFEST-rank<r>.json`."""
    folder = Path(folder)
    files = {rel: sha256_file(path) for rel, path in _files_under(folder) if not MANIFEST_PATTERN.fullmatch(rel)}
    target = folder / manifest_name(rank)
    target.write_text(json.dumps({"format": MANIFEST_FORMAT, "rank": rank, "world_size": world_size,
                                  "files": files}, indent=1, sort_keys=True))
    return target


def _safe_relative(rel: Any) -> bool:
    if not isinstance(rel, str) or not rel or "\\" in rel or "\0" in rel:
        return False
    parts = PurePosixPath(rel).parts
    return not PurePosixPath(rel).is_absolute() and all(p not in ("", ".", "..") for p in parts)


def _read_manifest(path: Path) -> dict[str, Any]:
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise UserError(f"{path}: over {MAX_MANIFEST_BYTES} bytes, not a checkpoint manifest")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: unreadable checkpoint manifest ({exc})") from exc
    if (not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT
            or not isinstance(manifest.get("files"), dict) or not isinstance(manifest.get("world_size"), int)):
        raise UserError(f"{path}: not a {MANIFEST_FORMAT} checkpoint manifest")
    for rel, digest in manifest["files"].items():
        if not _safe_relative(rel) or not isinstance(digest, str):
            raise UserError(f"{path}: entry {rel!r} is not a file path inside the checkpoint")
    return manifest


def verify_manifest(folder: str | Path) -> dict[str, str]:
    """Check a (merged) checkpoint folder against its ranks' manifests; returns {relative path: sha256}.

    Refused, naming the file: no manifest, a rank's manifest missing, a listed file missing or changed, a
    file no manifest lists (other than `LATER_FILES` at the top), a link or device anywhere.
    """
    folder = Path(folder)
    present = dict(_files_under(folder))  # first: a manifest that is a link (to /dev/zero, say) is never read
    manifests = {int(m.group(1)): present[m.group(0)] for m in map(MANIFEST_PATTERN.fullmatch, present) if m}
    if not manifests:
        raise UserError(f"{folder}: no checkpoint manifest ({manifest_name(0)}); refusing to load a training "
                        "checkpoint whose files cannot be verified")
    listed: dict[str, str] = {}
    world_sizes = set()
    for rank, path in sorted(manifests.items()):
        manifest = _read_manifest(path)
        if manifest.get("rank") != rank:
            raise UserError(f"{path}: names rank {manifest.get('rank')!r}; refusing to load the checkpoint")
        world_sizes.add(manifest["world_size"])
        for rel, digest in manifest["files"].items():
            if listed.setdefault(rel, digest) != digest:
                raise UserError(f"{folder / rel}: two checkpoint manifests list different sha256; refusing to load it")
    world_size = max(world_sizes)
    expected = set(range(world_size))
    if len(world_sizes) > 1 or set(manifests) != expected:
        odd = sorted((expected - set(manifests)) or (set(manifests) - expected) or manifests)[0]
        raise UserError(f"{folder / manifest_name(odd)}: the checkpoint manifests do not cover ranks "
                        f"0..{world_size - 1} exactly; refusing to load the checkpoint")
    for rel in present:
        if rel not in listed and not MANIFEST_PATTERN.fullmatch(rel) and rel not in LATER_FILES:
            raise UserError(f"{folder / rel}: not listed in the checkpoint manifest; refusing to load the checkpoint")
    for rel, digest in sorted(listed.items()):
        if rel not in present:
            raise UserError(f"{folder / rel}: listed in the checkpoint manifest but missing")
        if sha256_file(present[rel]) != digest:
            raise UserError(f"{folder / rel}: sha256 does not match the checkpoint manifest; the file was altered "
                            "or corrupted (refusing to load it)")
    return listed


def deepspeed_safe_globals() -> list[Any]:
    """The plain (non-tensor) types DeepSpeed 0.19 pickles into ZeRO optimizer states: an IntEnum, a
    two-int dataclass and the static loss scaler. Allowing them lets `weights_only` loads read our own
    checkpoints; nothing else is ever rebuilt from a checkpoint."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, fragment_address, LossScaler]


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Inside the block, every `torch.load` in this process is weights-only, whatever its caller passes.

    DeepSpeed's resume path and `zero_to_fp32` call `torch.load(..., weights_only=False)` themselves;
    PyTorch's `TORCH_FORCE_WEIGHTS_ONLY_LOAD` overrides that argument. An unpickling refusal becomes a
    UserError (callers that know the file name it first, see `load_tensors`).
    """
    saved = {name: os.environ.get(name) for name in (FORCE, FORCE_NO)}
    os.environ[FORCE] = "1"
    os.environ.pop(FORCE_NO, None)  # both set makes torch.load raise
    try:
        with torch.serialization.safe_globals(deepspeed_safe_globals()):
            yield
    except pickle.UnpicklingError as exc:
        raise UserError(f"a training checkpoint file holds objects other than tensors and plain values; refusing "
                        f"to unpickle it ({_first_line(exc)})") from exc
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def load_tensors(path: str | Path, map_location: Any = "cpu") -> Any:
    """`torch.load` of one checkpoint file, weights-only; a refused pickle is a UserError naming the file."""
    with weights_only_loads():
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as exc:
            raise UserError(f"{path}: holds objects other than tensors and plain values; refusing to unpickle it "
                            f"({_first_line(exc)})") from exc


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    unsafe = [line for line in lines if "Unsupported global" in line or "GLOBAL" in line]
    return (unsafe or lines or [type(exc).__name__])[0][:200]
