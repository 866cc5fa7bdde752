"""Write → verify: one writer and one verifier for every unit kind.

The reference (the masked original with the plan's compensation applied) is computed first, on the
loaded model; then the weights are written — streamed shard by shard from a local safetensors source when
the unit kind and the compensation allow it, otherwise folded and sliced in memory — with the plan, the
scores, the card and the plot; finally the checkpoint is reloaded the way a user loads it and its
outputs are compared with the reference. The caller runs this inside ``write_atomically``: a failure
leaves nothing at ``--out``.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from fair_moe.calibration import CalibrationBatches
from fair_moe.checkpoint.verify import compare_by_parts, compare_outputs
from fair_moe.core.errors import FairMoeError
from fair_moe.core.plan import PrunePlan
from fair_moe.core.scores import SCORES_FILE, Scores
from fair_moe.metrics import compute_dtype
from fair_moe.strategies import COMPENSATIONS
from fair_moe.strategies.selection import reference
from fair_moe.units import UnitKind
from fair_moe.workflow.report import CardFacts, model_card, plot_allocation

log = logging.getLogger(__name__)


@dataclass
class WriteOptions:
    """How a checkpoint is written: the dtype weights are saved in; ``source``, the local checkpoint folder the
    model was loaded from (its config.json is patched, its tokenizer and licence files copied, and with
    ``stream`` its weights are streamed); whether to verify, and the accelerate placement to reload with. A quantized
    source is either kept in its format (``quantized``: streamed, and reloaded through a dequantising load for the
    check) or written dequantised from memory (``drop_config_fields`` removes its ``quantization_config``)."""

    save_dtype: object
    source: Path | None = None
    stream: bool = True
    verify: bool = True
    placement: dict | None = None
    progress: bool = True
    trust_remote_code: bool = False
    card: CardFacts = field(default_factory=CardFacts)
    quantized: object = None  # QuantizedSource whose format the output keeps (streamed; reloaded dequantising)
    drop_config_fields: tuple[str, ...] = ()  # source config.json fields the output must not keep
    expected: tuple | None = field(default=None, repr=False)  # (probe, reference outputs) of the plan being written


def streams(unit: UnitKind, plan: PrunePlan, options: WriteOptions) -> bool:
    """Whether the weights are streamed from the source (else the model is folded and sliced in memory)."""
    compensation = COMPENSATIONS.get(plan.compensation.kind) if plan.compensation else None
    return (options.stream and options.source is not None and unit.streamable
            and (compensation is None or compensation.streamable))


def write_config(folder: Path, unit: UnitKind, model, plan: PrunePlan, source: Path | None,
                 changes: dict | None = None, drop: tuple[str, ...] = ()) -> None:
    """config.json of the pruned checkpoint: the source's own file patched with what pruning changed, or (with no
    source folder) the pruned config saved by transformers."""
    from fair_moe.checkpoint.config import config_changes, write_patched_config

    if changes is None:
        pruned = unit.pruned_config(model, plan)
        changes = config_changes(model.config.to_dict(), pruned.to_dict())
        if source is None or not (Path(source) / "config.json").is_file():
            pruned.save_pretrained(folder)
            return
    if source is not None and (Path(source) / "config.json").is_file():
        write_patched_config(source, folder, changes, drop)


def compensation_as_written(plan: PrunePlan, dtype):
    """``plan``'s compensation record as a checkpoint whose weights are stored in ``dtype`` holds it (values the
    compensation writes verbatim, router rows, rounded to ``dtype``: ``Compensation.as_written``); None when the
    plan has none. The plan saved beside a checkpoint records this, so that it equals what was written."""
    if plan.compensation is None:
        return None
    return COMPENSATIONS.get(plan.compensation.kind).as_written(plan.compensation, dtype)


def write_checkpoint(folder: Path, unit: UnitKind, model, processor, plan: PrunePlan, scores: Scores,
                     data: CalibrationBatches | None, options: WriteOptions, phase=None) -> None:
    """Write the whole output folder (weights, config, plan, scores, card, plot) into ``folder`` and verify it.

    Streaming leaves ``model`` untouched; otherwise it is folded and sliced in place. ``phase(name)``, when given,
    times the "write" and "verify" parts.
    """
    import contextlib


    phase = phase or (lambda name: contextlib.nullcontext())
    with phase("write"):
        _write(folder, unit, model, processor, plan, scores, data, options)
    if options.verify:
        with phase("verify"):
            _verify(folder, unit, model, plan, options)


def _write(folder, unit, model, processor, plan, scores, data, options) -> None:
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    if options.verify:  # on the original weights, before an in-memory write folds and slices them
        probe = unit.probe(model, data)

        def masked():
            return reference(model, unit, plan.kept, plan.compensation)

        with torch.no_grad():
            trace = unit.routing_trace(model, probe, plan.kept, masked)
            if trace is None:
                with masked():
                    options.expected = (probe, unit.outputs(model, probe), None)
            else:
                options.expected = (probe, trace.logits, trace)
    dtypes = {name: t.dtype for name, t in _named_tensors(model)}  # a model may keep some modules in float32
    compensation = COMPENSATIONS.get(plan.compensation.kind) if plan.compensation else None
    source = options.source
    if streams(unit, plan, options):
        transform = compensation.transform(model, plan.compensation) if compensation else None
        quantized = options.quantized.format if options.quantized is not None else None
        stats = unit.stream(model, plan, source, folder, transform, options.save_dtype, options.progress,
                            quantized=quantized)
        write_config(folder, unit, model, plan, source)
        log.info("streamed %d source bytes into %d shard(s) of %d bytes", stats["source_bytes"], stats["shards"],
                 stats["written_bytes"])
    else:
        before = model.config.to_dict()
        with torch.no_grad():
            if compensation is not None:
                compensation.fold(model, plan.compensation)
            unit.apply(model, plan)
        from fair_moe.checkpoint.config import config_changes

        changes = config_changes(before, model.config.to_dict())
        unit.save(model, folder, processor if source is None else None, options.save_dtype)
        write_config(folder, unit, model, plan, source, changes, options.drop_config_fields)
        _restore_dtypes(model, dtypes)
    if source is not None:
        from fair_moe.checkpoint.stream import copy_side_files

        copy_side_files(source, folder, remote_code=bool(getattr(model.config, "auto_map", None))
                        and plan.is_uniform)
    plan.save(folder)
    if scores is not None:  # a plan applied with --plan may come without its scores
        scores.save(folder / SCORES_FILE)
    (folder / "README.md").write_text(model_card(plan, options.card))
    plot_allocation(plan, folder / "allocation.png")
    unit.verify_saved(folder, plan, model.config)


def _named_tensors(model):
    return [*model.named_parameters(), *model.named_buffers()]


def _restore_dtypes(model, dtypes: dict) -> None:
    """Every parameter and buffer back in the dtype it had (saving in another dtype casts the whole model)."""
    for name, tensor in _named_tensors(model):
        if name in dtypes and tensor.dtype != dtypes[name]:
            tensor.data = tensor.data.to(dtypes[name])


def _verify(folder, unit, model, plan, options) -> None:
    """Reload the written checkpoint and compare its outputs on the probe with the reference's; in half precision a
    mismatch is checked again by parts (``compare_by_parts``), which ties of the routing cannot fail."""
    import torch

    probe, expected, trace = options.expected
    dtype = compute_dtype(model)
    reloaded = reload(folder, unit, plan, dtype, model, options.placement, options.trust_remote_code,
                      options.quantized)
    exact = dtype == torch.float32 and options.save_dtype in (None, torch.float32)
    what = "the masked original" + (" with its compensation" if plan.compensation else "")
    try:
        compare_outputs(unit.outputs(reloaded, probe), expected, exact, unit.exact_tolerance, what)
    except FairMoeError as error:
        if exact or trace is None:
            raise
        compare_by_parts(unit.by_parts(reloaded, probe, plan, trace), expected, what, error)


def reload(folder: Path, unit: UnitKind, plan: PrunePlan, dtype, model, placement: dict | None,
           trust_remote_code: bool = False, quantized=None):
    """The written checkpoint loaded as a user would, with the placement the original was loaded with (and, for a
    quantized output, dequantised the way the original was, so that both sides see the same numbers).

    Remote code runs only for fair_moe's own modeling file (uneven plans) or when the user allowed it."""
    import contextlib

    import transformers

    from fair_moe.metrics import execution_device

    auto = getattr(transformers, unit.auto_class_for(model.config))
    trust = trust_remote_code or not plan.is_uniform
    extra = quantized.load_kwargs() if quantized is not None else {}
    with warnings.catch_warnings(), (quantized.loading() if quantized is not None else contextlib.nullcontext()):
        warnings.simplefilter("ignore")
        if placement:  # offload into a folder of its own
            placement = {**placement, **({"offload_folder": str(Path(placement["offload_folder"]) / "verify")}
                                         if "offload_folder" in placement else {})}
            reloaded = auto.from_pretrained(folder, trust_remote_code=trust, dtype=dtype, **placement, **extra)
        else:
            reloaded = auto.from_pretrained(folder, trust_remote_code=trust, dtype=dtype, **extra)
            reloaded = reloaded.to(execution_device(model))
    return reloaded.eval()
