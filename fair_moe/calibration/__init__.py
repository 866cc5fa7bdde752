"""Calibration data: text windows for language models, labelled images for vision transformers.

Each *class* (a text source, an image label) is one calibration class for the wasserstein signal.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
BUNDLED_CALIB_DIR = DATA_DIR / "calib"
BUNDLED_HELDOUT_DIR = DATA_DIR / "heldout"
DEMO_MODEL_DIR = DATA_DIR / "demo_model"
VISION_DEMO_DIR = DATA_DIR / "vision_demo"
VISION_DEMO_IMAGES = DATA_DIR / "vision_demo_images"  # the digits calibration split, one folder per class
EVAL_TASKS_DIR = DATA_DIR / "eval_tasks"  # offline lm-eval tasks (fair_moe_heldout_mc)
CONFIGS_DIR = DATA_DIR / "configs"  # eval suites (configs/eval/*.yaml), bare model configs (configs/models/*.json)
# Names that stand for what fair_moe ships, so that the README's commands run from an installed package.
ALIASES = {"demo": DEMO_MODEL_DIR, "demo-vision": VISION_DEMO_DIR, "demo-digits": VISION_DEMO_IMAGES}


def resolve_alias(name):
    """``demo`` / ``demo-vision`` / ``demo-digits`` → the shipped folder; anything else unchanged."""
    return str(ALIASES[name]) if isinstance(name, str) and name in ALIASES else name


@dataclass
class CalibrationBatches:
    """What a calibration pass runs on.

    ``batches`` holds (class, inputs) pairs: for text, (source index, input_ids [B, S]); for images,
    (labels [B], pixel_values [B, C, H, W]). ``meta`` describes the data for the plan and the model card.
    ``calibration_ids [n, S]`` are the text windows used and ``selection_ids [m, S]`` windows held out of
    them (text only).
    """

    batches: list[tuple[Any, Any]]
    num_classes: int
    meta: dict = field(default_factory=dict)
    calibration_ids: torch.Tensor | None = None
    selection_ids: torch.Tensor | None = None
