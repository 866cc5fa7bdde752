"""Prune the routed experts of a Hugging Face MoE model with Tolerance-of-Difference allocation.

    python -m fair_moe.prune --model fair_moe/data/demo_model --out /tmp/pruned --budget 0.25
    python -m fair_moe.prune --model Qwen/Qwen1.5-MoE-A2.7B-Chat --calib-file a.txt --calib-file b.jsonl \\
        --budget 0.25 --out qwen-pruned
    python -m fair_moe.prune --model M --scores qwen-pruned/fair_moe_scores.safetensors --budget 0.5 --out q50
    python -m fair_moe.prune --list-models

All input is checked before the model is loaded or calibrated; on any error nothing is written to --out.
"""

from __future__ import annotations

import argparse
import logging
import warnings
from pathlib import Path

import torch

from fair_moe.adapters import get_adapter, supported_model_types
from fair_moe.calibration import (
    BUNDLED_CALIB_DIR,
    CalibrationSource,
    bundled_sources,
    sources_from_dataset,
    sources_from_files,
)
from fair_moe.errors import FairMoeError, run_command
from fair_moe.pipeline import (
    ALLOCATIONS,
    PROTECTIONS,
    ExpertLayout,
    PlanSettings,
    check_budget,
    compensate,
    compute_scores,
    make_plan,
)
from fair_moe.plan import PrunePlan
from fair_moe.scores import SCORES_FILE, Scores, model_fingerprint
from fair_moe.signals import REMOVAL_SIGNALS
from fair_moe.signals.layerwise import execution_device

log = logging.getLogger("fair_moe")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fair_moe.prune", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", help="local checkpoint folder or Hub id")
    p.add_argument("--out", type=Path, help="output folder (must not exist or be empty, unless --overwrite)")
    p.add_argument("--list-models", action="store_true", help="print the supported model types and exit")

    c = p.add_argument_group("calibration")
    c.add_argument("--calib-file", type=Path, action="append", default=[], help=".txt or .jsonl; repeatable, one class each")
    c.add_argument("--calib-images", type=Path,
                   help="vision transformers: image folder with one sub-folder per class (prunes MLP neurons)")
    c.add_argument("--units", default="neurons", choices=["neurons", "heads"],
                   help="vision units: MLP hidden neurons (default) or attention heads")
    c.add_argument("--calib-dataset", help="datasets name or local data path")
    c.add_argument("--calib-config", help="dataset config; comma-separated for several classes")
    c.add_argument("--calib-split", default="train")
    c.add_argument("--text-field", default="text")
    c.add_argument("--samples", type=int, default=128, help="calibration sequences in total (default 128)")
    c.add_argument("--seq-len", type=int, default=512, help="tokens per sequence (default 512)")
    c.add_argument("--batch-size", type=int, default=8)
    c.add_argument("--seed", type=int, default=0)

    b = p.add_argument_group("budget")
    b.add_argument("--budget", help="fraction of routed experts removed model-wide (e.g. 0.25); a comma-separated "
                   "list writes one checkpoint per budget into OUT/budget-B/ from one calibration")
    b.add_argument("--tolerance", type=float, help="ToD tolerance α in [0, 1] instead of a budget")
    b.add_argument("--min-keep", type=int, help="experts every layer keeps (default: the router's top_k)")

    m = p.add_argument_group("method")
    m.add_argument("--allocation", default="auto", choices=ALLOCATIONS,
                   help="auto (default): the best of tod / uniform / global with every removal signal, judged by the "
                        "masked model's loss on calibration text the scores did not use; tod = the paper's rule")
    m.add_argument("--removal", default=None, choices=REMOVAL_SIGNALS,
                   help="removal signal for tod / uniform / global (default reap for MoE, wasserstein for vision; "
                        "auto tries every signal but random)")
    m.add_argument("--protection", default="taylor", choices=PROTECTIONS)
    m.add_argument("--compensate", default="auto", choices=["none", "layer-scale", "router-temperature", "merge", "auto"],
                   help="fold a least-squares output scale per MoE layer into the kept experts (auto: only if it "
                        "lowers the loss on held-out calibration windows)")

    r = p.add_argument_group("reuse and runtime")
    r.add_argument("--scores", type=Path, help=f"{SCORES_FILE} from an earlier run: no calibration")
    r.add_argument("--device", default="auto", choices=["cpu", "cuda", "auto"])
    r.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="compute dtype; auto = the checkpoint's, but float32 on CPU for half-precision checkpoints. "
                        "Weights are saved in the checkpoint's own dtype.")
    r.add_argument("--device-map", help="accelerate device map for models larger than memory (e.g. auto); implies "
                   "--layerwise and a streamed rewrite")
    r.add_argument("--max-memory", help="per-device memory for --device-map, e.g. 'cpu=8GiB' or '0=20GiB,cpu=64GiB'")
    r.add_argument("--offload-folder", type=Path, help="where --device-map offloads weights that do not fit")
    r.add_argument("--layerwise", action="store_true",
                   help="calibrate with per-layer recomputation: activation memory of one decoder layer")
    r.add_argument("--ppl-file", type=Path, action="append", default=[],
                   help="text file(s) to report dense vs. pruned perplexity on")

    s = p.add_argument_group("safety")
    s.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    s.add_argument("--dry-run", action="store_true", help="validate model and budget, print the layout; no calibration")
    s.add_argument("--no-verify", action="store_true",
                   help="skip reloading the written checkpoint and comparing it with the masked original")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.add_argument("--no-stream", action="store_true",
                   help="slice the loaded model and save_pretrained it instead of streaming a local checkpoint's "
                        "safetensors shard by shard")

    h = p.add_argument_group("share")
    h.add_argument("--push-to-hub", metavar="REPO_ID", help="upload --out to this Hub repo once it is complete and verified")
    h.add_argument("--private", action="store_true", help="create the Hub repo as private")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.list_models:
        print("\n".join(supported_model_types()))
        return 0
    return run_command(run, args)


