"""``python -m fair_moe.prune``: see ``fair_moe.cli.prune``."""

from fair_moe.cli.prune import main

if __name__ == "__main__":
    raise SystemExit(main())
