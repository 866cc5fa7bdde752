"""One calibration pass over a MoE model that measures every routed expert (``SignalStatistics``).

The experts module of each MoE layer is temporarily given a forward that calls the module's own
forward once, on every (token, chosen expert) pair as its own row with that expert alone at weight 1,
so it returns f_e(x) for exactly the tokens the router sent to each expert (the same rows and FLOPs as
the stock call, through the module's own kernel), and then combines ``f_e(x) · g`` as the stock module
does. Nothing runs an expert on a token it was not routed to; the routing used is the model's own
top-k ids and weights (selection biases and group limits included).

The Taylor sum needs ∂L/∂y only: a gradient hook on f_e(x) sees g · ∂L/∂y, so ⟨hook grad, f_e(x)⟩
summed over tokens is Σ_t ⟨∂L/∂y_t, g_t f_e(x_t)⟩ = Σ (∂L/∂W_down ⊙ W_down). Parameters are frozen
during the pass; the embedding output is made to require grad instead, so no parameter gradient is
ever stored.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from fair_moe.adapters.base import MoELayer
from fair_moe.adapters.structure import EXPERT_MAJOR
from fair_moe.core.statistics import SignalStatistics
from fair_moe.metrics import execution_device
from fair_moe.units.autograd import activation_gradients_only
from fair_moe.units.experts.routing import (
    as_routed,
    expert_major_output,
    expert_outputs,
    layer_routing,
    patched_forward,
    routed_pairs,
    run_experts,
)


class LayerAccumulator:
    """Running sums for one layer, all float64 [E]; per-class routed values for the class distributions."""

    def __init__(self, num_experts: int, num_classes: int):
        self.count = torch.zeros(num_experts, dtype=torch.float64)
        self.output_norm = torch.zeros(num_experts, dtype=torch.float64)
        self.gated_norm = torch.zeros(num_experts, dtype=torch.float64)
        self.taylor = torch.zeros(num_experts, dtype=torch.float64)
        self.class_values: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in range(num_classes)]

    def update(self, experts: torch.Tensor, klass: int, weights: torch.Tensor, outputs: torch.Tensor) -> None:
        """Record routed pairs: expert ids [P], weights g [P], outputs f_e(x) [P, H]."""
        experts = experts.cpu()
        norms = outputs.detach().double().norm(dim=-1).cpu()
        gated = weights.detach().double().cpu() * norms
        self.count.index_add_(0, experts, torch.ones_like(norms))
        self.output_norm.index_add_(0, experts, norms)
        self.gated_norm.index_add_(0, experts, gated)
        self.class_values[klass].append((experts, gated.float()))

    def add_taylor(self, experts: torch.Tensor, grad: torch.Tensor, outputs: torch.Tensor) -> None:
        """Σ over pairs of ⟨∂L/∂f, f⟩ per expert; grad and outputs [P, H]."""
        dots = (grad.double() * outputs.detach().double()).sum(dim=-1).cpu()
        self.taylor.index_add_(0, experts.cpu(), dots)

    def class_samples(self, class_tokens: list[int]) -> list[torch.Tensor]:
        """Per class, the per-token value g·‖f‖ of every expert [tokens_c, E] (0 where not routed).

        The order inside a column does not matter to a distribution, so routed values fill each column
        from the top and the rest stays 0.
        """
        num_experts = self.count.shape[0]
        samples = []
        for klass, chunks in enumerate(self.class_values):
            dense = torch.zeros(class_tokens[klass], num_experts, dtype=torch.float64)
            if chunks:
                experts = torch.cat([e for e, _ in chunks])
                values = torch.cat([v for _, v in chunks]).double()
                order = torch.sort(experts, stable=True).indices
                experts, values = experts[order], values[order]
                counts = torch.bincount(experts, minlength=num_experts)
                starts = torch.cumsum(counts, 0) - counts
                rows = torch.arange(len(experts)) - starts[experts]
                dense[rows, experts] = values
            samples.append(dense)
        return samples


class RoutedClassValues:
    """Per layer and class, the routed (expert ids, g·‖f‖) pairs, and the tokens each class had: the per-class
    distributions of every expert's per-token value, built densely one layer at a time when asked for."""

    def __init__(self, accumulators: list[LayerAccumulator], class_tokens: list[int]):
        self.accumulators = accumulators
        self.class_tokens = list(class_tokens)

    def __call__(self, row: int) -> list[torch.Tensor]:
        return self.accumulators[row].class_samples(self.class_tokens)

    def merged(self, others: list[RoutedClassValues]) -> RoutedClassValues:
        """Pooled with the values of the same layers from other passes (another share of the batches)."""
        pooled = []
        for row, acc in enumerate(self.accumulators):
            merged = LayerAccumulator(acc.count.shape[0], len(acc.class_values))
            for source in [acc, *[o.accumulators[row] for o in others]]:
                for klass, chunks in enumerate(source.class_values):
                    merged.class_values[klass].extend(chunks)
            pooled.append(merged)
        tokens = [sum(t) for t in zip(self.class_tokens, *[o.class_tokens for o in others], strict=True)]
        return RoutedClassValues(pooled, tokens)


