"""One calibration pass that collects every removal signal and the Taylor protection signal.

The experts module of each MoE layer is temporarily given a forward that calls the module's own
forward once, on every (token, chosen expert) pair as its own row with that expert alone at weight 1,
so it returns f_e(x) for exactly the tokens the router sent to each expert (the same rows and FLOPs as
the stock call, through the module's own kernel), and then combines ``f_e(x) · g`` as the stock module
does. Nothing runs an expert on a token it was not routed to; the routing used is the model's own
top-k ids and weights.

The Taylor score needs ∂L/∂y only: a gradient hook on f_e(x) sees g · ∂L/∂y, so
⟨hook grad, f_e(x)⟩ summed over tokens is Σ_t ⟨∂L/∂y_t, g_t f_e(x_t)⟩ = Σ (∂L/∂W_down ⊙ W_down).
Parameters are frozen during the pass; the embedding output is made to require grad instead, so no
parameter gradient is ever stored.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from fair_moe.adapters.base import MoELayer
from fair_moe.signals.wasserstein import max_pairwise_wasserstein

REMOVAL_SIGNALS = ("reap", "frequency", "ean", "wasserstein", "random")


class LayerAccumulator:
    """Running sums for one layer, all float64 [E]; per-class routed values for the Wasserstein signal."""

    def __init__(self, num_experts: int, num_classes: int):
        self.count = torch.zeros(num_experts, dtype=torch.float64)
        self.ean = torch.zeros(num_experts, dtype=torch.float64)
        self.reap_sum = torch.zeros(num_experts, dtype=torch.float64)
        self.taylor = torch.zeros(num_experts, dtype=torch.float64)
        self.class_values: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in range(num_classes)]

    def update(self, experts: torch.Tensor, klass: int, weights: torch.Tensor, outputs: torch.Tensor) -> None:
        """Record routed pairs: expert ids [P], weights g [P], outputs f_e(x) [P, H]."""
        experts = experts.cpu()
        norms = outputs.detach().double().norm(dim=-1).cpu()
        gated = weights.detach().double().cpu() * norms
        self.count.index_add_(0, experts, torch.ones_like(norms))
        self.ean.index_add_(0, experts, norms)
        self.reap_sum.index_add_(0, experts, gated)
        self.class_values[klass].append((experts, gated.float()))

    def add_taylor(self, experts: torch.Tensor, grad: torch.Tensor, outputs: torch.Tensor) -> None:
        """Σ over pairs of ⟨∂L/∂f, f⟩ per expert; grad and outputs [P, H]."""
        dots = (grad.double() * outputs.detach().double()).sum(dim=-1).cpu()
        self.taylor.index_add_(0, experts.cpu(), dots)


class SignalCollector:
    """Collects signals over calibration batches for the given MoE layers.

    Set ``current_class`` before each batch (the calibration source the batch came from) and
    ``class_tokens[c]`` is incremented by the caller with the batch's token count.
    """

    def __init__(self, layers: list[MoELayer], num_classes: int):
        self.layers = layers
        self.num_classes = num_classes
        self.acc = [LayerAccumulator(layer.num_experts, num_classes) for layer in layers]
        self.class_tokens = [0] * num_classes
        self.current_class = 0
        self.track_taylor = True

    @contextlib.contextmanager
    def instrument(self) -> Iterator[None]:
        """Patch every experts module for the duration of the block; always restored (an instance-level
        forward such as accelerate's offload hook comes back exactly as it was)."""
        with contextlib.ExitStack() as stack:
            for layer, acc in zip(self.layers, self.acc, strict=True):
                stack.enter_context(patched_forward(layer.experts, self._instrumented_forward(layer.experts, acc)))
            yield

    def _instrumented_forward(self, experts: nn.Module, acc: LayerAccumulator):
        original = experts.forward
        collector = self

        def forward(self, hidden_states, top_k_index, top_k_weights, *args, **kwargs):
            # hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]; one row per routed pair below
            num_experts = acc.count.shape[0]
            tokens, k = top_k_index.shape
            flat = top_k_index.reshape(-1)
            valid = (flat >= 0) & (flat < num_experts)  # padding / dropped slots carry no expert
            token = torch.arange(tokens, device=flat.device).repeat_interleave(k)[valid]
            experts = flat[valid]
            weights = top_k_weights.reshape(-1)[valid]
            outputs = original(
                hidden_states[token],
                experts[:, None],
                torch.ones((len(token), 1), dtype=top_k_weights.dtype, device=top_k_weights.device),
                *args,
                **kwargs,
            )  # [P, H]: f_e(x) for every routed (token, expert) pair
            final = torch.zeros_like(hidden_states)
            final.index_add_(0, token, (outputs * weights[:, None]).to(final.dtype))
            acc.update(experts, collector.current_class, weights, outputs)
            if collector.track_taylor and outputs.requires_grad:
                # The hook holds a detached view, not ``outputs`` itself: a tensor whose own hook refers back
                # to it forms a reference cycle that keeps every batch's autograd graph alive until gc runs.
                outputs.register_hook(_taylor_hook(acc, experts, outputs.detach()))
            return final

        return forward

    def result(self, seed: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Removal signals {name: [L, E]} and the Taylor protection [L, E], all float64."""
        count = torch.stack([a.count for a in self.acc])
        reap = torch.stack([a.reap_sum for a in self.acc]) / count.clamp_min(1)
        removal = {
            "reap": reap,
            "frequency": count,
            "ean": torch.stack([a.ean for a in self.acc]),
            "random": torch.rand(count.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64),
        }
        if self.num_classes >= 2 and all(self.class_tokens):
            removal["wasserstein"] = torch.stack([self._wasserstein(a) for a in self.acc])
        protection = torch.stack([a.taylor for a in self.acc]).abs()
        return removal, protection

    def _wasserstein(self, acc: LayerAccumulator) -> torch.Tensor:
        """Per expert: max over class pairs of W1 between per-token g·‖f‖ distributions (0 if not routed).

        A class's distribution for expert e is its routed values plus a zero for every other token of
        the class; the order inside a column does not matter, so values fill each column from the top.
        """
        num_experts = acc.count.shape[0]
        samples = []
        for klass, chunks in enumerate(acc.class_values):
            dense = torch.zeros(self.class_tokens[klass], num_experts, dtype=torch.float64)
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
        return max_pairwise_wasserstein(samples)


def execution_device(model: nn.Module) -> torch.device:
    """Where inputs go: the first parameter not offloaded to the meta device (accelerate), else the CPU."""
    return next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))


@contextlib.contextmanager
def patched_forward(module: nn.Module, forward) -> Iterator[None]:
    """Give ``module`` the instance-level ``forward(self, ...)`` for the block; what it had before comes back."""
    previous = module.__dict__.get("forward")
    module.forward = types.MethodType(forward, module)
    try:
        yield
    finally:
        restore_forward(module, previous)


def restore_forward(module: nn.Module, previous) -> None:
    """Put back the instance-level ``forward`` a module had before patching (or none)."""
    if previous is None:
        module.__dict__.pop("forward", None)
    else:
        module.forward = previous


def _taylor_hook(acc: LayerAccumulator, experts: torch.Tensor, outputs: torch.Tensor):
    held = [outputs]  # released once used, so a graph kept alive elsewhere does not pin the activations

    def hook(grad: torch.Tensor) -> None:
        acc.add_taylor(experts, grad, held.pop())

    return hook


@contextlib.contextmanager
def activation_gradients_only(model: nn.Module) -> Iterator[None]:
    """Freeze parameters and make the embedding output require grad, so backward stores no parameter grads."""
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    was_training = model.training
    handle = model.get_input_embeddings().register_forward_hook(lambda m, i, out: out.requires_grad_(True))
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()
        with torch.enable_grad():
            yield
    finally:
        handle.remove()
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])
        model.train(was_training)


def run_calibration(
    model: nn.Module,
    layers: list[MoELayer],
    batches: list[tuple[int, torch.Tensor]],
    num_classes: int,
    seed: int,
    progress: bool = True,
) -> tuple[dict[str, torch.Tensor], torch.Tensor, int]:
    """Forward + backward over ``batches`` ([(class id, input_ids [B, S])]) collecting every signal.

    Returns removal signals {name: [L, E]}, Taylor protection [L, E] and the number of tokens seen.
    """
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
    removal, protection = collector.result(seed)
    return removal, protection, tokens
