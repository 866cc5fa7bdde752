"""The prune workflow: validate → load → score → plan → compensate → write → verify → report.

``run_prune(settings)`` is what ``python -m fair_moe.prune`` runs; every step is also usable on its own
(``fair_moe.workflow.api``).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

from fair_moe.checkpoint.atomic import OutputClaim
from fair_moe.checkpoint.loading import (
    checkpoint_dtype,
    load_config,
    load_model,
    load_processor,
    local_checkpoint,
    resolve_device,
    resolve_dtype,
)
from fair_moe.checkpoint.stream import streamable_source
from fair_moe.core.budget import Budget, UnitLayout
from fair_moe.core.errors import FairMoeError
from fair_moe.core.plan import PrunePlan
from fair_moe.core.scores import Scores
from fair_moe.strategies import AUTO
from fair_moe.strategies.planning import make_plan
from fair_moe.strategies.selection import decide_compensation, select_plan
from fair_moe.units import UnitKind
from fair_moe.workflow.report import Console, layers_phrase
from fair_moe.workflow.scoring import calibration_data, check_scores_fit, score, text_sources
from fair_moe.workflow.settings import PruneSettings
from fair_moe.workflow.writing import WriteOptions, compensation_as_written, streams, write_checkpoint

log = logging.getLogger(__name__)


@dataclass
class PruneResult:
    """What a run produced: one plan and one output folder per budget, dense / pruned perplexities, and the
    seconds each phase took (load, calibrate, select, compensate, write, verify, …)."""

    plans: list[PrunePlan] = field(default_factory=list)
    folders: list[Path] = field(default_factory=list)
    perplexity: dict[str, list[float]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def phase(self, name: str):
        """Add the block's wall time to phase ``name``."""
        import time

        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def run_prune(settings: PruneSettings, console: Console | None = None) -> PruneResult:
    console = console or Console()
    unit = settings.validate()
    runtime, output, method = settings.runtime, settings.output, settings.method
    config = load_config(settings.model, runtime.trust_remote_code)
    unit.check_config(config)
    quantized = check_quantized(settings, unit, config)
    layout = unit.layout(config)
    if method.layout == "stock" and layout.whole:
        raise FairMoeError(f"--layout stock: {config.model_type} keeps its MoE layers {list(layout.whole)} whole "
                           "(their experts cannot be made unreachable), so no pruned checkpoint of it keeps one count "
                           "per layer; use --layout any")
    check_budgets(layout, settings.budgets, method.min_keep)
    saved_plan = load_saved_plan(settings.plan, unit, config, layout) if settings.plan else None
    console.line(unit.summary_line(config, layout))
    for budget in settings.budgets:
        console.line(budget_line(unit, layout, budget, method.allocation_for(unit)))
    if output.dry_run:
        batch_tokens = settings.calibration.batch_size * settings.calibration.seq_len
        for line in unit.describe(config, layout, settings.budgets, checkpoint_dtype(config), batch_tokens,
                                  runtime.trust_remote_code):
            console.line(line)
        if quantized is not None:
            console.line(f"the checkpoint is quantized ({quantized.describe()}): the sizes above are of dequantised "
                         f"{str(checkpoint_dtype(config)).removeprefix('torch.')} weights, "
                         + ("which --dequantize writes" if output.dequantize
                            else "the pruned checkpoint keeps the source's smaller format"))
        return PruneResult()
    if settings.model.endswith(".json"):
        raise FairMoeError(
            f"--model {settings.model} is a bare config: it has no weights to prune; use it with --dry-run"
        )
    from fair_moe.workflow.distributed import from_environment

    ranks = from_environment(runtime.device) if saved_plan is None and settings.scores is None else None
    if ranks is not None and not ranks.main:  # calibrates its share; rank 0 alone claims --out and writes
        return _prune_into(None, settings, unit, config, Console(quiet=True), None, ranks, quantized)
    with OutputClaim(output.out, output.overwrite) as claim:
        return _prune_into(claim, settings, unit, config, console, saved_plan, ranks, quantized)


