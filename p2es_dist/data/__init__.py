"""Data plane: readers per source -> preprocessing -> window shards -> Ray Data loader."""
