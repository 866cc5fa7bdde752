"""Vision transformers: MLP neurons as units, wasserstein + Taylor signals, exact budgets, round trips."""

import json

import numpy as np
import pytest
import scipy.stats
import torch
import transformers as tf
from PIL import Image

from fair_moe import prune
from fair_moe.core.plan import PrunePlan
from fair_moe.strategies.signals import compute_signals
from fair_moe.units.vision.calibrate import head_statistics, neuron_statistics
from fair_moe.units.vision.modules import attention_modules, mlp_layers
from fair_moe.units.vision.rewrite import apply_vision_plan, zeroed_heads, zeroed_neurons

FAST = ["--samples", "24", "--batch-size", "8", "--quiet"]


def tiny_vision(model_type: str, seed: int = 0):
    config_cls, model_cls = {"vit": (tf.ViTConfig, tf.ViTForImageClassification),
                             "deit": (tf.DeiTConfig, tf.DeiTForImageClassification)}[model_type]
    config = config_cls(image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=3,
                        num_attention_heads=2, intermediate_size=20, num_labels=3)
    torch.manual_seed(seed)
    return model_cls(config).eval()


@pytest.fixture(scope="module", params=["vit", "deit"])
def checkpoint(request, tmp_path_factory):
    """A saved tiny vision checkpoint with its processor, and a 3-class image folder."""
    folder = tmp_path_factory.mktemp(request.param)
    tiny_vision(request.param).save_pretrained(folder / "model")
    tf.ViTImageProcessor(
        size={"height": 8, "width": 8}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    ).save_pretrained(folder / "model")
    rng = np.random.default_rng(0)
    for klass in range(3):
        (folder / "images" / f"c{klass}").mkdir(parents=True)
        for i in range(8):
            pixels = rng.integers(0, 80 + 80 * klass, (8, 8, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / "images" / f"c{klass}" / f"{i}.png")
    return folder


def run(checkpoint, out, *args):
    return prune.main(["--model", str(checkpoint / "model"), "--calib-images", str(checkpoint / "images"),
                       "--out", str(out), *map(str, args), *FAST])


@pytest.mark.parametrize("allocation", ["tod", "uniform", "global"])
def test_cli_round_trip_equals_zeroed_original(checkpoint, tmp_path, allocation):
    out = tmp_path / "out"
    assert run(checkpoint, out, "--budget", "0.3", "--allocation", allocation) == 0
    plan = json.loads((out / "fair_moe_plan.json").read_text())
    kept = {int(k): v for k, v in plan["kept_units"].items()}
    assert sum(20 - len(v) for v in kept.values()) == 3 * round(0.3 * 20)  # exact budget
    assert all(len(v) >= 1 for v in kept.values())
    original = tf.AutoModelForImageClassification.from_pretrained(checkpoint / "model").eval()
    pixels = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dense = original(pixel_values=pixels).logits
        with zeroed_neurons(original, kept):
            reference = original(pixel_values=pixels).logits
        pruned = tf.AutoModelForImageClassification.from_pretrained(out, trust_remote_code=True).eval()
        assert (pruned(pixel_values=pixels).logits - reference).abs().max().item() < 1e-4
    assert (reference - dense).abs().max() > 1e-5
    widths = [layer.width for layer in mlp_layers(pruned)]
    assert widths == [len(kept[i]) for i in range(3)]
    if allocation == "uniform":
        assert type(tf.AutoModelForImageClassification.from_pretrained(out)) is type(original)  # stock, no remote code


def test_signals_match_references(checkpoint):
    model = tf.AutoModelForImageClassification.from_pretrained(checkpoint / "model").eval()
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(6, 3, 8, 8, generator=gen), torch.tensor([0, 1, 2, 0, 1, 2])) for _ in range(2)]
    removal, protection = compute_signals(neuron_statistics(model, [(y, x) for x, y in batches], 3, progress=False))
    # Taylor: |Σ ∂L/∂W ⊙ W| over each neuron's fc1 row and bias, with parameter autograd
    model.zero_grad()
    acts = {i: [] for i in range(3)}
    hooks = [layer.fc1.register_forward_hook(lambda m, a, z, n=n: acts[n].append(layer_act(model, n, z)))
             for n, layer in enumerate(mlp_layers(model))]
    for pixels, labels in batches:
        model(pixel_values=pixels, labels=labels).loss.backward()
    for h in hooks:
        h.remove()
    for n, layer in enumerate(mlp_layers(model)):
        expected = (layer.fc1.weight.grad * layer.fc1.weight).sum(1) + layer.fc1.bias.grad * layer.fc1.bias
        torch.testing.assert_close(protection[n], expected.detach().double().abs(), rtol=1e-4, atol=1e-10)
        a = torch.cat(acts[n])  # [12, I] mean-over-token activations
        labels = torch.cat([b[1] for b in batches])
        for unit in (0, 7, 19):
            cols = [a[labels == c, unit].numpy() for c in range(3)]
            best = max(scipy.stats.wasserstein_distance(cols[i], cols[j]) for i in range(3) for j in range(i + 1, 3))
            assert removal["wasserstein"][n, unit].item() == pytest.approx(best, rel=1e-6, abs=1e-12)


