"""What a unit kind provides (after Torch-Pruning's split of *what* is pruned from *how* it is chosen).

A unit kind knows where its units live in a model and everything that follows from that: the layout a
budget is checked against, one calibration pass that measures every unit (``SignalStatistics``), the
masked reference the pruned model must equal, slicing in memory, the modeling file for uneven plans,
and the probe used to verify a written checkpoint. Allocation, the writer, the verifier and the model
card are shared by every kind.

Kind modules import torch only inside methods, so that listing the kinds for ``--help`` stays fast.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fair_moe.core.registry import Registry

if TYPE_CHECKING:
    import torch
    from torch import nn

    from fair_moe.calibration import CalibrationBatches
    from fair_moe.checkpoint.verify import ByParts
    from fair_moe.core.budget import UnitLayout
    from fair_moe.core.plan import PrunePlan
    from fair_moe.core.statistics import SignalStatistics


class UnitKind(ABC):
    """One kind of prunable unit. Class attributes are the facts the rest of fair_moe reads."""

    name: str  # the --units value
    measures: tuple[str, ...]  # the SignalStatistics fields its calibration fills (which signals it offers)
    description: str  # one line for --help and the docs
    noun: str  # what the card and messages call the units ("routed experts")
    data: str  # the calibration data it takes: "text" or "images"
    auto_class: str  # transformers Auto class that loads the model
    processor_class: str  # transformers Auto class of the tokenizer / image processor
    pipeline_tag: str  # Hub pipeline tag of the pruned model
    card_tags: tuple[str, ...] = ()  # Hub tags beside "pruned" and "fair-moe"
    removal_means: str  # how the reference treats a removed unit, for the model card
    uneven_class: str  # the class an uneven checkpoint's modeling file defines (its config's architectures)
    default_removal: str  # removal signal when --removal is not given
    default_allocation: str  # allocation when --allocation is left at auto and the kind has no model-judged auto
    takes_compensation: bool = False  # whether compensations (which need routing) apply
    streamable: bool = False  # whether the checkpoint can be rewritten shard by shard
    exact_tolerance: float = 1e-3  # largest |Δoutput| a float32 round trip may show

    @abstractmethod
    def check_config(self, config) -> None:
        """A FairMoeError when this kind does not apply to the model (says what was looked for)."""

    @abstractmethod
    def layout(self, config) -> UnitLayout:
        """Layers, width and the least a layer may keep, from the config alone."""

    @abstractmethod
    def collect(self, model: nn.Module, data: CalibrationBatches, seed: int, layerwise: bool,
                progress: bool) -> SignalStatistics:
        """One calibration pass measuring every unit."""

    @abstractmethod
    def masked(self, model: nn.Module, kept: dict[int, list[int]]) -> contextlib.AbstractContextManager:
        """The reference inside the block: the model with every unit not in ``kept`` removed, computed on the
        original weights (restored on exit)."""

    @abstractmethod
    def apply(self, model: nn.Module, plan: PrunePlan) -> None:
        """Slice the model in place to the plan and update its config."""

    @abstractmethod
    def save(self, model: nn.Module, folder: Path, processor: Any, dtype: torch.dtype | None) -> None:
        """Write a sliced model (weights, config, processor, modeling file for uneven plans)."""

    @abstractmethod
    def probe(self, model: nn.Module, data: CalibrationBatches | None) -> dict:
        """Inputs on which a written checkpoint is compared with the reference."""

    def outputs(self, model: nn.Module, inputs: dict) -> torch.Tensor:
        """The model's logits on ``inputs``, float32 on the CPU."""
        import torch

        from fair_moe.metrics import execution_device

        device = execution_device(model)
        with torch.no_grad():
            out = model(**{k: v.to(device) for k, v in inputs.items()}, **self.forward_kwargs)
        return out.logits.float().cpu()

    forward_kwargs: dict = {}

    def routing_trace(self, model: nn.Module, inputs: dict, kept: dict[int, list[int]],
                      reference: Callable[[], contextlib.AbstractContextManager]) -> Any | None:
        """For kinds whose units are chosen per token: the reference's forward on ``inputs`` (``reference()``
        enters it) with what ``by_parts`` needs; its ``logits`` are the reference outputs. None by default: the
        written checkpoint is compared on outputs alone."""
        return None

    def by_parts(self, reloaded: nn.Module, inputs: dict, plan: PrunePlan, trace: Any) -> ByParts:
        """The reloaded checkpoint checked in parts that ties of its routing cannot fail (kinds with a
        ``routing_trace``)."""
        raise NotImplementedError(f"{self.name} checkpoints are compared on outputs alone")

    def verify_saved(self, folder: Path, plan: PrunePlan, config) -> None:  # noqa: B027 - optional check
        """Checks of the written files beyond the reload (key counts); none by default."""

    def auto_class_for(self, config) -> str:
        """The transformers Auto class a checkpoint of ``config`` loads with."""
        return self.auto_class

    def output_bytes(self, model: nn.Module, plan: PrunePlan, save_dtype) -> int:
        """About how many bytes the pruned weights take on disk; by default the dense model's (an upper bound)."""
        import torch

        size = torch.finfo(save_dtype).bits // 8 if save_dtype is not None and save_dtype.is_floating_point else 4
        return sum(t.numel() * (size if t.is_floating_point() else t.element_size())
                   for t in model.state_dict().values())

    def stream(self, model: nn.Module, plan: PrunePlan, source: Path, folder: Path, transform, save_dtype,
               progress: bool, max_shard_bytes: int = 2 * 2**30, quantized=None) -> dict:
        """Rewrite a local checkpoint's weights shard by shard (kinds with ``streamable``); the writer adds the
        config (``pruned_config``) and the side files. ``quantized`` is the source's ``QuantFormat`` (None when
        it is not quantized)."""
        raise NotImplementedError(f"{self.name} checkpoints are rewritten in memory")

    def pruned_config(self, model: nn.Module, plan: PrunePlan):
        """The config of the pruned checkpoint, as a copy (kinds with ``streamable``)."""
        raise NotImplementedError(f"{self.name} checkpoints are rewritten in memory")

    def summary_line(self, config, layout: UnitLayout) -> str:
        """One line saying what the model holds, printed before any work."""
        return f"model_type {config.model_type}: {layout.num_layers} layers × {layout.width} {self.noun}"

    def describe(self, config, layout: UnitLayout, budgets: tuple, dtype, batch_tokens: int,
                 trust_remote_code: bool) -> list[str]:
        """``--dry-run``'s layout and size report beyond the summary line (nothing by default)."""
        return []


