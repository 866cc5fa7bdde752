"""``python -m fair_moe.push``: see ``fair_moe.cli.push``."""

from fair_moe.cli.push import main

if __name__ == "__main__":
    raise SystemExit(main())
