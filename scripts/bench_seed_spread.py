"""Spread over calibration seeds of the quality battery: the same cells run with ``--seed 0, 1, 2 …``.

    python scripts/bench_quality.py --fixtures demo --regimes sources --budgets 0.25,0.5 --seed 1 --out bench_out/seed_1
    python scripts/bench_seed_spread.py bench_out/battery bench_out/seed_1 bench_out/seed_2

Each folder is one seed's ``--out`` (its ``cells.jsonl``); the first is seed 0. For every cell that all folders
hold: the default and the best baseline per seed, their ratio, and the range over seeds of each fixed
configuration relative to its mean (median and largest over configurations).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def load_cells(folder: Path) -> dict[tuple, dict]:
    """(fixture, regime, budget) → the cell's record, for the finished cells of one ``--out`` folder."""
    cells = {}
    for line in (folder / "cells.jsonl").read_text().splitlines():
        cell = json.loads(line)
        if "best_baseline" in cell:
            cells[(cell["fixture"], cell["regime"], cell["budget"])] = cell
    return cells


def relative_ranges(rows: list[dict]) -> dict[str, float]:
    """Fixed configuration → (max − min) / mean of its held-out perplexity over the seeds."""
    keys = [k for k, v in rows[0].items() if isinstance(v, float) and "+" in k]
    return {k: (max(r[k] for r in rows) - min(r[k] for r in rows)) / statistics.mean(r[k] for r in rows)
            for k in keys}


def spread_table(runs: list[dict[tuple, dict]]) -> str:
    lines = ["| cell | default per seed | best baseline per seed | default ÷ best baseline | range over seeds of one "
             "fixed configuration: median / largest |", "|---|---|---|---|---|"]
    for key in sorted(set.intersection(*(set(r) for r in runs))):
        rows = [run[key] for run in runs]
        ranges = relative_ranges(rows)
        widest = max(ranges, key=ranges.get)
        per_seed = [" / ".join(f"{value:.2f}" for value in (r["default"] for r in rows)),
                    " / ".join(f"{value:.2f}" for value in (r["best_baseline"] for r in rows)),
                    " / ".join(f"{r['default'] / r['best_baseline']:.3f}" for r in rows)]
        lines.append(f"| {' '.join(map(str, key))} | {' | '.join(per_seed)} | "
                     f"{100 * statistics.median(ranges.values()):.1f} % / {100 * ranges[widest]:.1f} % ({widest}) |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", type=Path, nargs="+", help="one bench_quality --out folder per seed")
    args = parser.parse_args(argv)
    if len(args.folders) < 2:
        parser.error("give at least two folders (one per seed)")
    print(spread_table([load_cells(folder) for folder in args.folders]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
