"""Tiny random configs of every fused-experts MoE type in the installed transformers (``zoo_configs.json``: 8 routed
experts, top-2, 3 layers; expert groups, selection biases, shared experts and dense layers turned on where the
family has them), and the tiny models built from them."""

from __future__ import annotations

import json
from pathlib import Path

import transformers

ZOO = json.loads((Path(__file__).with_name("zoo_configs.json")).read_text())


def zoo_config(name: str):
    entry = ZOO[name]
    return transformers.AutoConfig.for_model(entry["config"], **entry["kwargs"])


def auto_class(name: str):
    return getattr(transformers, ZOO[name]["auto"])
