"""What every reader yields: one raw record at its native rate, before resampling and windowing."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from p2es_dist.constants import SEX_UNKNOWN


class RecordError(Exception):
    """A record that cannot be used; ingest writes it to quarantine.jsonl with this message as reason."""


@dataclass
class Record:
    """A raw recording from one source.

    `ecg` maps canonical lead names (`p2es_dist.constants.LEADS`) to 1-D float signals in `ecg_units`;
    leads the record lacks are simply absent. `ppg` is None for ECG-only corpora. NaN marks gaps.
    `split` is the dataset's own patient-disjoint fold when it has one, else None (a hash decides).
    """

    source: str
    record: str
    subject_id: str
    fs: float
    ecg: dict[str, np.ndarray]
    ppg: np.ndarray | None = None
    ppg_fs: float | None = None  # only when PPG is sampled at another rate than the ECG
    age: float | None = None
    sex: int = SEX_UNKNOWN
    labels: list[str] = field(default_factory=list)
    split: str | None = None
    ecg_units: str = "mV"
    ppg_units: str = "au"
    # True when the source rescaled each ECG signal on its own (BIDMC): amplitudes of different leads are
    # then not comparable, lead physics (III = II - I, ...) would mix units, and one window scale over all
    # leads would weigh them arbitrarily. Preprocessing keeps one lead (II when present) of such records.
    leads_scaled_separately: bool = False

    @property
    def n_samples(self) -> int:
        signals = list(self.ecg.values()) or ([self.ppg] if self.ppg is not None else [])
        return int(len(signals[0])) if signals else 0
