"""p2es-dist: Ray-distributed training of PPG -> 12-lead ECG translation models.

Data flows one way: raw records -> window shards -> Ray Data -> trainer -> checkpoint -> bundle.

    from p2es_dist import load_pretrained
    model = load_pretrained("path/to/bundle")   # checks SHA256SUMS, loads safetensors (no pickle)
"""

__version__ = "0.1.0"


def load_pretrained(directory):  # noqa: ANN001, ANN201 - re-exported lazily so `import p2es_dist` stays light
    """A bundle from `p2es export` -> the model, sums verified. See `p2es_dist.models.checkpoint`."""
    from p2es_dist.models.checkpoint import load_pretrained as _load

    return _load(directory)
