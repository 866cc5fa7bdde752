"""Modeling code for a fair_moe-pruned vision transformer whose MLP widths differ per layer.

Written into the checkpoint by fair_moe as ``modeling_fair_moe.py`` and registered through
``auto_map``; load with ``AutoModelForImageClassification.from_pretrained(path, trust_remote_code=True)``.
Everything is the stock architecture except each encoder layer's MLP width, taken from
``config.fair_moe_intermediate_sizes`` (layer index -> hidden neurons kept), and/or its number of
attention heads, from ``config.fair_moe_attention_heads`` (head width ``config.head_dim``). Needs only
torch and transformers.
"""

from torch import nn
from transformers.models.vit.modeling_vit import ViTForImageClassification as FairMoeBase  # fair_moe:base


class FairMoeForImageClassification(FairMoeBase):
    def __init__(self, config):
        super().__init__(config)
        layers = getattr(self, self.base_model_prefix).layers
        for key, width in (getattr(config, "fair_moe_intermediate_sizes", None) or {}).items():
            mlp = layers[int(key)].mlp
            mlp.fc1 = nn.Linear(mlp.fc1.in_features, width, bias=mlp.fc1.bias is not None)
            mlp.fc2 = nn.Linear(width, mlp.fc2.out_features, bias=mlp.fc2.bias is not None)
        for key, heads in (getattr(config, "fair_moe_attention_heads", None) or {}).items():
            attention = layers[int(key)].attention
            width = heads * attention.head_dim
            for name in ("q_proj", "k_proj", "v_proj"):
                old = getattr(attention, name)
                setattr(attention, name, nn.Linear(old.in_features, width, bias=old.bias is not None))
            attention.o_proj = nn.Linear(width, attention.o_proj.out_features, bias=attention.o_proj.bias is not None)
            attention.num_attention_heads = heads
        self.post_init()
