"""PhysioNet/CinC Challenge 2020/2021 training data: 12-lead WFDB records with MATLAB v4 `.mat` signals.

Layout: `<record>.hea` + `<record>.mat`, in any folder depth (the Challenge ships one folder per source
database). Keys are record paths relative to the root, without `.hea`. Headers carry `# Age:` (numbers,
`NaN`, top-coded `90+`), `# Sex:` (`Male`/`Female`/`Unknown`) and `# Dx:` (SNOMED-CT codes, labels via
`p2es_dist.data.labels.labels_from_snomed`). The PTB-XL part (`HR*`) writes its units as lowercase
`mv`: units are matched case-insensitively, so those leads are in mV like the rest.

The Challenge headers do not identify patients, so the subject is the record name (Chapman-Shaoxing
and Ningbo have one ECG per patient; for the PTB-XL part use the `ptbxl` source, which knows patients).
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from p2es_dist.data.labels import labels_from_snomed
from p2es_dist.data.record import Record
from p2es_dist.data.sources.wfdb_common import (
    comment_fields,
    dx_codes,
    list_headers,
    parse_age,
    parse_sex,
    read_wfdb,
    to_record,
)
from p2es_dist.errors import UserError

SOURCE = "cinc"


def list_records(root: Path) -> list[str]:
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"--input {root}: not a directory")
    keys = [header.relative_to(root).with_suffix("").as_posix() for header in list_headers(root)]
    if not keys:
        raise UserError(f"--input {root}: no Challenge records (*.hea) found")
    return keys


def read_record(root: Path, key: str) -> Record:
    rec = read_wfdb(Path(root) / key)
    comments = rec.comments or []
    fields = comment_fields(comments)
    return to_record(
        rec,
        source=SOURCE,
        key=key,
        subject_id=PurePosixPath(key).name,
        age=parse_age(fields.get("age")),
        sex=parse_sex(fields.get("sex")),
        labels=labels_from_snomed(dx_codes(comments)),
    )
