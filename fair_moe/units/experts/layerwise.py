"""Calibration with per-layer recomputation: activation memory bounded by one decoder layer.

For each batch:

1. a forward pass without autograd keeps only every decoder layer's inputs (hidden states and the
   keyword arguments the model passed it: masks, position embeddings, ...), and turns autograd on
   for the head alone, so the loss gradient at the last layer's output comes from the model's own
   norm, lm_head and loss;
2. the layers are then recomputed one at a time from last to first with autograd and the signal
   instrumentation on, and back-propagated with the gradient coming from the layer above.

Each layer's signals are collected exactly once per batch (in its recomputation), so the scores equal
those of the one-pass collector. With weights offloaded by accelerate (``device_map`` with
``max_memory`` / ``offload_folder``) a layer's weights are brought in for its forward; autograd keeps
the tensors it saved for that layer's backward, which runs right after.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from fair_moe.adapters import get_adapter
from fair_moe.adapters.base import MoELayer
from fair_moe.core.statistics import SignalStatistics
from fair_moe.metrics import execution_device
from fair_moe.units.autograd import activation_gradients_only
from fair_moe.units.experts.calibrate import SignalCollector


def _hidden(output):
    return output[0] if isinstance(output, tuple) else output


@contextlib.contextmanager
def _capture_inputs(decoder_layers: nn.ModuleList, store: list) -> Iterator[dict]:
    """Record each layer's (args, kwargs); the last layer's output is detached and autograd turned on."""
    head = {}

    def pre_hook(module, args, kwargs):
        store.append((args, kwargs))

    def last_hook(module, args, kwargs, output):
        torch.set_grad_enabled(True)  # from here on (norm, lm_head, loss) autograd records the head only
        hidden = _hidden(output).detach().requires_grad_(True)
        head["output"] = hidden
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handles = [layer.register_forward_pre_hook(pre_hook, with_kwargs=True) for layer in decoder_layers]
    handles.append(decoder_layers[-1].register_forward_hook(last_hook, with_kwargs=True))
    try:
        yield head
    finally:
        for h in handles:
            h.remove()


def run_calibration_layerwise(
    model: nn.Module,
    layers: list[MoELayer],
    batches: list[tuple[int, torch.Tensor]],
    num_classes: int,
    seed: int,
    progress: bool = True,
) -> SignalStatistics:
    """Same sums as ``run_calibration``; peak activation memory of one decoder layer plus the layer inputs."""
    decoder_layers = get_adapter(model.config).decoder_layers(model)
    collector = SignalCollector(layers, num_classes)
    device = execution_device(model)
    tokens = 0
    with activation_gradients_only(model):
        for klass, input_ids in tqdm(batches, desc="calibrating (layer by layer)", unit="batch", disable=not progress):
            collector.current_class = klass
            collector.class_tokens[klass] += input_ids.numel()
            tokens += input_ids.numel()
            input_ids = input_ids.to(device)
            inputs: list = []
            with _capture_inputs(decoder_layers, inputs) as head:
                with torch.no_grad():
                    out = model(input_ids=input_ids, labels=input_ids, use_cache=False, output_router_logits=False)
            out.loss.backward()
            grad = head["output"].grad
            del out
            with collector.instrument():
                for layer, (args, kwargs) in zip(reversed(decoder_layers), reversed(inputs), strict=True):
                    hidden_in = (args[0] if args else kwargs["hidden_states"]).detach().requires_grad_(True)
                    rest = dict(kwargs)
                    rest.pop("hidden_states", None)
                    output = _hidden(layer(hidden_in, *args[1:], **rest))
                    output.backward(grad.to(output.device))
                    grad = hidden_in.grad
    return collector.statistics(seed, tokens)
