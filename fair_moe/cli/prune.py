"""Prune the routed experts of a Hugging Face MoE model (or a vision transformer's units).

    python -m fair_moe.prune --model fair_moe/data/demo_model --out /tmp/pruned --budget 0.25
    python -m fair_moe.prune --model Qwen/Qwen1.5-MoE-A2.7B-Chat --calib-file a.txt --calib-file b.jsonl \\
        --budget 0.25 --out qwen-pruned
    python -m fair_moe.prune --model M --scores qwen-pruned/fair_moe_scores.safetensors --budget 0.5 --out q50
    python -m fair_moe.prune --list-models

All input is checked before the model is loaded or calibrated; on any error nothing is written to --out.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fair_moe.cli.common import HelpFormatter, quiet_libraries, run_command, set_threads
from fair_moe.core.budget import Budget
from fair_moe.strategies import (
    ALLOCATIONS,
    AUTO,
    AUTO_ALLOCATION_HELP,
    AUTO_COMPENSATION_HELP,
    COMPENSATIONS,
    LAYOUTS,
    PROTECTION_SIGNALS,
    REMOVAL_SIGNALS,
)
from fair_moe.units import UNIT_KINDS
from fair_moe.workflow.settings import (
    CalibrationSettings,
    MethodSettings,
    OutputSettings,
    PruneSettings,
    RuntimeSettings,
)


def _choices(registry, auto: str | None = None) -> str:
    lines = ([f"{AUTO}: {auto}"] if auto else []) + [f"{item.name}: {item.description}" for item in registry]
    return "; ".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fair-moe-prune", description=__doc__,
                                formatter_class=HelpFormatter)
    p.add_argument("--model", help="local checkpoint folder or Hub id; demo / demo-vision name the shipped demo "
                   "models")
    p.add_argument("--out", type=Path, help="output folder (must not exist or be empty, unless --overwrite)")
    p.add_argument("--list-models", action="store_true", help="print the supported model types and exit")
    p.add_argument("--recipe", type=Path, help="a YAML file of settings (keys are these flags' names, e.g. budget: "
                   "0.25, calib_file: [a.txt, b.txt]); flags given here override it. Every output folder holds "
                   "the fair_moe_recipe.yaml that reproduces it")
    p.add_argument("--plan", type=Path, help="apply a saved fair_moe_plan.json (or the folder holding it) as it "
                   "is: no calibration and no choosing; its compensation is applied as recorded")

    c = p.add_argument_group("calibration")
    c.add_argument("--calib-file", type=Path, action="append", default=[],
                   help=".txt or .jsonl; repeatable, one class each")
    c.add_argument("--calib-images", type=Path,
                   help="vision transformers: image folder with one sub-folder per class (prunes MLP neurons); "
                        "demo-digits names the shipped digits")
    c.add_argument("--units", choices=UNIT_KINDS.names(),
                   help="what to prune: " + _choices(UNIT_KINDS) + " (default: experts; neurons with --calib-images)")
    c.add_argument("--calib-dataset", action="append", default=[], metavar="SPEC",
                   help="a dataset as one calibration class, read in streaming mode: NAME[,config=C][,split=S]"
                        "[,field=F][,samples=N][,data_files=PATTERN] (a Hub id, a local folder, or json / text with "
                        "data_files); repeatable: several specs with samples= make a composite mix")
    c.add_argument("--calib-config", help="dataset config of a single --calib-dataset; comma-separated for several "
                   "classes")
    c.add_argument("--calib-split", default="train", help="default split of --calib-dataset specs (default train)")
    c.add_argument("--text-field", default="text", help="field holding the text in .jsonl files and datasets; a "
                   "list of chat messages (or a messages / conversations column) is rendered with the tokenizer's "
                   "chat template (default text)")
    c.add_argument("--samples", type=int, default=128, help="calibration sequences in total")
    c.add_argument("--seq-len", type=int, default=512, help="tokens per sequence")
    c.add_argument("--batch-size", type=int, default=8, help="sequences per forward + backward pass")
    c.add_argument("--seed", type=int, default=0, help="seed of the window draw, random signal and any fitting")

    b = p.add_argument_group("budget")
    b.add_argument("--budget", help="fraction of routed experts removed model-wide (e.g. 0.25); a comma-separated "
                   "list writes one checkpoint per budget into OUT/budget-B/ from one calibration")
    b.add_argument("--tolerance", type=float, help="ToD tolerance α in [0, 1] instead of a budget")
    b.add_argument("--min-keep", type=int, help="experts every layer keeps (default: the router's top_k)")

    m = p.add_argument_group("method")
    m.add_argument("--allocation", default=AUTO, choices=[AUTO, *ALLOCATIONS.names()],
                   help=_choices(ALLOCATIONS, AUTO_ALLOCATION_HELP) + " (default auto; vision units: tod)")
    m.add_argument("--removal", default=None, choices=REMOVAL_SIGNALS.names(),
                   help=_choices(REMOVAL_SIGNALS) + " (default reap for experts, wasserstein for vision; "
                        "auto tries every signal but random)")
    m.add_argument("--protection", default="taylor", choices=PROTECTION_SIGNALS.names(),
                   help=_choices(PROTECTION_SIGNALS))
    m.add_argument("--compensate", default=AUTO, choices=[AUTO, *COMPENSATIONS.names()],
                   help=_choices(COMPENSATIONS, AUTO_COMPENSATION_HELP) + " (default auto)")
    m.add_argument("--layout", default="any", choices=list(LAYOUTS),
                   help="; ".join(f"{k}: {v}" for k, v in LAYOUTS.items()) + " (default any)")
    m.add_argument("--compensate-option", action="append", default=[], metavar="NAME=VALUE",
                   help="an option of the compensation, repeatable: " + "; ".join(
                       f"{c.name}: " + ", ".join(f"{n} ({h}, default {d})" for n, (_, d, h) in c.options.items())
                       for c in COMPENSATIONS if c.options))

    r = p.add_argument_group("reuse and runtime")
    r.add_argument("--scores", type=Path, help="fair_moe_scores.safetensors from an earlier run: no calibration")
    r.add_argument("--device", default="auto", choices=["cpu", "cuda", "auto"],
                   help="where the model runs (auto: cuda when available)")
    r.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="compute dtype; auto = the checkpoint's, but float32 on CPU for half-precision checkpoints. "
                        "Weights are saved in the checkpoint's own dtype.")
    r.add_argument("--device-map", help="accelerate device map for models larger than memory (e.g. auto); implies "
                   "--layerwise and a streamed rewrite")
    r.add_argument("--max-memory", help="per-device memory for --device-map, e.g. 'cpu=8GiB' or '0=20GiB,cpu=64GiB'")
    r.add_argument("--offload-folder", type=Path, help="where --device-map offloads weights that do not fit")
    r.add_argument("--layerwise", action="store_true",
                   help="calibrate with per-layer recomputation: activation memory of one decoder layer")
    r.add_argument("--trust-remote-code", action="store_true",
                   help="allow the model repository's own Python code (auto_map) to run; off by default")
    r.add_argument("--threads", type=int, metavar="N",
                   help="CPU threads torch may use for its own parallel work (default: torch's choice, one per "
                        "core); e.g. to leave cores free on a shared machine")
    r.add_argument("--ppl-file", type=Path, action="append", default=[],
                   help="text file(s) to report dense vs. pruned perplexity on")

    s = p.add_argument_group("safety")
    s.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    s.add_argument("--dry-run", action="store_true", help="validate model and budget, print the layout; no calibration")
    s.add_argument("--no-verify", action="store_true",
                   help="skip reloading the written checkpoint and comparing it with the masked original")
    s.add_argument("--quiet", action="store_true", help="print only errors and the final path (no progress bars)")
    s.add_argument("--no-stream", action="store_true",
                   help="slice the loaded model and save_pretrained it instead of streaming a local checkpoint's "
                        "safetensors shard by shard")
    s.add_argument("--dequantize", action="store_true",
                   help="for a quantized checkpoint (FP8, MXFP4, compressed-tensors): write the pruned model "
                        "dequantised, in the config's dtype, instead of in the source's format (needed for "
                        "compensations the format cannot hold exactly, e.g. merge, or layer-scale into MXFP4)")

    h = p.add_argument_group("share")
    h.add_argument("--push-to-hub", metavar="REPO_ID",
                   help="upload --out to this Hub repo once it is complete and verified")
    h.add_argument("--private", action="store_true", help="create the Hub repo as private")
    h.add_argument("--base-model", metavar="HUB_ID", help="the Hub id a local --model folder holds, named as "
                   "base_model in the model card (a Hub id given as --model is named anyway)")
    return p


NOT_IN_RECIPE = {"recipe", "list_models", "overwrite", "quiet", "threads", "dry_run", "push_to_hub", "private", "help"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Flags over the settings of ``--recipe`` (when given) over the defaults."""
    parser = build_parser()
    known, _ = parser.parse_known_args(argv)
    if known.recipe is not None:
        parser.set_defaults(**recipe_defaults(parser, known.recipe))
    return parser.parse_args(argv)


