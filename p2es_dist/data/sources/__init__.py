"""One module per source. Each exposes two functions, so ingest can fan records out over Ray:

    list_records(root: Path) -> list[str]       # cheap, sorted, stable record keys
    read_record(root: Path, key: str) -> Record  # raises RecordError for a record that cannot be used

`synthetic` is different: it generates windows directly (vectorised) and has its own entry point.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from p2es_dist.errors import UserError

# source name -> module under p2es_dist.data.sources
READERS = {
    "bidmc": "bidmc",
    "wfdb": "wfdb_records",
    "ptbxl": "ptbxl",
    "ludb": "ludb",
    "cinc": "cinc",
    "cinc2015": "cinc2015",
    "mimic3wdb": "mimic3wdb",
    "code15": "code15",
}
SOURCES = (*READERS, "synthetic")

# Records per ingest task, so that a task fills shards of useful size: 10-s ECG corpora give one
# window per record, long paired recordings give a hundred. Fixed per source (never derived from the
# cluster size), so a resumed ingest finds the same task boundaries.
RECORDS_PER_TASK = {"bidmc": 8, "wfdb": 4, "mimic3wdb": 8, "ptbxl": 256, "ludb": 256, "cinc": 256, "code15": 1024,
                    "cinc2015": 8}


def reader(source: str) -> ModuleType:
    """The reader module of a record-based source."""
    if source not in READERS:
        raise UserError(f"--source: expected one of {', '.join(SOURCES)}, got {source!r}")
    return importlib.import_module(f"p2es_dist.data.sources.{READERS[source]}")
