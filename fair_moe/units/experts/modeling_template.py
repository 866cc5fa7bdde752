"""Modeling code for a fair_moe-pruned checkpoint whose MoE layers keep different numbers of experts.

Written into the checkpoint by fair_moe as ``modeling_fair_moe.py`` and registered through
``auto_map``; load with ``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)``.
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
    for key, count in config.fair_moe_experts_per_layer.items():
        block = getattr(layers[int(key)], layout["block_attr"])
        for attr, names in (
            (layout["router_attr"], layout["router_tensors"]),
            (layout["experts_attr"], layout["experts_tensors"]),
        ):
            module = getattr(block, attr)
            for name in names:
                _resize_tensor(module, name, count)
            for count_attr in layout["count_attributes"]:
                if hasattr(module, count_attr):
                    setattr(module, count_attr, count)
            if isinstance(getattr(module, "config", None), type(config)):
                module.config = copy.copy(module.config)
                setattr(module.config, layout["count_field"], count)


def _resize_tensor(module, name, count):
    if name in module._parameters:
        old = module._parameters[name]
        module._parameters[name] = nn.Parameter(
            torch.empty((count, *old.shape[1:]), dtype=old.dtype, device=old.device), requires_grad=old.requires_grad
        )
    elif name in module._buffers:
        old = module._buffers[name]
        module._buffers[name] = torch.zeros((count, *old.shape[1:]), dtype=old.dtype, device=old.device)


class FairMoeForCausalLM(FairMoeBase):
    def __init__(self, config):
        super().__init__(config)
        resize_moe_layers(self, config)
        self.post_init()
