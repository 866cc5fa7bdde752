"""``PrunePlan``: the one object passed from allocation to rewriting, saved as fair_moe_plan.json."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fair_moe.core.errors import FairMoeError

PLAN_FILE = "fair_moe_plan.json"
COMPENSATION_FILE = "fair_moe_compensation.safetensors"  # tensors a compensation learned (e.g. router rows)
_TENSOR_REF = "tensor:"
# Before 0.2 a compensation's per-layer table was saved under a name of its own.
_LEGACY_TABLES = ("scales", "temperatures", "merges")


@dataclass
class CompensationRecord:
    """What a compensation changes, per layer (``per_layer``: decoder layer → its parameters), and how it was
    fitted (``fit``: windows, losses, steps). Which strategy reads it is ``kind`` (its CLI name)."""

    kind: str
    per_layer: dict[int, Any]
    fit: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        """JSON-ready; tensors appear as ``"tensor:<layer>.<name>"`` references into ``COMPENSATION_FILE``."""
        per_layer = {str(k): _refs(k, v) for k, v in sorted(self.per_layer.items())}
        return {"kind": self.kind, "per_layer": per_layer, **self.fit}

    def tensors(self) -> dict:
        """Every tensor of ``per_layer`` by its reference key (``"<layer>.<name>"``)."""
        found: dict = {}
        for layer, value in self.per_layer.items():
            if isinstance(value, dict):
                found.update({f"{layer}.{name}": t for name, t in value.items() if _is_tensor(t)})
            elif _is_tensor(value):
                found[str(layer)] = value
        return found

    def with_tensors(self, tensors: dict) -> CompensationRecord:
        """The record with its tensor references replaced by ``tensors`` (read from ``COMPENSATION_FILE``)."""
        def resolve(value):
            if isinstance(value, str) and value.startswith(_TENSOR_REF):
                key = value[len(_TENSOR_REF):]
                if key not in tensors:
                    raise FairMoeError(f"{COMPENSATION_FILE} lacks tensor {key!r} that the plan's compensation names")
                return tensors[key]
            if isinstance(value, dict):
                return {k: resolve(v) for k, v in value.items()}
            return value

        return CompensationRecord(self.kind, {k: resolve(v) for k, v in self.per_layer.items()}, self.fit)

    def references_tensors(self) -> bool:
        return any(isinstance(v, str) and v.startswith(_TENSOR_REF) for v in _leaves(self.per_layer))

    @classmethod
    def from_json(cls, data: dict) -> CompensationRecord:
        data = dict(data)
        kind = data.pop("kind")
        table = data.pop("per_layer", None)
        for legacy in _LEGACY_TABLES:
            if table is None and legacy in data:
                table = data.pop(legacy)
        return cls(kind, {int(k): v for k, v in (table or {}).items()}, data)


def _is_tensor(value) -> bool:
    return type(value).__name__ in ("Tensor", "Parameter")


def _refs(layer, value):
    if isinstance(value, dict):
        return {name: f"{_TENSOR_REF}{layer}.{name}" if _is_tensor(t) else t for name, t in value.items()}
    return f"{_TENSOR_REF}{layer}" if _is_tensor(value) else value


def _leaves(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from _leaves(v)
    else:
        yield value


@dataclass
class PrunePlan:
    """Kept unit ids per layer (layer index → sorted original ids) and how they were chosen.

    ``unit`` is the unit kind (``experts``, ``neurons``, ``heads``) and ``width`` the units every layer had.
    ``settings`` records the method (allocation, removal, protection, budget or tolerance, calibration);
    ``alpha`` is α* for ToD plans (None otherwise); ``top_k`` is the router's top_k (experts only).
    ``whole`` lists the layers whose units are kept whole because they are not units at all (layer index → units
    it keeps: DeepSeek-V4's hash-routed MoE layers); they are in no other field, and a plan with whole layers that
    removes units anywhere keeps different counts in different layers.
    """

    model_type: str
    unit: str
    width: int
    kept: dict[int, list[int]]
    settings: dict = field(default_factory=dict)
    alpha: float | None = None
    base_model: str | None = None
    compensation: CompensationRecord | None = None
    top_k: int | None = None
    whole: dict[int, int] = field(default_factory=dict)

    @property
    def kept_counts(self) -> dict[int, int]:
        return {layer: len(ids) for layer, ids in sorted(self.kept.items())}

    @property
    def is_uniform(self) -> bool:
        """Every layer keeps the same number of units, the layers kept whole included."""
        return len(set(self.layer_counts.values())) <= 1

    @property
    def layer_counts(self) -> dict[int, int]:
        """Units every layer keeps, the layers kept whole included, by layer index."""
        return dict(sorted({**self.kept_counts, **self.whole}.items()))

    @property
    def largest_count(self) -> int:
        """The most units any layer keeps (the count a config field holding one number must say)."""
        return max(self.layer_counts.values())

    @property
    def removed_total(self) -> int:
        return sum(self.width - n for n in self.kept_counts.values())

    def removed(self, layer: int) -> list[int]:
        """Removed unit ids of one layer, ascending."""
        return sorted(set(range(self.width)) - set(self.kept[layer]))

    def to_json(self) -> str:
        from fair_moe import __version__

        kept = {str(k): sorted(v) for k, v in sorted(self.kept.items())}
        data: dict[str, Any] = {
            "model_type": self.model_type,
            "unit": self.unit,
            "settings": self.settings,
            "alpha": self.alpha,
            "base_model": self.base_model,
            "compensation": None if self.compensation is None else self.compensation.to_json(),
            "kept_counts": {str(k): v for k, v in self.kept_counts.items()},
            "removed_total": self.removed_total,
            "fair_moe_version": __version__,
        }
        if self.whole:
            data["kept_whole"] = {str(k): v for k, v in sorted(self.whole.items())}
        if self.unit == "experts":  # the names users of the expert pruner read
            data.update(kept_experts=kept, num_experts=self.width, top_k=self.top_k)
        else:
            data.update(kept_units=kept, width=self.width)
        return json.dumps(data, indent=2, sort_keys=True)

    def save(self, folder: Path) -> None:
        """``fair_moe_plan.json``, and ``fair_moe_compensation.safetensors`` when the compensation learned tensors."""
        tensors = self.compensation.tensors() if self.compensation else {}
        if tensors:
            from safetensors.torch import save_file

            save_file({k: t.detach().cpu().contiguous() for k, t in tensors.items()},
                      str(Path(folder) / COMPENSATION_FILE))
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
        try:
            plan = cls.from_dict(data)
        except (KeyError, TypeError, ValueError) as err:
            raise FairMoeError(f"{path} is not a fair_moe plan ({err.__class__.__name__}: {err})") from err
        if plan.compensation is not None and plan.compensation.references_tensors():
            sidecar = path.parent / COMPENSATION_FILE
            if not sidecar.is_file():
                raise FairMoeError(f"{path} names learned tensors in {COMPENSATION_FILE}, which is not beside it")
            from safetensors.torch import load_file

            plan.compensation = plan.compensation.with_tensors(load_file(str(sidecar)))
        return plan

    @classmethod
    def from_dict(cls, data: dict) -> PrunePlan:
        experts = "kept_experts" in data
        unit = data.get("unit", "experts")
        if unit == "units":  # written before 0.2 by the vision path
            unit = "heads" if (data.get("settings") or {}).get("units") == "heads" else "neurons"
        kept = data["kept_experts"] if experts else data["kept_units"]
        compensation = data.get("compensation")
        return cls(
            model_type=data["model_type"],
            unit=unit,
            width=int(data["num_experts"] if "num_experts" in data else data["width"]),
            kept={int(k): [int(i) for i in v] for k, v in kept.items()},
            settings=data.get("settings", {}),
            alpha=data.get("alpha"),
            base_model=data.get("base_model"),
            compensation=None if not compensation else CompensationRecord.from_json(compensation),
            top_k=data.get("top_k") if experts else None,
            whole={int(k): int(v) for k, v in (data.get("kept_whole") or {}).items()},
        )
