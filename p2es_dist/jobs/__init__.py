"""Thin `ray job submit` entrypoints: `python -m p2es_dist.jobs.<name> ...` == `p2es <name> ...`."""
