"""Evaluate a (pruned) model with lm-evaluation-harness and perplexity, optionally against its base.

Both models go through the same code with the same settings. With a base, a recovery table (pruned ÷
base per metric; base ÷ pruned for perplexity, so that 1.0 is full recovery and lower is worse) is
written into the JSON and as markdown next to it (PATH with .md); ``fail_under`` (or the config's
``recovery_threshold``) turns a metric below it into a non-zero exit. The base model's results are cached,
keyed by a fingerprint of its files and every setting that changes them, so evaluating several pruned
checkpoints against one base evaluates the base once. lm-eval's own results JSON is kept beside ours.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fair_moe.core.errors import FairMoeError

log = logging.getLogger(__name__)
DEFAULT_CACHE = Path.home() / ".cache" / "fair_moe" / "eval"


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
    backend: str = "hf"
    model_args: str | None = None
    trust_remote_code: bool = False
    fail_under: float | None = None
    cache_dir: Path | None = DEFAULT_CACHE
    quiet: bool = False


class RecoveryBelowThreshold(FairMoeError):
    """Some metric recovered less than the threshold: the evaluation ran, the model did not pass (exit 1)."""

    exit_code = 1


def load_eval_config(path: Path | None) -> dict:
    """A suite file, or the name of one fair_moe ships (``standard``: the 8-task zero-shot suite)."""
    if path is None:
        return {}
    import yaml

    from fair_moe.calibration import CONFIGS_DIR

    shipped = CONFIGS_DIR / "eval" / f"{Path(path).stem}.yaml"
    if not Path(path).is_file() and shipped.is_file():
        path = shipped
    if not Path(path).is_file():
        names = ", ".join(p.stem for p in sorted((CONFIGS_DIR / "eval").glob("*.yaml")))
        raise FairMoeError(f"--config {path} does not exist (shipped suites: {names})")
    return yaml.safe_load(Path(path).read_text()) or {}


def resolve_tasks(names: list[str], include_path: Path | None):
    """A TaskManager that knows every name (lm-eval's, fair_moe's shipped offline tasks, and ``include_path``'s),
    or a FairMoeError naming the unknown ones."""
    from lm_eval.tasks import TaskManager

    from fair_moe.calibration import EVAL_TASKS_DIR

    if include_path is not None and not include_path.is_dir():
        raise FairMoeError(f"--include-path {include_path} is not a folder")
    paths = [str(EVAL_TASKS_DIR)] + ([str(include_path)] if include_path else [])
    manager = TaskManager(include_path=paths)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise FairMoeError(
            f"unknown lm-eval task(s): {', '.join(unknown)}; check --tasks (and --include-path for local tasks)"
        )
    return manager


def parse_model_args(text: str | None) -> dict:
    """lm-eval's ``key=value,key=value`` model arguments (``parallelize=True``, ``max_length=4096``, …)."""
    if not text:
        return {}
    result = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise FairMoeError(f"--model-args {text!r}: write key=value pairs separated by commas")
        result[key.strip()] = {"true": True, "false": False}.get(value.strip().lower(), value.strip())
    return result


def resolve_device(name: str) -> str:
    import torch

    return name if name != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")


def compute_dtype(name: str, device: str) -> str:
    """``auto``: the checkpoint's own dtype on a GPU, float32 on the CPU (half precision is slow and lossy there)."""
    return name if name != "auto" else ("float32" if device == "cpu" else "auto")


def run_lm_eval(model_name: str, tasks: list[str], manager, args: EvalSettings, dtype: str, device: str
                ) -> tuple[dict[str, float], dict]:
    """{"task/metric": value} for every numeric metric lm-eval reports (stderr entries dropped), and lm-eval's
    own results (without per-sample logs)."""
    import lm_eval

    model_args = {"pretrained": model_name, "trust_remote_code": args.trust_remote_code, "dtype": dtype,
                  **parse_model_args(args.model_args)}
    try:
        out = lm_eval.simple_evaluate(
            model=args.backend,
            model_args=model_args,
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
    except ValueError as err:
        if "trust_remote_code" in str(err):
            raise needs_remote_code(model_name) from err
        raise
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
    harness = {k: v for k, v in out.items() if k in ("results", "groups", "configs", "versions", "n-shot", "config",
                                                     "n-samples", "higher_is_better")}
    return metrics, json.loads(json.dumps(harness, default=str))


def needs_remote_code(model_name: str) -> FairMoeError:
    return FairMoeError(f"--model {model_name} needs its own modeling code (an uneven fair_moe checkpoint carries "
                        "modeling_fair_moe.py): pass --trust-remote-code if you trust it")


def run_perplexity(model_name: str, files: list[Path], seq_len: int, dtype, device: str, args: EvalSettings
                   ) -> dict[str, float]:
    """Perplexity per file and over all files (strided windows), in ``dtype`` on ``device`` (or spread over
    devices with ``--model-args parallelize=True``)."""
    import warnings

    import transformers
    from transformers import AutoConfig, AutoTokenizer

    from fair_moe.adapters.structure import auto_class_name
    from fair_moe.calibration.text import token_stream
    from fair_moe.metrics import stream_nll

    spread = bool(parse_model_args(args.model_args).get("parallelize"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tokenizer = AutoTokenizer.from_pretrained(model_name, trust_remote_code=args.trust_remote_code)
        try:
            # the model's own Auto class: a multimodal MoE's checkpoint is not a causal LM's
            auto = getattr(transformers, auto_class_name(
                AutoConfig.from_pretrained(model_name, trust_remote_code=args.trust_remote_code)))
            model = auto.from_pretrained(model_name, trust_remote_code=args.trust_remote_code,
                                         dtype=dtype, **({"device_map": "auto"} if spread else {}))
        except ValueError as err:
            if "trust_remote_code" in str(err):
                raise needs_remote_code(model_name) from err
            raise
    if not spread:
        model = model.to(device)
    model.eval()
    result, nll_all, n_all = {}, 0.0, 0
    for path in files:
        nll, n = stream_nll(model, token_stream(tokenizer, [path.read_text(encoding="utf-8")]), seq_len,
                            progress=not args.quiet)
        result[f"perplexity/{path.stem}"] = math.exp(nll / n)
        nll_all, n_all = nll_all + nll, n_all + n
    if len(files) > 1:
        result["perplexity/overall"] = math.exp(nll_all / n_all)
    return result


def evaluate(model_name: str, tasks: list[str], manager, args: EvalSettings) -> tuple[dict[str, float], dict]:
    """All metrics of one model and lm-eval's own results."""
    import torch

    device = resolve_device(args.device)
    dtype_name = compute_dtype(args.dtype, device)
    metrics, harness = run_lm_eval(model_name, tasks, manager, args, dtype_name, device) if tasks else ({}, {})
    if args.ppl_file:
        torch_dtype = "auto" if dtype_name == "auto" else getattr(torch, dtype_name)
        metrics.update(run_perplexity(model_name, args.ppl_file, args.ppl_seq_len, torch_dtype, device, args))
    return metrics, harness


def fingerprint(model_name: str) -> str:
    """Identifies a model's files without reading the weights: config and every file's name, size and
    modification time for a local folder; the id for a Hub model (its cached snapshot is immutable)."""
    path = Path(model_name).expanduser()
    if not path.is_dir():
        return f"hub:{model_name}"
    digest = hashlib.sha256()
    for file in sorted(p for p in path.iterdir() if p.is_file()):
        stat = file.stat()
        digest.update(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns};".encode())
        if file.name == "config.json":
            digest.update(file.read_bytes())
    return f"{path.resolve()}:{digest.hexdigest()[:20]}"


def cache_key(model_name: str, tasks: list[str], args: EvalSettings) -> str:
    settings = {k: v for k, v in asdict(args).items()
                if k in ("ppl_seq_len", "limit", "batch_size", "num_fewshot", "device", "dtype", "seed", "backend",
                         "model_args")}
    blob = json.dumps({"model": fingerprint(model_name), "tasks": sorted(tasks),
                       "ppl": sorted(str(Path(p).resolve()) + str(Path(p).stat().st_mtime_ns) for p in args.ppl_file),
                       "settings": settings}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def evaluate_base(model_name: str, tasks: list[str], manager, args: EvalSettings) -> tuple[dict, dict, bool]:
    """The base model's results, from the cache when the same files were evaluated the same way before."""
    path = args.cache_dir / f"{cache_key(model_name, tasks, args)}.json" if args.cache_dir else None
    if path is not None and path.is_file():
        cached = json.loads(path.read_text())
        log.info("base results of %s from the cache (%s)", model_name, path)
        return cached["metrics"], cached["harness"], True
    metrics, harness = evaluate(model_name, tasks, manager, args)
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"model": model_name, "metrics": metrics, "harness": harness}))
        except OSError as err:  # a cache that cannot be written only costs time
            log.warning("could not cache the base results in %s: %s", path, err.strerror)
    return metrics, harness, False


def recovery(pruned: dict[str, float], base: dict[str, float]) -> dict[str, float]:
    """pruned ÷ base per metric (base ÷ pruned for perplexity, lower-is-better), plus their average over the task
    metrics and the per-file perplexities (``perplexity/overall`` summarises those, so it is not counted again)."""
    table = {}
    for key, value in pruned.items():
        if key not in base or base[key] == 0 or value == 0:
            continue
        table[key] = base[key] / value if key.startswith("perplexity/") else value / base[key]
    counted = [v for k, v in table.items() if k != "perplexity/overall"]
    if counted:
        table["average"] = sum(counted) / len(counted)
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


def run_eval(args: EvalSettings) -> dict:
    """Evaluate, write the results JSON (+ .md recovery table, + lm-eval's own results), check the threshold."""
    from fair_moe.calibration import resolve_alias

    args.model, args.base = resolve_alias(args.model), resolve_alias(args.base)
    config = load_eval_config(args.config)
    tasks = [t for t in (args.tasks or ",".join(config.get("tasks", []))).split(",") if t]
    if args.num_fewshot is None:
        args.num_fewshot = config.get("num_fewshot")
    threshold = args.fail_under if args.fail_under is not None else config.get("recovery_threshold")
    if not tasks and not args.ppl_file:
        raise FairMoeError("nothing to evaluate: pass --tasks (or --config) and/or --ppl-file")
    missing = [str(p) for p in args.ppl_file if not p.is_file()]
    if missing:
        raise FairMoeError(f"--ppl-file not found: {', '.join(missing)}")
    for name, label in ((args.model, "--model"), (args.base, "--base")):
        if name and (name.startswith((".", "/", "~")) or Path(name).exists()) and not Path(name).expanduser().exists():
            raise FairMoeError(f"{label} {name} does not exist: pass a checkpoint folder or a Hub id")
    for name in (args.model, args.base):
        config_file = Path(name).expanduser() / "config.json" if name else None
        if (config_file is not None and config_file.is_file() and not args.trust_remote_code
                and json.loads(config_file.read_text()).get("auto_map")):
            raise needs_remote_code(name)
    if threshold is not None and not args.base:
        raise FairMoeError("--fail-under compares with the base model: pass --base")
    parse_model_args(args.model_args)
    manager = resolve_tasks(tasks, args.include_path) if tasks else None
    try:  # before the (long) evaluation: a folder that cannot be made fails now, not after it
        args.output_json.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise FairMoeError(f"--output-json {args.output_json}: cannot create its folder ({err.strerror}); choose "
                           "another --output-json") from err
    result: dict = {"model": args.model, "tasks": tasks, "ppl_files": [str(p) for p in args.ppl_file],
                    "settings": {"limit": args.limit, "num_fewshot": args.num_fewshot, "seed": args.seed,
                                 "backend": args.backend, "model_args": args.model_args, "dtype": args.dtype}}
    result["metrics"], harness = evaluate(args.model, tasks, manager, args)
    harness_files = {"model": harness}
    if args.base:
        result["base"] = args.base
        result["base_metrics"], base_harness, cached = evaluate_base(args.base, tasks, manager, args)
        result["base_from_cache"] = cached
        harness_files["base"] = base_harness
        result["recovery"] = recovery(result["metrics"], result["base_metrics"])
        result["recovery_threshold"] = threshold
        markdown = recovery_markdown(result["metrics"], result["base_metrics"], result["recovery"], threshold)
        args.output_json.with_suffix(".md").write_text(markdown)
        print(markdown)
    for which, data in harness_files.items():
        if data:
            path = args.output_json.with_name(f"{args.output_json.stem}.lm_eval.{which}.json")
            path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    args.output_json.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    for key, value in result["metrics"].items():
        print(f"{key}: {value:.4f}")
    if threshold is not None:
        failing = {k: v for k, v in result["recovery"].items() if k != "average" and v < threshold}
        if failing:
            raise RecoveryBelowThreshold(
                f"recovery below {threshold}: " + ", ".join(f"{k} {v:.3f}" for k, v in failing.items())
                + f" (results in {args.output_json})")
    return result
