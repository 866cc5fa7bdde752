"""``python -m fair_moe.eval``: see ``fair_moe.cli.eval``."""

from fair_moe.cli.eval import main

if __name__ == "__main__":
    raise SystemExit(main())