def parse_budgets(text: str | None) -> list[float | None]:
    if text is None:
        return [None]
    try:
        budgets = [float(part) for part in text.split(",") if part.strip()]
    except ValueError as err:
        raise FairMoeError(f"--budget {text!r} is not a number or a comma-separated list of numbers (e.g. 0.25,0.5)") from err
    if not budgets or len(set(budgets)) != len(budgets):
        raise FairMoeError(f"--budget {text!r}: give one fraction or distinct comma-separated fractions")
    return budgets


def settings_from_args(args) -> list[PlanSettings]:
    """One PlanSettings per requested budget (or the one --tolerance run)."""
    if args.budget is None and args.tolerance is None:
        raise FairMoeError("pass --budget FRACTION (e.g. 0.25) or --tolerance ALPHA")
    result = []
    for budget in parse_budgets(args.budget):
        settings = PlanSettings(
            budget=budget, tolerance=args.tolerance, allocation=args.allocation, removal=args.removal,
            protection=args.protection, min_keep=args.min_keep,
        )
        settings.validate()
        result.append(settings)
    return result


def calibration_sources(args) -> list[CalibrationSource]:
    if args.calib_file and args.calib_dataset:
        raise FairMoeError("pass --calib-file or --calib-dataset, not both")
    if args.calib_file:
        return sources_from_files(args.calib_file, args.text_field)
    if args.calib_dataset:
        configs = args.calib_config.split(",") if args.calib_config else [None]
        return sources_from_dataset(args.calib_dataset, configs, args.calib_split, args.text_field)
    log.warning(
        "no calibration data given: using the small bundled sample in %s (code, licences, Python docs). "
        "Pass text like your model's use with --calib-file FILE (repeatable) or --calib-dataset NAME.",
        BUNDLED_CALIB_DIR,
    )
    return bundled_sources()