def check_quantized(settings: PruneSettings, unit: UnitKind, config):
    """The quantized source (a ``QuantizedSource``, None when the checkpoint is not quantized), after refusing what
    cannot be written in its format: an in-memory rewrite, or a compensation the format cannot hold exactly."""
    from fair_moe.checkpoint.quantized import quantized_source

    quantized = quantized_source(config)
    output, method = settings.output, settings.method
    if quantized is None:
        if output.dequantize:
            raise FairMoeError(f"--dequantize: --model {settings.model} is not quantized (its config has no "
                               "quantization_config); drop the flag")
        return None
    if output.dequantize:
        if settings.runtime.device_map:
            raise FairMoeError("--dequantize writes the dequantised model from memory, which --device-map cannot "
                               "offload: drop --device-map, or drop --dequantize to keep the source's format")
        return quantized
    what = quantized.format.label
    if not unit.streamable:
        raise FairMoeError(f"--units {unit.name} rewrites weights in memory, which cannot keep the {what} format: "
                           "pass --dequantize")
    if not output.stream:
        raise FairMoeError(f"--no-stream would save the dequantised model under the source's {what} "
                           "quantization_config: drop --no-stream to keep the format, or pass --dequantize")
    if method.compensation not in ("auto", "none"):
        from fair_moe.strategies import COMPENSATIONS

        compensation = COMPENSATIONS.get(method.compensation)
        if compensation.writes not in quantized.format.writable or not compensation.streamable:
            raise FairMoeError(f"--compensate {compensation.name} changes {compensation.writes}, which cannot be "
                               f"written exactly into {what} weights: pass --dequantize, or choose --compensate "
                               f"none or one that changes only "
                               f"{' / '.join(sorted(quantized.format.writable))}")
    return quantized


def load_saved_plan(path: Path, unit: UnitKind, config, layout: UnitLayout) -> PrunePlan:
    """A fair_moe_plan.json (and any learned tensors beside it) that must fit this model's layers and widths."""
    plan = PrunePlan.load(path)
    if plan.unit != unit.name or plan.model_type != config.model_type or plan.width != layout.width \
            or sorted(plan.kept) != sorted(layout.layers):
        raise FairMoeError(f"--plan {path} was made for another model ({plan.model_type}, {plan.width} {plan.unit} "
                           f"in layers {sorted(plan.kept)}): this one has {layout.width} {unit.noun} in layers "
                           f"{list(layout.layers)}")
    return plan


