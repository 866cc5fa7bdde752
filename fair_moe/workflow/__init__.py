"""The workflow: settings → score → plan → compensate → write → verify, and evaluation and publishing.

``prune.run_prune`` is what the command line runs; ``api`` is the same steps as a Python API.
"""