def load_config(name: str):
    from transformers import CONFIG_MAPPING, AutoConfig

    if name.endswith(".json") and Path(name).is_file():  # a bare config (e.g. configs/models/*.json): --dry-run
        import json

        data = json.loads(Path(name).read_text())
        if data.get("model_type") not in CONFIG_MAPPING:
            raise FairMoeError(f"--model {name}: model_type {data.get('model_type')!r} is unknown to transformers")
        return CONFIG_MAPPING[data["model_type"]].from_dict(data)
    looks_local = name.startswith((".", "/", "~")) or Path(name).exists() or name.count("/") > 1
    if looks_local and not Path(name).expanduser().exists():
        raise FairMoeError(f"--model {name} does not exist: pass a checkpoint folder or a Hub id (owner/name)")
    if Path(name).exists() and not (Path(name) / "config.json").is_file():
        raise FairMoeError(f"--model {name} has no config.json: pass a Hugging Face checkpoint folder")
    try:
        return AutoConfig.from_pretrained(name, trust_remote_code=True)
    except (OSError, ValueError) as err:
        raise FairMoeError(f"cannot load --model {name!r}: {err.__class__.__name__}: {str(err).splitlines()[0]}") from err


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise FairMoeError("--device cuda was asked for but no CUDA device is available: use --device cpu")
    return torch.device(name)


def checkpoint_dtype(config) -> torch.dtype:
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def resolve_dtype(name: str, config, device: torch.device) -> torch.dtype:
    if name != "auto":
        return getattr(torch, name)
    dtype = checkpoint_dtype(config)
    if device.type == "cpu" and dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return dtype


def describe_layout(config, adapter, layout: ExpertLayout, settings: PlanSettings) -> list[str]:
    layers = adapter.moe_layer_indices(config)
    e, k = layout.num_experts, layout.top_k
    lines = [
        f"model_type {config.model_type}: {config.num_hidden_layers} decoder layers, {len(layers)} MoE layers "
        f"({layers[0]}…{layers[-1]}), {e} routed experts per layer, top_k={k}"
        + (f", {layout.groups} expert groups" if layout.groups > 1 else ""),
    ]
    if settings.budget is not None:
        per = layout.removed_per_layer(settings.budget)
        lines.append(
            f"budget {settings.budget}: remove {per * len(layers)} routed experts in total "
            f"({per} per layer under uniform allocation; {settings.allocation} allocation decides the split)"
        )
    return lines


def print_plan(plan: PrunePlan) -> None:
    if "selected" in plan.settings:
        print("candidate plans (loss on held-out calibration windows):")
        print("  allocation removal        loss    with layer scales")
        for c in sorted(plan.settings["candidates"], key=lambda c: c["perplexity"]):
            plain, scaled = c.get("loss"), c.get("loss_layer_scale")
            print(f"  {c['allocation']:10s} {c['removal']:12s} {'' if plain is None else f'{plain:.4f}':>7s}  "
                  f"{'' if scaled is None else f'{scaled:.4f}':>7s}")
        chosen = plan.settings["selected"]
        print(f"auto chose {chosen['allocation']} + {chosen['removal']}" + (" with layer scales" if chosen["layer_scale"] else ""))
    print(f"plan ({plan.settings['allocation']} + {plan.settings['removal']}"
          + (f", alpha*={plan.alpha:.4f}" if plan.alpha is not None else "") + "):")
    print("  layer  kept  removed")
    for layer, n in plan.kept_counts.items():
        print(f"  {layer:5d}  {n:4d}  {plan.num_experts - n:7d}")
    print(f"  total  {sum(plan.kept_counts.values()):4d}  {plan.removed_total:7d}")
    if plan.layer_scales:
        print("  layer scales (folded into kept experts): "
              + ", ".join(f"{k}: {v:.4f}" for k, v in plan.layer_scales.items()))
    if plan.router_temperatures:
        print("  router temperatures (folded into router weights): "
              + ", ".join(f"{k}: {v:.2f}" for k, v in plan.router_temperatures.items()))