def _prune_into(claim: OutputClaim | None, settings: PruneSettings, unit: UnitKind, config, console: Console,
                saved_plan: PrunePlan | None = None, ranks=None, quantized=None) -> PruneResult:
    """Everything after the checks, with ``--out`` claimed: load → score → plan → compensate → write → verify.
    A rank other than 0 of a torch.distributed group (``claim`` None) only calibrates its share."""
    runtime, output, method = settings.runtime, settings.output, settings.method
    scores = Scores.load(settings.scores) if settings.scores else None
    if saved_plan is not None and scores is None:
        beside = Path(settings.plan).parent / "fair_moe_scores.safetensors" if Path(settings.plan).is_file() \
            else Path(settings.plan) / "fair_moe_scores.safetensors"
        scores = Scores.load(beside) if beside.is_file() else None
    if scores is not None:
        check_scores_fit(scores, unit, config, path=settings.scores)
    placement = runtime.placement()
    folder = local_checkpoint(settings.model, runtime.trust_remote_code)  # Hub ids: their snapshot
    source = streamable_source(str(folder))
    keep_format = quantized is not None and not output.dequantize
    if quantized is not None:
        console.line(f"quantized checkpoint: {quantized.describe()}; calibrated on its dequantised weights, written "
                     + ("in the same format" if keep_format else f"dequantised ({checkpoint_dtype(config)})"))
        if keep_format and source is None:
            raise FairMoeError(f"--model {settings.model} has no local safetensors to rewrite in the "
                               f"{quantized.format.label} format: pass --dequantize")
    if placement and (source is None or not output.stream):
        raise FairMoeError("--device-map needs the streamed rewrite: pass a safetensors checkpoint (a folder or a "
                           "Hub id) as --model and drop --no-stream")

    device = resolve_device(runtime.device)
    dtype = resolve_dtype(runtime.dtype, config, device)
    result = PruneResult()
    with result.phase("load"):
        processor = load_processor(str(folder), unit.processor_class, runtime.trust_remote_code)
        sources = None
        if scores is None and saved_plan is None and unit.data == "text":  # read before the weights are loaded
            sources = text_sources(settings.calibration, processor, settings.model)
            if method.removal_for(unit) == "wasserstein" and len(sources) < 2:
                raise FairMoeError("--removal wasserstein needs at least two calibration classes: pass --calib-file "
                                   "twice or several --calib-dataset specs")
        model = load_model(str(folder), unit.auto_class_for(config), dtype, device, placement,
                           runtime.trust_remote_code, quantized)
    data = None
    with result.phase("calibrate"):
        if (scores is None and saved_plan is None) or unit.data == "images":  # vision probes need the images
            data = calibration_data(unit, processor, settings.calibration, sources)
        if scores is None and saved_plan is None:
            scores = score(model, unit, data, settings.calibration.seed, runtime.layerwise or bool(placement),
                           runtime.progress and (ranks is None or ranks.main), ranks)
            if scores is None:  # a rank other than 0: its share went to rank 0
                return result
        elif scores is not None:
            check_scores_fit(scores, unit, config, model, settings.scores)

    if saved_plan is not None:
        plans = [saved_plan]
    else:
        writable = quantized.format.writable if keep_format else None
        plans = [plan_for(model, unit, scores, budget, settings, result, writable) for budget in settings.budgets]
    result.plans = plans
    for plan in plans:  # the class the card tells users to load it with
        plan.settings = {**plan.settings, "auto_class": unit.auto_class_for(config)}
    for plan in plans:
        console.plan(plan)
    ppl_ids = [_ppl_ids(processor, path) for path in output.ppl_files]
    if ppl_ids:
        from fair_moe.metrics import perplexity

        seq_len = settings.calibration.seq_len
        result.perplexity["dense"] = [perplexity(model, ids, seq_len, progress=runtime.progress) for ids in ppl_ids]

    save_dtype = checkpoint_dtype(config)
    weight_bytes = [unit.output_bytes(model, plan, save_dtype) for plan in plans]
    if keep_format:  # the estimate is for dequantised weights; the source's files say how much smaller they are
        from fair_moe.checkpoint.stream import weight_files

        dense = UnitKind.output_bytes(unit, model, None, save_dtype)  # the base class: the unpruned size
        ratio = sum(p.stat().st_size for p in weight_files(source)) / dense
        weight_bytes = [int(b * ratio) for b in weight_bytes]
    check_free_space(claim, weight_bytes)
    facts = card_facts(settings, folder)
    if quantized is not None:
        for plan in plans:
            plan.settings = {**plan.settings, "source_quantization": quantized.describe(),
                             "written": "in the source's quantized format" if keep_format
                             else f"dequantised to {str(save_dtype).removeprefix('torch.')}"}
    for plan in plans:  # the plan records what the checkpoint will hold: router rows rounded to its dtype
        plan.compensation = compensation_as_written(plan, save_dtype)
    options = WriteOptions(save_dtype=save_dtype, source=source, stream=output.stream and not output.dequantize,
                           verify=output.verify, placement=placement or None, progress=runtime.progress,
                           trust_remote_code=runtime.trust_remote_code, card=facts,
                           quantized=quantized if keep_format else None,
                           drop_config_fields=("quantization_config",) if output.dequantize else ())
    with write_faults(claim):
        claim.staging.mkdir()
        if len(plans) == 1:
            write_checkpoint(claim.staging, unit, model, processor, plans[0], scores, data, options, result.phase)
            result.folders = [output.out]
        else:
            for i, (plan, budget) in enumerate(zip(plans, settings.budgets, strict=True)):
                # Slicing in memory consumes the model; streaming only reads it. Keep the loaded model whole
                # for every budget but the last, and slice fresh copies instead.
                in_memory, last = not streams(unit, plan, options), i == len(plans) - 1
                target = model if not in_memory or last else load_model(
                    str(folder), unit.auto_class_for(config), dtype, device, placement, runtime.trust_remote_code,
                    quantized)
                write_checkpoint(claim.staging / budget.label, unit, target, processor, plan, scores, data, options,
                                 result.phase)
            result.folders = [output.out / budget.label for budget in settings.budgets]
        if output.recipe:
            import yaml

            for folder in ([claim.staging] if len(plans) == 1 else [claim.staging / b.label for b in settings.budgets]):
                (folder / "fair_moe_recipe.yaml").write_text(
                    "# the settings that reproduce this checkpoint: fair-moe-prune --recipe fair_moe_recipe.yaml\n"
                    + yaml.safe_dump(output.recipe, sort_keys=True))
        claim.commit()
    if ppl_ids:
        report_perplexity(result, unit, config, ppl_ids, settings, dtype, device, console,
                          quantized if keep_format else None)
    if any(not plan.is_uniform for plan in plans):
        console.line(f"layers keep different counts: load with {unit.auto_class_for(config)}.from_pretrained("
                     "PATH, trust_remote_code=True); vLLM / SGLang / TGI need one count per layer: "
                     + (f"this model keeps {layers_phrase(plans[0].whole)} whole, so a pruned one never has that"
                        if plans[0].whole else "prune with --layout stock"))
    console.timings(result.seconds)
    console.final(f"wrote {output.out}")
    if output.push_to_hub:
        from fair_moe.workflow.publish import push

        console.line(f"pushed to {push(output.out, output.push_to_hub, output.private)}")
    return result


def card_facts(settings: PruneSettings, folder: Path | None):
    """What the model card states beyond the plan: base model id and licence, Hub datasets, where to load from."""
    from fair_moe.workflow.report import base_card_facts

    facts = base_card_facts(settings.model, settings.output.base_model, folder)
    specs = settings.calibration.dataset_specs()
    facts.datasets = tuple(dict.fromkeys(s.name for s in specs if not Path(s.name).exists() and not s.data_files))
    facts.load_path = settings.output.push_to_hub or str(settings.output.out)
    return facts


