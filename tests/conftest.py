"""Tiny models built from the real transformers config classes (random weights, float32)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2MoeConfig

torch.set_num_threads(1)


def tiny_qwen2_moe_config(**overrides) -> Qwen2MoeConfig:
    values = dict(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=48,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=24,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=12,
        num_experts_per_tok=3,
        norm_topk_prob=False,
        max_position_embeddings=128,
        eos_token_id=0,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    values.update(overrides)
    return Qwen2MoeConfig(**values)


def build_model(config, seed: int = 0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Larger router weights than the default init, so routing is decisive and top-k never sits on a tie.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.normal_(0, 0.5)
    return model.eval()


class CharTokenizer:
    """A minimal tokenizer for tests: one id per byte (mod vocab), EOS = 0."""

    eos_token_id = 0

    def __init__(self, vocab_size: int = 97):
        self.vocab_size = vocab_size

    def __call__(self, text, add_special_tokens=False, verbose=False):
        return {"input_ids": [1 + (b % (self.vocab_size - 1)) for b in text.encode()]}


@pytest.fixture
def tiny_qwen2_moe():
    return build_model(tiny_qwen2_moe_config())


@pytest.fixture
def char_tokenizer():
    return CharTokenizer()
