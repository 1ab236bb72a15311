"""Long PPG inputs in bounded memory: conditioning, upstrokes and stitched windows, one chunk at a time.

`p2es translate` makes three passes, each holding one chunk (`StreamConfig.chunk` samples at 125 Hz, 8.7 min
by default) plus `margin_s` (30 s) of context on either side:

1. `condition`: raw pieces are scanned for non-finite runs and flat lines (`ArtefactScan`), short gaps are
   interpolated, and each chunk is resampled and band-passed (`data.preprocess.resample`, `bandpass`). The
   125 Hz signal goes to a float64 file in a scratch folder (8 bytes a sample, 3.6 MB an hour).
2. `find_upstrokes`: `timing.ppg_upstrokes` per chunk, with the whole signal's Elgendi threshold.
3. `stitched`: windows on the whole signal's grid (`stitch.window_starts`), generated a group of whole
   batches at a time, blended with the normalised Hann weights of `stitch.overlap_add` (sum of weighted
   windows over sum of weights), and handed on one finished block at a time.

Equal to the whole-signal computation up to rounding, ends included: chunks are cut at multiples of the
resampling ratio's denominator, so their 125 Hz samples fall on the whole signal's grid; 30 s of context
outlast the polyphase filter (10 taps of the slower rate either side) and the band-pass's transient (order
3 Butterworth at 0.5 Hz: its impulse response falls below 1e-9 of its peak within 15 s); a chunk's own
median, which `bandpass` removes, is a constant the band-pass rejects anyway; and Elgendi's peak detector
is local but for one term, 0.02 x the mean of the squared positive signal, which pass 1 measures on the
whole signal. tests/test_translate_robust.py checks it.

Input policy: non-finite samples (NaN, +-inf) are gaps. Runs up to `PreprocessConfig.max_gap_s` (0.5 s,
ingest's limit, or the bundle's) are linearly interpolated and counted; a longer one refuses the input
with the positions. A flat line is a run of one value lasting `flat_s` (1 s, ingest's definition: sensor
off or saturated). A PPG flat for more than half its length carries no pulse to translate and is refused;
shorter flat stretches are reported (the ECG there does not come from a pulse).

Memory bound, whatever the input's length: a few copies of one chunk and its margins as 1-D float64 at the
input rate (~1 MB each at 125 Hz, ~5 MB at 1 kHz), one group of windows (64 by default: PPG, template
and 12-lead output, ~7 MB) and its overlap-add buffer (~4 MB), the writer's piece (`io.EcgRecordWriter`,
~12 MB), plus 8 bytes per detected beat and per window start (~0.5 MB an hour). Measured with a tiny
model on synthetic 125 Hz CSV input, peak RSS of `p2es translate` is 476 MB for 24 s, 517 MB for 1 h and
516 MB for 10 h (whole-signal code before: 814 MB for 1 h, ~4.4 GB for 10 h): the interpreter, torch and
the model are most of it. On disk, in a scratch folder beside the output: 8 bytes per 125 Hz sample for
the PPG and 48 for the ECG (220 MB for 10 h), removed at the end.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Protocol

import numpy as np

from p2es_dist.constants import FS, N_LEADS, WINDOW
from p2es_dist.data import timing
from p2es_dist.data.normalize import ppg_to_model_space
from p2es_dist.data.preprocess import PreprocessConfig, bandpass, resample
from p2es_dist.errors import UserError
from p2es_dist.translate.stitch import cut_windows, taper

READ_PIECE = 1 << 16  # input samples asked of a reader at a time
FLAT_SHARE_REFUSED = 0.5  # a PPG flat for more than this share of its samples is refused
_SAME = 1e-9  # consecutive samples this close are one value (as ingest's flat-line check)


@dataclass(frozen=True)
class StreamConfig:
    chunk: int = 1 << 16  # samples at 125 Hz per chunk (8.7 min)
    margin_s: float = 30.0  # context either side of a chunk (filters' transients, gap repair)
    group_windows: int = 64  # windows generated per group, rounded to whole batches


class PPGSource(Protocol):
    fs: float
    source: str

    def chunks(self, size: int) -> Iterator[np.ndarray]: ...


class _Runs:
    """Runs of True in a boolean stream fed piece by piece, as (start, stop) stream positions."""

    def __init__(self) -> None:
        self.position = 0
        self.open: int | None = None  # start of a run still going at the end of the last piece

    def feed(self, mask: np.ndarray) -> list[tuple[int, int]]:
        if len(mask) == 0:
            return []
        edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
        starts = (np.flatnonzero(edges == 1) + self.position).tolist()
        stops = (np.flatnonzero(edges == -1) + self.position).tolist()
        if self.open is not None:
            if mask[0]:
                starts[0] = self.open
            else:
                starts, stops = [self.open, *starts], [self.position, *stops]
        self.open = None
        if mask[-1]:
            self.open, starts, stops = starts[-1], starts[:-1], stops[:-1]
        self.position += len(mask)
        return list(zip(starts, stops, strict=True))

    def close(self) -> list[tuple[int, int]]:
        run, self.open = ([] if self.open is None else [(self.open, self.position)]), None
        return run


@dataclass
class ArtefactScan:
    """Non-finite runs and flat lines of a raw signal read in pieces (positions in input samples)."""

    fs: float
    max_gap_s: float
    flat_s: float
    n: int = 0
    finite: int = 0
    repaired: int = 0  # non-finite samples in runs short enough to interpolate
    repaired_gaps: int = 0
    long_gaps: list[tuple[int, int]] = field(default_factory=list)
    flat: list[tuple[int, int]] = field(default_factory=list)
    _gaps: _Runs = field(default_factory=_Runs)
    _same: _Runs = field(default_factory=_Runs)
    _last: float = math.nan

    def feed(self, x: np.ndarray) -> None:
        finite = np.isfinite(x)
        self.n += len(x)
        self.finite += int(finite.sum())
        self._add_gaps(self._gaps.feed(~finite))
        previous = np.concatenate([[self._last], x[:-1]])
        with np.errstate(invalid="ignore"):
            same = finite & np.isfinite(previous) & (np.abs(x - previous) <= _SAME)
        self._add_flat(self._same.feed(same))
        if len(x):
            self._last = float(x[-1])

    def close(self) -> ArtefactScan:
        self._add_gaps(self._gaps.close())
        self._add_flat(self._same.close())
        return self

    def _add_gaps(self, runs: list[tuple[int, int]]) -> None:
        for start, stop in runs:
            if stop - start > self.max_gap_s * self.fs:
                self.long_gaps.append((start, stop))
            else:
                self.repaired += stop - start
                self.repaired_gaps += 1

    def _add_flat(self, runs: list[tuple[int, int]]) -> None:
        # A run of k "same as the previous sample" flags is k + 1 equal samples.
        self.flat += [(start - 1, stop) for start, stop in runs if stop - start + 1 >= self.flat_s * self.fs]

    def flat_seconds(self) -> list[tuple[float, float]]:
        return [(start / self.fs, stop / self.fs) for start, stop in self.flat]

    def check(self, source: str) -> None:
        """UserError when the input cannot be translated: no finite sample, a long gap, or flat."""
        if self.finite == 0:
            raise UserError(f"--input {source}: the PPG has no finite sample")
        if self.long_gaps:
            count = len(self.long_gaps)
            where = ", ".join(f"{a / self.fs:.2f}-{b / self.fs:.2f} s" for a, b in self.long_gaps[:3])
            more = f" and {count - 3} more" if count > 3 else ""
            raise UserError(f"--input {source}: {count} NaN gap(s) in the PPG longer than the {self.max_gap_s:g} s "
                            f"interpolation limit, at {where}{more}; cut the record around them (inf counts as NaN)")
        flat = sum(stop - start for start, stop in self.flat)
        if flat > FLAT_SHARE_REFUSED * self.n:
            where = ", ".join(f"{a:.2f}-{b:.2f} s" for a, b in self.flat_seconds()[:3])
            raise UserError(f"--input {source}: the PPG is flat (one value for {self.flat_s:g} s or longer) over "
                            f"{flat / self.n:.0%} of its {self.n / self.fs:.2f} s, at {where}: there is no pulse "
                            "to translate")


def fill_gaps(x: np.ndarray) -> np.ndarray:
    """Non-finite samples linearly interpolated from their finite neighbours (zeros when there are none)."""
    bad = ~np.isfinite(x)
    if not bad.any():
        return x
    if bad.all():
        return np.zeros_like(x)
    index = np.arange(len(x))
    filled = x.copy()
    filled[bad] = np.interp(index[bad], index[~bad], x[~bad])
    return filled


def repair_gaps(values: np.ndarray, fs: float, *, max_gap_s: float, source: str) -> np.ndarray:
    """Whole-array form of pass 1's repair: non-finite runs up to `max_gap_s` interpolated; a longer
    run (or no finite sample) is a UserError saying where."""
    scan = ArtefactScan(fs, max_gap_s=max_gap_s, flat_s=math.inf)
    scan.feed(np.asarray(values, dtype=np.float64))
    scan.close().check(source)
    return fill_gaps(np.asarray(values, dtype=np.float64))


def resampling_ratio(fs: float) -> tuple[int, int]:
    """(up, down) of `data.preprocess.resample` from `fs` to 125 Hz."""
    if fs == FS:
        return 1, 1
    ratio = Fraction(FS / fs).limit_denominator(1000)
    return ratio.numerator, ratio.denominator


@dataclass
class Conditioned:
    """The 125 Hz conditioned PPG, on disk (float64), and what pass 1 learnt about the input."""

    path: Path
    n: int  # samples at 125 Hz
    mean_square: float  # mean of max(x, 0)^2: the whole signal's share of Elgendi's threshold
    artefacts: ArtefactScan

    def read(self, start: int, stop: int) -> np.ndarray:
        start, stop = max(0, start), min(stop, self.n)
        return np.fromfile(self.path, dtype=np.float64, count=max(0, stop - start), offset=8 * start)


def condition(source: PPGSource, config: PreprocessConfig, path: Path,
              stream: StreamConfig = StreamConfig()) -> Conditioned:
    """Pass 1: the input, scanned, gap-repaired, at 125 Hz and band-passed as ingest does, written to `path`.

    UserError when the input has no finite sample, a gap longer than `config.max_gap_s`, is flat (see
    the module docstring) or is shorter than one window.
    """
    up, down = resampling_ratio(source.fs)
    core_in = max(1, stream.chunk // up) * down  # input samples per chunk: whole resampling periods
    margin_in = math.ceil((stream.margin_s + config.max_gap_s) * FS / up) * down
    scan = ArtefactScan(source.fs, max_gap_s=config.max_gap_s, flat_s=config.flat_s)
    buffer, origin, core = np.zeros(0), 0, 0  # unprocessed input from sample `origin`; next chunk at `core`
    total_square, n_out = 0.0, 0
    with open(path, "wb") as out:

        def process(first: int, stop: int, *, last: bool) -> None:
            nonlocal total_square, n_out
            lo = max(0, first - margin_in)
            piece = fill_gaps(buffer[lo - origin:stop + margin_in - origin])
            clean = bandpass(resample(piece, source.fs, FS), config.ppg_band_hz, config.filter_order)
            skip = (first - lo) * up // down
            core_out = clean[skip:] if last else clean[skip:skip + (stop - first) * up // down]
            total_square += float(np.sum(np.maximum(core_out, 0.0) ** 2))
            n_out += len(core_out)
            out.write(np.ascontiguousarray(core_out, dtype=np.float64).tobytes())

        for piece in source.chunks(READ_PIECE):
            scan.feed(piece)
            buffer = np.concatenate([buffer, np.asarray(piece, dtype=np.float64)])
            while origin + len(buffer) >= core + core_in + margin_in:
                process(core, core + core_in, last=False)
                core += core_in
                keep = max(0, core - margin_in) - origin
                buffer, origin = buffer[keep:], origin + keep
        scan.close().check(source.source)
        n_in = origin + len(buffer)
        expected = math.ceil(n_in * up / down)
        if expected < WINDOW:
            raise UserError(f"--input {source.source}: {n_in} samples at {source.fs:g} Hz "
                            f"({n_in / source.fs:.2f} s) are shorter than one window: "
                            f"{WINDOW} samples at {FS} Hz ({WINDOW / FS:.3f} s) are needed")
        while core < n_in:
            process(core, min(core + core_in, n_in), last=core + core_in >= n_in)
            core += core_in
    return Conditioned(path=path, n=n_out, mean_square=total_square / n_out, artefacts=scan)


def find_upstrokes(conditioned: Conditioned, stream: StreamConfig = StreamConfig()) -> np.ndarray:
    """Pass 2: the sorted upstrokes of the whole conditioned PPG (`timing.ppg_upstrokes`), chunk by chunk."""
    margin = math.ceil(stream.margin_s * FS)
    n, found = conditioned.n, []
    for first in range(0, n, stream.chunk):
        stop = min(n, first + stream.chunk)
        lo = max(0, first - margin)
        whole = first == 0 and stop == n  # one chunk: exactly the whole-signal call
        try:
            upstrokes = lo + timing.ppg_upstrokes(conditioned.read(lo, stop + margin),
                                                  mean_square=None if whole else conditioned.mean_square)
        except IndexError:  # neurokit2's Elgendi finds no pulse wave at all here (a quiet stretch)
            continue
        found.append(upstrokes[(upstrokes >= first) & (upstrokes < stop)])
    if not found:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate(found).astype(np.int64)


Generate = Callable[[np.ndarray, np.ndarray, int], np.ndarray]


def stitched(conditioned: Conditioned, starts: np.ndarray, generate: Generate, *, group: int) -> Iterator[np.ndarray]:
    """Pass 3: (12, m) blocks of the stitched output, in order, covering all `conditioned.n` samples.

    `generate(ppg_windows, starts, first_index)` turns (g, L) model-space PPG windows starting at `starts`
    (the `first_index`-th window on) into (g, 12, L) outputs; it is called with `group` windows at a time.
    """
    shape = taper(WINDOW)
    total = np.zeros((N_LEADS, 0))
    weight = np.zeros(0)
    origin = 0  # the sample at total[:, 0]
    for first in range(0, len(starts), group):
        these = starts[first:first + group]
        lo, hi = int(these[0]), int(these[-1]) + WINDOW
        windows = ppg_to_model_space(cut_windows(conditioned.read(lo, hi), these - lo, WINDOW))
        outputs = generate(windows, these, first)
        if total.shape[1] < hi - origin:
            grow = hi - origin - total.shape[1]
            total = np.concatenate([total, np.zeros((N_LEADS, grow))], axis=1)
            weight = np.concatenate([weight, np.zeros(grow)])
        for values, start in zip(outputs, these, strict=True):
            at = slice(int(start) - origin, int(start) - origin + WINDOW)
            total[:, at] += values * shape
            weight[at] += shape
        # Samples before the next group's first window get nothing more.
        done = (int(starts[first + group]) if first + group < len(starts) else hi) - origin
        yield total[:, :done] / weight[:done]
        total, weight, origin = total[:, done:], weight[done:], origin + done