def recipe_defaults(parser: argparse.ArgumentParser, path: Path) -> dict:
    """The settings of a recipe file as parser defaults (each converted like the flag's own value)."""
    import yaml

    from fair_moe.core.errors import FairMoeError

    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise FairMoeError(f"cannot read --recipe {path}: {err}") from err
    if not isinstance(data, dict):
        raise FairMoeError(f"--recipe {path} must be a mapping of setting: value")
    actions = {a.dest: a for a in parser._actions if a.option_strings and a.dest not in NOT_IN_RECIPE}
    defaults = {}
    for key, value in data.items():
        dest = str(key).replace("-", "_")
        if dest not in actions:
            raise FairMoeError(f"--recipe {path}: {key!r} is not a setting (settings: {', '.join(sorted(actions))})")
        action = actions[dest]
        many = isinstance(action, argparse._AppendAction)
        values = value if isinstance(value, list) else [value]
        if action.type is not None:
            values = [action.type(str(v)) for v in values]
        defaults[dest] = values if many else values[0]
    return defaults


def recipe_of(args: argparse.Namespace) -> dict:
    """The settings that reproduce a run: every setting that differs from its default, and the model."""
    fresh = build_parser()
    result = {}
    for action in fresh._actions:
        if not action.option_strings or action.dest in NOT_IN_RECIPE:
            continue
        value = getattr(args, action.dest)
        if value != action.default or action.dest in ("model", "budget"):
            result[action.dest] = [str(v) for v in value] if isinstance(value, list) else (
                str(value) if isinstance(value, Path) else value)
    return result


