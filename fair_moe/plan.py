"""``PrunePlan``: the one object passed from allocation to rewriting, saved as fair_moe_plan.json."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fair_moe.errors import FairMoeError

PLAN_FILE = "fair_moe_plan.json"


@dataclass
class PrunePlan:
    """Kept expert ids per MoE layer (decoder layer index → sorted original ids) plus how they were chosen.

    ``settings`` records the method (allocation, removal, protection, budget or tolerance, calibration);
    ``alpha`` is α* for ToD plans (None otherwise).
    """

    model_type: str
    num_experts: int
    top_k: int
    kept_experts: dict[int, list[int]]
    settings: dict = field(default_factory=dict)
    alpha: float | None = None
    base_model: str | None = None
    compensation: dict | None = None  # {"kind": "layer-scale", "scales": {layer: s}} folded into the weights
    unit: str = "experts"  # "experts" (MoE, saved as kept_experts) or "units" (vision neurons, saved as kept_units)

    def _compensation(self, kind: str, key: str) -> dict | None:
        """The compensation's per-layer table when it is of ``kind`` (keys back to ints after a JSON round trip)."""
        if not self.compensation or self.compensation.get("kind") != kind:
            return None
        return {int(layer): value for layer, value in self.compensation[key].items()}

    @property
    def layer_scales(self) -> dict[int, float] | None:
        table = self._compensation("layer-scale", "scales")
        return None if table is None else {k: float(v) for k, v in table.items()}

    @property
    def router_temperatures(self) -> dict[int, float] | None:
        table = self._compensation("router-temperature", "temperatures")
        return None if table is None else {k: float(v) for k, v in table.items()}

    @property
    def merges(self) -> dict[int, dict[int, list]] | None:
        table = self._compensation("merge", "merges")
        return None if table is None else {k: {int(t): m for t, m in groups.items()} for k, groups in table.items()}

    @property
    def kept_counts(self) -> dict[int, int]:
        return {layer: len(ids) for layer, ids in sorted(self.kept_experts.items())}

    @property
    def is_uniform(self) -> bool:
        return len(set(self.kept_counts.values())) <= 1

    @property
    def removed_total(self) -> int:
        return sum(self.num_experts - n for n in self.kept_counts.values())

    def to_json(self) -> str:
        from fair_moe import __version__

        data = asdict(self)
        kept = data.pop("kept_experts")
        data[f"kept_{self.unit}"] = {str(k): sorted(v) for k, v in sorted(kept.items())}
        # compensation tables keep int layer / expert keys: json writes them as strings, the properties read them back
        data["kept_counts"] = {str(k): v for k, v in self.kept_counts.items()}
        data["removed_total"] = self.removed_total
        data["fair_moe_version"] = __version__
        return json.dumps(data, indent=2, sort_keys=True)

    def save(self, folder: Path) -> None:
        (Path(folder) / PLAN_FILE).write_text(self.to_json() + "\n")

    @classmethod
    def load(cls, path: Path) -> PrunePlan:
        path = Path(path)
        if path.is_dir():
            path = path / PLAN_FILE
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise FairMoeError(f"cannot read plan {path}: {err}") from err
        return cls(
            model_type=data["model_type"],
            num_experts=data["num_experts"],
            top_k=data["top_k"],
            kept_experts={int(k): list(v) for k, v in data.get("kept_experts", data.get("kept_units", {})).items()},
            settings=data.get("settings", {}),
            alpha=data.get("alpha"),
            base_model=data.get("base_model"),
            compensation=data.get("compensation"),
            unit=data.get("unit", "experts"),
        )
