"""p2es-dist: Ray-distributed training of PPG -> 12-lead ECG translation models.

Data flows one way: raw records -> window shards -> Ray Data -> trainer -> checkpoint -> bundle.
"""

__version__ = "0.1.0"