SIDE_FILES_BYTES = 64 * 2**20  # scores, plan, card, plot, tokenizer: generous room beside the weights


def check_free_space(claim: OutputClaim, weight_bytes: list[int]) -> None:
    """Refuse before writing when the filesystem of --out cannot hold the new checkpoint(s)."""
    import shutil

    needed = sum(weight_bytes) + SIDE_FILES_BYTES * len(weight_bytes)
    free = shutil.disk_usage(claim.container).free
    if free < needed:
        raise FairMoeError(f"--out {claim.out} needs about {needed / 2**20:,.0f} MiB free on its filesystem and "
                           f"{free / 2**20:,.0f} MiB is free: free some space or choose another --out")


@contextlib.contextmanager
def write_faults(claim: OutputClaim):
    """Disk faults while writing (no space, permissions lost, unreadable shards) become one clear error."""
    from safetensors import SafetensorError

    try:
        yield
    except OSError as err:
        raise FairMoeError(f"writing --out {claim.out} failed: {err.strerror or err} "
                           f"({err.filename or claim.staging}); nothing was written") from err
    except SafetensorError as err:
        raise FairMoeError(f"writing --out {claim.out} failed: {err}; nothing was written") from err


def check_budgets(layout: UnitLayout, budgets: tuple[Budget, ...], min_keep: int | None) -> None:
    """Every budget against the model's layout (top_k, groups, --min-keep), before any weights are loaded."""
    keep = layout.min_keep(min_keep)
    for budget in budgets:
        layout.total(budget, keep)


def budget_line(unit: UnitKind, layout: UnitLayout, budget: Budget, allocation: str) -> str:
    if budget.fraction is None:
        return (f"tolerance α = {budget.tolerance}: {allocation} allocation decides how many {unit.noun} "
                "each layer loses")
    per = budget.removed_per_layer(layout.width, layout.groups)
    return (f"budget {budget.fraction}: remove {per * layout.num_layers} {unit.noun} in total ({per} per layer under "
            f"uniform allocation; {allocation} allocation decides the split)")


def plan_for(model, unit: UnitKind, scores: Scores, budget: Budget, settings: PruneSettings,
             result: PruneResult | None = None, writable: frozenset[str] | None = None) -> PrunePlan:
    """One budget's plan: allocation (auto: selected on the model), then its compensation (auto: among those whose
    change the output format can hold, ``writable``; None = any)."""
    method, batch_size = settings.method, settings.calibration.batch_size
    allocation = method.allocation_for(unit)
    result = result or PruneResult()
    with result.phase("select"):
        plan, judge = _allocate(model, unit, scores, budget, settings, allocation)
    with result.phase("compensate"):
        return decide_compensation(model, unit, plan, scores, method.compensation, batch_size,
                                   settings.calibration.seed, method.compensation_options,
                                   settings.runtime.progress, judge, writable)


def _allocate(model, unit: UnitKind, scores: Scores, budget: Budget, settings: PruneSettings, allocation: str):
    """The plan of a fixed allocation rule, or the one auto selects (and the dense reference it judged with)."""
    method, batch_size = settings.method, settings.calibration.batch_size
    if allocation == AUTO:
        selection = select_plan(model, unit, scores, budget, method.compensation, method.protection,
                                method.min_keep, settings.model, batch_size, settings.runtime.progress,
                                settings.calibration.seed, method.compensation_options, method.layout)
        return selection.plan, selection.judge
    return make_plan(scores, budget, allocation, method.removal_for(unit), method.protection, method.min_keep,
                     settings.model), None


def _ppl_ids(processor, path: Path):
    from fair_moe.calibration.text import token_stream

    return token_stream(processor, [Path(path).read_text(encoding="utf-8")])


def report_perplexity(result: PruneResult, unit: UnitKind, config, ppl_ids: list, settings: PruneSettings, dtype,
                      device, console: Console, quantized=None) -> None:
    """Perplexity of every written checkpoint, loaded as a user would (a quantized one dequantised as the original
    was), next to the dense model's."""
    from fair_moe.checkpoint.loading import load_model
    from fair_moe.metrics import perplexity

    seq_len, progress = settings.calibration.seq_len, settings.runtime.progress
    for folder, plan in zip(result.folders, result.plans, strict=True):
        pruned = load_model(str(folder), unit.auto_class_for(config), dtype, device, None,
                            settings.runtime.trust_remote_code or not plan.is_uniform, quantized)
        label = folder.name if len(result.folders) > 1 else "pruned"
        result.perplexity[label] = [perplexity(pruned, ids, seq_len, progress=progress) for ids in ppl_ids]
    console.perplexity([Path(p).name for p in settings.output.ppl_files], result.perplexity["dense"],
                       {k: v for k, v in result.perplexity.items() if k != "dense"})
