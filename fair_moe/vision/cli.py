"""``python -m fair_moe.prune --model VIT_DIR --calib-images DIR --budget 0.3 --out OUT``: the vision path.

Units are each encoder layer's MLP hidden neurons; removal ``wasserstein`` (default) or ``random``,
protection Taylor, allocation tod (default) / uniform / global. The plan is saved with
``"kept_units": {"<layer>": [kept neuron ids]}``.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch

from fair_moe import allocate
from fair_moe.errors import FairMoeError
from fair_moe.pipeline import removed_per_layer
from fair_moe.plan import PrunePlan
from fair_moe.scores import SCORES_FILE, Scores
from fair_moe.vision.units import VISION_MODEL_TYPES

log = logging.getLogger("fair_moe")


def vision_plan(scores: Scores, budget: float | None, tolerance: float | None, allocation: str, removal: str,
                min_keep: int, base_model: str | None = None) -> PrunePlan:
    """Allocate neurons from saved vision scores; budgets are exact: L × round(b·I) neurons."""
    width, layers = int(scores.meta["width"]), len(scores.layer_indices)
    if removal not in scores.removal:
        raise FairMoeError(f"--removal {removal} is not a vision signal: use one of {', '.join(sorted(scores.removal))}")
    u, r = scores.removal[removal], scores.protection
    n_max = [width - min_keep] * layers
    if budget is not None:
        per_layer = removed_per_layer(budget, width)
        if per_layer == 0:
            raise FairMoeError(f"--budget {budget} removes 0 of {width} neurons per layer: raise --budget")
        if per_layer > width - min_keep:
            raise FairMoeError(f"--budget {budget} is too aggressive: it removes {per_layer} of {width} neurons per layer "
                               f"but every layer keeps at least {min_keep} (--min-keep)")
        total = per_layer * layers
    if allocation == "uniform":
        result = allocate.uniform(u, per_layer)
    elif allocation == "global":
        result = allocate.global_(u, n_max, total)
    elif budget is not None:
        result = allocate.tod(u, r, n_max, total=total)
    else:
        result = allocate.tod(u, r, n_max, alpha=tolerance)
    kept = {i: sorted(set(range(width)) - set(rm)) for i, rm in zip(scores.layer_indices, result.removed, strict=True)}
    return PrunePlan(model_type=scores.meta["model_type"], num_experts=width, top_k=min_keep, kept_experts=kept,
                     settings={"allocation": allocation, "removal": removal, "protection": "taylor", "budget": budget,
                               "tolerance": tolerance, "min_keep": min_keep, "calibration": scores.meta.get("calibration")},
                     alpha=result.alpha, base_model=base_model, unit="units")


def vision_card(plan: PrunePlan) -> str:
    widths = ", ".join(f"{k}: {v}" for k, v in plan.kept_counts.items())
    uniform = plan.is_uniform
    return "\n".join([
        "---", "library_name: transformers", "pipeline_tag: image-classification", "tags:", "- pruned", "- fair-moe",
        "- vision-transformer", "---", "",
        f"# {plan.model_type} with {plan.removed_total} MLP neurons pruned by fair_moe", "",
        f"Base model: `{plan.base_model}`. Allocation `{plan.settings['allocation']}`"
        + (f" (α* = {plan.alpha:.4f})" if plan.alpha is not None else "")
        + f", removal `{plan.settings['removal']}`, protection Taylor, budget {plan.settings['budget']}.",
        f"MLP hidden neurons kept per layer: {widths}. Kept ids are in `fair_moe_plan.json` (`kept_units`).", "",
        "```python", "from transformers import AutoModelForImageClassification",
        f'model = AutoModelForImageClassification.from_pretrained("PATH_OR_REPO"{"" if uniform else ", trust_remote_code=True"})',
        "```", "",
    ])


def run_vision(args) -> None:
    from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification

    from fair_moe.prune import parse_budgets
    from fair_moe.rewrite import check_output_dir, write_atomically
    from fair_moe.vision.data import image_batches, read_image_folder
    from fair_moe.vision.rewrite import (
        apply_head_plan,
        apply_vision_plan,
        save_vision,
        zero_removed,
        zero_removed_heads,
    )
    from fair_moe.vision.signals import VISION_REMOVAL_SIGNALS, vision_head_scores, vision_scores

    heads = args.units == "heads"

    if not args.out:
        raise FairMoeError("--out is required: the folder the pruned checkpoint is written to")
    budgets = parse_budgets(args.budget)
    if len(budgets) != 1:
        raise FairMoeError("the vision path takes one --budget at a time")
    budget = budgets[0]
    if (budget is None) == (args.tolerance is None):
        raise FairMoeError("pass exactly one of --budget and --tolerance")
    if budget is not None and not 0 < budget < 1:
        raise FairMoeError(f"--budget {budget} must be a fraction strictly between 0 and 1 (e.g. 0.3)")
    allocation = "tod" if args.allocation == "auto" else args.allocation
    removal = args.removal or "wasserstein"
    if removal not in VISION_REMOVAL_SIGNALS:
        raise FairMoeError(f"--removal {removal} is not available for vision models: use {' or '.join(VISION_REMOVAL_SIGNALS)}")
    if args.tolerance is not None and allocation != "tod":
        raise FairMoeError("--tolerance sets ToD's α directly: use it with --allocation tod")
    min_keep = args.min_keep if args.min_keep is not None else 1
    if min_keep < 1:
        raise FairMoeError("--min-keep must be at least 1 for vision models")
    check_output_dir(args.out, args.overwrite)
    if not Path(args.model).exists():
        raise FairMoeError(f"--model {args.model} does not exist: pass an image-classification checkpoint folder")
    config = AutoConfig.from_pretrained(args.model)
    if config.model_type not in VISION_MODEL_TYPES:
        raise FairMoeError(f"--calib-images needs a vision transformer; model_type {config.model_type!r} is not one of "
                           f"{', '.join(VISION_MODEL_TYPES)}")
    paths, labels, classes = read_image_folder(args.calib_images)
    width = config.num_attention_heads if heads else config.intermediate_size
    layers = config.num_hidden_layers
    print(f"model_type {config.model_type}: {layers} encoder layers × {width} {'attention heads' if heads else 'MLP neurons'}; "
          f"{len(paths)} images in {len(classes)} classes")
    if args.dry_run:
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        processor = AutoImageProcessor.from_pretrained(args.model)
        model = AutoModelForImageClassification.from_pretrained(args.model, dtype=torch.float32).eval()
    batches = image_batches(processor, paths, labels, args.samples, args.batch_size, args.seed)
    if args.scores:
        scores = Scores.load(args.scores)
    else:
        score_fn = vision_head_scores if heads else vision_scores
        removal_scores, protection = score_fn(model, batches, len(classes), args.seed, progress=not args.quiet)
        scores = Scores(list(range(layers)), removal_scores, protection,
                        {"model_type": config.model_type, "width": width, "unit": "attention_heads" if heads else "mlp_neurons",
                         "calibration": {"images": sum(len(b[1]) for b in batches), "classes": classes, "seed": args.seed}})
        scores.check_finite()
    plan = vision_plan(scores, budget, args.tolerance, allocation, removal, min_keep, base_model=args.model)
    print("layer  kept  removed")
    for layer, n in plan.kept_counts.items():
        print(f"{layer:5d}  {n:4d}  {width - n:7d}")
    probe = batches[0][0][:4]
    reference_model = AutoModelForImageClassification.from_pretrained(args.model, dtype=torch.float32).eval()
    with torch.no_grad():
        reference = (zero_removed_heads if heads else zero_removed)(reference_model, plan.kept_experts)(pixel_values=probe).logits
    del reference_model

    def write(tmp: Path) -> None:
        (apply_head_plan if heads else apply_vision_plan)(model, plan)
        save_vision(model, tmp, processor)
        plan.save(tmp)
        scores.save(tmp / SCORES_FILE)
        (tmp / "README.md").write_text(vision_card(plan))
        if not args.no_verify:
            reloaded = AutoModelForImageClassification.from_pretrained(tmp, trust_remote_code=True, dtype=torch.float32)
            with torch.no_grad():
                diff = (reloaded.eval()(pixel_values=probe).logits - reference).abs().max().item()
            if diff > 1e-4:
                raise RuntimeError(f"the written checkpoint does not match the zeroed original (max |Δ| = {diff:.3g})")
            log.info("verified: reloaded checkpoint matches the original with removed neurons zeroed (%.2e)", diff)

    write_atomically(args.out, write, overwrite=args.overwrite)
    print(f"wrote {args.out}")
