"""Patient-disjoint splits: the dataset's own folds where it has them, otherwise a stable hash of the subject."""

from __future__ import annotations

import hashlib


def subject_hash(subject_id: str) -> int:
    """A stable 63-bit integer for a subject (Python's hash() is salted per process, so never use it)."""
    digest = hashlib.blake2b(subject_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def hash_split(subject_id: str, *, val_fraction: float = 0.1, test_fraction: float = 0.1) -> str:
    """`train`/`val`/`test` from the subject alone, so every window of a patient lands in one split."""
    if not (val_fraction >= 0 and test_fraction >= 0 and val_fraction + test_fraction < 1):
        raise ValueError("val_fraction and test_fraction must be >= 0 and sum to < 1")
    unit = (subject_hash(subject_id) % 1_000_003) / 1_000_003
    if unit < test_fraction:
        return "test"
    if unit < test_fraction + val_fraction:
        return "val"
    return "train"
