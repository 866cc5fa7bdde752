"""Tiny models built from the real transformers config classes (random weights, float32)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the Hub
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import Qwen2MoeConfig  # noqa: E402

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
    """A tiny model with random weights, float32. Router weights are larger than the default init, so routing is
    decisive and top-k never sits on a tie; every bias (router, expert, attention) and selection bias is random
    and non-zero, so that bias handling is actually exercised (init leaves most of them at zero), and so is every
    per-expert tensor of a module inside the experts module (a per-expert norm scale, initialised to ones)."""
    import transformers

    from fair_moe.adapters import get_adapter
    from fair_moe.adapters.structure import auto_class_name

    torch.manual_seed(seed)
    model = getattr(transformers, auto_class_name(config)).from_config(config, dtype=torch.float32)
    try:
        layers = get_adapter(model.config).moe_layers(model)
    except Exception:  # not a supported MoE (tests of refusals build those too)
        layers = []
    routers = {id(m) for layer in layers for m in layer.router.modules()}
    selection = {id(t) for layer in layers for t in layer.selection_biases()}
    with torch.no_grad():
        for module in model.modules():
            for name, p in module.named_parameters(recurse=False):
                if id(p) in selection:
                    continue
                if id(module) in routers:
                    p.normal_(0, 0.5 if name == "weight" else 0.3)
                elif name == "bias" or name.endswith("_bias"):
                    p.normal_(0, 0.02)
        for layer in layers:
            for name in layer.structure.expert_tensors:
                if "." in name:  # a per-expert tensor of a module inside the experts module (ergo's norm scale,
                    layer.expert_tensor(name).normal_(1.0, 0.2)  # initialised to ones): each expert its own
            for bias in layer.selection_biases():
                # non-negative: a group-limited router that fills unselected groups with 0 (DeepSeek-V3 style) would
                # otherwise often tie a kept expert with those zeros, and torch.topk breaks ties in no defined order
                bias.uniform_(0.0, 0.1)
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


def train_tiny_tokenizer(vocab_size: int = 300):
    """A byte-level BPE tokenizer trained in a fraction of a second on a fixed text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    text = ["def function(x):\n    return x + 1\n", "Permission is hereby granted, free of charge, to any person"] * 20
    tok.train_from_iterator(text, trainer=trainer)
    eos = "<|endoftext|>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token=eos)


def write_checkpoint(folder, config, seed: int = 0):
    tokenizer = train_tiny_tokenizer()
    text = config.get_text_config()
    text.vocab_size = len(tokenizer)  # the language tower's, for a multimodal config
    if getattr(text, "unpadded_vocab_size", None) is not None:  # Inkling 2 scores only the unpadded ids
        text.unpadded_vocab_size = len(tokenizer)
    model = build_model(config, seed)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A saved tiny qwen2_moe checkpoint (float32) with its tokenizer."""
    return write_checkpoint(tmp_path_factory.mktemp("tiny_qwen2_moe"), tiny_qwen2_moe_config())


@pytest.fixture(scope="session")
def calib_files(tmp_path_factory):
    """Two calibration classes (code-like and licence-like text), long enough for 8 × 32-token windows."""
    import json
    import random

    rng = random.Random(0)
    folder = tmp_path_factory.mktemp("calib")
    code = "\n".join(f"def f{i}(x):\n    return x * {rng.randint(0, 99)} + {i}" for i in range(120))
    legal = " ".join(rng.choice(["permission", "granted", "free", "charge", "person", "software", "the", "to", "of"])
                     for _ in range(900))
    (folder / "code.txt").write_text(code)
    (folder / "legal.jsonl").write_text(
        "\n".join(json.dumps({"text": legal[i : i + 400]}) for i in range(0, len(legal), 400))
    )
    return [folder / "code.txt", folder / "legal.jsonl"]
