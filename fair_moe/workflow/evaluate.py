"""Evaluate a (pruned) model with lm-evaluation-harness and perplexity, optionally against its base.

Both models go through the same code with the same settings. With a base, a recovery table (pruned ÷
base per metric; base ÷ pruned for perplexity, so that 1.0 is full recovery and lower is worse) is
written into the JSON and as markdown next to it (PATH with .md).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fair_moe.core.errors import FairMoeError

log = logging.getLogger(__name__)


@dataclass
class EvalSettings:
    """One ``python -m fair_moe.eval`` run."""

    model: str
    output_json: Path
    base: str | None = None
    tasks: str | None = None
    config: Path | None = None
    include_path: Path | None = None
    ppl_file: list[Path] = field(default_factory=list)
    ppl_seq_len: int = 512
    limit: float | None = None
    batch_size: str = "1"
    num_fewshot: int | None = None
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 0


def load_eval_config(path: Path | None) -> dict:
    if path is None:
        return {}
    import yaml

    if not path.is_file():
        raise FairMoeError(f"--config {path} does not exist")
    return yaml.safe_load(path.read_text()) or {}


def resolve_tasks(names: list[str], include_path: Path | None):
    """A TaskManager that knows every name, or a FairMoeError naming the unknown ones."""
    from lm_eval.tasks import TaskManager

    if include_path is not None and not include_path.is_dir():
        raise FairMoeError(f"--include-path {include_path} is not a folder")
    manager = TaskManager(include_path=str(include_path) if include_path else None)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise FairMoeError(
            f"unknown lm-eval task(s): {', '.join(unknown)}; check --tasks (and --include-path for local tasks)"
        )
    return manager


def run_lm_eval(model_name: str, tasks: list[str], manager, args, dtype: str, device: str) -> dict[str, float]:
    """{"task/metric": value} for every numeric metric lm-eval reports (stderr entries dropped)."""
    import lm_eval

    out = lm_eval.simple_evaluate(
        model="hf",
        model_args={"pretrained": model_name, "trust_remote_code": True, "dtype": dtype},
        tasks=tasks,
        num_fewshot=args.num_fewshot,
        batch_size=args.batch_size,
        device=device,
        limit=args.limit,
        task_manager=manager,
        random_seed=args.seed,
        numpy_random_seed=args.seed,
        torch_random_seed=args.seed,
        fewshot_random_seed=args.seed,
        log_samples=False,
    )
    metrics = {}
    for task, values in out["results"].items():
        for key, value in values.items():
            if (
                "stderr" in key
                or key.startswith("sample")
                or not isinstance(value, (int, float))
                or isinstance(value, bool)
            ):
                continue  # uncertainty and bookkeeping entries, not metrics
            metrics[f"{task}/{key.split(',')[0]}"] = float(value)
    return metrics


def run_perplexity(
    model_name: str, files: list[Path], seq_len: int, dtype: torch.dtype, device: str
) -> dict[str, float]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fair_moe.calibration.text import token_stream
    from fair_moe.metrics import stream_nll

    tokenizer = AutoTokenizer.from_pretrained(model_name)
    model = AutoModelForCausalLM.from_pretrained(model_name, trust_remote_code=True, dtype=dtype).to(device).eval()
    result, nll_all, n_all = {}, 0.0, 0
    for path in files:
        nll, n = stream_nll(model, token_stream(tokenizer, [path.read_text(encoding="utf-8")]), seq_len)
        result[f"perplexity/{path.stem}"] = math.exp(nll / n)
        nll_all, n_all = nll_all + nll, n_all + n
    result["perplexity/overall"] = math.exp(nll_all / n_all)
    return result


def evaluate(model_name: str, tasks: list[str], manager, args) -> dict[str, float]:
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype_name = args.dtype if args.dtype != "auto" else ("float32" if device == "cpu" else "auto")
    metrics = run_lm_eval(model_name, tasks, manager, args, dtype_name, device) if tasks else {}
    if args.ppl_file:
        torch_dtype = torch.float32 if dtype_name in ("auto", "float32") else getattr(torch, dtype_name)
        metrics.update(run_perplexity(model_name, args.ppl_file, args.ppl_seq_len, torch_dtype, device))
    return metrics


def recovery(pruned: dict[str, float], base: dict[str, float]) -> dict[str, float]:
    """pruned ÷ base per metric (base ÷ pruned for perplexity, lower-is-better), plus their average."""
    table = {}
    for key, value in pruned.items():
        if key not in base or base[key] == 0 or value == 0:
            continue
        table[key] = base[key] / value if key.startswith("perplexity/") else value / base[key]
    if table:
        table["average"] = sum(table.values()) / len(table)
    return table


def recovery_markdown(pruned: dict, base: dict, rec: dict, threshold: float | None) -> str:
    lines = ["| metric | base | pruned | recovery |" + (" ok |" if threshold else ""),
             "|---|---|---|---|" + ("---|" if threshold else "")]
    for key, value in rec.items():
        if key == "average":
            continue
        mark = (" ✓ |" if value >= threshold else " ✗ |") if threshold else ""
        lines.append(f"| {key} | {base[key]:.4f} | {pruned[key]:.4f} | {value:.3f} |{mark}")
    if "average" in rec:
        lines.append(f"| **average** | | | **{rec['average']:.3f}** |" + (" |" if threshold else ""))
    return "\n".join(lines) + "\n"


def run_eval(args: EvalSettings) -> None:
    config = load_eval_config(args.config)
    tasks = [t for t in (args.tasks or ",".join(config.get("tasks", []))).split(",") if t]
    if args.num_fewshot is None:
        args.num_fewshot = config.get("num_fewshot")
    if not tasks and not args.ppl_file:
        raise FairMoeError("nothing to evaluate: pass --tasks (or --config) and/or --ppl-file")
    missing = [str(p) for p in args.ppl_file if not p.is_file()]
    if missing:
        raise FairMoeError(f"--ppl-file not found: {', '.join(missing)}")
    for name, label in ((args.model, "--model"), (args.base, "--base")):
        if name and name.startswith((".", "/")) and not Path(name).exists():
            raise FairMoeError(f"{label} {name} does not exist")
    manager = resolve_tasks(tasks, args.include_path) if tasks else None
    try:  # before the (long) evaluation: a folder that cannot be made fails now, not after it
        args.output_json.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise FairMoeError(f"--output-json {args.output_json}: cannot create its folder ({err.strerror}); choose "
                           "another --output-json") from err
    result: dict = {"model": args.model, "tasks": tasks, "ppl_files": [str(p) for p in args.ppl_file],
                    "settings": {"limit": args.limit, "num_fewshot": args.num_fewshot, "seed": args.seed}}
    result["metrics"] = evaluate(args.model, tasks, manager, args)
    threshold = config.get("recovery_threshold")
    if args.base:
        result["base"] = args.base
        result["base_metrics"] = evaluate(args.base, tasks, manager, args)
        result["recovery"] = recovery(result["metrics"], result["base_metrics"])
        result["recovery_threshold"] = threshold
        markdown = recovery_markdown(result["metrics"], result["base_metrics"], result["recovery"], threshold)
        args.output_json.with_suffix(".md").write_text(markdown)
        print(markdown)
    args.output_json.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    for key, value in result["metrics"].items():
        print(f"{key}: {value:.4f}")


