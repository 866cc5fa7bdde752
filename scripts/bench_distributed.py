"""Data-parallel calibration: wall time at 1 and 2 processes on this machine, and a projection for large MoEs.

    python scripts/bench_distributed.py                 # the demo model, 128 × 512 calibration tokens

Measured: the calibration phase of the same command (``--allocation uniform --compensate none``, so nothing
but calibration differs) run as one process with 2 threads and as ``torchrun --nproc-per-node 2`` with one
thread each (gloo), with the tokens each rank calibrated on. This machine has 2 cores, so 2 processes can at
best match one 2-thread process: the point is that the split adds little; the gain comes with more devices.

Projected (not measured): calibration time of Qwen3-235B-A22B and DeepSeek-V3 (their layouts from ``--dry-run``
on the configs shipped in fair_moe/data/configs/models/) for R data-parallel replicas of 8 × H100, from FLOPs:
a forward + activation-only backward costs about 4 · N_active FLOPs per token; fair_moe's calibration costs
``overhead`` × that (measured here by scripts/bench_calibration.py as fair_moe ÷ the activation-gradient floor);
an H100 is taken at 989 dense bf16 TFLOP/s and 30 % utilisation. These are estimates to plan with, not results.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--model", "demo", "--budget", "0.25", "--allocation", "uniform", "--compensate", "none", "--no-verify"]
ACTIVE = {  # (total parameters, routed-expert parameters, top_k, experts) from --dry-run of the shipped configs
    "Qwen3-235B-A22B": (235.094e9, 227.096e9, 8, 128),
    "DeepSeek-V3": (671.026e9, 653.909e9, 8, 256),
}
H100_FLOPS, UTILISATION = 989e12, 0.30


def calibrate_seconds(command: list[str], env: dict) -> float:
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    match = re.search(r"calibrate ([0-9.]+) s", done.stdout)
    return float(match.group(1))


def rank_tokens(samples: int, seq_len: int, world: int) -> list[int]:
    """Calibration tokens each rank runs (the same batches every rank builds, split batch by batch)."""
    sys.path.insert(0, str(ROOT))
    from transformers import AutoTokenizer

    from fair_moe.calibration import DEMO_MODEL_DIR
    from fair_moe.calibration.text import bundled_sources, text_batches
    from fair_moe.workflow.scoring import selection_windows

    data = text_batches(AutoTokenizer.from_pretrained(DEMO_MODEL_DIR), bundled_sources(), samples, seq_len, 8, 0,
                        selection_windows(samples), selection_windows(samples))
    return [sum(b.numel() for _, b in data.batches[r::world]) for r in range(world)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--overhead", type=float, default=1.6,
                   help="fair_moe calibration ÷ activation-gradient floor (scripts/bench_calibration.py measured "
                        "1.52-1.63 on 2026-11-30)")
    p.add_argument("--projection-only", action="store_true", help="print the projection without measuring")
    args = p.parse_args(argv)
    if args.projection_only:
        print(projection(args.overhead))
        return 0
    out = Path(os.environ.get("TMPDIR", "/tmp")) / "fair_moe_bench_distributed"
    common = [*ARGS, "--samples", str(args.samples), "--seq-len", str(args.seq_len), "--overwrite"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    one = calibrate_seconds([sys.executable, "-m", "fair_moe.prune", *common, "--out", str(out / "one")],
                            {**env, "OMP_NUM_THREADS": "2"})
    two = calibrate_seconds([str(Path(sys.executable).parent / "torchrun"), "--nproc-per-node", "2", "-m",
                             "fair_moe.prune", *common, "--out", str(out / "two")], {**env, "OMP_NUM_THREADS": "1"})
    tokens = rank_tokens(args.samples, args.seq_len, 2)
    print("| run | calibration s | tokens per rank |\n|---|---|---|")
    print(f"| 1 process × 2 threads | {one:.1f} | {sum(tokens)} |")
    print(f"| 2 processes × 1 thread (gloo) | {two:.1f} | {' / '.join(map(str, tokens))} |")
    print(projection(args.overhead))
    return 0


def projection(overhead: float) -> str:
    """Projected calibration time of the shipped large-model layouts on R replicas of 8 × H100 (an estimate)."""
    lines = [f"\nProjected calibration time (overhead {overhead:.2f} × 4·N_active FLOPs per token; H100 at "
             f"{H100_FLOPS / 1e12:.0f} TFLOP/s × {UTILISATION:.0%}); estimates, not measurements:\n",
             "| model | active params | bf16 weights | fits one 8 × 80 GB replica | tokens | 1 replica | 2 replicas | "
             "4 replicas |", "|---|---|---|---|---|---|---|---|"]
    for name, (total, routed, top_k, experts) in ACTIVE.items():
        active = total - routed * (1 - top_k / experts)
        weights_gb = 2 * total / 1e9
        fits = "yes" if weights_gb < 0.9 * 8 * 80 else "no: 2 nodes per replica, or FP8 weights dequantised per layer"
        for count in (128 * 2048, 1024 * 2048):
            seconds = count * 4 * active * overhead / (8 * H100_FLOPS * UTILISATION)
            cells = " | ".join(f"{seconds / r / 60:.1f} min" for r in (1, 2, 4))
            lines.append(f"| {name} | {active / 1e9:.1f} B | {weights_gb:.0f} GB | {fits} | {count:,} | {cells} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
