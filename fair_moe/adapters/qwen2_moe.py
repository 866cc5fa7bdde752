"""Qwen1.5-MoE / Qwen2-MoE: softmax router ``mlp.gate``, fused experts, one gated shared expert.

The shared expert (``mlp.shared_expert`` + ``mlp.shared_expert_gate``) is never a unit. Dense layers
come from ``mlp_only_layers`` and ``decoder_sparse_step``.
"""

from fair_moe.adapters import register_adapter
from fair_moe.adapters.base import FusedExpertsAdapter

QWEN2_MOE = register_adapter(FusedExpertsAdapter(model_type="qwen2_moe", count_field="num_experts"))