def settings_from_args(args: argparse.Namespace) -> PruneSettings:
    """The one place an argparse namespace becomes typed settings."""
    from fair_moe.calibration import resolve_alias

    units = args.units or ("neurons" if args.calib_images is not None else "experts")
    images = Path(resolve_alias(str(args.calib_images))) if args.calib_images is not None else None
    return PruneSettings(
        model=resolve_alias(args.model),
        budgets=() if args.plan is not None and args.budget is None and args.tolerance is None
        else Budget.parse(args.budget, args.tolerance),
        calibration=CalibrationSettings(
            files=tuple(args.calib_file), datasets=tuple(args.calib_dataset),
            dataset_configs=tuple(args.calib_config.split(",")) if args.calib_config else (None,),
            split=args.calib_split, text_field=args.text_field, images=images, samples=args.samples,
            seq_len=args.seq_len, batch_size=args.batch_size, seed=args.seed),
        method=MethodSettings(units=units, allocation=args.allocation, removal=args.removal,
                              protection=args.protection, compensation=args.compensate, min_keep=args.min_keep,
                              compensation_options=tuple(args.compensate_option), layout=args.layout),
        runtime=RuntimeSettings(device=args.device, dtype=args.dtype, device_map=args.device_map,
                                max_memory=args.max_memory, offload_folder=args.offload_folder,
                                layerwise=args.layerwise, trust_remote_code=args.trust_remote_code,
                                progress=not args.quiet),
        output=OutputSettings(out=args.out, overwrite=args.overwrite, verify=not args.no_verify,
                              stream=not args.no_stream, dequantize=args.dequantize, dry_run=args.dry_run,
                              ppl_files=tuple(args.ppl_file),
                              push_to_hub=args.push_to_hub, private=args.private, base_model=args.base_model,
                              recipe=recipe_of(args)),
        scores=args.scores,
        plan=args.plan,
    )


def main(argv: list[str] | None = None) -> int:
    parsed: dict = {}
    status = run_command(lambda: parsed.update(args=parse_args(argv)))  # a bad --recipe is one error line too
    if status:
        return status
    args = parsed["args"]
    if args.list_models:
        from fair_moe.adapters import supported_model_types

        print("\n".join(supported_model_types()))
        return 0

    def run() -> None:
        from fair_moe.workflow.prune import run_prune
        from fair_moe.workflow.report import Console

        if args.threads is not None:
            set_threads(args.threads)
        with quiet_libraries(args.quiet):
            run_prune(settings_from_args(args), Console(quiet=args.quiet))

    return run_command(run)
