"""Modeling code for a fair_moe-pruned checkpoint whose MoE layers keep different numbers of experts.

Written into the checkpoint by fair_moe as ``modeling_fair_moe.py`` and registered through
``auto_map``; load with the model's Auto class (``AutoModelForCausalLM`` for a language model) and
``trust_remote_code=True``.
Everything is the stock transformers architecture except that each MoE layer's router and routed
experts are sized from ``config.fair_moe_experts_per_layer`` (decoder layer index -> experts kept).
It needs only torch and transformers.
"""

import copy

import torch
from torch import nn
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeForCausalLM as FairMoeBase  # fair_moe:base


def resize_moe_layers(model, config):
    """Resize every listed MoE layer's router and experts tensors to that layer's kept count."""
    layout = config.fair_moe_layout
    layers = model.get_submodule(layout["layers_path"])
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key, count in config.fair_moe_experts_per_layer.items():
        layer = layers[int(key)]
        block = layer.get_submodule(layout["block_path"]) if layout["block_path"] else layer
        # built for the config's (largest) count; classes a router scores after the routed experts stay
        built = getattr(text, layout["count_fields"][0]) if layout["count_fields"] else count
        for path, axis in layout["router_tensors"]:
            module_path, _, name = path.rpartition(".")
            module = block.get_submodule(module_path) if module_path else block
            _resize_tensor(module, name, count + getattr(module, name).shape[axis] - built, axis)
        experts = block.get_submodule(layout["experts_path"])
        for name in layout["experts_tensors"]:  # relative to the experts module; may name a module inside it
            module_path, _, attribute = name.rpartition(".")
            module = experts.get_submodule(module_path)
            _resize_tensor(module, attribute, count + getattr(module, attribute).shape[0] - built, 0)
        for paths, value in ((layout["count_attributes"], count),
                             (layout.get("tail_count_attributes", ()), count + layout.get("router_tail", 0))):
            for path in paths:
                module_path, _, attr = path.rpartition(".")
                setattr(block.get_submodule(module_path) if module_path else block, attr, value)
        for module in block.modules():
            if getattr(module, "config", None) is text:  # a module that reads the count from the config
                module.config = copy.copy(text)
                for field in layout["count_fields"]:
                    setattr(module.config, field, count)


def _resize_tensor(module, name, count, axis):
    if name in module._parameters:
        old = module._parameters[name]
        shape = list(old.shape)
        shape[axis] = count
        module._parameters[name] = nn.Parameter(torch.empty(shape, dtype=old.dtype, device=old.device),
                                                requires_grad=old.requires_grad)
    elif name in module._buffers:
        old = module._buffers[name]
        shape = list(old.shape)
        shape[axis] = count
        module._buffers[name] = torch.zeros(shape, dtype=old.dtype, device=old.device)


def _register_conversions(config):
    """transformers converts a checkpoint's key format only for its own classes, and applies a mapping found through
    a class name once at the root and again, scoped, in every stock sub-model of the same model type. This class
    takes over the stock class's mapping the way the stock class gets it: the base class's own mapping under this
    class's name, or else the model type's mapping, marked registered so that this (custom) class is not skipped."""
    try:
        from transformers.conversion_mapping import (
            get_checkpoint_conversion_mapping,
            register_checkpoint_conversion_mapping,
        )
    except ImportError:  # a transformers without conversion mappings: keys are the module names
        return
    by_class = get_checkpoint_conversion_mapping(FairMoeBase.__name__)
    # None when the base class has no mapping of its own (it also clears what an earlier load in this process
    # registered for another base): the lookup then falls through to the model type
    register_checkpoint_conversion_mapping("FairMoeForCausalLM", by_class, overwrite=True)
    if by_class is not None:
        return
    by_type = get_checkpoint_conversion_mapping(config.model_type)
    if by_type is not None:
        register_checkpoint_conversion_mapping(config.model_type, by_type, overwrite=True)


class FairMoeForCausalLM(FairMoeBase):
    def __init__(self, config):
        _register_conversions(config)
        super().__init__(config)
        resize_moe_layers(self, config)
        self.post_init()
