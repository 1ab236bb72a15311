"""Facts every stage agrees on (shard schema `data/schema.py`, labels `data/labels.py`, model space
`data/normalize.py`): rate, window, lead order, label vocabulary."""

FS = 125  # Hz, the canonical rate every source is resampled to
WINDOW = 1024  # samples per window (8.192 s at FS)

# Lead-major order of the `ecg` column and of every model's output.
LEADS: tuple[str, ...] = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")
N_LEADS = len(LEADS)
LEAD_INDEX = {name: i for i, name in enumerate(LEADS)}

# Canonical diagnostic vocabulary shared by all sources (mapped from each source's codes in `data/labels.py`).
LABELS: tuple[str, ...] = (
    "NORM", "MI", "STTC", "HYP", "CD", "LBBB", "RBBB", "1AVB", "AF", "PVC", "SB", "ST", "PACE",
)
LABEL_INDEX = {name: i for i, name in enumerate(LABELS)}

SPLITS: tuple[str, ...] = ("train", "val", "test")
SEX_FEMALE, SEX_MALE, SEX_UNKNOWN = 0, 1, -1

SCHEMA_VERSION = 1  # of metrics.json
# Of shards and their manifest.json; 2 added beat timing and calibration columns (data/schema.py).
SHARD_SCHEMA_VERSION = 2
