"""PPG file (WFDB record or CSV) -> 12-lead WFDB record at 125 Hz, with a bundle or checkpoint.

    p2es translate --model bundles/student --input ../shared/data/wfdb_samples/a103l --out out/a103l_ecg
    p2es translate --model bundles/student --input bidmc_01_Signals.csv.gz --column PLETH --fs 125 \
        --out out/bidmc_01_ecg --png out/bidmc_01_ecg.png

Amplitudes are NOT calibrated: model space has no absolute scale, and one model unit is written as
`--ecg-scale-mv` millivolts (default: the bundle's `preprocessing.ecg_scale_mv`, else 1.0). The
record's header comments say so.

With `--condition LEADS` the input is instead a WFDB record's ECG leads, and a lead-conditioned model
(trained with `data.condition_subsets` or `data.condition_leads`) generates the other leads; the output
keeps the given leads as recorded (125 Hz, band-passed) and the input's units (translate/from_leads.py):

    p2es translate --model runs/p2es_anysubset --input ../shared/data/ptbxl/records500/00000/00001_hr \
        --condition I,II --out out/00001_12lead

Inputs of any length are read, translated and written chunk by chunk (translate/stream.py). Short
NaN/inf gaps in the PPG are interpolated, with a line on stderr saying how many samples; a longer gap
(over 0.5 s, or the bundle's limit) or a PPG flat over more than half its length is refused with exit
code 2, and shorter flat stretches are named on stderr.
"""

from __future__ import annotations

import json
import sys

from p2es_dist.cli import run_main
from p2es_dist.constants import FS, WINDOW
from p2es_dist.errors import UserError
from p2es_dist.jobs.common import apply_common, parser

_SEX = {"f": 0, "female": 0, "m": 1, "male": 1, "u": -1, "unknown": -1}


def main(argv: list[str] | None = None) -> int:
    p = parser("p2es translate", "PPG file (WFDB record or CSV) -> 12-lead WFDB record (PREFIX.hea + PREFIX.dat)",
               config=False)
    for action in p._actions:  # the shared --out means a folder elsewhere; here it is a record prefix
        if action.dest == "out":
            action.help, action.metavar = "output record, written as PREFIX.hea + PREFIX.dat (125 Hz, mV)", "PREFIX"
    p.add_argument("--model", required=True, help="bundle from `p2es export`, or a checkpoint / job --out folder")
    p.add_argument("--input", required=True,
                   help="WFDB record (path with or without .hea) with a PLETH/PPG channel, or a .csv/.csv.gz file")
    p.add_argument("--column", help="PPG column (CSV) or channel (WFDB); names match after stripping spaces")
    p.add_argument("--fs", type=float, help="sampling rate in Hz of a CSV input (required for CSV; 10 to 10000)")
    p.add_argument("--png", help="also plot the first 10 s as a 12-lead printout to this PNG")
    p.add_argument("--calibration", help="the patient's profile from `p2es calibrate` (PAT, own beat): models "
                                         "trained with templates use it, and amplitudes follow its beat")
    p.add_argument("--population", help="without --calibration: the training source whose population PAT and "
                                        "beat to assume (e.g. bidmc for a fingertip PPG); default: all pooled")
    p.add_argument("--hop", type=int, default=WINDOW // 2,
                   help=f"samples at {FS} Hz between {WINDOW}-sample windows (default {WINDOW // 2})")
    p.add_argument("--seed", type=int, default=0, help="seed of stochastic models (default 0)")
    p.add_argument("--steps", type=int, help="sampling steps of stochastic models (default: the bundle's or model's)")
    p.add_argument("--age", type=float, help="age in years (default: the WFDB header's, else unknown)")
    p.add_argument("--sex", type=str.lower, choices=sorted(_SEX), help="sex (default: the WFDB header's, else unknown)")
    p.add_argument("--ecg-scale-mv", type=float,
                   help="mV written per model-space unit; amplitudes are a convention, NOT calibrated "
                        "(default: the bundle's preprocessing.ecg_scale_mv, else 1.0: the largest lead "
                        "peaks near 1 mV)")
    p.add_argument("--batch-size", type=int, default=16, help="windows per model call (default 16)")
    p.add_argument("--condition", help="ECG lead(s) of the --input WFDB record to give a lead-conditioned model, "
                                       "e.g. II or I,II or II,V1,V5: it generates the other leads")
    p.epilog = ("Output: 12 leads (I II III aVR aVL aVF V1-V6) at 125 Hz, as long as the input. Amplitudes are NOT "
                "calibrated: the model works without absolute scale; see --ecg-scale-mv.")
    args = p.parse_args(argv)
    if not args.out:
        raise UserError("--out: required (the output record PREFIX, e.g. out/a103l_ecg)")
    if args.batch_size < 1:
        raise UserError(f"--batch-size: expected a positive number, got {args.batch_size}")
    if args.ecg_scale_mv is not None and not args.ecg_scale_mv > 0:
        raise UserError(f"--ecg-scale-mv: expected a positive number of mV, got {args.ecg_scale_mv}")
    if args.fs is not None:
        from p2es_dist.translate.io import check_fs

        check_fs(args.fs)
    apply_common(args)
    from p2es_dist.translate.run import TranslateConfig, notices, translate_file

    if args.steps is not None and args.steps < 1:
        raise UserError(f"--steps: expected a positive number, got {args.steps}")
    config = TranslateConfig(hop=args.hop, seed=args.seed, steps=args.steps, batch_size=args.batch_size,
                             ecg_scale_mv=args.ecg_scale_mv, age=args.age,
                             sex=None if args.sex is None else _SEX[args.sex], population=args.population)
    if args.condition is not None:
        from p2es_dist.evaluate.windows import parse_condition
        from p2es_dist.translate.from_leads import translate_leads_file

        for option, value in (("--fs", args.fs), ("--calibration", args.calibration),
                              ("--ecg-scale-mv", args.ecg_scale_mv)):
            if value is not None:
                raise UserError(f"{option}: not with --condition (the input is a WFDB record's ECG leads, whose own "
                                "scale the output keeps)")
        summary = translate_leads_file(model=args.model, input=args.input, out=args.out, column=args.column,
                                       condition=parse_condition(args.condition.split(",")), png=args.png,
                                       config=config)
        print(json.dumps(summary))
        return 0
    summary = translate_file(model=args.model, input=args.input, out=args.out, column=args.column, fs=args.fs,
                             png=args.png, config=config, calibration=args.calibration)
    for line in notices(summary):
        print(f"p2es translate: {line}", file=sys.stderr)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, sys.argv[1:], prog="p2es translate"))
