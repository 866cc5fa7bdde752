"""Checkpoint I/O: loading models and configs, streaming shards, atomic output folders, reload checks."""
