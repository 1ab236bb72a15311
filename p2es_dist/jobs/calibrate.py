"""A patient's calibration profile from a paired ECG + PPG record (see `p2es_dist/translate/calibrate.py`).

    p2es calibrate --input ../shared/data/wfdb_samples/a103l --seconds 60 --out a103l_profile.json
    p2es translate --model bundles/p2es --input ../shared/data/wfdb_samples/a103l \
        --calibration a103l_profile.json --out out/a103l_ecg --png out/a103l_ecg.png

Prints one JSON line: the profile path, the measured pulse arrival time and how many beats it rests on.
"""

from __future__ import annotations

import json
import sys

from p2es_dist.cli import run_main
from p2es_dist.errors import UserError
from p2es_dist.jobs.common import _Parser


def main(argv: list[str] | None = None) -> int:
    p = _Parser(prog="p2es calibrate",
                description="paired ECG + PPG of one patient -> calibration profile (PAT, mean beat per lead), JSON")
    p.add_argument("--input", required=True, help="WFDB record (with or without .hea) or CSV with an ECG lead "
                                                  "and a PLETH/PPG channel")
    p.add_argument("--out", required=True, help="profile file to write (JSON)")
    p.add_argument("--seconds", type=float, default=60.0, help="length of the calibration segment (default 60)")
    p.add_argument("--start", type=float, default=0.0, help="where the segment starts, in s (default 0)")
    p.add_argument("--fs", type=float, help="sampling rate of a CSV input in Hz")
    p.add_argument("--model", help="bundle or checkpoint whose preprocessing (filter bands) to use; "
                                   "default: ingest's")
    args = p.parse_args(argv)
    if not args.out.endswith(".json"):
        raise UserError(f"--out {args.out}: expected a .json file name")
    from p2es_dist.translate.calibrate import calibrate_file

    summary = calibrate_file(input=args.input, out=args.out, seconds=args.seconds, start_s=args.start, fs=args.fs,
                             model=args.model)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, sys.argv[1:], prog="p2es calibrate"))
