"""Upload a complete, verified fair_moe output folder to the Hugging Face Hub.

    python -m fair_moe.push OUT_DIR user/model-pruned [--private] [--results results.json]

A missing token or a network error ends with one message; the local folder is never changed by a
failed upload.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fair_moe.cli.common import HelpFormatter, run_command


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fair-moe-push", description=__doc__,
                                formatter_class=HelpFormatter)
    p.add_argument("folder", type=Path, help="the --out folder of python -m fair_moe.prune")
    p.add_argument("repo_id", help="Hub repository to create or update (owner/name)")
    p.add_argument("--private", action="store_true", help="create the repository as private")
    p.add_argument("--results", type=Path, help="results JSON from python -m fair_moe.eval, shown in the card")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def run() -> None:
        from fair_moe.workflow.publish import push

        print(f"pushed to {push(args.folder, args.repo_id, args.private, args.results)}")

    return run_command(run)
