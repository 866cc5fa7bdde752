"""Tiny configs of every supported family, built from the real transformers config classes."""

from __future__ import annotations

import transformers as tf

from fair_moe.adapters import get_adapter
from fair_moe.core.plan import PrunePlan

COMMON = dict(vocab_size=97, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=128, pad_token_id=0, eos_token_id=0, tie_word_embeddings=False)


def family_configs() -> dict:
    """model_type → config with 12 routed experts, top-3; grouped families use 3 groups of 4."""
    deepseek_mla = dict(kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
                        moe_intermediate_size=16, intermediate_size=48, n_routed_experts=12, num_experts_per_tok=3,
                        n_shared_experts=1, first_k_dense_replace=1)
    return {
        "qwen2_moe": tf.Qwen2MoeConfig(**COMMON, intermediate_size=48, moe_intermediate_size=16,
                                       shared_expert_intermediate_size=24, num_experts=12, num_experts_per_tok=3),
        "qwen3_moe": tf.Qwen3MoeConfig(**COMMON, intermediate_size=48, moe_intermediate_size=16, head_dim=8,
                                       num_experts=12, num_experts_per_tok=3, norm_topk_prob=True,
                                       mlp_only_layers=[1]),
        "mixtral": tf.MixtralConfig(**COMMON, intermediate_size=16, num_local_experts=12, num_experts_per_tok=3),
        "olmoe": tf.OlmoeConfig(**COMMON, intermediate_size=16, num_experts=12, num_experts_per_tok=3),
        "deepseek_v2": tf.DeepseekV2Config(**{**COMMON, "num_key_value_heads": 4}, **deepseek_mla,
                                           topk_method="group_limited_greedy", n_group=3,
                                           topk_group=2, routed_scaling_factor=1.5),
        "deepseek_v3": tf.DeepseekV3Config(**{**COMMON, "num_key_value_heads": 4}, **deepseek_mla,
                                           n_group=3, topk_group=2, norm_topk_prob=True,
                                           routed_scaling_factor=2.5),
        "glm4_moe": tf.Glm4MoeConfig(**COMMON, head_dim=8, intermediate_size=48, moe_intermediate_size=16,
                                     n_routed_experts=12, num_experts_per_tok=3, n_shared_experts=1, n_group=1,
                                     topk_group=1, first_k_dense_replace=1, norm_topk_prob=True,
                                     routed_scaling_factor=1.8),
        "qwen3_next": tf.Qwen3NextConfig(**COMMON, intermediate_size=48, moe_intermediate_size=16, head_dim=8,
                                         shared_expert_intermediate_size=24, num_experts=12, num_experts_per_tok=3,
                                         linear_num_value_heads=2, linear_num_key_heads=2, linear_key_head_dim=8,
                                         linear_value_head_dim=8, layer_types=["linear_attention", "full_attention",
                                                                               "linear_attention"]),
        "flex_olmo": tf.FlexOlmoConfig(**COMMON, intermediate_size=16, num_experts=12, num_experts_per_tok=3),
        "minimax": tf.MiniMaxConfig(**COMMON, head_dim=8, intermediate_size=16, num_local_experts=12,
                                    num_experts_per_tok=3),
        "dots1": tf.Dots1Config(**COMMON, head_dim=8, intermediate_size=48, moe_intermediate_size=16,
                                n_routed_experts=12, num_experts_per_tok=3, n_shared_experts=1,
                                first_k_dense_replace=1, n_group=3, topk_group=2, norm_topk_prob=True,
                                routed_scaling_factor=1.2),
        "granitemoe": tf.GraniteMoeConfig(**COMMON, intermediate_size=16, num_local_experts=12, num_experts_per_tok=3),
        "gpt_oss": tf.GptOssConfig(**COMMON, head_dim=8, intermediate_size=16, num_local_experts=12,
                                   num_experts_per_tok=3, sliding_window=8),
    }


def zoo_configs() -> dict:
    """Every other fused-experts model type of the installed transformers (``zoo.py``: 8 experts, top-2) that fair_moe
    supports, under its own name; types already in ``family_configs`` are not repeated."""
    from zoo import ZOO, zoo_config

    from fair_moe.adapters import supported_model_types

    supported = set(supported_model_types())
    return {name: zoo_config(name) for name in sorted(ZOO) if name in supported and name not in FAMILY_TYPES}


FAMILY_TYPES = frozenset({"qwen2_moe", "qwen3_moe", "mixtral", "olmoe", "deepseek_v2", "deepseek_v3", "glm4_moe",
                          "qwen3_next", "flex_olmo", "minimax", "dots1", "granitemoe", "gpt_oss"})


def all_configs() -> dict:
    """The hand-written family configs (12 experts, top-3, 3 groups where grouped) and every other supported type."""
    return {**family_configs(), **zoo_configs()}


def grouped_uneven_plan(model) -> PrunePlan:
    """Layers keep very different counts, the same number in every group."""
    adapter = get_adapter(model.config)
    e, groups = adapter.num_experts(model.config), adapter.num_groups(model.config)
    size = e // groups
    keep_per_group = [size, max(2, size // 2), size - 1]
    kept = {}
    for n, layer in enumerate(adapter.moe_layers(model)):
        j = keep_per_group[n % 3]
        kept[layer.index] = sorted(g * size + (i * 5 + g) % size for g in range(groups) for i in range(j))
    assert len({len(v) for v in kept.values()}) > 1
    return PrunePlan(model.config.model_type, "experts", e, kept, top_k=adapter.top_k(model.config),
                     whole=adapter.whole_counts(model.config))
