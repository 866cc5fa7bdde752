"""Typed settings of a prune run: built once (by the CLI or the API), validated once, before any work.

``PruneSettings.validate`` checks everything that needs no model: method names against the registries,
the budget against the allocation rule, the output folder, calibration paths. What needs the config (the
budget against top_k and groups) is checked next, still before any weights are loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fair_moe.core.budget import Budget
from fair_moe.core.errors import FairMoeError
from fair_moe.strategies import ALLOCATIONS, AUTO, COMPENSATIONS, LAYOUTS, PROTECTION_SIGNALS, REMOVAL_SIGNALS
from fair_moe.strategies.compensations import options_for
from fair_moe.units import UNIT_KINDS, UnitKind


@dataclass(frozen=True)
class CalibrationSettings:
    """Where calibration data comes from and how much of it: text files (one class each), a dataset (one
    class per config), or an image folder (one class per sub-folder); none of them → the bundled sample."""

    files: tuple[Path, ...] = ()
    datasets: tuple[str, ...] = ()  # --calib-dataset specs: NAME[,config=C][,split=S][,field=F][,samples=N]…
    dataset_configs: tuple[str | None, ...] = (None,)  # --calib-config: one class per config of one dataset
    split: str = "train"
    text_field: str = "text"
    images: Path | None = None
    samples: int = 128
    seq_len: int = 512
    batch_size: int = 8
    seed: int = 0

    def dataset_specs(self) -> list:
        """One DatasetSpec per calibration class from --calib-dataset (and --calib-config)."""
        from dataclasses import replace as _replace

        from fair_moe.calibration.text import DatasetSpec

        specs = [DatasetSpec.parse(text, self.split, self.text_field) for text in self.datasets]
        if len(specs) == 1 and specs[0].config is None and self.dataset_configs != (None,):
            specs = [_replace(specs[0], config=config) for config in self.dataset_configs]
        return specs

    def validate(self) -> None:
        if self.files and self.datasets:
            raise FairMoeError("pass --calib-file or --calib-dataset, not both")
        if self.dataset_configs != (None,) and len(self.datasets) != 1:
            raise FairMoeError("--calib-config goes with one --calib-dataset (or write config= in each spec)")
        self.dataset_specs()
        if self.samples < 1 or self.batch_size < 1 or self.seq_len < 2:
            raise FairMoeError("--samples, --batch-size must be ≥ 1 and --seq-len ≥ 2")
        for path in self.files:
            if not Path(path).is_file():
                raise FairMoeError(f"calibration file {path} does not exist: check --calib-file")

    @property
    def num_text_classes(self) -> int | None:
        """Calibration classes known from the settings alone (None: the bundled sample or a dataset folder)."""
        if self.files:
            return len(self.files)
        if self.datasets:
            return len(self.dataset_specs())
        return None


@dataclass(frozen=True)
class MethodSettings:
    """How units are chosen. ``removal`` None means the unit kind's default."""

    units: str = "experts"
    allocation: str = AUTO
    removal: str | None = None
    protection: str = "taylor"
    compensation: str = AUTO
    min_keep: int | None = None
    compensation_options: tuple[str, ...] = ()  # NAME=VALUE pairs for the compensation (--compensate-option)
    layout: str = "any"  # "stock": every layer keeps the same count (--layout)

    def validate(self, budgets: tuple[Budget, ...]) -> UnitKind:
        unit = UNIT_KINDS.get(self.units)
        if self.allocation != AUTO:
            ALLOCATIONS.get(self.allocation)
        if self.compensation != AUTO:
            COMPENSATIONS.get(self.compensation)
        PROTECTION_SIGNALS.get(self.protection)
        removal = REMOVAL_SIGNALS.get(self.removal_for(unit))
        if not removal.available(unit.measures):
            offered = REMOVAL_SIGNALS.names(lambda s: s.available(unit.measures))
            raise FairMoeError(f"--removal {removal.name} is not available for --units {unit.name} (it needs "
                               f"{removal.needs()}, which the calibration of {unit.noun} does not give): use one of "
                               f"{', '.join(offered)}")
        if self.layout not in LAYOUTS:
            raise FairMoeError(f"--layout {self.layout!r} is unknown: use one of {', '.join(LAYOUTS)}")
        allocation = self.allocation_for(unit)
        if self.layout == "stock" and allocation != AUTO and not ALLOCATIONS.get(allocation).even_counts:
            raise FairMoeError(f"--allocation {allocation} gives layers different counts, which --layout stock "
                               f"forbids: use --allocation {' or '.join(ALLOCATIONS.names(lambda r: r.even_counts))} "
                               "or auto, or --layout any")
        if any(b.tolerance is not None for b in budgets):
            rule = ALLOCATIONS.get(self.allocation_for(unit)) if self.allocation_for(unit) != AUTO else None
            if rule is None or not rule.supports_tolerance:
                raise FairMoeError("--tolerance sets ToD's α directly: use it with --allocation "
                                   f"{' / '.join(ALLOCATIONS.names(lambda r: r.supports_tolerance))}, or pass --budget")
        fitted = ([c for c in COMPENSATIONS if c.auto_candidate] if self.compensation == AUTO
                  else [COMPENSATIONS.get(self.compensation)])
        for pair in self.compensation_options:
            if not any(pair.partition("=")[0].strip() in c.options for c in fitted):
                (fitted[0] if fitted else COMPENSATIONS.get("none")).parse_options((pair,))  # raises, naming options
        for compensation in fitted:
            options_for(compensation, self.compensation_options)  # values parse
        if self.compensation not in (AUTO, "none") and not unit.takes_compensation:
            raise FairMoeError(f"--compensate {self.compensation} needs routed experts: use --compensate none with "
                               f"--units {unit.name}")
        return unit

    def removal_for(self, unit: UnitKind) -> str:
        return self.removal or unit.default_removal

    def allocation_for(self, unit: UnitKind) -> str:
        """``auto`` judges candidates on held-out text; a unit kind without it uses its own default."""
        if self.allocation == AUTO and unit.default_allocation != AUTO:
            return unit.default_allocation
        return self.allocation


