"""Accuracy of the vision demo ViT before and after pruning MLP neurons: tod vs. uniform vs. global vs. random.

    python scripts/train_vision_demo.py --images-out bench_out/digits   # once: the calib/ and test/ folders
    python scripts/bench_vision.py
    python scripts/bench_vision.py --units heads --budgets 0.25,0.5

One calibration pass over the calibration split (wasserstein U + Taylor R); every plan is evaluated on
the test split through the zeroed-neuron reference, which the tests prove equal to the rewritten model.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fair_moe.scores import Scores  # noqa: E402
from fair_moe.vision.cli import vision_plan  # noqa: E402
from fair_moe.vision.data import image_batches, read_image_folder  # noqa: E402
from fair_moe.vision.rewrite import zero_removed, zero_removed_heads  # noqa: E402
from fair_moe.vision.signals import vision_head_scores, vision_scores  # noqa: E402

METHODS = [("tod", "wasserstein"), ("uniform", "wasserstein"), ("global", "wasserstein"), ("uniform", "random"),
           ("tod", "random")]


def accuracy(model, batches) -> float:
    correct = total = 0
    with torch.no_grad():
        for pixels, labels in batches:
            correct += (model(pixel_values=pixels).logits.argmax(-1) == labels).sum().item()
            total += len(labels)
    return correct / total


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(ROOT / "fair_moe" / "data" / "vision_demo"))
    p.add_argument("--images", type=Path, default=ROOT / "bench_out" / "digits")
    p.add_argument("--budgets", default="0.3,0.5")
    p.add_argument("--samples", type=int, default=400)
    p.add_argument("--units", default="neurons", choices=["neurons", "heads"])
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    processor = AutoImageProcessor.from_pretrained(args.model)
    model = AutoModelForImageClassification.from_pretrained(args.model, dtype=torch.float32).eval()
    calib = image_batches(processor, *read_image_folder(args.images / "calib")[:2], args.samples, 32, 0)
    test = image_batches(processor, *read_image_folder(args.images / "test")[:2], 10_000, 128, 0)
    heads = args.units == "heads"
    removal, protection = (vision_head_scores if heads else vision_scores)(model, calib, 10, progress=False)
    width = model.config.num_attention_heads if heads else model.config.intermediate_size
    layers = model.config.num_hidden_layers
    scores = Scores(list(range(layers)), removal, protection, {"model_type": "vit", "width": width})
    print(f"dense test accuracy {accuracy(model, test):.4f} ({sum(len(b[1]) for b in test)} images, "
          f"calibration {sum(len(b[1]) for b in calib)} images)")
    print("\n| budget | method | test accuracy | kept per layer |\n|---|---|---|---|")
    print(f"| - | dense | {accuracy(model, test):.4f} | {' '.join([str(width)] * layers)} |")
    for budget in (float(b) for b in args.budgets.split(",")):
        for allocation, signal in METHODS:
            plan = vision_plan(scores, budget, None, allocation, signal, 1)
            pruned = (zero_removed_heads if heads else zero_removed)(copy.deepcopy(model), plan.kept_experts)
            kept = " ".join(str(v) for v in plan.kept_counts.values())
            print(f"| {budget} | {allocation}+{signal} | {accuracy(pruned, test):.4f} | {kept} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
