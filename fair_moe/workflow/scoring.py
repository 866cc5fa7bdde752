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


def text_sources(settings: CalibrationSettings) -> list[CalibrationSource]:
    """The calibration classes: each --calib-file, each --calib-config of a dataset, or the bundled sample."""
    from fair_moe.calibration.text import bundled_sources, sources_from_dataset, sources_from_files

    if settings.files:
        return sources_from_files(list(settings.files), settings.text_field)
    if settings.dataset:
        return sources_from_dataset(settings.dataset, list(settings.dataset_configs), settings.split,
                                    settings.text_field)
    log.warning(
        "no calibration data given: using the small bundled sample in %s (code, licences, Python docs). "
        "Pass text like your model's use with --calib-file FILE (repeatable) or --calib-dataset NAME.",
        BUNDLED_CALIB_DIR,
    )
    return bundled_sources()


def selection_windows(samples: int) -> int:
    """Windows of calibration text held out of the scores for ``auto`` to judge plans on."""
    return max(4, samples // 8)


def calibration_data(unit: UnitKind, processor, settings: CalibrationSettings,
                     sources: list[CalibrationSource] | None = None) -> CalibrationBatches:
    """The batches one calibration pass runs on, for the unit kind's kind of data."""
    if unit.data == "images":
        from fair_moe.calibration.images import folder_batches

        return folder_batches(processor, settings.images, settings.samples, settings.batch_size, settings.seed)
    from fair_moe.calibration.text import text_batches

    sources = sources if sources is not None else text_sources(settings)
    return text_batches(processor, sources, settings.samples, settings.seq_len, settings.batch_size, settings.seed,
                        selection_windows(settings.samples))


def score(model, unit: UnitKind, data: CalibrationBatches, seed: int = 0, layerwise: bool = False,
          progress: bool = True) -> Scores:
    """One calibration pass; every removal signal the pass allows and the Taylor protection."""
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
