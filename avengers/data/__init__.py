"""Data pipeline: prepare.py (raw text -> token shards), shards.py (the on-disk format), index.py
(datasets and logical shards), stream.py (one loader worker), loader.py (the stateful loader)."""
