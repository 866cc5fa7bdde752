"""Where the units of a vision transformer live: each encoder layer's MLP (fc1 [I, H] → act → fc2 [H, I]).

A neuron i of layer l is row i of fc1 (weight and bias) and column i of fc2. Registered by model_type.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from fair_moe.core.errors import FairMoeError
from fair_moe.units.vision import VISION_MODEL_TYPES


@dataclass
class MLPLayer:
    """One encoder layer's MLP: ``fc1`` (up, [I, H]) and ``fc2`` (down, [H, I])."""

    index: int
    fc1: nn.Linear
    fc2: nn.Linear
    activation: nn.Module

    @property
    def width(self) -> int:
        return self.fc1.out_features


def encoder(model: nn.Module) -> nn.Module:
    if getattr(model.config, "model_type", None) not in VISION_MODEL_TYPES:
        raise FairMoeError(f"model_type {getattr(model.config, 'model_type', None)!r} is not a supported vision model; "
                           f"supported: {', '.join(VISION_MODEL_TYPES)}")
    return getattr(model, model.base_model_prefix)


def mlp_layers(model: nn.Module) -> list[MLPLayer]:
    """Every encoder layer's MLP, in order."""
    return [
        MLPLayer(i, layer.mlp.fc1, layer.mlp.fc2, layer.mlp.activation_fn)
        for i, layer in enumerate(encoder(model).layers)
    ]


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """Every encoder layer's self-attention (q/k/v_proj [n·d, H], o_proj [H, n·d]), in order."""
    return [layer.attention for layer in encoder(model).layers]


def head_dim(model: nn.Module) -> int:
    return attention_modules(model)[0].head_dim
