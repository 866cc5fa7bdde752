"""The reference every pruned MoE must equal: the original with removed experts unreachable, plus taps.

Inside ``masked_experts`` each router's real logits are kept and the top-k weights and ids are
recomputed the way the family's router computes them, with the removed experts' logits (and, for
routers with a selection bias, their selection scores) at -inf.

A ``tap`` sees every call of a layer's experts module as an ``ExpertsCall``: the hidden states, the
masked routing the model passes, the router's own logits and unmasked routing, and ``run`` to call the
experts module's own forward with any ids and weights. Compensations fit themselves through taps, so
no state is ever stored on a router or an experts module.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from fair_moe.adapters import get_adapter
from fair_moe.adapters.base import FusedExpertsAdapter, MoELayer


@dataclass
class RouterState:
    """What one router call produced: logits [T, E], its own (unmasked) top-k weights and ids [T, k], and the
    removed-expert mask [E] the masked routing used (None when nothing is removed)."""

    logits: torch.Tensor | None = None
    weights: torch.Tensor | None = None
    ids: torch.Tensor | None = None
    removed: torch.Tensor | None = None


@dataclass
class ExpertsCall:
    """One call of a layer's experts module: ``hidden_states [T, H]``, the routing the model passed (masked)
    ``ids``/``weights [T, k]``, and the router's own state for the same tokens."""

    layer: MoELayer
    adapter: FusedExpertsAdapter
    hidden_states: torch.Tensor
    ids: torch.Tensor
    weights: torch.Tensor
    router: RouterState
    run: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

    def output(self) -> torch.Tensor:
        """The experts output [T, H] under the routing the model passed."""
        return self.run(self.hidden_states, self.ids, self.weights)

    def unmasked_output(self) -> torch.Tensor:
        """The experts output [T, H] under the router's own routing (every expert reachable)."""
        return self.run(self.hidden_states, self.router.ids, self.router.weights.to(self.weights.dtype))


Tap = Callable[[ExpertsCall], "torch.Tensor | None"]


@contextlib.contextmanager
def masked_experts(model: nn.Module, kept: dict[int, list[int]] | None, tap: Tap | None = None) -> Iterator[None]:
    """Make every expert not in ``kept[layer index]`` unreachable for the duration of the block.

    ``kept=None`` removes nothing (the original model, with taps). ``tap(call)`` runs instead of each
    experts call; it returns the output to use, or None for the call's own output.
    """
    adapter = get_adapter(model.config)
    with contextlib.ExitStack() as stack:
        for layer in adapter.moe_layers(model):
            if kept is not None and layer.index not in kept:
                continue
            removed = None
            if kept is not None:
                removed = torch.ones(layer.num_experts, dtype=torch.bool)
                removed[list(kept[layer.index])] = False
            state = RouterState(removed=removed)
            handle = layer.router.register_forward_hook(_mask_hook(adapter, state))
            stack.callback(handle.remove)
            if tap is not None:
                stack.enter_context(patched_forward(layer.experts, _tapped_forward(layer, adapter, state, tap)))
        yield


def _mask_hook(adapter: FusedExpertsAdapter, state: RouterState):
    def hook(router, args, output):
        logits = adapter.router_logits(output)
        state.logits = logits
        state.weights, state.ids = adapter.route(router, logits, None)
        if state.removed is None:
            return None
        weights, ids = adapter.route(router, logits, state.removed)
        return adapter.replace_router_output(output, logits, weights, ids)

    return hook


def _tapped_forward(layer: MoELayer, adapter: FusedExpertsAdapter, state: RouterState, tap: Tap):
    original = layer.experts.forward

    def forward(self, hidden_states, top_k_index, top_k_weights, *args, **kwargs):
        def run(hidden, ids, weights):
            return original(hidden, ids, weights, *args, **kwargs)

        call = ExpertsCall(layer, adapter, hidden_states, top_k_index, top_k_weights, state, run)
        result = tap(call)
        return call.output() if result is None else result

    return forward


@contextlib.contextmanager
def patched_forward(module: nn.Module, forward) -> Iterator[None]:
    """Give ``module`` the instance-level ``forward(self, ...)`` for the block; what it had before comes back
    (an instance-level forward such as accelerate's offload hook is restored exactly)."""
    previous = module.__dict__.get("forward")
    module.forward = types.MethodType(forward, module)
    try:
        yield
    finally:
        if previous is None:
            module.__dict__.pop("forward", None)
        else:
            module.forward = previous


def routed_pairs(ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flatten top-k routing [T, k] into routed (token, expert) pairs: token rows [P], expert ids [P] and the
    mask [T·k] of valid slots (padding / dropped slots carry an id outside [0, E))."""
    tokens, k = ids.shape
    flat = ids.reshape(-1)
    valid = (flat >= 0) & (flat < num_experts)
    token = torch.arange(tokens, device=flat.device).repeat_interleave(k)[valid]
    return token, flat[valid], valid


def expert_outputs(call_forward, hidden_states: torch.Tensor, token: torch.Tensor, experts: torch.Tensor,
                   weight_dtype: torch.dtype) -> torch.Tensor:
    """f_e(x) [P, H] for every routed pair, through the experts module's own forward: each pair is a row of
    its own with its expert alone at weight 1 (same rows and FLOPs as the stock call)."""
    ones = torch.ones((len(token), 1), dtype=weight_dtype, device=hidden_states.device)
    return call_forward(hidden_states[token], experts[:, None], ones)
