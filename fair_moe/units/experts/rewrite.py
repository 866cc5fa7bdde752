"""Checkpoint surgery in memory: slice the removed experts out and save a loadable checkpoint (docs/METHOD.md §5).

Router rows (and router bias / selection bias) and every per-expert tensor are sliced along the
expert dimension, kept experts in their original relative order. A plan with one count everywhere
gives the stock architecture with the count field updated; different counts per layer add
``fair_moe_experts_per_layer`` to the config and a modeling file registered through ``auto_map``.
Compensations are folded by their own strategy before slicing; nothing here knows about them.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from fair_moe.adapters import get_adapter
from fair_moe.adapters.base import FusedExpertsAdapter
from fair_moe.adapters.structure import expert_index, text_config
from fair_moe.checkpoint.stream import weight_files
from fair_moe.core.errors import FairMoeError
from fair_moe.core.plan import PrunePlan
from fair_moe.units.base import MODELING_FILE, keep_architectures, modeling_file
from fair_moe.units.experts import UNEVEN_CLASS, modeling_template


def _slice_tensor(module: nn.Module, name: str, keep: torch.Tensor, axis: int = 0) -> None:
    """Keep ``keep`` along ``axis`` of one direct parameter or buffer of ``module``."""
    if name in module._parameters:
        old = module._parameters[name]
        new = old.detach().index_select(axis, keep.to(old.device)).clone()
        module._parameters[name] = nn.Parameter(new, requires_grad=old.requires_grad)
    else:
        old = module._buffers[name]
        module._buffers[name] = old.index_select(axis, keep.to(old.device)).clone()


def check_plan(model: nn.Module, plan: PrunePlan) -> None:
    """The plan must name every MoE layer of this model with valid, distinct ids and ≥ top_k kept."""
    adapter = get_adapter(model.config)
    layers = {layer.index: layer for layer in adapter.moe_layers(model)}
    if set(plan.kept) != set(layers):
        raise FairMoeError(f"plan layers {sorted(plan.kept)} do not match the model's MoE layers {sorted(layers)}")
    whole = adapter.whole_counts(model.config)
    if plan.whole != whole:
        raise FairMoeError(f"the plan keeps layers {sorted(plan.whole)} whole, but this model keeps MoE layers "
                           f"{sorted(whole)} whole ({adapter.whole_reason or 'none'}): the plan is for another model")
    for index, kept in plan.kept.items():
        layer = layers[index]
        if len(set(kept)) != len(kept) or not all(0 <= e < layer.num_experts for e in kept):
            raise FairMoeError(f"plan layer {index}: kept ids must be distinct and in [0, {layer.num_experts})")
        if len(kept) < layer.top_k:
            raise FairMoeError(
                f"plan layer {index} keeps {len(kept)} experts, fewer than the router's top_k={layer.top_k}"
            )


def set_count_attributes(block: nn.Module, paths, count: int) -> None:
    """Every module attribute that caches a layer's expert count (block-relative paths) set to ``count``."""
    for path in paths:
        module_path, _, attr = path.rpartition(".")
        module = block.get_submodule(module_path) if module_path else block
        setattr(module, attr, count)


def apply_plan(model: nn.Module, plan: PrunePlan) -> nn.Module:
    """Slice ``model`` in place to the plan and update its config. Returns the same model."""
    check_plan(model, plan)
    adapter = get_adapter(model.config)
    structure = adapter.structure(model.config)
    layout = layout_of(model)
    text = text_config(model.config)
    for layer in adapter.moe_layers(model):
        kept = sorted(plan.kept[layer.index])
        for path, axis in structure.router_tensors:
            module, name = layer.owner(path)
            length = getattr(module, name).shape[axis]
            _slice_tensor(module, name, expert_index(kept, length, layer.num_experts), axis)
        for name in structure.expert_tensors:
            module, attribute = layer.expert_owner(name)
            length = getattr(module, attribute).shape[0]
            _slice_tensor(module, attribute, expert_index(kept, length, layer.num_experts))
        set_count_attributes(layer.block, structure.count_attributes, len(kept))
        set_count_attributes(layer.block, structure.tail_count_attributes, len(kept) + structure.router_tail)
        if not plan.is_uniform:
            for module in (layer.block, layer.router, layer.experts):
                if getattr(module, "config", None) is text:  # a module that reads the count from the config
                    module.config = copy.copy(text)
                    for field in structure.count_fields:
                        setattr(module.config, field, len(kept))
    for attr in structure.model_count_attributes:
        setattr(model, attr, plan.largest_count)
    update_config(model.config, plan, layout)
    return model


def update_config(config, plan: PrunePlan, layout: dict) -> None:
    """Expert count fields = the largest kept count; uneven plans add per-layer counts, layout and auto_map."""
    adapter = get_adapter(config)
    counts = plan.kept_counts
    auto_class = adapter.auto_class(config)
    adapter.set_count(config, plan.largest_count)
    if not plan.is_uniform:
        config.fair_moe_experts_per_layer = {str(k): v for k, v in counts.items()}
        config.fair_moe_layout = layout
        config.auto_map = {auto_class: f"{MODELING_FILE[:-3]}.{UNEVEN_CLASS}"}
        # A loader that ignores auto_map (vLLM, SGLang, TGI) must not take this for the stock architecture.
        config.architectures = [UNEVEN_CLASS]


def layout_of(model: nn.Module) -> dict:
    """Where the per-layer modeling file finds each MoE block's tensors and count attributes (paths)."""
    structure = get_adapter(model.config).structure(model.config)
    return {
        "layers_path": structure.layers_path,
        "block_path": structure.block_path,
        "router_tensors": [[path, axis] for path, axis in structure.router_tensors],
        "router_tail": structure.router_tail,
        "experts_path": structure.experts_path,
        "experts_tensors": list(structure.expert_tensors),
        "count_attributes": list(structure.count_attributes),
        "tail_count_attributes": list(structure.tail_count_attributes),
        "count_fields": list(structure.count_fields),
    }


def modeling_source(model: nn.Module | type) -> str:
    """The per-layer modeling file, its base class pointed at the model's own transformers class."""
    return modeling_file(modeling_template, model if isinstance(model, type) else type(model))


def save_pruned(model: nn.Module, folder: Path, dtype: torch.dtype | None = None, tokenizer=None) -> None:
    """Write weights, config, generation config, tokenizer and (non-uniform) the modeling file."""
    if dtype is not None:
        model.to(dtype)
    model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    if getattr(model.config, "fair_moe_experts_per_layer", None):
        (Path(folder) / MODELING_FILE).write_text(modeling_source(model))
        keep_architectures(Path(folder), [UNEVEN_CLASS])


def verify_expert_keys(folder: Path, plan: PrunePlan, adapter: FusedExpertsAdapter) -> None:
    """Every saved layer holds exactly the planned number of experts, numbered 0 … n−1."""
    keys = []
    for shard in weight_files(folder):
        with safe_open(str(shard), "pt") as f:
            keys.extend(f.keys())
    found = adapter.saved_expert_ids(keys)
    for layer, count in plan.kept_counts.items():
        ids = found.get(layer)
        if ids is not None and ids != set(range(count)):
            raise FairMoeError(f"the written checkpoint's layer {layer} holds experts {sorted(ids)}, expected "
                               f"0..{count - 1}: nothing was written to --out")
