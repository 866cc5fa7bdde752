"""The command line: arguments → typed settings, once; then the workflow. Entry points: ``python -m
fair_moe.prune`` / ``fair_moe.eval`` / ``fair_moe.push`` and the ``fair-moe-*`` console scripts."""