def run(args) -> None:
    if not args.model:
        raise FairMoeError("--model is required (a checkpoint folder or Hub id)")
    if args.calib_images is not None:
        from fair_moe.vision.cli import run_vision

        return run_vision(args)
    args.removal = args.removal or "reap"
    if not args.out and not args.dry_run:
        raise FairMoeError("--out is required: the folder the pruned checkpoint is written to")
    all_settings = settings_from_args(args)
    if args.out:
        from fair_moe.rewrite import check_output_dir

        check_output_dir(args.out, args.overwrite)
    config = load_config(args.model)
    adapter = get_adapter(config)
    moe_indices = adapter.moe_layer_indices(config)
    if not moe_indices:
        raise FairMoeError(f"--model {args.model} ({config.model_type}) has no MoE layers to prune")
    layout = ExpertLayout.from_config(config, adapter, len(moe_indices))
    for i, settings in enumerate(all_settings):
        check_budget(settings, layout)
        for line in describe_layout(config, adapter, layout, settings)[(1 if i else 0):]:
            print(line)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, config, device)
    if args.dry_run:
        from fair_moe.layout import describe

        for i, settings in enumerate(all_settings):
            lines = describe(config, adapter, layout, settings, checkpoint_dtype(config), args.batch_size * args.seq_len)
            print("\n".join(lines if i == 0 else lines[-2:-1]))
        return
    if args.model.endswith(".json"):
        raise FairMoeError(f"--model {args.model} is a bare config: it has no weights to prune; use it with --dry-run")
    scores = Scores.load(args.scores) if args.scores else None
    sources = None
    if scores is not None:
        if scores.meta.get("model_type") != config.model_type or int(scores.meta.get("num_experts", -1)) != layout.num_experts:
            raise FairMoeError(f"--scores {args.scores} was computed for another model ({scores.meta.get('model_type')}, "
                               f"{scores.meta.get('num_experts')} experts): calibrate again without --scores")
    else:
        sources = calibration_sources(args)
        if args.removal == "wasserstein" and len(sources) < 2:
            raise FairMoeError("--removal wasserstein needs at least two calibration classes: pass --calib-file twice "
                               "or several comma-separated --calib-config values")
    ppl_texts = [p.read_text(encoding="utf-8") if p.is_file() else _missing(p) for p in args.ppl_file]

    placement = load_kwargs(args)
    if placement and (args.no_stream or streamable_source(args.model) is None):
        raise FairMoeError("--device-map needs the streamed rewrite: pass a local safetensors checkpoint folder as "
                           "--model and drop --no-stream")
    model, tokenizer = load_model(args.model, dtype, device, placement)
    model.fair_moe_placement = placement
    if scores is not None:
        fingerprint = model_fingerprint(model.config, {k: tuple(v.shape) for k, v in model.state_dict().items()})
        if scores.meta.get("fingerprint") not in (None, fingerprint):
            raise FairMoeError(f"--scores {args.scores} belongs to a different model (fingerprint "
                               f"{scores.meta.get('fingerprint')} ≠ {fingerprint}): calibrate again without --scores")
    else:
        scores = compute_scores(model, tokenizer, sources, args.samples, args.seq_len, args.batch_size, args.seed,
                                progress=not args.quiet, layerwise=args.layerwise or bool(placement))
    plans = [compensate(model, plan_for(model, scores, settings, args), scores, args.compensate, args.batch_size)
             for settings in all_settings]
    for plan in plans:
        print_plan(plan)

    from fair_moe.perplexity import perplexity

    dense_ppl = [perplexity(model, tokenizer, [t], args.seq_len, progress=not args.quiet) for t in ppl_texts]
    save_dtype = checkpoint_dtype(config)
    verify = not args.no_verify
    # merging averages experts across shards, which the streaming rewriter does not do: slice in memory
    source = None if args.no_stream or args.compensate == "merge" else streamable_source(args.model)
    from fair_moe.rewrite import write_atomically

    if len(plans) == 1:
        write_atomically(args.out, lambda tmp: write_pruned_files(model, tokenizer, plans[0], scores, tmp, save_dtype,
                                                                   verify, source, not args.quiet),
                         overwrite=args.overwrite)
        targets = [args.out]
    else:
        def write_all(tmp: Path) -> None:
            for i, plan in enumerate(plans):
                # Streaming leaves the model untouched; slicing in memory needs a fresh copy per budget.
                fresh = model if (source is not None or i == 0) else load_model(args.model, dtype, device, placement)[0]
                write_pruned_files(fresh, tokenizer, plan, scores, tmp / budget_folder(plan), save_dtype, verify,
                                   source, not args.quiet)

        write_atomically(args.out, write_all, overwrite=args.overwrite)
        targets = [args.out / budget_folder(plan) for plan in plans]
    if ppl_texts:
        report_perplexity(args, targets, ppl_texts, dense_ppl, tokenizer, dtype, device)
    print(f"wrote {args.out}")
    if args.push_to_hub:
        from fair_moe.push import push

        if len(targets) > 1:
            raise FairMoeError("--push-to-hub takes one budget: push each OUT/budget-B folder with python -m fair_moe.push")
        print(f"pushed to {push(args.out, args.push_to_hub, args.private)}")