class SignalCollector:
    """Collects per-expert sums over calibration batches for the given MoE layers.

    Set ``current_class`` before each batch (the calibration source the batch came from) and add the
    batch's token count to ``class_tokens[c]``.
    """

    def __init__(self, layers: list[MoELayer], num_classes: int):
        self.layers = layers
        self.num_classes = num_classes
        self.acc = [LayerAccumulator(layer.num_experts, num_classes) for layer in layers]
        self.class_tokens = [0] * num_classes
        self.current_class = 0

    @contextlib.contextmanager
    def instrument(self) -> Iterator[None]:
        """Patch every experts module (and an expert-major block's router, to see its routing) for the duration of
        the block; always restored."""
        with contextlib.ExitStack() as stack:
            for layer, acc in zip(self.layers, self.acc, strict=True):
                if layer.structure.dispatch == EXPERT_MAJOR:
                    seen: dict = {}
                    stack.enter_context(patched_forward(layer.router, _recording_router(layer, seen)))
                    forward = self._instrumented_expert_major_forward(layer, acc, seen)
                else:
                    forward = self._instrumented_forward(layer, acc)
                stack.enter_context(patched_forward(layer.experts, forward))
            yield

    def _instrumented_forward(self, layer: MoELayer, acc: LayerAccumulator):
        original = layer.experts.forward
        computes_tail = layer.structure.experts_tail > 0
        collector = self

        def forward(self, hidden_states, top_k_index, top_k_weights, *args, **kwargs):
            # hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]; one row per routed pair below
            ids = as_routed(layer, top_k_index, top_k_weights)
            token, chosen, valid = routed_pairs(ids, acc.count.shape[0])
            weights = top_k_weights.reshape(-1)[valid]
            outputs = expert_outputs(lambda h, i, w: original(h, i, w, *args, **kwargs), hidden_states, token,
                                     chosen, top_k_weights.dtype,
                                     acc.count.shape[0] if computes_tail else None)  # [P, H]
            final = torch.zeros_like(hidden_states)
            final.index_add_(0, token, (outputs * weights[:, None]).to(final.dtype))
            if computes_tail and not valid.all():  # identity experts past E: the module's own output for them
                others = top_k_weights * (~valid).reshape(top_k_weights.shape).to(top_k_weights.dtype)
                final = final + original(hidden_states, top_k_index, others, *args, **kwargs).to(final.dtype)
            acc.update(chosen, collector.current_class, weights, outputs)
            if outputs.requires_grad:
                # The hook holds a detached view, not ``outputs`` itself: a tensor whose own hook refers back
                # to it forms a reference cycle that keeps every batch's autograd graph alive until gc runs.
                outputs.register_hook(_taylor_hook(acc, chosen, outputs.detach()))
            return final

        return forward

    def _instrumented_expert_major_forward(self, layer: MoELayer, acc: LayerAccumulator, seen: dict):
        """An expert-major block scales each expert's input by its router weight, so the routed pair's output is the
        expert's contribution f_e(g·x) [P, H] and its gate is taken as 1; the module returns their sum over the
        slots, laid out as the block sums it."""
        run = run_experts(layer, layer.experts.forward)
        collector = self

        def forward(self, routed_in):
            weights, ids = seen["routing"]
            hidden = seen["hidden"].reshape(-1, routed_in.shape[-1])  # [T, H]
            token, chosen, valid = routed_pairs(ids, acc.count.shape[0])
            gates = weights.reshape(-1)[valid].to(hidden.dtype)
            outputs = run(hidden[token], chosen[:, None], gates[:, None])  # [P, H]
            final = torch.zeros_like(hidden).index_add_(0, token, outputs.to(hidden.dtype))
            acc.update(chosen, collector.current_class, torch.ones_like(gates), outputs)
            if outputs.requires_grad:
                outputs.register_hook(_taylor_hook(acc, chosen, outputs.detach()))
            return expert_major_output(final, layer.num_experts)

        return forward

    def statistics(self, seed: int, tokens: int) -> SignalStatistics:
        """The sums as [L, E] tensors; class samples are built per layer on demand."""
        rows = [layer.index for layer in self.layers]
        return SignalStatistics(
            layer_indices=rows,
            taylor=torch.stack([a.taylor for a in self.acc]),
            num_classes=self.num_classes,
            seed=seed,
            tokens=tokens,
            count=torch.stack([a.count for a in self.acc]),
            output_norm=torch.stack([a.output_norm for a in self.acc]),
            gated_norm=torch.stack([a.gated_norm for a in self.acc]),
            class_samples=RoutedClassValues(self.acc, self.class_tokens) if self.num_classes >= 2 else None,
        )


def _recording_router(layer: MoELayer, seen: dict):
    """A router forward that keeps its input rows and its routing in ``seen`` and returns its own output."""
    original = layer.router.forward

    def forward(self, hidden_states, *args, **kwargs):
        output = original(hidden_states, *args, **kwargs)
        seen["hidden"], seen["routing"] = hidden_states, layer_routing(layer, output)
        return output

    return forward


def _taylor_hook(acc: LayerAccumulator, experts: torch.Tensor, outputs: torch.Tensor):
    held = [outputs]  # released once used, so a graph kept alive elsewhere does not pin the activations

    def hook(grad: torch.Tensor) -> None:
        acc.add_taylor(experts, grad, held.pop())

    return hook


def run_calibration(model: nn.Module, layers: list[MoELayer], batches: list[tuple[int, torch.Tensor]],
                    num_classes: int, seed: int, progress: bool = True) -> SignalStatistics:
    """Forward + backward over ``batches`` ([(class id, input_ids [B, S])]) collecting every sum."""
    collector = SignalCollector(layers, num_classes)
    device = execution_device(model)
    tokens = 0
    with activation_gradients_only(model), collector.instrument():
        for klass, input_ids in tqdm(batches, desc="calibrating", unit="batch", disable=not progress):
            collector.current_class = klass
            collector.class_tokens[klass] += input_ids.numel()
            tokens += input_ids.numel()
            input_ids = input_ids.to(device)
            loss = model(input_ids=input_ids, labels=input_ids, use_cache=False, output_router_logits=False).loss
            loss.backward()
            del loss  # the output object would keep this batch's graph (and logits) alive into the next one
    return collector.statistics(seed, tokens)
