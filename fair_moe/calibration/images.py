"""Labelled calibration images from an image folder (one sub-folder per class, the datasets imagefolder layout)."""

from __future__ import annotations

from pathlib import Path

import torch

from fair_moe.calibration import CalibrationBatches
from fair_moe.core.errors import FairMoeError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def read_image_folder(folder: Path) -> tuple[list[Path], list[int], list[str]]:
    """Image paths, their class ids and the class names (sorted sub-folder names)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FairMoeError(f"--calib-images {folder} is not a folder: pass a folder with one sub-folder per class")
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    paths, labels = [], []
    for klass, name in enumerate(classes):
        files = sorted(p for p in (folder / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise FairMoeError(f"--calib-images class folder {folder / name} holds no images")
        paths += files
        labels += [klass] * len(files)
    if len(classes) < 2:
        raise FairMoeError(f"--calib-images {folder} has {len(classes)} class folder(s); the wasserstein signal "
                           "compares classes, so give at least two (one sub-folder per class)")
    return paths, labels, classes


def image_batches(processor, paths: list[Path], labels: list[int], samples: int, batch_size: int,
                  seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Up to ``samples`` images (a seeded draw when there are more) as (pixel_values, labels) batches."""
    from PIL import Image

    order = torch.randperm(len(paths), generator=torch.Generator().manual_seed(seed))[:samples].sort().values.tolist()
    batches = []
    for i in range(0, len(order), batch_size):
        chunk = order[i : i + batch_size]
        images = [Image.open(paths[j]).convert("RGB" if _channels(processor) == 3 else "L") for j in chunk]
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        batches.append((pixels, torch.tensor([labels[j] for j in chunk])))
    return batches


def _channels(processor) -> int:
    mean = getattr(processor, "image_mean", None)
    return len(mean) if isinstance(mean, (list, tuple)) else 3


def folder_batches(processor, folder: Path, samples: int, batch_size: int, seed: int) -> CalibrationBatches:
    """Labelled calibration batches [(labels [B], pixel_values [B, C, H, W])] from an image folder."""
    paths, labels, classes = read_image_folder(folder)
    batches = [(y, x) for x, y in image_batches(processor, paths, labels, samples, batch_size, seed)]
    meta = {"images": sum(len(y) for y, _ in batches), "classes": classes, "seed": seed}
    return CalibrationBatches(batches, len(classes), meta)
