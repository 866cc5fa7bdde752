"""Time to classify every key of a large MoE checkpoint (the streaming rewriter asks this once per key).

    python scripts/bench_keys.py                     # DeepSeek-V3 (58 MoE layers × 256 experts): ~45k keys
    python scripts/bench_keys.py --model-type qwen3_moe

The keys are those ``save_pretrained`` writes for the full-size default config of ``--model-type`` (taken from a
meta-device model: no weights are made). Reported: seconds for all keys with the adapter bound to the config once
(``key_classifier``, what the rewriter uses) and, on a sample, per key through ``classify_key(key, config)``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def checkpoint_keys(config) -> list[str]:
    """Key names of ``config``'s checkpoint in the per-expert format ``save_pretrained`` writes for the common
    ``model.layers.N.mlp`` layout: every MoE layer's expert projections and router, plus two other keys per layer."""
    from fair_moe.adapters import get_adapter

    adapter = get_adapter(config)
    structure = adapter.structure(config)
    keys = []
    for layer in structure.layer_indices:
        for expert in range(structure.num_experts):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                keys.append(f"model.layers.{layer}.mlp.experts.{expert}.{proj}.weight")
        keys.append(f"model.layers.{layer}.mlp.gate.weight")
        keys += [f"model.layers.{layer}.self_attn.o_proj.weight", f"model.layers.{layer}.input_layernorm.weight"]
    return keys


def main(argv: list[str] | None = None) -> None:
    from transformers import AutoConfig

    from fair_moe.adapters import get_adapter

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-type", default="deepseek_v3")
    p.add_argument("--sample", type=int, default=2000, help="keys timed through classify_key one by one")
    args = p.parse_args(argv)
    config = AutoConfig.for_model(args.model_type)
    adapter = get_adapter(config)
    start = time.perf_counter()
    adapter.structure(config)
    built = time.perf_counter() - start
    keys = checkpoint_keys(config)
    start = time.perf_counter()
    classify = adapter.key_classifier(config)
    bound = [classify(key) for key in keys]
    bound_s = time.perf_counter() - start
    sample = range(0, len(keys), max(1, len(keys) // args.sample))[: args.sample]
    start = time.perf_counter()
    single = [adapter.classify_key(keys[i], config) for i in sample]
    per_key = (time.perf_counter() - start) / len(sample)
    assert single == [bound[i] for i in sample], "bound and per-key classification disagree"
    experts = sum(ref is not None and ref.expert is not None for ref in bound)
    print(f"{args.model_type}: {len(keys)} keys ({experts} per-expert); structure built once in {built:.1f} s")
    print(f"bound (key_classifier): {bound_s:.2f} s for all keys, {bound_s / len(keys) * 1e6:.0f} µs per key")
    print(f"classify_key(key, config) per key: {per_key * 1e6:.0f} µs -> {per_key * len(keys):.1f} s for all keys")


if __name__ == "__main__":
    main()
