"""Does calibration text show what held-out text shows? Per domain, the KL of uniform plans' next-token
distributions from the dense model's, on windows of the calibration files and of the held-out files.

    python scripts/train_demo_model.py --fixture qwen2moe6
    fair-moe-prune --model bench_out/fixtures/qwen2moe6/model --calib-file bench_out/fixtures/qwen2moe6/calib/docs.txt \
        --calib-file bench_out/fixtures/qwen2moe6/calib/licenses.txt \
        --calib-file bench_out/fixtures/qwen2moe6/calib/python.txt --samples 128 --seq-len 512 --budget 0.5 --out OUT
    python scripts/bench_judge_shift.py --fixture qwen2moe6 --scores OUT/fair_moe_scores.safetensors --budget 0.5

For each domain and split: mean and median window KL (nats per token; the judge of ``--allocation auto``
itself, ``DenseReference.window_kl``) of ``uniform + <signal>`` for each signal, and on how many windows the
second signal's plan is lower than the first's. A plan the judge prefers on calibration windows but that loses on
held-out windows of the same domain is a shift no judge of calibration text can see.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_quality as bq  # noqa: E402


def spread_windows(ids: torch.Tensor, count: int, seq_len: int) -> torch.Tensor:
    """``count`` non-overlapping windows [count, seq_len] spread evenly over the token stream ``ids``."""
    available = len(ids) // seq_len
    starts = torch.linspace(0, available - 1, min(count, available)).long()
    return torch.stack([ids[i * seq_len : (i + 1) * seq_len] for i in starts])


def main(argv: list[str] | None = None) -> None:
    from fair_moe.core.budget import Budget
    from fair_moe.core.scores import Scores
    from fair_moe.metrics import DenseReference
    from fair_moe.strategies.selection import window_kl

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fixture", default="qwen2moe6", choices=sorted(bq.FIXTURES))
    p.add_argument("--scores", type=Path, required=True, help="fair_moe_scores.safetensors of a run on the fixture")
    p.add_argument("--budget", type=float, default=0.5)
    p.add_argument("--signals", default="ean,wasserstein", help="two removal signals, compared under uniform")
    p.add_argument("--windows", type=int, default=12, help="windows per file")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    tokenizer, model, _ = bq.load_fixture(args.fixture)
    data_dir = bq.FIXTURES[args.fixture][1]
    scores = Scores.load(args.scores)
    first, second = args.signals.split(",")
    plans = {s: bq.make_plan(scores, Budget(args.budget), "uniform", s).kept for s in (first, second)}
    print(f"{args.fixture}, budget {args.budget}: window KL from the dense model, uniform + {first} / {second}")
    print(f"| split | domain | {first} mean / median | {second} mean / median | {second} lower on |")
    print("|---|---|---|---|---|")
    for split in ("calib", "heldout"):
        for path in sorted((data_dir / split).glob("*.txt")):
            judge = DenseReference(model, spread_windows(bq.token_stream(tokenizer, [path.read_text()]), args.windows,
                                                         512))
            kl = {s: window_kl(judge, model, bq.EXPERTS, kept, None) for s, kept in plans.items()}
            a, b = kl[first], kl[second]
            print(f"| {split} | {path.stem} | {a.mean():.3f} / {a.median():.3f} | {b.mean():.3f} / {b.median():.3f} | "
                  f"{int((b < a).sum())} of {len(judge)} |")


if __name__ == "__main__":
    main()
