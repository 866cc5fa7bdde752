"""The Python API: the workflow's steps with defaults, on a model already in memory.

    from fair_moe import prune_model
    pruned, plan = prune_model(model, tokenizer, ["some text", ...], budget=0.25)

    scores = compute_scores(model, tokenizer, sources, samples=128, seq_len=512)         # one calibration
    plan = make_plan(scores, PlanSettings(budget=0.5, allocation="tod", removal="reap"))  # many budgets
    with reference(model, plan): ...        # the model the checkpoint of ``plan`` must equal
    apply_plan(model, plan); save_pruned(model, "out", tokenizer)
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from pathlib import Path

from fair_moe.calibration.text import CalibrationSource
from fair_moe.core.budget import Budget
from fair_moe.core.errors import FairMoeError
from fair_moe.core.plan import PrunePlan
from fair_moe.core.scores import Scores
from fair_moe.metrics import compute_dtype
from fair_moe.strategies import AUTO, COMPENSATIONS
from fair_moe.strategies import planning as _planning
from fair_moe.strategies import selection as _selection
from fair_moe.units import UNIT_KINDS
from fair_moe.workflow.scoring import score
from fair_moe.workflow.settings import CalibrationSettings
from fair_moe.workflow.writing import compensation_as_written, write_config


@dataclass(frozen=True)
class PlanSettings:
    """How one plan is chosen. Exactly one of ``budget`` (fraction of units removed model-wide) and
    ``tolerance`` (the paper's α, ToD only) is set."""

    budget: float | None = 0.25
    tolerance: float | None = None
    allocation: str = AUTO
    removal: str = "reap"
    protection: str = "taylor"
    min_keep: int | None = None

    @property
    def target(self) -> Budget:
        return Budget(self.budget if self.tolerance is None else None, self.tolerance)


def compute_scores(model, tokenizer, sources: list[CalibrationSource], samples: int = 128, seq_len: int = 512,
                   batch_size: int = 8, seed: int = 0, progress: bool = True, layerwise: bool = False,
                   selection_samples: int | None = None) -> Scores:
    """One calibration pass over text ``sources`` (one class each); every removal signal and Taylor.

    ``selection_samples`` windows (default samples // 8, at least 8) of text the pass does not use are kept
    in the scores for ``--allocation auto``'s first judging look, and as many again for its second look.
    """
    from fair_moe.calibration.text import text_batches
    from fair_moe.workflow.scoring import selection_windows

    unit = UNIT_KINDS.get("experts")
    unit.check_config(model.config)
    CalibrationSettings(samples=samples, seq_len=seq_len, batch_size=batch_size, seed=seed).validate()
    held = selection_windows(samples) if selection_samples is None else selection_samples
    data = text_batches(tokenizer, sources, samples, seq_len, batch_size, seed, held, held)
    return score(model, unit, data, seed, layerwise, progress)


def make_plan(scores: Scores, settings: PlanSettings, base_model: str | None = None) -> PrunePlan:
    """Allocate from saved scores with a fixed allocation rule. Budgets are exact: L × round(b·n) removed."""
    if settings.allocation == AUTO:
        raise FairMoeError("--allocation auto compares candidate plans on the model: use fair_moe.prune_model or "
                           "fair_moe.strategies.selection.select_plan")
    return _planning.make_plan(scores, settings.target, settings.allocation, settings.removal, settings.protection,
                               settings.min_keep, base_model)


def reference(model, plan: PrunePlan) -> contextlib.AbstractContextManager:
    """Inside the block ``model`` (the original) behaves as the written checkpoint of ``plan`` must: removed
    units unreachable, the plan's compensation applied."""
    return _selection.reference(model, UNIT_KINDS.get(plan.unit), plan.kept, plan.compensation)


def apply_plan(model, plan: PrunePlan):
    """Fold the plan's compensation into ``model`` and slice it to the plan, in place. Returns the model."""
    import torch

    with torch.no_grad():
        if plan.compensation is not None:
            COMPENSATIONS.get(plan.compensation.kind).fold(model, plan.compensation)
        UNIT_KINDS.get(plan.unit).apply(model, plan)
    return model


def save_pruned(model, folder: Path, processor=None, plan: PrunePlan | None = None, dtype=None) -> None:
    """Save a sliced model (weights in ``dtype`` if given, config, processor, the modeling file for uneven plans,
    and the plan)."""
    unit = UNIT_KINDS.get(plan.unit if plan else "experts")
    Path(folder).mkdir(parents=True, exist_ok=True)
    unit.save(model, Path(folder), processor, dtype)
    if plan is not None:  # recording the compensation as written: router rows rounded to the weights' dtype
        written = compensation_as_written(plan, dtype or compute_dtype(model))
        dataclasses.replace(plan, compensation=written).save(Path(folder))


def stream_pruned(model, plan: PrunePlan, source: Path, out: Path, max_shard_bytes: int = 2 * 2**30,
                  progress: bool = False) -> dict:
    """Write the checkpoint of ``plan`` by streaming ``source`` (the model's local safetensors folder) shard by
    shard through the plan and its compensation; ``model`` (loaded from ``source``) is only read. A quantized source
    (FP8, MXFP4, compressed-tensors) is written in its own format: load ``model`` dequantised, e.g. with
    ``quantization_config=FineGrainedFP8Config(dequantize=True)``."""
    from fair_moe.checkpoint.loading import load_config
    from fair_moe.checkpoint.quantized import quantized_source

    unit = UNIT_KINDS.get(plan.unit)
    record = plan.compensation
    compensation = COMPENSATIONS.get(record.kind) if record else None
    if not unit.streamable or (compensation is not None and not compensation.streamable):
        raise FairMoeError(f"a plan of {plan.unit} with compensation {record.kind if record else 'none'} cannot be "
                           "streamed: use apply_plan and save_pruned")
    quantized = quantized_source(load_config(str(source)))
    if quantized is not None and compensation is not None and compensation.writes not in quantized.format.writable:
        raise FairMoeError(f"compensation {record.kind} cannot be written exactly into {quantized.format.label} "
                           "weights: use apply_plan and save_pruned on the dequantised model")
    transform = compensation.transform(model, record) if compensation else None
    stats = unit.stream(model, plan, Path(source), Path(out), transform, None, progress, max_shard_bytes,
                        quantized=quantized.format if quantized else None)
    write_config(Path(out), unit, model, plan, Path(source))
    return stats


def prune_model(model, tokenizer, calibration: list[str] | list[CalibrationSource] | Scores,
                budget: float | None = 0.25, *, tolerance: float | None = None, allocation: str = AUTO,
                removal: str = "reap", compensation: str = AUTO, samples: int = 128, seq_len: int = 512,
                batch_size: int = 8, seed: int = 0, progress: bool = True) -> tuple[object, PrunePlan]:
    """Calibrate (unless given Scores), allocate, compensate and slice ``model`` in place.

    ``calibration`` is a list of texts (one class), a list of CalibrationSource (one class each), or the
    Scores of an earlier run. Returns the pruned model and its plan.
    """
    unit = UNIT_KINDS.get("experts")
    target = Budget(budget if tolerance is None else None, tolerance)
    unit.check_config(model.config)
    layout = unit.layout(model.config)
    layout.total(target, layout.min_keep(None))
    if isinstance(calibration, Scores):
        scores = calibration
    else:
        sources = list(calibration)
        if sources and isinstance(sources[0], str):
            sources = [CalibrationSource("texts", list(calibration))]
        scores = compute_scores(model, tokenizer, sources, samples, seq_len, batch_size, seed, progress)
    base = getattr(model.config, "_name_or_path", None) or None
    judge = None
    if allocation == AUTO:
        selection = _selection.select_plan(model, unit, scores, target, compensation, base_model=base,
                                           progress=progress)
        plan, judge = selection.plan, selection.judge
    else:
        plan = _planning.make_plan(scores, target, allocation, removal, base_model=base)
    plan = _selection.decide_compensation(model, unit, plan, scores, compensation, batch_size, seed,
                                          progress=progress, judge=judge)
    apply_plan(model, plan)
    return model, plan
