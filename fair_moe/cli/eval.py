"""Evaluate a (pruned) model with lm-evaluation-harness and perplexity, optionally against its base.

    python -m fair_moe.eval --model demo_out --base fair_moe/data/demo_model \\
        --tasks fair_moe_heldout_mc --include-path eval/tasks \\
        --ppl-file fair_moe/data/heldout/python.txt --output-json results.json
    python -m fair_moe.eval --model out --base Qwen/Qwen1.5-MoE-A2.7B-Chat --config configs/eval/standard.yaml \\
        --output-json results.json

Both models go through the same code with the same settings. With --base, a recovery table (pruned ÷
base per metric; base ÷ pruned for perplexity, so that 1.0 is full recovery and lower is worse) is
written into the JSON and as markdown next to it (PATH with .md).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fair_moe.cli.common import run_command


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fair_moe.eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="pruned checkpoint folder or Hub id")
    p.add_argument("--base", help="the model it was pruned from, evaluated identically")
    p.add_argument("--tasks", help="comma-separated lm-eval task names")
    p.add_argument("--config", type=Path, help="YAML with tasks / num_fewshot / recovery_threshold (configs/eval/)")
    p.add_argument("--include-path", type=Path, help="folder of extra lm-eval task YAMLs (e.g. eval/tasks)")
    p.add_argument("--ppl-file", type=Path, action="append", default=[], help="local text for perplexity (repeatable)")
    p.add_argument("--ppl-seq-len", type=int, default=512)
    p.add_argument("--limit", type=float, help="examples per task (lm-eval --limit)")
    p.add_argument("--batch-size", default="1")
    p.add_argument("--num-fewshot", type=int)
    p.add_argument("--device", default="auto", choices=["cpu", "cuda", "auto"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-json", type=Path, required=True)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def run() -> None:
        from fair_moe.workflow.evaluate import EvalSettings, run_eval

        run_eval(EvalSettings(**vars(args)))

    return run_command(run)
