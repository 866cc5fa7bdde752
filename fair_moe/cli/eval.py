"""Evaluate a (pruned) model with lm-evaluation-harness and perplexity, optionally against its base.

    fair-moe-eval --model demo_out --base demo --tasks fair_moe_heldout_mc --trust-remote-code \\
        --ppl-file fair_moe/data/heldout/python.txt --output-json results.json
    fair-moe-eval --model out --base Qwen/Qwen1.5-MoE-A2.7B-Chat --config standard --output-json results.json

Both models go through the same code with the same settings. With --base, a recovery table (pruned ÷
base per metric; base ÷ pruned for perplexity, so that 1.0 is full recovery and lower is worse) is
written into the JSON and as markdown next to it (PATH with .md).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fair_moe.cli.common import HelpFormatter, quiet_libraries, run_command, set_threads
from fair_moe.workflow.evaluate import DEFAULT_CACHE


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fair-moe-eval", description=__doc__,
                                formatter_class=HelpFormatter)
    p.add_argument("--model", required=True, help="pruned checkpoint folder or Hub id")
    p.add_argument("--base", help="the model it was pruned from, evaluated identically (its results are cached); "
                   "demo names the shipped demo model")
    p.add_argument("--tasks", help="comma-separated lm-eval task names")
    p.add_argument("--config", type=Path, help="YAML with tasks / num_fewshot / recovery_threshold, or a shipped "
                   "suite's name (standard: the 8-task zero-shot suite)")
    p.add_argument("--include-path", type=Path, help="folder of extra lm-eval task YAMLs (fair_moe's offline "
                   "fair_moe_heldout_mc is always included)")
    p.add_argument("--ppl-file", type=Path, action="append", default=[], help="local text for perplexity (repeatable)")
    p.add_argument("--ppl-seq-len", type=int, default=512, help="perplexity window in tokens")
    p.add_argument("--limit", type=float, help="examples per task (lm-eval --limit)")
    p.add_argument("--batch-size", default="1", help="lm-eval batch size (a number or auto)")
    p.add_argument("--num-fewshot", type=int, help="few-shot examples (default: the config's, else the task's)")
    p.add_argument("--device", default="auto", choices=["cpu", "cuda", "auto"], help="where the model runs")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: the checkpoint's dtype on a GPU, float32 on the CPU")
    p.add_argument("--backend", default="hf", choices=["hf", "vllm"], help="lm-eval model type (vllm when installed)")
    p.add_argument("--model-args", help="extra lm-eval model arguments, e.g. parallelize=True,max_length=4096 "
                   "(parallelize also spreads the perplexity model over the GPUs)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow the checkpoint's own modeling code (uneven fair_moe checkpoints need it)")
    p.add_argument("--fail-under", type=float, metavar="RATIO",
                   help="exit 1 when any metric's recovery is below RATIO (default: the config's recovery_threshold)")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="where base results are cached")
    p.add_argument("--no-cache", dest="cache_dir", action="store_const", const=None,
                   help="always evaluate the base model again")
    p.add_argument("--seed", type=int, default=0, help="seed of every random choice lm-eval makes")
    p.add_argument("--threads", type=int, metavar="N",
                   help="CPU threads torch may use for its own parallel work (default: torch's choice, one per core)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--output-json", type=Path, required=True,
                   help="results; recovery table in .md and lm-eval's own results in .lm_eval.*.json beside it")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def run() -> None:
        from fair_moe.workflow.evaluate import EvalSettings, run_eval

        settings = vars(args)
        threads = settings.pop("threads")  # a machine setting, not one of the evaluation's
        if threads is not None:
            set_threads(threads)
        with quiet_libraries(args.quiet):  # transformers' loading bars too, as for fair-moe-prune
            run_eval(EvalSettings(**settings))

    return run_command(run)
