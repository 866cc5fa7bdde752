"""The reference every pruned MoE must equal: the original with removed experts unreachable, plus taps.

Nothing about routing is re-implemented. Inside ``masked_experts`` each router runs its own forward under an
``ExpertMask``: the operation that makes its logits from its ``[E, H]`` weight has the removed experts' columns
set to -inf, and so has every operation that adds a selection bias (``e_score_correction_bias``, ``expert_bias``)
to scores — which is exactly what slicing those experts out of the router does, whatever the router then computes
(softmax or sigmoid, group-limited selection, sparsemixer, renormalisation, scaling factors).

A ``tap`` sees every call of a layer's experts module as an ``ExpertsCall``: the hidden states, the masked routing
the model passes, the router's own unmasked routing for the same tokens, and ``run`` to call the experts module's
own forward with any ids and weights. Compensations fit themselves through taps, so no state is ever stored on a
router or an experts module.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from fair_moe.adapters import get_adapter
from fair_moe.adapters.base import FusedExpertsAdapter, MoELayer
from fair_moe.adapters.structure import EXPERT_MAJOR, Unsupported


def _tensors_in(args, kwargs) -> list[torch.Tensor]:
    found = []
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, (list, tuple)):
            found.extend(v for v in value if isinstance(v, torch.Tensor))
    return found


FILL_OPS = frozenset({torch.Tensor.masked_fill, torch.masked_fill, torch.Tensor.masked_fill_, torch.where})


class ExpertMask(TorchFunctionMode):
    """While active: an operation that combines the router's logits weight with another tensor (the logits) has its
    output multiplied by ``scale`` and, like an operation that adds a selection bias to scores, its removed experts'
    columns (last axis, ``[…, E]``) set to -inf. Casts, views and transposes of those tensors are followed, and a
    fill of masked scores (a group-limited router setting the experts of unselected groups to 0) keeps the removed
    experts at -inf, as they are absent from the pruned router.

    The tensors are looked up through ``weights()`` / ``biases()`` at every operation, so a weight that accelerate
    or ``functional_call`` swaps in while the router runs is the one followed. ``observe``, when given, is called
    with each such logits / selection-score output ``[…, E]`` as the router goes on with it."""

    def __init__(self, weights: Callable[[], list[torch.Tensor]], biases: Callable[[], list[torch.Tensor]],
                 num_experts: int, removed: torch.Tensor | None, scale: float = 1.0, tail: int = 0,
                 observe: Callable[[torch.Tensor], None] | None = None):
        super().__init__()
        self.observe = observe
        self.weights, self.biases = weights, biases
        self.num_experts = num_experts
        self.widths = (num_experts, num_experts + tail)  # a router may score classes after the routed experts
        self.removed = removed
        self.scale = scale
        self.weight_views: dict[int, torch.Tensor] = {}
        self.bias_views: dict[int, torch.Tensor] = {}
        self.masked: dict[int, torch.Tensor] = {}
        self.changed = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not isinstance(out, torch.Tensor):
            return out
        weights = {id(t) for t in self.weights()} | set(self.weight_views)
        biases = {id(t) for t in self.biases()} | set(self.bias_views)
        inputs = _tensors_in(args, kwargs)
        from_weight = [t for t in inputs if id(t) in weights]
        from_bias = [t for t in inputs if id(t) in biases]
        if not from_weight and not from_bias:
            if func in FILL_OPS and any(id(t) in self.masked for t in inputs) and self.removed is not None \
                    and out.dim() > 0 and out.shape[-1] in self.widths:
                out = out.masked_fill(self._removed(out), float("-inf"))
                self.masked[id(out)] = out
            return out
        others = [t for t in inputs if id(t) not in weights and id(t) not in biases]
        if not others:  # a cast, view or copy of the weight or of a selection bias
            views = self.weight_views if from_weight else self.bias_views
            views[id(out)] = out
            return out
        if out.dim() == 0 or out.shape[-1] not in self.widths:
            return out
        if from_weight and self.scale != 1.0:
            out = out * self.scale
        if self.removed is not None:
            out = out.masked_fill(self._removed(out), float("-inf"))
            self.masked[id(out)] = out
        self.changed += 1
        if self.observe is not None:
            self.observe(out)
        return out

    def _removed(self, out: torch.Tensor) -> torch.Tensor:
        """The removed-expert mask for scores ``out [..., E or E + tail]`` (trailing classes are never removed)."""
        removed = self.removed.to(out.device)
        extra = out.shape[-1] - self.num_experts
        return torch.cat([removed, removed.new_zeros(extra)]) if extra else removed


def expert_mask(layer: MoELayer, removed: torch.Tensor | None, scale: float = 1.0,
                parameters: dict | None = None, observe: Callable[[torch.Tensor], None] | None = None) -> ExpertMask:
    """The mask for one layer's router: its logits weight (or the one in ``parameters``, router-relative names, as
    ``functional_call`` substitutes it) and its selection biases; ``observe`` sees its logits and scores."""
    weight_path = layer.structure.logits_weight
    router_prefix = layer.structure.router_path + "."

    def weights():
        if parameters and weight_path.removeprefix(router_prefix) in parameters:
            return [parameters[weight_path.removeprefix(router_prefix)]]
        return [layer.logits_weight()]

    return ExpertMask(weights, layer.selection_biases, layer.num_experts, removed, scale, layer.structure.router_tail,
                      observe)


def routing_of(output, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(top-k weights, top-k ids) [T, k] out of whatever a router's forward returned: the integer tensor whose last
    axis is top_k, and the floating-point tensor of the same shape."""
    items = output if isinstance(output, (tuple, list)) else (output,)
    tensors = [t for t in items if isinstance(t, torch.Tensor)]
    ids = [t for t in tensors if not t.is_floating_point() and t.dim() >= 1 and t.shape[-1] == top_k]
    weights = [t for t in tensors if t.is_floating_point() and ids and t.shape == ids[0].shape]
    if not ids or not weights:
        raise Unsupported("the router does not return its top-k ids and weights (it returned "
                          f"{[tuple(t.shape) for t in tensors]}): fair_moe cannot follow its routing")
    return weights[0], ids[0]