@dataclass(frozen=True)
class RuntimeSettings:
    """Where and how the model runs."""

    device: str = "auto"
    dtype: str = "auto"
    device_map: str | None = None
    max_memory: str | None = None
    offload_folder: Path | None = None
    layerwise: bool = False
    trust_remote_code: bool = False
    progress: bool = True

    def validate(self) -> None:
        if not self.device_map and (self.max_memory or self.offload_folder):
            raise FairMoeError("--max-memory and --offload-folder need --device-map (e.g. --device-map auto)")

    def placement(self) -> dict:
        """from_pretrained keyword arguments for accelerate placement (empty without --device-map)."""
        from fair_moe.checkpoint.loading import parse_max_memory

        if not self.device_map:
            return {}
        kwargs: dict = {"device_map": self.device_map}
        if self.max_memory:
            kwargs["max_memory"] = parse_max_memory(self.max_memory)
        if self.offload_folder:
            kwargs["offload_folder"] = str(self.offload_folder)
        return kwargs


@dataclass(frozen=True)
class OutputSettings:
    """What is written and checked, and where."""

    out: Path | None = None
    overwrite: bool = False
    verify: bool = True
    stream: bool = True
    dequantize: bool = False  # a quantized source is written dequantised instead of in its own format
    dry_run: bool = False
    ppl_files: tuple[Path, ...] = ()
    push_to_hub: str | None = None
    private: bool = False
    base_model: str | None = None  # the Hub id a local --model folder holds, for the card's base_model
    recipe: dict | None = None  # the command-line settings that reproduce the run, written as fair_moe_recipe.yaml

    def validate(self, multi_budget: bool) -> None:
        from fair_moe.checkpoint.atomic import check_output_dir

        if self.out is None and not self.dry_run:
            raise FairMoeError("--out is required: the folder the pruned checkpoint is written to")
        if self.out is not None:
            check_output_dir(self.out, self.overwrite)
        for path in self.ppl_files:
            if not Path(path).is_file():
                raise FairMoeError(f"--ppl-file {path} does not exist")
        if self.push_to_hub and multi_budget:
            raise FairMoeError("--push-to-hub takes one budget: push each OUT/budget-B folder with "
                               "python -m fair_moe.push")


@dataclass(frozen=True)
class PruneSettings:
    """Everything one ``fair_moe.prune`` run needs."""

    model: str
    budgets: tuple[Budget, ...]
    calibration: CalibrationSettings = field(default_factory=CalibrationSettings)
    method: MethodSettings = field(default_factory=MethodSettings)
    runtime: RuntimeSettings = field(default_factory=RuntimeSettings)
    output: OutputSettings = field(default_factory=OutputSettings)
    scores: Path | None = None
    plan: Path | None = None  # a saved fair_moe_plan.json to apply as it is (no calibration, no choosing)

    def check_source_untouched(self) -> None:
        """Nothing fair_moe writes (--out, every OUT/budget-B inside it, --offload-folder) may be the source
        folder, lie inside it or contain it; symlinks are followed."""
        from fair_moe.checkpoint.atomic import check_apart

        source = Path(self.model).expanduser()
        if not source.is_dir():
            return  # a Hub id (its download cache is not the user's folder) or a bare config for --dry-run
        if self.output.out is not None:
            check_apart(source, self.output.out, "--out")
        if self.runtime.offload_folder is not None:
            check_apart(source, self.runtime.offload_folder, "--offload-folder")

    def validate(self) -> UnitKind:
        """Every check that needs no model; returns the unit kind."""
        if not self.model:
            raise FairMoeError("--model is required (a checkpoint folder or Hub id)")
        if self.plan is not None:
            if self.budgets:
                raise FairMoeError("--plan fixes what is removed: drop --budget / --tolerance")
            if not Path(self.plan).exists():
                raise FairMoeError(f"--plan {self.plan} does not exist: pass the fair_moe_plan.json of an earlier run")
        elif not self.budgets:
            raise FairMoeError("pass --budget FRACTION (e.g. 0.25) or --tolerance ALPHA (or --plan PLAN.json)")
        unit = self.method.validate(self.budgets)
        if unit.data == "images" and self.calibration.images is None:
            raise FairMoeError(f"--units {unit.name} calibrates on images: pass --calib-images DIR")
        if unit.data == "text" and self.calibration.images is not None:
            raise FairMoeError(f"--calib-images is for vision units; --units {unit.name} calibrates on text")
        if len(self.budgets) > 1 and unit.data == "images":
            raise FairMoeError("the vision path takes one --budget at a time")
        self.check_source_untouched()  # first: the message must say it is the source, not merely "not empty"
        self.output.validate(multi_budget=len(self.budgets) > 1)
        if not self.output.dry_run and self.plan is None:
            if self.scores is None:
                self.calibration.validate()
                removal = self.method.removal_for(unit)
                classes = self.calibration.num_text_classes
                if unit.data == "text" and removal == "wasserstein" and classes is not None and classes < 2:
                    raise FairMoeError("--removal wasserstein needs at least two calibration classes: pass "
                                       "--calib-file twice or several comma-separated --calib-config values")
        if not self.output.dry_run:
            self.runtime.validate()
        return unit