UNIT_KINDS: Registry[UnitKind] = Registry("unit kind", "--units")
MODELING_FILE = "modeling_fair_moe.py"  # the per-layer modeling file an uneven checkpoint carries


def modeling_file(template, cls: type) -> str:
    """The source of a modeling template module, its base class pointed at ``cls`` through the public
    ``transformers`` name when there is one (a re-pruned uneven checkpoint points at the stock class again)."""
    import inspect
    import re

    import transformers

    if getattr(cls, "__module__", "").endswith("modeling_fair_moe"):
        cls = cls.__mro__[1]
    path = "transformers" if getattr(transformers, cls.__name__, None) is cls else cls.__module__
    line = f"from {path} import {cls.__name__} as FairMoeBase  # fair_moe:base"
    return re.sub(r"^from .* as FairMoeBase  # fair_moe:base$", line, inspect.getsource(template), count=1,
                  flags=re.M)


def keep_architectures(folder: Path, architectures: list[str]) -> None:
    """save_pretrained writes the Python class's name; an uneven checkpoint names its own class instead, so that
    a loader ignoring ``auto_map`` (vLLM, SGLang, TGI) does not take it for the stock architecture."""
    import json

    path = Path(folder) / "config.json"
    data = json.loads(path.read_text())
    data["architectures"] = architectures
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
