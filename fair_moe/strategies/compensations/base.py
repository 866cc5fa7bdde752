"""Compensations: what is changed in the kept weights so that the pruned model follows the dense one.

A compensation is registered once under its ``--compensate`` name and provides everything the rest
needs: ``fit`` (on calibration windows, recorded in the plan as a ``CompensationRecord``), ``reference``
(the masked original with the compensation applied, which the written checkpoint must equal), ``fold``
(into the weights of the loaded model, before slicing) and ``transform`` (the same change applied key by
key while streaming, on each source tensor before slicing).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fair_moe.core.registry import Registry

if TYPE_CHECKING:
    from torch import Tensor, nn

    from fair_moe.adapters.base import CheckpointKey
    from fair_moe.core.plan import CompensationRecord

Transform = Callable[["CheckpointKey", "Tensor"], "Tensor"]


@dataclass
class FitData:
    """What a compensation is fitted on: calibration ``windows [n, S]``, processed ``batch_size`` at a time;
    ``options`` are its ``--compensate-option`` values (``parse_options``), ``seed`` fixes any sampling."""

    windows: Tensor
    batch_size: int = 4
    seed: int = 0
    options: dict = field(default_factory=dict)
    progress: bool = False


class Compensation:
    """One compensation. Class attributes are the facts the rest of fair_moe reads."""

    name: str
    description: str  # one line for --help and the docs
    changes: str  # what it does to the weights, for the model card ("… multiplied by a per-layer scale")
    streamable: bool = True  # whether ``transform`` can apply it key by key while streaming
    writes: str = "router"  # what it changes, for quantized outputs: router | expert-scale | expert-weights
    auto_candidate: bool = False  # whether --compensate auto considers it
    options: dict[str, tuple[type, object, str]] = {}  # --compensate-option NAME=VALUE: (type, default, help)

    def fit(self, model: nn.Module, kept: dict[int, list[int]], data: FitData) -> CompensationRecord | None:
        """Fit for the plan keeping ``kept`` (layer → expert ids); None when there is nothing to change."""
        return None

    def unavailable(self, model: nn.Module) -> str | None:
        """Why this compensation cannot be expressed in ``model``'s weights (None: it can)."""
        return None

    def parse_options(self, pairs: tuple[str, ...]) -> dict:
        """``("steps=200", …)`` → {name: typed value} over the defaults; a FairMoeError names what is wrong."""
        from fair_moe.core.errors import FairMoeError

        values = {name: default for name, (_, default, _) in self.options.items()}
        for pair in pairs:
            name, sep, text = pair.partition("=")
            if not sep or name.strip() not in self.options:
                known = ", ".join(f"{n} ({h}; default {d})" for n, (_, d, h) in self.options.items()) or "none"
                raise FairMoeError(f"--compensate-option {pair!r} is not an option of --compensate {self.name} "
                                   f"(its options: {known})")
            kind = self.options[name.strip()][0]
            try:
                values[name.strip()] = kind(text.strip())
            except ValueError as err:
                raise FairMoeError(f"--compensate-option {pair!r}: {text!r} is not a {kind.__name__}") from err
        return values

    def reference(self, model: nn.Module, record: CompensationRecord) -> contextlib.AbstractContextManager:
        """Inside the block the original model behaves as if the compensation were folded in (entered before
        the masking, so that hooks on a router run before the mask recomputes its routing)."""
        return contextlib.nullcontext()

    def as_written(self, record: CompensationRecord, dtype) -> CompensationRecord:
        """The record as a checkpoint whose weights are stored in ``dtype`` holds it. A compensation that writes
        its values verbatim (router rows) rounds them to ``dtype`` here, so that the plan, the reference the
        checkpoint is verified against and the checkpoint agree exactly: an unrounded router row can move a
        near-tie top-k choice, which no output tolerance absorbs. Unchanged by default."""
        return record

    def fold(self, model: nn.Module, record: CompensationRecord) -> None:
        """Apply the compensation to the loaded (unsliced) model's weights, in place."""

    def transform(self, model: nn.Module, record: CompensationRecord) -> Transform | None:
        """The same change for a streamed checkpoint of ``model``: ``f(key, source tensor) -> tensor``."""
        return None

    def summary(self, record: CompensationRecord) -> str:
        """One line for the console and the model card."""
        values = ", ".join(f"{layer}: {value:.4g}" if isinstance(value, float) else f"{layer}: {value}"
                           for layer, value in sorted(record.per_layer.items()))
        return f"{self.name}: {values}"


