"""Train the small ViT fair_moe ships for its vision path, on the 8×8 digits that scikit-learn carries.

    python scripts/train_vision_demo.py                               # -> fair_moe/data/vision_demo
    python scripts/train_vision_demo.py --images-out bench_out/digits # also write calib/ and test/ image folders

The 1,797 digits are split by a fixed seed into train (60 %), calibration (20 %) and test (20 %);
only the training part is trained on. ``--images-out`` writes the calibration and test parts as
image folders (one sub-folder per class), the layout ``--calib-images`` expects.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def digits_split(seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{"train" | "calib" | "test": (uint8 images [n, 8, 8], labels [n])}."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images * (255 / 16)).round().astype(np.uint8)
    order = np.random.default_rng(seed).permutation(len(images))
    a, b = int(0.6 * len(order)), int(0.8 * len(order))
    parts = {"train": order[:a], "calib": order[a:b], "test": order[b:]}
    return {name: (images[idx], digits.target[idx]) for name, idx in parts.items()}


def write_image_folder(folder: Path, images: np.ndarray, labels: np.ndarray) -> None:
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        target = folder / f"digit_{label}"
        target.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image, mode="L").convert("RGB").save(target / f"{i:04d}.png")


def processor():
    from transformers import ViTImageProcessor

    return ViTImageProcessor(do_resize=True, size={"height": 8, "width": 8}, do_rescale=True, rescale_factor=1 / 255,
                             do_normalize=True, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])


def to_pixels(images: np.ndarray) -> torch.Tensor:
    """[n, 8, 8] uint8 → normalised pixel values [n, 3, 8, 8], exactly what the processor produces."""
    x = torch.tensor(images, dtype=torch.float32) / 255
    return ((x - 0.5) / 0.5)[:, None].expand(-1, 3, -1, -1).contiguous()


def accuracy(model, images: np.ndarray, labels: np.ndarray) -> float:
    with torch.no_grad():
        logits = model(pixel_values=to_pixels(images)).logits
    return float((logits.argmax(-1).numpy() == labels).mean())


def main(argv: list[str] | None = None) -> int:
    from transformers import ViTConfig, ViTForImageClassification

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "fair_moe" / "data" / "vision_demo")
    p.add_argument("--images-out", type=Path)
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(2)
    t0 = time.time()
    data = digits_split(args.seed)
    config = ViTConfig(image_size=8, patch_size=2, num_channels=3, hidden_size=64, num_hidden_layers=4,
                       num_attention_heads=4, intermediate_size=128, num_labels=10, hidden_dropout_prob=0.0,
                       id2label={i: f"digit_{i}" for i in range(10)}, label2id={f"digit_{i}": i for i in range(10)})
    model = ViTForImageClassification(config)
    x, y = to_pixels(data["train"][0]), torch.tensor(data["train"][1])
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    steps = args.epochs * ((len(x) + 63) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    gen = torch.Generator().manual_seed(args.seed)
    model.train()
    for epoch in range(args.epochs):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), 64):
            idx = perm[i : i + 64]
            loss = model(pixel_values=x[idx], labels=y[idx]).loss
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad()
        if epoch % 10 == 0 or epoch == args.epochs - 1:
            print(f"epoch {epoch:3d} loss {loss.item():.3f}", flush=True)
    model.eval()
    acc = {name: accuracy(model, *data[name]) for name in ("train", "calib", "test")}
    print("accuracy", acc, f"{time.time() - t0:.0f} s")
    model.save_pretrained(args.out)
    processor().save_pretrained(args.out)
    (args.out / "TRAINING.md").write_text(
        f"# Vision demo model (vit)\n\nTrained by `python scripts/train_vision_demo.py` in {time.time() - t0:.0f} s on "
        f"2 CPU cores: {args.epochs} epochs on 60 % of scikit-learn's 8×8 digits (seed {args.seed}); 20 % is the "
        "calibration split, 20 % the test split.\n\n| split | accuracy |\n|---|---|\n"
        + "".join(f"| {k} | {v:.4f} |\n" for k, v in acc.items())
    )
    if args.images_out:
        for name in ("calib", "test"):
            write_image_folder(args.images_out / name, *data[name])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
