"""Benchmarks behind `p2es bench <name>`: each measures in one process and prints one JSON line
(README "Benchmarks")."""
