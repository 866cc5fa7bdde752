"""Per-neuron signals for vision transformers, from one pass over labelled images.

- removal ``wasserstein`` (the paper's U-score): each neuron's activation act(fc1(x)) averaged over
  tokens gives one value per image; U = max over class pairs of the 1-D W1 distance between the
  per-class distributions, vectorised over all neurons of a layer (one sort per class and layer);
- removal ``random``: seeded control;
- protection ``taylor``: |Σ_batches Σ (∂L/∂W ⊙ W)| over the neuron's fc1 row (weight and bias), which
  equals |Σ_{images, tokens} ∂L/∂z · z| for its pre-activation z — from activation gradients only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from fair_moe.signals.collect import activation_gradients_only
from fair_moe.signals.wasserstein import max_pairwise_wasserstein
from fair_moe.vision.units import MLPLayer, attention_modules, encoder, mlp_layers

VISION_REMOVAL_SIGNALS = ("wasserstein", "random")


class NeuronRecorder:
    """Per layer: mean-over-tokens activations [images, I] by class, and the signed Taylor sums [I]."""

    def __init__(self, layers: list[MLPLayer], num_classes: int):
        self.layers = layers
        self.activations = [[[] for _ in range(num_classes)] for _ in layers]
        self.taylor = [torch.zeros(layer.width, dtype=torch.float64) for layer in layers]
        self.labels: torch.Tensor | None = None

    @contextlib.contextmanager
    def attached(self) -> Iterator[None]:
        handles = [layer.fc1.register_forward_hook(self._hook(n)) for n, layer in enumerate(self.layers)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _hook(self, n: int):
        def hook(module, args, z):  # z: pre-activation [B, T, I]
            act = self.layers[n].activation(z.detach()).mean(dim=1).double().cpu()  # [B, I]
            for klass in self.labels.unique().tolist():
                self.activations[n][klass].append(act[self.labels == klass])
            if z.requires_grad:
                z.register_hook(self._taylor(n, z.detach()))  # a detached view: no tensor → hook → tensor cycle

        return hook

    def _taylor(self, n: int, z):
        held = [z]  # released once used

        def hook(grad) -> None:  # returns None: the gradient itself is left untouched
            self.taylor[n] += (grad.double() * held.pop().double()).sum(dim=(0, 1)).cpu()

        return hook


def vision_scores(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], num_classes: int, seed: int = 0,
                  progress: bool = True) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Removal signals {name: [L, I]} and Taylor protection [L, I] over (pixel_values, labels) batches."""
    layers = mlp_layers(model)
    recorder = NeuronRecorder(layers, num_classes)
    device = next(model.parameters()).device
    embeddings = encoder(model).embeddings
    handle = embeddings.register_forward_hook(lambda m, a, out: out.requires_grad_(True))
    try:
        with activation_gradients_only(model), recorder.attached():
            for pixels, labels in tqdm(batches, desc="calibrating", unit="batch", disable=not progress):
                recorder.labels = labels
                loss = model(pixel_values=pixels.to(device), labels=labels.to(device)).loss
                loss.backward()
                del loss
    finally:
        handle.remove()
    wasserstein = []
    for per_class in recorder.activations:
        samples = [torch.cat(chunks) for chunks in per_class if chunks]
        wasserstein.append(max_pairwise_wasserstein(samples))
    shape = (len(layers), layers[0].width)
    removal = {
        "wasserstein": torch.stack(wasserstein),
        "random": torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64),
    }
    return removal, torch.stack(recorder.taylor).abs()


class HeadRecorder:
    """Per layer: each head's output norm (mean over tokens) by class [images, heads], and signed Taylor sums.

    A head's output is its d-wide slice of o_proj's input; its Taylor score is Σ ⟨∂L/∂x_h, x_h⟩, which
    equals Σ (∂L/∂W ⊙ W) over the head's columns of o_proj.
    """

    def __init__(self, model: nn.Module, num_classes: int):
        self.attentions = attention_modules(model)
        self.heads = [a.o_proj.in_features // a.head_dim for a in self.attentions]
        self.activations = [[[] for _ in range(num_classes)] for _ in self.attentions]
        self.taylor = [torch.zeros(n, dtype=torch.float64) for n in self.heads]
        self.labels: torch.Tensor | None = None

    @contextlib.contextmanager
    def attached(self) -> Iterator[None]:
        handles = [a.o_proj.register_forward_pre_hook(self._hook(n)) for n, a in enumerate(self.attentions)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _hook(self, n: int):
        def hook(module, args):
            x = args[0]  # [B, T, heads·d]
            per_head = x.detach().unflatten(-1, (self.heads[n], -1))
            norms = per_head.double().norm(dim=-1).mean(dim=1).cpu()  # [B, heads]
            for klass in self.labels.unique().tolist():
                self.activations[n][klass].append(norms[self.labels == klass])
            if x.requires_grad:
                x.register_hook(self._taylor(n, x.detach()))

        return hook

    def _taylor(self, n: int, x):
        held = [x]

        def hook(grad) -> None:
            product = (grad.double() * held.pop().double()).unflatten(-1, (self.heads[n], -1))
            self.taylor[n] += product.sum(dim=(0, 1, 3)).cpu()

        return hook


def vision_head_scores(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], num_classes: int,
                       seed: int = 0, progress: bool = True) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Removal signals {name: [L, heads]} and Taylor protection [L, heads] for attention heads."""
    recorder = HeadRecorder(model, num_classes)
    device = next(model.parameters()).device
    handle = encoder(model).embeddings.register_forward_hook(lambda m, a, out: out.requires_grad_(True))
    try:
        with activation_gradients_only(model), recorder.attached():
            for pixels, labels in tqdm(batches, desc="calibrating heads", unit="batch", disable=not progress):
                recorder.labels = labels
                loss = model(pixel_values=pixels.to(device), labels=labels.to(device)).loss
                loss.backward()
                del loss
    finally:
        handle.remove()
    wasserstein = [max_pairwise_wasserstein([torch.cat(c) for c in per_class if c]) for per_class in recorder.activations]
    shape = (len(recorder.heads), recorder.heads[0])
    removal = {
        "wasserstein": torch.stack(wasserstein),
        "random": torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64),
    }
    return removal, torch.stack(recorder.taylor).abs()