COMPENSATIONS: Registry[Compensation] = Registry("compensation", "--compensate")


def options_for(compensation: Compensation, pairs: tuple[str, ...]) -> dict:
    """The ``--compensate-option`` pairs that name one of ``compensation``'s options, parsed over its defaults."""
    return compensation.parse_options(tuple(p for p in pairs if p.partition("=")[0].strip() in compensation.options))


def forward_all(model: nn.Module, input_ids: Tensor, batch_size: int) -> None:
    """Run the model over ``input_ids [n, seq]`` in batches, outputs discarded (taps keep what they need)."""
    from fair_moe.metrics import execution_device

    device = execution_device(model)
    for i in range(0, len(input_ids), batch_size):
        model(input_ids=input_ids[i : i + batch_size].to(device), use_cache=False)


def _layer_tensors(layer, part: str) -> list[tuple[str, object]]:
    """(name, tensor) of one MoE layer's ``part``: the router side's tensors by block-relative path (router rows,
    biases, selection biases), or the experts module's own parameters."""
    if part == "router":
        return [(path, layer.tensor(path)) for path, _ in layer.router_tensors()]
    return list(layer.experts.named_parameters(recurse=False))


def scale_in_place(model: nn.Module, factors: dict, part: str, chosen: Callable[[object, object, str], bool]) -> None:
    """Multiply, in place, every tensor of layer l's ``part`` ("router" or "experts") that
    ``chosen(adapter, config, name)`` picks by ``factors[l]``."""
    import torch

    from fair_moe.adapters import get_adapter

    adapter = get_adapter(model.config)
    with torch.no_grad():
        for layer in adapter.moe_layers(model):
            if layer.index not in factors:
                continue
            for name, tensor in _layer_tensors(layer, part):
                if chosen(adapter, model.config, name):
                    tensor.mul_(float(factors[layer.index]))


def scaling_transform(model: nn.Module, factors: dict, part: str,
                      chosen: Callable[[object, object, str], bool]) -> Transform:
    """The streaming form of ``scale_in_place``: ``f(key, tensor)`` multiplies the picked tensors of layer l's
    ``part`` by ``factors[l]`` in float32 and casts back to the tensor's dtype. A quantized weight is multiplied
    through its scale tensor (dequantised = payload × scale), its payload copied as it is."""
    from fair_moe.adapters import get_adapter
    from fair_moe.checkpoint.quantized import AUXILIARY, PAYLOAD, SCALE
    from fair_moe.core.errors import FairMoeError

    adapter = get_adapter(model.config)
    config = model.config
    factors = {int(k): float(v) for k, v in factors.items()}

    def transform(ref, tensor):
        if ref.part != part or ref.layer not in factors or not chosen(adapter, config, ref.target or ref.name):
            return tensor
        if ref.role in (PAYLOAD, AUXILIARY):  # a quantized weight: its scale tensor carries the factor
            return tensor
        if ref.role is not None and ref.role != SCALE:
            raise FairMoeError(f"{ref.key} is a {ref.role} of a quantized weight, which cannot be multiplied by "
                               f"{factors[ref.layer]:.4g} exactly: pass --dequantize to write unquantized weights")
        return (tensor.float() * factors[ref.layer]).to(tensor.dtype)

    return transform
