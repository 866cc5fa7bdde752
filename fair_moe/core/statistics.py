"""What one calibration pass leaves behind: per-unit sums from which every signal is computed.

A unit kind fills the fields it can measure (a vision neuron has no routing, so no ``count``); a
removal signal states which fields it needs, so the signals available to a unit kind follow from
what its calibration measures.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import Tensor


@dataclass
class SignalStatistics:
    """Per-unit sums, rows in the order of ``layer_indices`` ([L, n] float64 tensors).

    - ``taylor``: signed Σ over calibration tokens of ⟨∂L/∂y, the unit's contribution to y⟩, which equals
      Σ (∂L/∂W ⊙ W) over the unit's output parameters (docs/METHOD.md §1);
    - ``count``: tokens routed to the unit; ``output_norm``: Σ ‖f(x)‖ and ``gated_norm``: Σ g·‖f(x)‖ over them;
    - ``class_samples(row)``: for layer row ``row``, one [n_c, n] matrix per calibration class holding each
      sample's per-unit value (the distributions the wasserstein signal compares). Unit kinds give an object that
      is also ``merged(others)`` so that passes run on several processes combine (``merge``).
    """

    layer_indices: list[int]
    taylor: Tensor
    num_classes: int
    seed: int
    tokens: int = 0
    count: Tensor | None = None
    output_norm: Tensor | None = None
    gated_norm: Tensor | None = None
    class_samples: Callable[[int], list[Tensor]] | None = field(default=None, repr=False)

    def has(self, name: str) -> bool:
        """Whether the pass measured ``name`` (``class_samples`` also needs two classes or more)."""
        if name == "class_samples":
            return self.class_samples is not None and self.num_classes >= 2
        return getattr(self, name, None) is not None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.taylor.shape)

    @classmethod
    def merge(cls, parts: list[SignalStatistics]) -> SignalStatistics:
        """The statistics of one pass over every part's data: sums added, class distributions pooled (the parts
        come from the same model, layers and seed, each over its own share of the calibration batches)."""
        first = parts[0]

        def total(name):
            values = [getattr(p, name) for p in parts]
            return None if values[0] is None else sum(values[1:], values[0].clone())

        samples = first.class_samples
        if samples is not None and len(parts) > 1:
            samples = samples.merged([p.class_samples for p in parts[1:]])
        return cls(layer_indices=first.layer_indices, taylor=total("taylor"), num_classes=first.num_classes,
                   seed=first.seed, tokens=sum(p.tokens for p in parts), count=total("count"),
                   output_norm=total("output_norm"), gated_norm=total("gated_norm"), class_samples=samples)
