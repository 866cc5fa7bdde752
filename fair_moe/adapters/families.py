"""Every MoE family that shares the fused-experts layout, as small per-family tables.

Routing kinds (how a router turns logits [tokens, E] into top-k weights and ids):

- softmax top-k (Qwen2/Qwen3-MoE, Qwen3-Next, OLMoE, FlexOlmo: optional renormalisation; Mixtral,
  MiniMax: always);
- DeepSeek-V2: softmax, ``greedy`` or ``group_limited_greedy`` (best expert per group picks groups),
  weights × ``routed_scaling_factor``;
- DeepSeek-V3 / GLM-4-MoE / dots.llm1: sigmoid scores, selection by score + ``e_score_correction_bias`` within the
  ``topk_group`` groups with the best top-2 sums, weights gathered from the unbiased scores;
- GPT-OSS (router with bias), GraniteMoE: top-k of the logits, softmax over the chosen k.

In every kind a removed expert is made unreachable by a -inf logit or, where selection uses a bias,
a -inf selection score — exactly what slicing it out of the router does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fair_moe.adapters import register_adapter
from fair_moe.adapters.base import FusedExpertsAdapter


def _group_floor(config, base: int) -> int:
    """A selected group set must still offer top_k experts: topk_group × kept-per-group ≥ top_k."""
    topk_group = int(getattr(config, "topk_group", None) or 1)
    return max(base, -(-int(config.num_experts_per_tok) // topk_group))


@dataclass
class DeepseekV2Adapter(FusedExpertsAdapter):
    def num_groups(self, config) -> int:
        if getattr(config, "topk_method", "greedy") == "group_limited_greedy":
            return int(config.n_group or 1)
        return 1

    def min_kept_per_group(self, config) -> int:
        return _group_floor(config, 1) if self.num_groups(config) > 1 else 0

    def route(self, router: nn.Module, logits: torch.Tensor, removed: torch.Tensor | None):
        if removed is not None:
            logits = logits.masked_fill(removed.to(logits.device), float("-inf"))
        scores = logits.softmax(dim=-1, dtype=torch.float32)
        if router.topk_method == "group_limited_greedy":
            n = scores.shape[-1]
            group_scores = scores.view(-1, router.num_group, n // router.num_group).max(dim=-1).values
            group_idx = torch.topk(group_scores, k=router.topk_group, dim=-1, sorted=False)[1]
            group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
            score_mask = group_mask.unsqueeze(-1).expand(-1, router.num_group, n // router.num_group).reshape(-1, n)
            scores = scores.masked_fill(~score_mask.bool(), 0.0)
        weights, ids = torch.topk(scores, k=router.top_k, dim=-1, sorted=False)
        return weights * router.routed_scaling_factor, ids


@dataclass
class BiasedSigmoidAdapter(FusedExpertsAdapter):
    """DeepSeek-V3 and GLM-4-MoE routers (sigmoid, selection bias, group-limited top-k)."""

    def route(self, router: nn.Module, logits: torch.Tensor, removed: torch.Tensor | None):
        scores = logits.sigmoid()
        choice = scores + router.e_score_correction_bias
        if removed is not None:
            choice = choice.masked_fill(removed.to(choice.device), float("-inf"))
        n, groups = scores.shape[-1], router.num_group
        group_scores = choice.view(-1, groups, n // groups).topk(2, dim=-1)[0].sum(dim=-1)
        group_idx = torch.topk(group_scores, k=router.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
        score_mask = group_mask.unsqueeze(-1).expand(-1, groups, n // groups).reshape(-1, n)
        choice = choice.masked_fill(~score_mask.bool(), float("-inf"))
        ids = torch.topk(choice, k=router.top_k, dim=-1, sorted=False)[1]
        weights = scores.gather(1, ids)
        if router.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * router.routed_scaling_factor, ids

    def num_groups(self, config) -> int:
        return int(getattr(config, "n_group", None) or 1)

    def min_kept_per_group(self, config) -> int:
        # Group scores sum each group's top-2 selection scores, so a group needs two experts.
        return _group_floor(config, 2) if self.num_groups(config) > 1 else 0


@dataclass
class TopkThenSoftmaxAdapter(FusedExpertsAdapter):
    """GPT-OSS and GraniteMoE: top-k of the logits, softmax over the k chosen.

    GraniteMoE casts the weights to the hidden states' dtype (``cast_to_weight_dtype``).
    """

    cast_to_weight_dtype: bool = False

    def route(self, router: nn.Module, logits: torch.Tensor, removed: torch.Tensor | None):
        if removed is not None:
            logits = logits.masked_fill(removed.to(logits.device), float("-inf"))
        top, ids = torch.topk(logits, router.top_k, dim=-1)
        weights = torch.softmax(top, dim=-1, dtype=top.dtype)
        if self.cast_to_weight_dtype:
            weights = weights.to(router.weight.dtype)
        return weights, ids


register_adapter(FusedExpertsAdapter(model_type="qwen3_moe", count_field="num_experts"))
register_adapter(FusedExpertsAdapter(model_type="olmoe", count_field="num_experts"))
register_adapter(FusedExpertsAdapter(model_type="flex_olmo", count_field="num_experts"))
register_adapter(FusedExpertsAdapter(model_type="mixtral", count_field="num_local_experts", always_normalize=True))
register_adapter(FusedExpertsAdapter(model_type="minimax", count_field="num_local_experts", always_normalize=True))
register_adapter(DeepseekV2Adapter(model_type="deepseek_v2", count_field="n_routed_experts"))
register_adapter(BiasedSigmoidAdapter(model_type="deepseek_v3", count_field="n_routed_experts"))
register_adapter(BiasedSigmoidAdapter(model_type="glm4_moe", count_field="n_routed_experts"))
register_adapter(TopkThenSoftmaxAdapter(model_type="gpt_oss", count_field="num_local_experts", router_attr="router"))
register_adapter(TopkThenSoftmaxAdapter(model_type="granitemoe", count_field="num_local_experts", router_attr="router",
                                        block_attr="block_sparse_moe", cast_to_weight_dtype=True,
                                        fused_key_names=("input_linear.weight", "output_linear.weight")))
register_adapter(BiasedSigmoidAdapter(model_type="dots1", count_field="n_routed_experts"))
register_adapter(FusedExpertsAdapter(model_type="qwen3_next", count_field="num_experts"))
