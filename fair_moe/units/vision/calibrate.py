"""One pass over labelled images that measures every MLP neuron or attention head of a vision transformer.

- per image and unit, one value (a neuron: its activation act(fc1(x)) averaged over tokens; a head: the
  norm of its slice of o_proj's input averaged over tokens), kept by class: the distributions the
  wasserstein signal compares;
- the signed Taylor sum Σ (∂L/∂W ⊙ W) over the unit's parameters (a neuron: its fc1 row and bias, equal to
  Σ_{images, tokens} ∂L/∂z · z for its pre-activation z; a head: its o_proj columns) — from activation
  gradients only.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from fair_moe.core.statistics import SignalStatistics
from fair_moe.units.autograd import activation_gradients_only
from fair_moe.units.vision.modules import MLPLayer, attention_modules, encoder, mlp_layers


class ImageClassValues:
    """Per layer and class, every image's per-unit values ([images, U] chunks)."""

    def __init__(self, activations: list[list[list[torch.Tensor]]]):
        self.activations = activations

    def __call__(self, row: int) -> list[torch.Tensor]:
        return [torch.cat(chunks) for chunks in self.activations[row] if chunks]

    def merged(self, others: list[ImageClassValues]) -> ImageClassValues:
        return ImageClassValues([[sum((o.activations[row][k] for o in others), list(chunks))
                                  for k, chunks in enumerate(layer)] for row, layer in enumerate(self.activations)])


class UnitRecorder:
    """Per layer: one value per image and unit, kept by class ([images, U] chunks), and the signed Taylor
    sums [U]. What a unit is (an MLP neuron, an attention head) is decided by the hooks that feed it."""

    def __init__(self, widths: list[int], num_classes: int):
        self.widths = widths
        self.activations = [[[] for _ in range(num_classes)] for _ in widths]
        self.taylor = [torch.zeros(w, dtype=torch.float64) for w in widths]
        self.labels: torch.Tensor | None = None

    def record(self, n: int, values: torch.Tensor) -> None:
        """Layer n's per-image unit values [B, U] for the current batch."""
        for klass in self.labels.unique().tolist():
            self.activations[n][klass].append(values[self.labels == klass])

    def track_taylor(self, n: int, x: torch.Tensor, per_unit) -> None:
        """Add ``per_unit(∂L/∂x ⊙ x) -> [U]`` to layer n's Taylor sum when the backward pass reaches ``x``."""
        if not x.requires_grad:
            return
        held = [x.detach()]  # a detached view, released once used: no tensor → hook → tensor cycle

        def hook(grad) -> None:  # returns None: the gradient itself is left untouched
            self.taylor[n] += per_unit(grad.double() * held.pop().double()).cpu()

        x.register_hook(hook)

    def statistics(self, seed: int, images: int) -> SignalStatistics:
        return SignalStatistics(
            layer_indices=list(range(len(self.widths))),
            taylor=torch.stack(self.taylor),
            num_classes=len(self.activations[0]),
            seed=seed,
            tokens=images,
            class_samples=ImageClassValues(self.activations),
        )


def _calibrate(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], recorder: UnitRecorder,
               handles: list, seed: int, desc: str, progress: bool) -> SignalStatistics:
    """Forward + backward over (labels, pixel_values) batches with the recorder's hooks; hooks always removed."""
    device = next(model.parameters()).device
    images = 0
    try:
        with activation_gradients_only(model, encoder(model).embeddings):
            for labels, pixels in tqdm(batches, desc=desc, unit="batch", disable=not progress):
                recorder.labels = labels
                images += len(labels)
                loss = model(pixel_values=pixels.to(device), labels=labels.to(device)).loss
                loss.backward()
                del loss
    finally:
        for h in handles:
            h.remove()
    return recorder.statistics(seed, images)


def neuron_statistics(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], num_classes: int,
                      seed: int = 0, progress: bool = True) -> SignalStatistics:
    """Per-class activations and Taylor sums [L, I] of every MLP neuron."""
    layers = mlp_layers(model)
    recorder = UnitRecorder([layer.width for layer in layers], num_classes)

    def hook_for(n: int, layer: MLPLayer):
        def hook(module, args, z):  # z: pre-activation [B, T, I]
            recorder.record(n, layer.activation(z.detach()).mean(dim=1).double().cpu())
            recorder.track_taylor(n, z, lambda product: product.sum(dim=(0, 1)))

        return hook

    handles = [layer.fc1.register_forward_hook(hook_for(n, layer)) for n, layer in enumerate(layers)]
    return _calibrate(model, batches, recorder, handles, seed, "calibrating", progress)


def head_statistics(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], num_classes: int,
                    seed: int = 0, progress: bool = True) -> SignalStatistics:
    """Per-class head norms and Taylor sums [L, heads] of every attention head.

    A head's output is its d-wide slice of o_proj's input; its value per image is that slice's norm
    averaged over tokens, and its Taylor score Σ ⟨∂L/∂x_h, x_h⟩ equals Σ (∂L/∂W ⊙ W) over the head's
    columns of o_proj.
    """
    attentions = attention_modules(model)
    heads = [a.o_proj.in_features // a.head_dim for a in attentions]
    recorder = UnitRecorder(heads, num_classes)

    def hook_for(n: int):
        def hook(module, args):
            x = args[0]  # [B, T, heads·d]
            recorder.record(n, x.detach().unflatten(-1, (heads[n], -1)).double().norm(dim=-1).mean(dim=1).cpu())
            recorder.track_taylor(n, x, lambda product: product.unflatten(-1, (heads[n], -1)).sum(dim=(0, 1, 3)))

        return hook

    handles = [a.o_proj.register_forward_pre_hook(hook_for(n)) for n, a in enumerate(attentions)]
    return _calibrate(model, batches, recorder, handles, seed, "calibrating heads", progress)
