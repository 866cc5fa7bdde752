"""Accuracy of the vision demo ViT before and after pruning MLP neurons: tod vs. uniform vs. global vs. random.

    python scripts/train_vision_demo.py --images-out bench_out/digits   # once: the calib/ and test/ folders
    python scripts/bench_vision.py
    python scripts/bench_vision.py --units heads --budgets 0.25,0.5

One calibration pass over the calibration split (wasserstein U + Taylor R); every plan is evaluated on
the test split through the zeroed-neuron reference, which the tests prove equal to the rewritten model.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fair_moe.calibration.images import folder_batches, image_batches, read_image_folder  # noqa: E402
from fair_moe.core.budget import Budget  # noqa: E402
from fair_moe.strategies.planning import make_plan  # noqa: E402
from fair_moe.units import UNIT_KINDS  # noqa: E402
from fair_moe.workflow.scoring import score  # noqa: E402

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
    unit = UNIT_KINDS.get(args.units)
    calib = folder_batches(processor, args.images / "calib", args.samples, 32, 0)
    test = image_batches(processor, *read_image_folder(args.images / "test")[:2], 10_000, 128, 0)
    scores = score(model, unit, calib, progress=False)
    width, layers = scores.layout.width, scores.layout.num_layers
    print(f"dense test accuracy {accuracy(model, test):.4f} ({sum(len(b[1]) for b in test)} images, "
          f"calibration {calib.meta['images']} images)")
    print("\n| budget | method | test accuracy | kept per layer |\n|---|---|---|---|")
    print(f"| - | dense | {accuracy(model, test):.4f} | {' '.join([str(width)] * layers)} |")
    for budget in (float(b) for b in args.budgets.split(",")):
        for allocation, signal in METHODS:
            plan = make_plan(scores, Budget(budget), allocation, signal)
            with unit.masked(model, plan.kept):
                correct = accuracy(model, test)
            kept = " ".join(str(v) for v in plan.kept_counts.values())
            print(f"| {budget} | {allocation}+{signal} | {correct:.4f} | {kept} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
