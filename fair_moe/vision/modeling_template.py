"""Modeling code for a fair_moe-pruned vision transformer whose MLP widths differ per layer.

Written into the checkpoint by fair_moe as ``modeling_fair_moe.py`` and registered through
``auto_map``; load with ``AutoModelForImageClassification.from_pretrained(path, trust_remote_code=True)``.
Everything is the stock architecture except each encoder layer's MLP width, taken from
``config.fair_moe_intermediate_sizes`` (layer index -> hidden neurons kept). Needs only torch and transformers.
"""

from torch import nn
from transformers.models.vit.modeling_vit import ViTForImageClassification as FairMoeBase  # fair_moe:base


class FairMoeForImageClassification(FairMoeBase):
    def __init__(self, config):
        super().__init__(config)
        layers = getattr(self, self.base_model_prefix).layers
        for key, width in config.fair_moe_intermediate_sizes.items():
            mlp = layers[int(key)].mlp
            mlp.fc1 = nn.Linear(mlp.fc1.in_features, width, bias=mlp.fc1.bias is not None)
            mlp.fc2 = nn.Linear(width, mlp.fc2.out_features, bias=mlp.fc2.bias is not None)
        self.post_init()
