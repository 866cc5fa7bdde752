"""Held-out perplexity of dense vs. pruned models for every allocation × removal signal at several budgets.

    python scripts/bench_quality.py --out bench_out/quality_demo.md     # demo model, budgets 0.125 … 0.625
    python scripts/train_demo_model.py --arch olmoe --out bench_out/olmoe_demo --no-samples --steps 800
    python scripts/bench_quality.py --model bench_out/olmoe_demo --out bench_out/quality_olmoe.md

One calibration pass (the bundled calibration sample, one class per domain) gives the scores every
configuration is allocated from; every pruned model is evaluated through the exact masked forward
(removed experts' router logits at -inf), which the test suite proves equal to the rewritten
checkpoint. Held-out text (fair_moe/data/heldout/) never takes part in calibration.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fair_moe import Budget, apply_plan, compute_scores, reference, save_pruned  # noqa: E402
from fair_moe.calibration import BUNDLED_HELDOUT_DIR, DEMO_MODEL_DIR  # noqa: E402
from fair_moe.calibration.text import bundled_sources, sources_from_files, token_stream  # noqa: E402
from fair_moe.metrics import stream_nll  # noqa: E402
from fair_moe.strategies.planning import make_plan  # noqa: E402
from fair_moe.strategies.selection import decide_compensation, select_plan  # noqa: E402
from fair_moe.units import UNIT_KINDS  # noqa: E402

EXPERTS = UNIT_KINDS.get("experts")

# (allocation, removal, compensation); baselines are the uniform and global rows.
CONFIGS = [
    ("uniform", "reap", "none"),
    ("uniform", "frequency", "none"),
    ("uniform", "ean", "none"),
    ("uniform", "wasserstein", "none"),
    ("uniform", "random", "none"),
    ("global", "reap", "none"),
    ("global", "frequency", "none"),
    ("global", "ean", "none"),
    ("global", "wasserstein", "none"),
    ("tod", "reap", "none"),
    ("tod", "frequency", "none"),
    ("tod", "ean", "none"),
    ("tod", "wasserstein", "none"),
    ("tod", "reap", "layer-scale"),
    ("uniform", "ean", "layer-scale"),
    ("uniform", "ean", "router-temperature"),
    ("tod", "wasserstein", "router-temperature"),
    ("uniform", "ean", "merge"),
    ("tod", "wasserstein", "merge"),
    ("auto", "-", "none"),
    ("auto", "-", "auto"),  # the default command
]
BASELINES = {"uniform", "global"}


def heldout_perplexity(model, streams: dict[str, torch.Tensor], seq_len: int) -> dict[str, float]:
    """Per-domain and overall perplexity over non-overlapping windows of seq_len tokens."""
    result, total_nll, total_n = {}, 0.0, 0
    for name, ids in streams.items():
        nll, n = stream_nll(model, ids, seq_len, stride=seq_len)
        result[name] = math.exp(nll / n)
        total_nll, total_n = total_nll + nll, total_n + n
    result["overall"] = math.exp(total_nll / total_n)
    return result


def harness_metrics(model_dir: str, tasks: list[str], include_path: Path | None, limit: float | None) -> dict:
    """lm-eval metrics of a checkpoint folder through fair_moe.eval (the same code users run)."""
    from fair_moe.workflow.evaluate import EvalSettings, evaluate, resolve_tasks

    args = EvalSettings(model=model_dir, output_json=Path("unused.json"), device="cpu", dtype="float32",
                        batch_size="8", limit=limit)
    return evaluate(model_dir, tasks, resolve_tasks(tasks, include_path), args)


def write_pruned(model, plan, folder: Path, tokenizer) -> None:
    import copy

    save_pruned(apply_plan(copy.deepcopy(model), plan), folder, tokenizer, plan)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(DEMO_MODEL_DIR))
    p.add_argument("--calib-file", type=Path, action="append", default=[], help="default: the bundled sample")
    p.add_argument("--heldout-dir", type=Path, default=BUNDLED_HELDOUT_DIR)
    p.add_argument("--budgets", default="0.125,0.25,0.375,0.5,0.625")
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="write the markdown table here (and .json beside it)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (1 lets two benchmarks share 2 cores)")
    p.add_argument("--only-auto", action="store_true", help="only the auto rows (the default command and auto alone)")
    p.add_argument("--only-compensation", help="only the rows with this compensation (e.g. router-temperature)")
    p.add_argument("--eval-tasks", help="also score every configuration with these lm-eval tasks through fair_moe.eval "
                   "(e.g. fair_moe_heldout_mc with --include-path eval/tasks); adds recovery columns")
    p.add_argument("--include-path", type=Path, default=ROOT / "eval" / "tasks")
    p.add_argument("--eval-limit", type=float)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.time()

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, trust_remote_code=True).eval()
    sources = sources_from_files(args.calib_file) if args.calib_file else bundled_sources()
    scores = compute_scores(model, tokenizer, sources, args.samples, args.seq_len, batch_size=8, seed=args.seed,
                            progress=False)
    streams = {f.stem: token_stream(tokenizer, [f.read_text()]) for f in sorted(args.heldout_dir.glob("*.txt"))}
    budgets = [float(b) for b in args.budgets.split(",")]

    rows = [("dense", "-", None, heldout_perplexity(model, streams, args.seq_len))]
    tasks = [t for t in (args.eval_tasks or "").split(",") if t]
    if tasks:
        dense_metrics = harness_metrics(args.model, tasks, args.include_path, args.eval_limit)
        rows[0][3].update({k: 1.0 for k in dense_metrics})
    for budget in budgets:
        selected = [c for c in CONFIGS if (c[0] == "auto" or not args.only_auto)
                    and (args.only_compensation is None or c[2] == args.only_compensation)]
        for allocation, removal, comp in selected:
            if removal not in scores.removal and removal != "-":
                continue
            settled = False
            if allocation == "auto":
                selection = select_plan(model, EXPERTS, scores, Budget(budget), comp, progress=False)
                plan, settled = selection.plan, selection.compensation_settled
            else:
                plan = make_plan(scores, Budget(budget), allocation, removal)
            if not settled:
                plan = decide_compensation(model, EXPERTS, plan, scores, comp, 4)
            with reference(model, plan):  # what the rewritten checkpoint equals
                ppl = heldout_perplexity(model, streams, args.seq_len)
            suffix = f" +{plan.compensation.kind}" if plan.compensation else ""
            if allocation == "auto":
                chosen = plan.settings["selected"]
                name = f"auto → {chosen['allocation']}+{chosen['removal']}" + suffix
            else:
                name = f"{allocation}+{removal}" + suffix
            if allocation == "auto" and comp == "auto":
                name = "**default** " + name
            elif allocation == "auto":
                name += " (no compensation)"
            if args.eval_tasks:
                import tempfile

                with tempfile.TemporaryDirectory() as tmp:
                    write_pruned(model, plan, Path(tmp), tokenizer)
                    metrics = harness_metrics(tmp, tasks, args.include_path, args.eval_limit)
                ppl.update({k: v / dense_metrics[k] for k, v in metrics.items() if dense_metrics.get(k)})
            rows.append((name, budget, plan, ppl))
            print(f"{budget:5.3f} {name:40s} overall {ppl['overall']:8.3f}  kept {list(plan.kept_counts.values())}",
                  flush=True)

    domains = [*streams, "overall"] + [k for k in rows[0][3] if "/" in k]
    lines = [
        f"Model `{Path(args.model).name}`, calibration {scores.meta['calibration']['samples']} × {args.seq_len} tokens "
        f"({', '.join(s.name for s in sources)}), held-out perplexity (lower is better); {time.time() - t0:.0f} s.",
        "",
        "| budget | method | " + " | ".join(domains) + " | kept per layer |",
        "|---|---|" + "---|" * len(domains) + "---|",
    ]
    best_baseline = {}
    for name, budget, plan, ppl in rows:
        if plan is not None and name.split("+")[0] in BASELINES and "random" not in name and name.count("+") == 1:
            best_baseline[budget] = min(best_baseline.get(budget, math.inf), ppl["overall"])
    for name, budget, plan, ppl in rows:
        kept = "-" if plan is None else " ".join(str(v) for v in plan.kept_counts.values())
        baseline = name.split("+")[0] in BASELINES and "random" not in name and name.count("+") == 1
        mark = (" (best baseline)" if baseline and plan is not None and ppl["overall"] == best_baseline.get(budget)
                else "")
        lines.append(f"| {budget} | {name}{mark} | " + " | ".join(f"{ppl[d]:.3f}" for d in domains) + f" | {kept} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table + "\n")
        args.out.with_suffix(".json").write_text(json.dumps(
            [{"method": n, "budget": b, "perplexity": ppl, "kept": None if pl is None else pl.kept_counts,
              "alpha": None if pl is None else pl.alpha} for n, b, pl, ppl in rows], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