def layer_routing(layer: MoELayer, output) -> tuple[torch.Tensor, torch.Tensor]:
    """(top-k weights, top-k ids) [T, k] of one call of ``layer``'s router, whatever its dispatch. An expert-major
    router (Llama 4) returns dense scores and its logits ``([T, E], [T, E])`` and selects the top-k logits: the ids
    are that same top-k of the same logits, the weights the scores there."""
    if layer.structure.dispatch != EXPERT_MAJOR:
        return routing_of(output, layer.top_k)
    items = output if isinstance(output, (tuple, list)) else (output,)
    dense = [t for t in items if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() == 2]
    if len(dense) < 2 or dense[0].shape != dense[1].shape:
        raise Unsupported("the expert-major router does not return its dense scores and logits [T, E] (it returned "
                          f"{[tuple(t.shape) for t in items if isinstance(t, torch.Tensor)]})")
    scores, logits = dense[0], dense[1]
    ids = torch.topk(logits, layer.top_k, dim=1).indices
    return scores.gather(1, ids), ids


def run_experts(layer: MoELayer, forward: Callable | None = None) -> Callable:
    """``run(hidden [T, H], ids [T, k], weights [T, k]) -> [T, H]``: the layer's experts module (``forward``, default
    the module itself) on those tokens and routing, called the way its block calls it. For an expert-major block that
    is every expert on every token, expert e's rows the tokens scaled by their weight for e (0 where e is not among
    their ids), summed over e as the block sums them."""
    forward = forward or layer.experts
    if layer.structure.dispatch != EXPERT_MAJOR:
        return forward
    num_experts = layer.num_experts

    def run(hidden, ids, weights, *args, **kwargs):
        scores = torch.zeros((hidden.shape[0], num_experts), dtype=weights.dtype, device=hidden.device)
        scores = scores.scatter(1, ids, weights)  # [T, E]
        routed_in = hidden.repeat(num_experts, 1) * scores.transpose(0, 1).reshape(-1, 1)
        out = forward(routed_in, *args, **kwargs)
        return out.reshape(num_experts, -1, out.shape[-1]).sum(dim=0)

    return run


