"""Slice pruned MLP neurons out of a vision transformer and write a loadable checkpoint.

fc1 keeps the rows (weight and bias) of the kept neurons, fc2 the matching columns. One width in
every layer → the stock architecture with ``intermediate_size`` updated; different widths → the
per-layer widths in the config and a modeling file registered through ``auto_map``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from fair_moe.core.plan import PrunePlan
from fair_moe.units.base import MODELING_FILE, keep_architectures, modeling_file
from fair_moe.units.vision import UNEVEN_CLASS, modeling_template
from fair_moe.units.vision.modules import attention_modules, mlp_layers


@contextlib.contextmanager
def _restored(tensors: list[torch.Tensor]) -> Iterator[None]:
    """The tensors' values come back on exit, whatever the block wrote into them."""
    saved = [t.detach().clone() for t in tensors]
    try:
        yield
    finally:
        with torch.no_grad():
            for tensor, value in zip(tensors, saved, strict=True):
                tensor.copy_(value)


@contextlib.contextmanager
def zeroed_neurons(model: nn.Module, kept: dict[int, list[int]]) -> Iterator[None]:
    """The reference inside the block: removed neurons' fc1 rows and biases at zero (act(0) = 0 for GELU/ReLU)."""
    layers = mlp_layers(model)
    params = [p for layer in layers for p in (layer.fc1.weight, layer.fc1.bias) if p is not None]
    with _restored(params), torch.no_grad():
        for layer in layers:
            removed = torch.ones(layer.width, dtype=torch.bool)
            removed[kept[layer.index]] = False
            layer.fc1.weight[removed] = 0
            if layer.fc1.bias is not None:
                layer.fc1.bias[removed] = 0
        yield


@contextlib.contextmanager
def zeroed_heads(model: nn.Module, kept: dict[int, list[int]]) -> Iterator[None]:
    """The reference for heads inside the block: removed heads' columns of o_proj at zero (their output adds
    nothing)."""
    attentions = attention_modules(model)
    with _restored([a.o_proj.weight for a in attentions]), torch.no_grad():
        for index, attention in enumerate(attentions):
            d = attention.head_dim
            for head in set(range(attention.o_proj.in_features // d)) - set(kept[index]):
                attention.o_proj.weight[:, head * d : (head + 1) * d] = 0
        yield


def apply_head_plan(model: nn.Module, plan: PrunePlan) -> nn.Module:
    """Slice removed heads out of q/k/v (rows) and o_proj (columns) of every layer; update the config."""
    heads = {}
    with torch.no_grad():
        for index, attention in enumerate(attention_modules(model)):
            d = attention.head_dim
            kept = sorted(plan.kept[index])
            rows = torch.cat([torch.arange(h * d, (h + 1) * d) for h in kept])
            for name in ("q_proj", "k_proj", "v_proj"):
                old = getattr(attention, name)
                setattr(
                    attention, name, _linear_like(old, old.weight[rows], None if old.bias is None else old.bias[rows])
                )
            attention.o_proj = _linear_like(attention.o_proj, attention.o_proj.weight[:, rows], attention.o_proj.bias)
            attention.num_attention_heads = len(kept)
            heads[str(index)] = len(kept)
    model.config.head_dim = attention_modules(model)[0].head_dim
    if len(set(heads.values())) == 1:
        model.config.num_attention_heads = next(iter(heads.values()))  # stock class: head_dim keeps the width
    else:
        model.config.fair_moe_attention_heads = heads
        _mark_uneven(model.config)
    return model


def _mark_uneven(config) -> None:
    """Registered through auto_map, and named so that a loader ignoring auto_map does not take it for stock."""
    config.auto_map = {"AutoModelForImageClassification": f"{MODELING_FILE[:-3]}.{UNEVEN_CLASS}"}
    config.architectures = [UNEVEN_CLASS]


def _linear_like(old: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    return new


def apply_vision_plan(model: nn.Module, plan: PrunePlan) -> nn.Module:
    """Slice every encoder MLP to its kept neurons and update the config. Returns the same model."""
    widths = {}
    with torch.no_grad():
        for layer in mlp_layers(model):
            keep = torch.tensor(sorted(plan.kept[layer.index]), dtype=torch.long)
            mlp = getattr(model, model.base_model_prefix).layers[layer.index].mlp
            fc1, fc2 = layer.fc1, layer.fc2
            mlp.fc1 = _linear_like(fc1, fc1.weight[keep], None if fc1.bias is None else fc1.bias[keep])
            mlp.fc2 = _linear_like(fc2, fc2.weight[:, keep], fc2.bias)
            widths[str(layer.index)] = len(keep)
    model.config.intermediate_size = max(widths.values())
    if len(set(widths.values())) > 1:
        model.config.fair_moe_intermediate_sizes = widths
        _mark_uneven(model.config)
    return model


def save_vision(model: nn.Module, folder: Path, image_processor=None, dtype: torch.dtype | None = None) -> None:
    if dtype is not None:
        model.to(dtype)
    model.save_pretrained(folder)
    if image_processor is not None:
        image_processor.save_pretrained(folder)
    if (
        getattr(model.config, "fair_moe_intermediate_sizes", None)
        or getattr(model.config, "fair_moe_attention_heads", None)
    ):
        (Path(folder) / MODELING_FILE).write_text(modeling_file(modeling_template, type(model)))
        keep_architectures(Path(folder), [UNEVEN_CLASS])
