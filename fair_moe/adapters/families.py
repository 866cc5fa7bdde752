"""What the module tree cannot say about a family: checkpoint key formats that differ from the module names, and
families whose structure looks prunable but whose routing or experts fair_moe cannot reproduce exactly.

Everything else — where the router and experts are, the expert axis of every tensor, selection biases, expert
groups, count fields — is found on the model (``structure.py``), and routing is always the model's own code.
"""

from __future__ import annotations

from fair_moe.adapters import register_adapter
from fair_moe.adapters.base import FusedExpertsAdapter
from fair_moe.adapters.structure import EXPERT_MAJOR

# GraniteMoE checkpoints keep the fused experts as ``block_sparse_moe.input_linear.weight`` / ``output_linear.weight``.
for _type in ("granitemoe", "granitemoeshared", "granitemoehybrid", "granitemoe_swa"):
    register_adapter(FusedExpertsAdapter(model_type=_type,
                                         fused_key_names=("input_linear.weight", "output_linear.weight")))

# Llama 4's block runs every expert on every token: its router returns dense scores [T, E] (sigmoid of the top-k
# logits, 0 elsewhere) and the experts module takes [E·T, H] rows, expert e's block the tokens scaled by their score
# for e; an expert that was not selected computes on zeros and adds nothing.
for _type in ("llama4_text", "llama4"):
    register_adapter(FusedExpertsAdapter(model_type=_type, dispatch=EXPERT_MAJOR))
# The routed experts' summed output goes straight into an RMS norm (no shared expert added before it), which undoes
# a per-layer scale: Gemma 4 before adding the dense MLP's output, FlexOlmo and Beam (post-norm decoder layers).
for _type in ("gemma4_text", "gemma4"):
    register_adapter(FusedExpertsAdapter(model_type=_type, output_norm="post_feedforward_layernorm_2"))
for _type in ("flex_olmo", "beam"):
    register_adapter(FusedExpertsAdapter(model_type=_type, output_norm="post_feedforward_layernorm"))

# DeepSeek-V4's hash-routed MoE layers pick experts from a fixed token-id -> expert table (tid2eid): an expert removed
# there cannot be made unreachable, so those layers keep every expert and the others are pruned.
register_adapter(FusedExpertsAdapter(
    model_type="deepseek_v4", whole_marker="is_hash",
    whole_reason="hash-routed: experts chosen by a fixed token-id table, so none can be made unreachable"))
register_adapter(FusedExpertsAdapter(
    model_type="openai_privacy_filter", unsupported="a token-classification encoder, not a language model"))

# The model types the fused-experts test matrix (tests/units/experts/test_families.py, test_stream.py) passes on;
# scripts/coverage.py writes the table in the README from the same matrix.
SUPPORTED = frozenset({
    "afmoe", "aria", "axk1", "axk2", "bailing_hybrid", "beam", "cohere2_moe", "deepseek_ocr2", "deepseek_v2",
    "deepseek_v3", "deepseek_v32", "deepseek_v4", "dots1", "dots3_note", "ergo", "ernie4_5_moe", "exaone_moe",
    "flex_olmo", "flint", "gemma4", "glm4_moe", "glm4_moe_lite", "glm4v_moe", "glm5_next", "glm_moe_dsa", "gpt_oss",
    "granitemoe", "granitemoe_swa", "granitemoehybrid", "granitemoeshared", "hunyuan_v1_moe", "hy_v3", "hy_v4",
    "hy_v4_vl", "inkling2", "inkling2_loop", "inkling_mm_model", "jamba", "kimi_linear", "kolibri1", "kolibri1_1",
    "laguna", "lara_mini", "lfm2_moe", "llama4", "llama4_text", "longcat_flash", "mellum", "mimo_v2_flash",
    "minicpm5_moe", "minimax", "minimax_m2", "minimax_m3_vl", "mistral4", "mistral_large4", "mixtral", "muse_spark",
    "nemotron_h", "olmoe", "phimoe", "qwen2_moe", "qwen3_5_moe", "qwen3_moe", "qwen3_next", "qwen3_omni_moe",
    "qwen3_vl_moe", "qwen4_exp", "sarvam_mla", "sarvam_moe", "solar_open", "step3p7", "unlimited_ocr", "zaya",
})