def expert_major_output(output: torch.Tensor, num_experts: int) -> torch.Tensor:
    """An output ``[T, H]`` as an expert-major experts module returns it, ``[E·T, H]``: the block's sum over the E
    blocks gives it back exactly (the other blocks are zeros)."""
    return torch.cat([output, output.new_zeros(((num_experts - 1) * output.shape[0], output.shape[1]))])


def route(layer: MoELayer, args: tuple, kwargs: dict, removed: torch.Tensor | None = None, scale: float = 1.0,
          parameters: dict | None = None, forward=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The router's own forward (``forward``, default its current one) on ``args`` with removed experts unreachable
    and logits × ``scale`` (with ``parameters`` substituted for its own, router-relative names, differentiably):
    (weights, ids) [T, k]."""
    forward = forward or layer.router.forward
    with expert_mask(layer, removed, scale, parameters):
        if parameters:
            output = torch.func.functional_call(layer.router, parameters, args, kwargs, strict=False)
        else:
            output = forward(*args, **kwargs)
    return layer_routing(layer, output)


@dataclass
class RouterState:
    """What one router call saw and produced: its arguments, its own (unmasked) top-k weights and ids [T, k] (when
    a tap needs them), the removed-expert mask [E] the masked routing used (None when nothing is removed) and, for an
    expert-major block, the routing it passed on (its experts module is not given ids)."""

    removed: torch.Tensor | None = None
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    weights: torch.Tensor | None = None
    ids: torch.Tensor | None = None
    forward: Callable | None = None  # the router's forward before it was patched
    given: tuple[torch.Tensor, torch.Tensor] | None = None  # (weights, ids) the block received (expert-major)


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

    def routing(self, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights, ids) of the router on the same tokens with its logits × ``scale`` and the same experts removed."""
        weights, ids = route(self.layer, self.router.args, self.router.kwargs, self.router.removed, scale,
                             forward=self.router.forward)
        return weights.to(self.weights.dtype), ids


Tap = Callable[[ExpertsCall], "torch.Tensor | None"]


def removed_mask(layer: MoELayer, kept: list[int]) -> torch.Tensor:
    removed = torch.ones(layer.num_experts, dtype=torch.bool)
    removed[list(kept)] = False
    return removed


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
            state = RouterState(removed=None if kept is None else removed_mask(layer, kept[layer.index]))
            stack.enter_context(patched_forward(layer.router, _masked_router_forward(layer, state, tap is not None)))
            if tap is not None:
                stack.enter_context(patched_forward(layer.experts, _tapped_forward(layer, adapter, state, tap)))
        yield


@contextlib.contextmanager
def scaled_routers(model: nn.Module, scales: dict[int, float]) -> Iterator[None]:
    """Every listed layer's router logits × its scale (a temperature) for the duration of the block."""
    adapter = get_adapter(model.config)
    with contextlib.ExitStack() as stack:
        for layer in adapter.moe_layers(model):
            if layer.index in scales:
                original = layer.router.forward

                def forward(self, *args, _layer=layer, _original=original, _scale=float(scales[layer.index]),
                            **kwargs):
                    with expert_mask(_layer, None, _scale):
                        return _original(*args, **kwargs)

                stack.enter_context(patched_forward(layer.router, forward))
        yield


def _masked_router_forward(layer: MoELayer, state: RouterState, need_unmasked: bool):
    original = state.forward = layer.router.forward
    expert_major = layer.structure.dispatch == EXPERT_MAJOR

    def forward(self, *args, **kwargs):
        state.args, state.kwargs = args, kwargs
        if need_unmasked or state.removed is None:
            output = original(*args, **kwargs)
            if need_unmasked:
                state.weights, state.ids = layer_routing(layer, output)
            if state.removed is None:
                if expert_major:  # the routing the block receives is the router's own
                    state.given = (state.weights, state.ids) if need_unmasked else layer_routing(layer, output)
                return output
        with expert_mask(layer, state.removed):
            output = original(*args, **kwargs)
        if expert_major:
            state.given = layer_routing(layer, output)
        return output

    return forward


def _tapped_forward(layer: MoELayer, adapter: FusedExpertsAdapter, state: RouterState, tap: Tap):
    original = layer.experts.forward
    if layer.structure.dispatch == EXPERT_MAJOR:
        return _tapped_expert_major_forward(layer, adapter, state, tap, original)

    def forward(self, hidden_states, top_k_index, top_k_weights, *args, **kwargs):
        def run(hidden, ids, weights):
            return original(hidden, ids, weights, *args, **kwargs)

        ids = as_routed(layer, top_k_index, top_k_weights)
        call = ExpertsCall(layer, adapter, hidden_states, ids, top_k_weights, state, run)
        result = tap(call)
        return call.output() if result is None else result

    return forward


def _tapped_expert_major_forward(layer: MoELayer, adapter: FusedExpertsAdapter, state: RouterState, tap: Tap,
                                 original):
    def forward(self, routed_in, *args, **kwargs):
        weights, ids = state.given
        hidden = state.args[0].reshape(-1, routed_in.shape[-1])  # the tokens the router scored [T, H]
        run = run_experts(layer, lambda x: original(x, *args, **kwargs))
        result = tap(ExpertsCall(layer, adapter, hidden, ids, weights.to(hidden.dtype), state, run))
        return original(routed_in, *args, **kwargs) if result is None else \
            expert_major_output(result.to(routed_in.dtype), layer.num_experts)

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


def as_routed(layer: MoELayer, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The ids ``[T, k]`` an experts module was given, with the slots of classes past the routed experts that its
    block computes itself put back past them (id E). Such a block (LongCat's identity experts, transformers ≥ 5.25)
    hands the experts module those slots re-pointed at routed experts with weight exactly 0, so without this they
    would count as routings of those experts; every other layer's ids are returned as they are."""
    structure = layer.structure
    if structure.router_tail <= structure.experts_tail:
        return ids
    return torch.where(weights == 0, torch.full_like(ids, layer.num_experts), ids)


def routed_pairs(ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flatten top-k routing [T, k] into routed (token, expert) pairs: token rows [P], expert ids [P] and the
    mask [T·k] of valid slots (padding / dropped slots carry an id outside [0, E))."""
    tokens, k = ids.shape
    flat = ids.reshape(-1)
    valid = (flat >= 0) & (flat < num_experts)
    token = torch.arange(tokens, device=flat.device).repeat_interleave(k)[valid]
    return token, flat[valid], valid


def expert_outputs(call_forward, hidden_states: torch.Tensor, token: torch.Tensor, experts: torch.Tensor,
                   weight_dtype: torch.dtype, pad_id: int | None = None) -> torch.Tensor:
    """f_e(x) [P, H] for every routed pair, through the experts module's own forward: each pair is a row of
    its own with its expert alone at weight 1 (same rows and FLOPs as the stock call). ``pad_id`` adds a second
    slot of that (zero-computation) expert at weight 0, for a module whose code needs top-k > 1 (LongCat's)."""
    ones = torch.ones((len(token), 1), dtype=weight_dtype, device=hidden_states.device)
    ids = experts[:, None]
    if pad_id is not None:
        ones = torch.cat([ones, torch.zeros_like(ones)], dim=1)
        ids = torch.cat([ids, torch.full_like(ids, pad_id)], dim=1)
    return call_forward(hidden_states[token], ids, ones)
