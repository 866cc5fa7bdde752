"""Vision transformers' MLP neurons (``--units neurons``) and attention heads (``--units heads``) as units.

The facades below are what the workflow sees; the work is in the modules beside them. They import torch
inside their methods so that registering the kinds costs nothing.
"""

from __future__ import annotations

from pathlib import Path

from fair_moe.core.budget import UnitLayout
from fair_moe.core.errors import FairMoeError
from fair_moe.units.base import UNIT_KINDS, UnitKind

VISION_MODEL_TYPES = ("vit", "deit")
UNEVEN_CLASS = "FairMoeForImageClassification"


class VisionUnits(UnitKind):
    """What neurons and heads share: image classifiers, labelled images, in-memory rewrite."""

    data = "images"
    measures = ("taylor", "class_samples")
    auto_class = "AutoModelForImageClassification"
    processor_class = "AutoImageProcessor"
    pipeline_tag = "image-classification"
    card_tags = ("vision-transformer",)
    default_removal = "wasserstein"
    default_allocation = "tod"
    exact_tolerance = 1e-4
    uneven_class = UNEVEN_CLASS

    def check_config(self, config) -> None:
        if config.model_type not in VISION_MODEL_TYPES:
            raise FairMoeError(f"--units {self.name} needs a vision transformer; model_type {config.model_type!r} is "
                               f"not one of {', '.join(VISION_MODEL_TYPES)}")

    def _layout(self, config, width: int) -> UnitLayout:
        return UnitLayout(self.name, width, tuple(range(config.num_hidden_layers)), 1, "a layer cannot be emptied")

    def save(self, model, folder: Path, processor, dtype) -> None:
        from fair_moe.units.vision.rewrite import save_vision

        save_vision(model, folder, processor, dtype)

    def probe(self, model, data) -> dict:
        return {"pixel_values": data.batches[0][1][:4]}

    def summary_line(self, config, layout) -> str:
        return f"model_type {config.model_type}: {layout.num_layers} encoder layers × {layout.width} {self.noun}"


@UNIT_KINDS.register
class NeuronsUnit(VisionUnits):
    name = "neurons"
    description = "MLP hidden neurons of a ViT / DeiT image classifier (with --calib-images)"
    noun = "MLP neurons"
    removal_means = "the removed neurons' up-projection rows and biases set to zero"

    def layout(self, config) -> UnitLayout:
        return self._layout(config, config.intermediate_size)

    def collect(self, model, data, seed, layerwise, progress):
        from fair_moe.units.vision.calibrate import neuron_statistics

        return neuron_statistics(model, data.batches, data.num_classes, seed, progress)

    def masked(self, model, kept):
        from fair_moe.units.vision.rewrite import zeroed_neurons

        return zeroed_neurons(model, kept)

    def apply(self, model, plan) -> None:
        from fair_moe.units.vision.rewrite import apply_vision_plan

        apply_vision_plan(model, plan)


@UNIT_KINDS.register
class HeadsUnit(VisionUnits):
    name = "heads"
    description = "attention heads of a ViT / DeiT image classifier (with --calib-images)"
    noun = "attention heads"
    removal_means = "the removed heads' output-projection columns set to zero"

    def layout(self, config) -> UnitLayout:
        return self._layout(config, config.num_attention_heads)

    def collect(self, model, data, seed, layerwise, progress):
        from fair_moe.units.vision.calibrate import head_statistics

        return head_statistics(model, data.batches, data.num_classes, seed, progress)

    def masked(self, model, kept):
        from fair_moe.units.vision.rewrite import zeroed_heads

        return zeroed_heads(model, kept)

    def apply(self, model, plan) -> None:
        from fair_moe.units.vision.rewrite import apply_head_plan

        apply_head_plan(model, plan)