def layer_act(model, n, z):
    return mlp_layers(model)[n].activation(z.detach()).mean(dim=1).double()


def test_in_memory_slice_equals_zeroed_original():
    model = tiny_vision("vit", seed=3)
    kept = {0: [1, 2, 3], 1: list(range(20)), 2: [0, 19]}
    pixels = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    reference_model = tiny_vision("vit", seed=3)
    with torch.no_grad(), zeroed_neurons(reference_model, kept):
        reference = reference_model(pixel_values=pixels).logits
    with torch.no_grad():  # the zeroing is undone on exit
        assert (reference_model(pixel_values=pixels).logits - reference).abs().max() > 1e-5
    pruned = apply_vision_plan(model, PrunePlan("vit", "neurons", 20, kept))
    assert (pruned(pixel_values=pixels).logits - reference).abs().max().item() < 1e-5
    assert model.config.fair_moe_intermediate_sizes == {"0": 3, "1": 20, "2": 2}


@pytest.mark.parametrize("args,message", [
    (["--budget", "0.99"], "too aggressive"),
    (["--budget", "0.3", "--removal", "reap"], "not available for --units neurons"),
    (["--budget", "1.5"], "between 0 and 1"),
])
def test_bad_vision_input(checkpoint, tmp_path, capsys, args, message):
    assert run(checkpoint, tmp_path / "out", *args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_single_class_folder_is_refused(checkpoint, tmp_path, capsys):
    (tmp_path / "one" / "only").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "one" / "only" / "a.png")
    rc = prune.main(["--model", str(checkpoint / "model"), "--calib-images", str(tmp_path / "one"), "--budget", "0.3",
                     "--out", str(tmp_path / "out")])
    assert rc == 2 and "at least two" in capsys.readouterr().err


@pytest.mark.parametrize("allocation", ["tod", "uniform"])
def test_heads_round_trip_equals_zeroed_original(checkpoint, tmp_path, allocation):
    out = tmp_path / "heads"
    assert run(checkpoint, out, "--units", "heads", "--budget", "0.5", "--allocation", allocation) == 0
    plan = json.loads((out / "fair_moe_plan.json").read_text())
    kept = {int(k): v for k, v in plan["kept_units"].items()}
    assert sum(2 - len(v) for v in kept.values()) == 3 * 1  # 2 heads per layer, round(0.5 × 2) = 1 removed
    original = tf.AutoModelForImageClassification.from_pretrained(checkpoint / "model").eval()
    pixels = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        dense = original(pixel_values=pixels).logits
        with zeroed_heads(original, kept):
            reference = original(pixel_values=pixels).logits
        pruned = tf.AutoModelForImageClassification.from_pretrained(out, trust_remote_code=True).eval()
        assert (pruned(pixel_values=pixels).logits - reference).abs().max().item() < 1e-4
    assert (reference - dense).abs().max() > 1e-5
    assert [a.q_proj.out_features for a in attention_modules(pruned)] == [8] * 3  # one head of width 8 left
    if allocation == "uniform":
        assert type(tf.AutoModelForImageClassification.from_pretrained(out)) is type(original)


def test_head_taylor_matches_autograd_on_o_proj_columns(checkpoint):
    model = tf.AutoModelForImageClassification.from_pretrained(checkpoint / "model").eval()
    gen = torch.Generator().manual_seed(2)
    batches = [(torch.randn(6, 3, 8, 8, generator=gen), torch.tensor([0, 1, 2, 0, 1, 2]))]
    removal, protection = compute_signals(head_statistics(model, [(y, x) for x, y in batches], 3, progress=False))
    model.zero_grad()
    model(pixel_values=batches[0][0], labels=batches[0][1]).loss.backward()
    for n, attention in enumerate(attention_modules(model)):
        w = attention.o_proj.weight
        expected = (w.grad * w).detach().double().unflatten(1, (2, -1)).sum(dim=(0, 2)).abs()
        torch.testing.assert_close(protection[n], expected, rtol=1e-4, atol=1e-10)
    assert removal["wasserstein"].shape == (3, 2)
