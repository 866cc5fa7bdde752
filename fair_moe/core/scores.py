"""Calibration scores for every unit of every layer, saved as safetensors.

``fair_moe_scores.safetensors`` holds ``removal.<signal> [L, n]`` for every removal signal that was
computed, ``protection.taylor [L, n]``, ``layer_indices [L]``, and in its metadata the unit layout, the
model fingerprint and the calibration settings, so a later ``--scores`` run can re-prune at any budget
without calibrating.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from fair_moe.core.budget import UnitLayout
from fair_moe.core.errors import FairMoeError

if TYPE_CHECKING:
    import torch

SCORES_FILE = "fair_moe_scores.safetensors"


@dataclass
class Scores:
    """Per-unit scores, rows in the order of ``layer_indices`` (layer indices); ``meta["layout"]`` is the
    ``UnitLayout`` they were computed on."""

    layer_indices: list[int]
    removal: dict[str, torch.Tensor]
    protection: torch.Tensor
    meta: dict = field(default_factory=dict)
    selection_ids: torch.Tensor | None = None  # [n, seq] calibration-source windows not used for the scores
    calibration_ids: torch.Tensor | None = None  # [n, seq] the windows the scores were computed from

    @property
    def layout(self) -> UnitLayout:
        """The unit layout the scores belong to (also from files written before 0.2)."""
        if "layout" in self.meta:
            return UnitLayout.from_meta(self.meta["layout"])
        meta, layers = self.meta, tuple(self.layer_indices)
        if "width" in meta:  # vision scores before 0.2
            unit = "heads" if meta.get("unit") == "attention_heads" else "neurons"
            return UnitLayout(unit, int(meta["width"]), layers, 1, "a layer cannot be emptied")
        top_k = int(meta["top_k"])
        return UnitLayout("experts", int(meta["num_experts"]), layers, top_k, f"the router selects top_k={top_k}",
                          int(meta.get("groups", 1)), int(meta.get("min_per_group", 0)), top_k)

    def calibration_subset(self, n: int) -> torch.Tensor | None:
        """Up to ``n`` calibration windows spread evenly over all of them (they are stored source by source,
        so the first n would all come from one source)."""
        ids = self.calibration_ids
        if ids is None or len(ids) == 0:
            return None
        if len(ids) <= n:
            return ids
        import torch

        return ids[torch.linspace(0, len(ids) - 1, n).round().long()]

    def check_finite(self) -> None:
        import torch

        for name, tensor in [*self.removal.items(), ("taylor", self.protection)]:
            if not torch.isfinite(tensor).all():
                bad = (~torch.isfinite(tensor)).nonzero()[0].tolist()
                raise FairMoeError(
                    f"score {name!r} holds NaN or inf (first at layer row {bad[0]}, unit {bad[1]}); the model or "
                    "the calibration data produced non-finite activations: "
                    "try --dtype float32 or other --calib-file text"
                )

    def save(self, path: Path) -> None:
        import torch
        from safetensors.torch import save_file

        tensors = {f"removal.{k}": v.double().contiguous() for k, v in self.removal.items()}
        tensors["protection.taylor"] = self.protection.double().contiguous()
        tensors["layer_indices"] = torch.tensor(self.layer_indices, dtype=torch.int64)
        for name in ("selection_ids", "calibration_ids"):
            ids = getattr(self, name)
            if ids is not None and len(ids):
                tensors[name] = ids.to(torch.int64).contiguous()
        save_file(tensors, str(path), metadata={"fair_moe": json.dumps(self.meta, sort_keys=True)})

    @classmethod
    def load(cls, path: Path) -> Scores:
        path = Path(path)
        if path.is_dir():
            path = path / SCORES_FILE
        from safetensors import SafetensorError
        from safetensors.torch import load_file, safe_open

        if not path.is_file():
            raise FairMoeError(
                f"scores file {path} does not exist: pass the {SCORES_FILE} of an earlier run to --scores"
            )
        try:
            tensors = load_file(str(path))
            with safe_open(str(path), "pt") as f:
                meta = json.loads((f.metadata() or {}).get("fair_moe", "{}"))
        except (SafetensorError, OSError, ValueError) as err:
            raise FairMoeError(f"--scores {path} is not a fair_moe scores file: {err}") from err
        if "protection.taylor" not in tensors or "layer_indices" not in tensors:
            raise FairMoeError(f"--scores {path} is not a fair_moe scores file (no protection.taylor / layer_indices)")
        removal = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("removal.")}
        scores = cls(tensors["layer_indices"].tolist(), removal, tensors["protection.taylor"], meta,
                     tensors.get("selection_ids"), tensors.get("calibration_ids"))
        try:
            scores.check_finite()
        except FairMoeError as err:
            raise FairMoeError(f"--scores {path} is damaged: {str(err).split(';')[0]}; calibrate again without "
                               "--scores") from err
        return scores


def model_fingerprint(config, shapes: dict[str, tuple[int, ...]]) -> str:
    """Hash of the config (minus bookkeeping fields) and every tensor's name and shape."""
    cfg = config.to_dict()
    for key in ("_name_or_path", "transformers_version", "dtype", "torch_dtype", "architectures", "_commit_hash"):
        cfg.pop(key, None)
    blob = json.dumps(
        {"config": cfg, "shapes": sorted((k, list(v)) for k, v in shapes.items())}, sort_keys=True, default=str
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
