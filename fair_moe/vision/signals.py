"""Per-neuron signals for vision transformers, from one pass over labelled images.

- removal ``wasserstein`` (the paper's U-score): each neuron's activation act(fc1(x)) averaged over
  tokens gives one value per image; U = max over class pairs of the 1-D W1 distance between the
  per-class distributions, vectorised over all neurons of a layer (one sort per class and layer);
- removal ``random``: seeded control;
- protection ``taylor``: |Σ_batches Σ (∂L/∂W ⊙ W)| over the neuron's fc1 row (weight and bias), which
  equals |Σ_{images, tokens} ∂L/∂z · z| for its pre-activation z — from activation gradients only.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from fair_moe.signals.collect import activation_gradients_only
from fair_moe.signals.wasserstein import max_pairwise_wasserstein
from fair_moe.vision.units import MLPLayer, attention_modules, encoder, mlp_layers

VISION_REMOVAL_SIGNALS = ("wasserstein", "random")


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

    def result(self, seed: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        wasserstein = [max_pairwise_wasserstein([torch.cat(c) for c in per_class if c]) for per_class in self.activations]
        shape = (len(self.widths), self.widths[0])
        removal = {
            "wasserstein": torch.stack(wasserstein),
            "random": torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64),
        }
        return removal, torch.stack(self.taylor).abs()


def _calibrate(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], recorder: UnitRecorder,
               handles: list, seed: int, desc: str, progress: bool) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Forward + backward over (pixel_values, labels) batches with the recorder's hooks; hooks always removed."""
    device = next(model.parameters()).device
    handles.append(encoder(model).embeddings.register_forward_hook(lambda m, a, out: out.requires_grad_(True)))
    try:
        with activation_gradients_only(model):
            for pixels, labels in tqdm(batches, desc=desc, unit="batch", disable=not progress):
                recorder.labels = labels
                loss = model(pixel_values=pixels.to(device), labels=labels.to(device)).loss
                loss.backward()
                del loss
    finally:
        for h in handles:
            h.remove()
    return recorder.result(seed)


def vision_scores(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], num_classes: int, seed: int = 0,
                  progress: bool = True) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Removal signals {name: [L, I]} and Taylor protection [L, I] for MLP neurons."""
    layers = mlp_layers(model)
    recorder = UnitRecorder([layer.width for layer in layers], num_classes)

    def hook_for(n: int, layer: MLPLayer):
        def hook(module, args, z):  # z: pre-activation [B, T, I]
            recorder.record(n, layer.activation(z.detach()).mean(dim=1).double().cpu())
            recorder.track_taylor(n, z, lambda product: product.sum(dim=(0, 1)))

        return hook

    handles = [layer.fc1.register_forward_hook(hook_for(n, layer)) for n, layer in enumerate(layers)]
    return _calibrate(model, batches, recorder, handles, seed, "calibrating", progress)


def vision_head_scores(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], num_classes: int,
                       seed: int = 0, progress: bool = True) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Removal signals {name: [L, heads]} and Taylor protection [L, heads] for attention heads.

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
