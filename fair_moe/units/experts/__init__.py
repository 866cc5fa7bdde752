"""Routed experts of MoE language models as units (``--units experts``, the default).

The facade below is what the workflow sees; the work is in the modules beside it (routing and the
masked reference, calibration, in-memory slicing, the streaming key rewriter, the dry run). They are
imported inside the methods so that registering the kind does not import torch.
"""

from __future__ import annotations

from pathlib import Path

from fair_moe.core.budget import UnitLayout
from fair_moe.core.errors import FairMoeError
from fair_moe.units.base import UNIT_KINDS, UnitKind

UNEVEN_CLASS = "FairMoeForCausalLM"


@UNIT_KINDS.register
class ExpertsUnit(UnitKind):
    name = "experts"
    description = "routed experts of a Mixture-of-Experts language model (shared experts are never units)"
    noun = "routed experts"
    measures = ("taylor", "count", "output_norm", "gated_norm", "class_samples")
    data = "text"
    auto_class = "AutoModelForCausalLM"
    processor_class = "AutoTokenizer"
    pipeline_tag = "text-generation"
    card_tags = ("moe",)
    removal_means = "the removed experts made unreachable (router logits set to -inf)"
    uneven_class = UNEVEN_CLASS
    default_removal = "reap"
    default_allocation = "auto"
    takes_compensation = True
    streamable = True
    forward_kwargs = {"use_cache": False}

    @staticmethod
    def adapter(config):
        from fair_moe.adapters import get_adapter

        return get_adapter(config)

    def auto_class_for(self, config) -> str:
        return self.adapter(config).auto_class(config)

    def check_config(self, config) -> None:
        if not self.adapter(config).moe_layer_indices(config):
            raise FairMoeError(f"the model ({config.model_type}) has no MoE layers to prune")

    def layout(self, config) -> UnitLayout:
        adapter = self.adapter(config)
        top_k = adapter.top_k(config)
        return UnitLayout("experts", adapter.num_experts(config), tuple(adapter.moe_layer_indices(config)), top_k,
                          f"the router selects top_k={top_k}", adapter.num_groups(config),
                          adapter.min_kept_per_group(config), top_k, adapter.structure(config).whole_layers)

    def collect(self, model, data, seed, layerwise, progress):
        layers = self.adapter(model.config).moe_layers(model)
        if not layers:
            raise FairMoeError(f"the model ({model.config.model_type}) has no MoE layers to prune")
        if layerwise:  # activation memory of one decoder layer; works with accelerate-offloaded weights
            from fair_moe.units.experts.layerwise import run_calibration_layerwise

            return run_calibration_layerwise(model, layers, data.batches, data.num_classes, seed, progress)
        from fair_moe.units.experts.calibrate import run_calibration

        return run_calibration(model, layers, data.batches, data.num_classes, seed, progress)

    def masked(self, model, kept):
        from fair_moe.units.experts.routing import masked_experts

        return masked_experts(model, kept)

    def apply(self, model, plan) -> None:
        from fair_moe.units.experts.rewrite import apply_plan

        apply_plan(model, plan)

    def save(self, model, folder: Path, processor, dtype) -> None:
        from fair_moe.units.experts.rewrite import save_pruned

        save_pruned(model, folder, dtype=dtype, tokenizer=processor)

    def probe(self, model, data) -> dict:
        import torch

        from fair_moe.adapters.structure import text_config

        vocab = text_config(model.config).vocab_size
        ids = torch.randint(0, vocab, (1, 24), generator=torch.Generator().manual_seed(0))
        return {"input_ids": ids}

    def routing_trace(self, model, inputs, kept, reference):
        from fair_moe.units.experts.trace import trace_original

        return trace_original(model, inputs, kept, self.forward_kwargs, reference)

    def by_parts(self, reloaded, inputs, plan, trace):
        from fair_moe.checkpoint.verify import ByParts
        from fair_moe.units.experts.trace import (
            differing_decisions,
            score_difference,
            trace_following,
            unexplained_decisions,
        )

        following = trace_following(reloaded, inputs, plan.kept, trace, self.forward_kwargs)
        scores = score_difference(trace, following)
        delta = scores[0] if scores else None
        unexplained = unexplained_decisions(trace, following, plan.kept, 2 * (delta or 0.0))
        return ByParts(following.logits, delta, scores[1] if scores else 0.0, *differing_decisions(trace, following),
                       unexplained)

    def verify_saved(self, folder: Path, plan, config) -> None:
        from fair_moe.units.experts.rewrite import verify_expert_keys

        verify_expert_keys(folder, plan, self.adapter(config))

    def output_bytes(self, model, plan, save_dtype) -> int:
        """The dense size minus every removed expert's router rows and expert tensors."""
        import torch

        dense = super().output_bytes(model, plan, save_dtype)
        size = torch.finfo(save_dtype).bits // 8 if save_dtype is not None and save_dtype.is_floating_point else 4
        adapter = self.adapter(model.config)
        structure = adapter.structure(model.config)
        removed = 0
        for layer in adapter.moe_layers(model):
            tensors = [layer.tensor(path) for path, _ in structure.router_tensors]
            tensors += [layer.expert_tensor(name) for name in structure.expert_tensors]
            per_expert = sum(t.numel() // layer.num_experts for t in tensors)
            removed += per_expert * size * (layer.num_experts - len(plan.kept[layer.index]))
        return dense - removed

    def stream(self, model, plan, source: Path, folder: Path, transform, save_dtype, progress: bool,
               max_shard_bytes: int = 2 * 2**30, quantized=None) -> dict:
        """Weights streamed from ``source`` through the plan (and the modeling file for uneven plans)."""
        from fair_moe.checkpoint.stream import stream_rewrite
        from fair_moe.units.experts.keys import ExpertKeyRewriter
        from fair_moe.units.experts.rewrite import MODELING_FILE, modeling_source

        rewriter = ExpertKeyRewriter(plan, self.adapter(model.config), transform, quantized, model.config)
        stats = stream_rewrite(source, folder, rewriter, max_shard_bytes, progress)
        rewriter.check_complete()
        if not plan.is_uniform:
            (Path(folder) / MODELING_FILE).write_text(modeling_source(model))
        return stats

    def pruned_config(self, model, plan):
        """The model's config as the pruned checkpoint's (a copy; the model is untouched)."""
        import copy

        from fair_moe.units.experts.rewrite import layout_of, update_config

        config = copy.deepcopy(model.config)
        update_config(config, plan, layout_of(model))
        return config

    def summary_line(self, config, layout) -> str:
        from fair_moe.adapters.structure import text_config

        layers = layout.layers
        decoder = text_config(config).num_hidden_layers
        return (f"model_type {config.model_type}: {decoder} decoder layers, {len(layers)} MoE layers "
                f"({layers[0]}…{layers[-1]}), {layout.width} routed experts per layer, top_k={layout.top_k}"
                + (f", {layout.groups} expert groups" if layout.groups > 1 else "")
                + (f"; MoE layers kept whole (not pruned): {', '.join(map(str, layout.whole))}"
                   if layout.whole else ""))

    def describe(self, config, layout, budgets, dtype, batch_tokens, trust_remote_code) -> list[str]:
        from fair_moe.units.experts.dry_run import describe

        return describe(config, self.adapter(config), layout, budgets, dtype, batch_tokens, trust_remote_code)
