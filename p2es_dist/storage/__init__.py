"""Where bytes live: the embedded S3 object store (`objectstore`) and URI-addressed storage (`uri`).

Import the submodules directly (`from p2es_dist.storage import uri`); this package imports nothing heavy.
"""
