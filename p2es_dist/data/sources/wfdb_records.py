"""Any WFDB record set (source `wfdb`): single- and multi-segment records, formats 16/80/212/...,
Challenge `.mat` (MATLAB v4 signal files behind a `.hea`), FLAC (`516`, via wfdb + soundfile), NaN gaps.

Keys are record paths relative to the root, without `.hea`. The segments of a multi-segment record
(and its `_layout` header) are not listed on their own: the master header merges them (wfdb `m2s`),
with NaN where a segment lacks a signal. Segments whose master header is absent are separate records.

The subject is the record, except inside a MIMIC-style `pNNNNNN/` folder, which names the patient,
and for a PhysioNet/CinC Challenge 2015 record (`a103l`, `v102s`: a name like `[abtvf]NNN[ls]` and a
`True/False alarm` header comment), which gets the `cinc2015` source's subject `cinc2015:<name>`, so an
ingest of both sources puts both copies in the same split. Its windows are still there twice, and this
reader keeps the alarm segment at the end: for those records prefer `--source cinc2015` (it drops the
alarm) and leave them out of the `wfdb` input.
Demographics come from `Age:`/`Sex:` comments (CinC, PTB, LUDB style) or MIT-BIH's `<age> <sex>` line;
labels only from a CinC-style `# Dx:` comment. Use the dataset's own source where there is one
(`ptbxl`, `ludb`, `cinc`, `mimic3wdb`): it knows the dataset's patients, folds and labels.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

from p2es_dist.data.labels import labels_from_snomed
from p2es_dist.data.record import Record
from p2es_dist.data.sources import cinc2015
from p2es_dist.data.sources.wfdb_common import (
    demographics,
    dx_codes,
    header_first_line,
    list_headers,
    read_wfdb,
    segment_names,
    to_record,
)
from p2es_dist.errors import UserError

SOURCE = "wfdb"
_MIMIC_PATIENT = re.compile(r"^p\d{6}$")


def list_records(root: Path) -> list[str]:
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"--input {root}: not a directory")
    headers = list_headers(root)
    segments = set()
    for header in headers:
        tokens = header_first_line(header)
        if tokens and "/" in tokens[0]:  # `name/n_segments`: a multi-segment master header
            segments.update(header.parent / name for name in segment_names(header))
    keys = sorted(
        header.relative_to(root).with_suffix("").as_posix()
        for header in headers
        if header.with_suffix("") not in segments
    )
    if not keys:
        raise UserError(f"--input {root}: no WFDB records (*.hea) found")
    return keys


def subject_of(key: str) -> str:
    """The MIMIC `pNNNNNN` folder a record lies in, else the record itself."""
    for part in reversed(PurePosixPath(key).parts[:-1]):
        if _MIMIC_PATIENT.match(part):
            return part
    return key


def read_record(root: Path, key: str) -> Record:
    rec = read_wfdb(Path(root) / key)
    comments = rec.comments or []
    age, sex = demographics(comments)
    name = PurePosixPath(key).name
    subject = cinc2015.subject_of(name) if cinc2015.is_challenge_record(name, comments) else subject_of(key)
    return to_record(
        rec, source=SOURCE, key=key, subject_id=subject, age=age, sex=sex,
        labels=labels_from_snomed(dx_codes(comments)),
    )