def plan_for(model, scores: Scores, settings: PlanSettings, args) -> PrunePlan:
    if settings.allocation == "auto":
        from fair_moe.select import select_plan

        return select_plan(model, scores, settings, base_model=args.model, batch_size=args.batch_size,
                           progress=not args.quiet, compensation=args.compensate)
    return make_plan(scores, settings, base_model=args.model)


def budget_folder(plan: PrunePlan) -> str:
    return f"budget-{plan.settings['budget']}"


def report_perplexity(args, targets: list[Path], texts: list[str], dense: list[float], tokenizer, dtype, device) -> None:
    from transformers import AutoModelForCausalLM

    from fair_moe.perplexity import perplexity

    names = [p.name for p in args.ppl_file]
    print("perplexity  " + "  ".join(f"{n[:14]:>14s}" for n in names))
    print("  dense     " + "  ".join(f"{v:14.3f}" for v in dense))
    for target in targets:
        pruned = AutoModelForCausalLM.from_pretrained(target, trust_remote_code=True, dtype=dtype).to(device).eval()
        values = [perplexity(pruned, tokenizer, [t], args.seq_len, progress=not args.quiet) for t in texts]
        label = target.name if len(targets) > 1 else "pruned"
        print(f"  {label[:10]:10s}" + "  ".join(f"{v:14.3f}" for v in values))


def _missing(path: Path) -> str:
    raise FairMoeError(f"--ppl-file {path} does not exist")


def parse_max_memory(text: str | None) -> dict | None:
    """'cpu=8GiB,0=20GiB' → {"cpu": "8GiB", 0: "20GiB"}."""
    if not text:
        return None
    result = {}
    for part in text.split(","):
        if "=" not in part:
            raise FairMoeError(f"--max-memory {text!r}: write DEVICE=SIZE pairs, e.g. cpu=8GiB,0=20GiB")
        device, size = (x.strip() for x in part.split("=", 1))
        result[int(device) if device.isdigit() else device] = size
    return result


def load_kwargs(args) -> dict:
    """from_pretrained keyword arguments for accelerate placement (empty without --device-map)."""
    if not args.device_map:
        if args.max_memory or args.offload_folder:
            raise FairMoeError("--max-memory and --offload-folder need --device-map (e.g. --device-map auto)")
        return {}
    kwargs = {"device_map": args.device_map}
    if args.max_memory:
        kwargs["max_memory"] = parse_max_memory(args.max_memory)
    if args.offload_folder:
        kwargs["offload_folder"] = str(args.offload_folder)
    return kwargs


def load_model(name: str, dtype: torch.dtype, device: torch.device, placement: dict | None = None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            tokenizer = AutoTokenizer.from_pretrained(name)
        except (OSError, ValueError) as err:
            raise FairMoeError(f"cannot load the tokenizer of --model {name}: {str(err).splitlines()[0]}") from err
        try:
            model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, trust_remote_code=True, **(placement or {}))
        except (OSError, ValueError) as err:
            raise FairMoeError(f"cannot load the weights of --model {name}: {str(err).splitlines()[0]}") from err
    if not placement:
        model = model.to(device)
    return model.eval(), tokenizer


