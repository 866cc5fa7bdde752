"""Score: calibration data → one pass over the model → every signal for every unit (``Scores``)."""

from __future__ import annotations

import logging

from fair_moe.calibration import BUNDLED_CALIB_DIR, CalibrationBatches
from fair_moe.calibration.text import CalibrationSource
from fair_moe.core.errors import FairMoeError
from fair_moe.core.scores import Scores, model_fingerprint
from fair_moe.strategies.signals import compute_signals
from fair_moe.units import UnitKind
from fair_moe.workflow.settings import CalibrationSettings

log = logging.getLogger(__name__)


def text_sources(settings: CalibrationSettings, tokenizer=None, model: str | None = None) -> list[CalibrationSource]:
    """The calibration classes: each --calib-file, each --calib-dataset spec (or --calib-config), or, for the
    bundled demo model only, the bundled sample. Chat data is rendered with the tokenizer's chat template."""
    from fair_moe.calibration.text import bundled_sources, sources_from_dataset, sources_from_files

    if settings.files:
        return sources_from_files(list(settings.files), settings.text_field, tokenizer)
    if settings.datasets:
        chars = 8 * settings.seq_len * (settings.samples + 2 * selection_windows(settings.samples))
        return [sources_from_dataset(spec, tokenizer, chars_needed=chars) for spec in settings.dataset_specs()]
    if model is not None and not is_demo_model(model):
        raise FairMoeError("no calibration data given: pass text like your model's use with --calib-file FILE "
                           "(repeatable, one class each) or --calib-dataset NAME[,config=C][,samples=N] (repeatable), "
                           "e.g. --calib-dataset allenai/c4,config=en; the bundled sample is only for the demo model")
    log.info("no calibration data given: using the sample bundled with the demo model (%s)", BUNDLED_CALIB_DIR)
    return bundled_sources()


def is_demo_model(model: str) -> bool:
    from pathlib import Path

    from fair_moe.calibration import DEMO_MODEL_DIR

    path = Path(model).expanduser()
    return path.is_dir() and path.resolve() == DEMO_MODEL_DIR.resolve()


def selection_windows(samples: int) -> int:
    """Windows of calibration text held out of the scores for ``auto``'s first judging look: an eighth as many as
    the calibration windows, at least 8 (the paired KL comparison needs a dozen or so; more costs judging time).
    As many again are held out for the second look (``strategies.selection``)."""
    return max(8, samples // 8)


def calibration_data(unit: UnitKind, processor, settings: CalibrationSettings,
                     sources: list[CalibrationSource] | None = None) -> CalibrationBatches:
    """The batches one calibration pass runs on, for the unit kind's kind of data."""
    if unit.data == "images":
        from fair_moe.calibration.images import folder_batches

        return folder_batches(processor, settings.images, settings.samples, settings.batch_size, settings.seed)
    from fair_moe.calibration.text import text_batches

    sources = sources if sources is not None else text_sources(settings)
    held = selection_windows(settings.samples)
    return text_batches(processor, sources, settings.samples, settings.seq_len, settings.batch_size, settings.seed,
                        held, held)


def score(model, unit: UnitKind, data: CalibrationBatches, seed: int = 0, layerwise: bool = False,
          progress: bool = True, ranks=None) -> Scores | None:
    """One calibration pass; every removal signal the pass allows and the Taylor protection.

    With ``ranks`` (a torch.distributed group) this process runs its share of the batches and rank 0 gets the
    merged statistics; the other ranks get None."""
    if ranks is not None:
        from dataclasses import replace

        from fair_moe.workflow.distributed import gather_statistics

        stats = unit.collect(model, replace(data, batches=ranks.share(data.batches)), seed, layerwise, progress)
        stats = gather_statistics(stats, ranks)
        if stats is None:
            return None
    else:
        stats = unit.collect(model, data, seed, layerwise, progress)
    removal, protection = compute_signals(stats)
    meta = {
        "model_type": model.config.model_type,
        "layout": unit.layout(model.config).to_meta(),
        "fingerprint": fingerprint(model),
        "calibration": data.meta,
    }
    scores = Scores(stats.layer_indices, removal, protection, meta, data.selection_ids, data.calibration_ids)
    scores.check_finite()
    return scores


def fingerprint(model) -> str:
    return model_fingerprint(model.config, {k: tuple(v.shape) for k, v in model.state_dict().items()})


def check_scores_fit(scores: Scores, unit: UnitKind, config, model=None, path=None) -> None:
    """Scores of an earlier run must belong to this model (unit kind, type, width, and fingerprint once loaded)."""
    layout = scores.layout
    current = unit.layout(config)
    if scores.meta.get("model_type") != config.model_type or layout.unit != unit.name or layout.width != current.width:
        raise FairMoeError(f"--scores {path} was computed for another model ({scores.meta.get('model_type')}, "
                           f"{layout.width} {layout.unit}): calibrate again without --scores")
    if model is not None:
        found = fingerprint(model)
        if scores.meta.get("fingerprint") not in (None, found):
            raise FairMoeError(f"--scores {path} belongs to a different model (fingerprint "
                               f"{scores.meta.get('fingerprint')} ≠ {found}): calibrate again without --scores")