def write_pruned_files(model, tokenizer, plan: PrunePlan, scores: Scores, folder: Path, save_dtype,
                       verify: bool = True, source: Path | None = None, progress: bool = True) -> None:
    """Write the whole output folder (weights, config, plan, scores, card, plot) into ``folder``.

    With ``source`` (a local safetensors checkpoint) the weights are streamed shard by shard from it and
    ``model`` is left untouched; otherwise ``model`` is sliced in place and saved.
    """
    from fair_moe.masking import masked_experts
    from fair_moe.report import model_card, plot_allocation
    from fair_moe.rewrite import apply_plan, save_pruned, verify_expert_keys

    folder.mkdir(parents=True, exist_ok=True)
    if plan.merges:
        from fair_moe.compensate import fold_merges

        fold_merges(model, plan.merges)  # the reference is the merged original; apply_plan will not fold again
    probe = None
    if verify:
        probe = torch.randint(0, model.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
        with torch.no_grad(), masked_experts(model, plan.kept_experts, scales=plan.layer_scales,
                                             temperatures=plan.router_temperatures):
            reference = model(input_ids=probe.to(execution_device(model)), use_cache=False).logits.float().cpu()
    compute_dtype = next(model.parameters()).dtype

    if source is not None:
        write_streamed(model, plan, source, folder, save_dtype, progress)
    else:
        with torch.no_grad():
            apply_plan(model, plan)
        save_pruned(model, folder, dtype=save_dtype, tokenizer=tokenizer)
        model.to(compute_dtype)
    plan.save(folder)
    scores.save(folder / SCORES_FILE)
    (folder / "README.md").write_text(model_card(plan))
    plot_allocation(plan, folder / "allocation.png")
    verify_expert_keys(folder, plan)
    if probe is not None:
        check_reload(folder, probe, reference, compute_dtype, execution_device(model), save_dtype,
                     placement=getattr(model, "fair_moe_placement", None))


def write_streamed(model, plan: PrunePlan, source: Path, folder: Path, save_dtype, progress: bool = True) -> None:
    """Weights streamed from ``source``; config and modeling file derived from the (unpruned) model in memory."""
    import copy

    from fair_moe.rewrite import MODELING_FILE, layout_of, modeling_source, update_config
    from fair_moe.stream import copy_side_files, stream_rewrite

    stats = stream_rewrite(source, folder, plan, progress=progress)
    config = copy.deepcopy(model.config)
    update_config(config, plan, layout_of(model))
    config.dtype = save_dtype
    config.save_pretrained(folder)
    if not plan.is_uniform:
        (folder / MODELING_FILE).write_text(modeling_source(model))
    copy_side_files(source, folder)
    log.info("streamed %d source bytes into %d shard(s) of %d bytes", stats["source_bytes"], stats["shards"],
             stats["written_bytes"])


def streamable_source(name: str) -> Path | None:
    """The local checkpoint folder to stream weights from, if --model is one with safetensors."""
    path = Path(name)
    return path if path.is_dir() and any(path.glob("*.safetensors")) else None


def check_reload(folder: Path, probe: torch.Tensor, reference: torch.Tensor, dtype, device, save_dtype=None,
                 placement: dict | None = None) -> None:
    """Reload the written checkpoint and compare its logits with the masked original's.

    Saving in a narrower dtype than the computation (a float16 checkpoint calibrated in float32) rounds
    weights that a compensation rescaled, so the tolerance then follows the saved precision.
    """
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if placement:  # reload the way the original was loaded, offloading into a folder of its own
            placement = {**placement, **({"offload_folder": str(Path(placement["offload_folder"]) / "verify")}
                                         if "offload_folder" in placement else {})}
            reloaded = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=dtype, **placement)
        else:
            reloaded = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=dtype).to(device)
        reloaded.eval()
    with torch.no_grad():
        logits = reloaded(input_ids=probe.to(device), use_cache=False).logits.float().cpu()
    diff = (logits - reference).abs().max().item()
    exact = dtype == torch.float32 and save_dtype in (None, torch.float32)
    tolerance = 1e-3 if exact else 2e-2 * max(1.0, reference.abs().max().item())
    if not diff <= tolerance:
        raise RuntimeError(f"the written checkpoint does not match the masked original (max |Δlogit| = {diff:.3g})")
    log.info("verified: reloaded checkpoint matches the masked original (max |Δlogit| = %.2e)", diff)


if __name__ == "__main__":
    raise SystemExit(main())
