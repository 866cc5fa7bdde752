"""What each key of a MoE checkpoint becomes when streamed through a plan (rules of docs/METHOD.md §5).

The adapter says what a key is (router rows, a per-expert tensor, a fused expert tensor); then:

- per-expert keys ``….experts.<j>.…`` of a planned layer: dropped when j was removed, renumbered otherwise
  (kept experts keep their relative order);
- fused expert tensors (expert axis first): sliced along it;
- router tensors whose first axis is the expert count: rows sliced.

A compensation's ``transform(key, tensor)`` sees each of these source tensors whole, before slicing, with
the original expert ids, in the layout of the module tensor it fills (a router stored transposed is handed over as
``[E, hidden]`` and written back transposed); in a quantized checkpoint the key says which weight the tensor
encodes and what it is to that weight (payload, scale, ...), so that a scaling touches the scale and never the
quantized payload.

Every MoE layer of the plan must have its router found and its experts sliced to the planned count; anything
else is an error (and the writer also reloads the result and compares it with the masked original, so a layout
these rules do not cover cannot slip through).
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Callable

import torch

from fair_moe.adapters.base import CheckpointKey, FusedExpertsAdapter
from fair_moe.adapters.structure import expert_index
from fair_moe.checkpoint.quantized import QuantFormat, encoded_weight
from fair_moe.core.errors import FairMoeError
from fair_moe.core.plan import PrunePlan

Transform = Callable[[CheckpointKey, torch.Tensor], torch.Tensor]


class ExpertKeyRewriter:
    """Decides, key by key, what a source tensor becomes in the pruned checkpoint."""

    def __init__(self, plan: PrunePlan, adapter: FusedExpertsAdapter, transform: Transform | None = None,
                 quantized: QuantFormat | None = None, config=None):
        self.plan = plan
        self.adapter = adapter
        # classes a router scores after the routed experts (kept after the kept experts)
        self.tail = adapter.structure(config).router_tail if config is not None else 0
        self.user_transform = transform
        self.quantized = quantized
        self.classify = adapter.key_classifier(config, encoded_weight if quantized is not None else None)
        self.kept = {layer: sorted(ids) for layer, ids in plan.kept.items()}
        self.new_id = {layer: {old: new for new, old in enumerate(ids)} for layer, ids in self.kept.items()}
        self.routers_seen: dict[int, int] = defaultdict(int)
        self.experts_seen: dict[int, set[int]] = defaultdict(set)
        self.fused_seen: dict[int, int] = defaultdict(int)

    def __call__(self, key: str, load: Callable[[], torch.Tensor]) -> tuple[str, torch.Tensor] | None:
        """(new key, tensor) or None to drop; ``load()`` reads the source tensor only when needed."""
        ref = self.classify(key)
        if ref is None or ref.layer not in self.kept:
            return key, load()
        layer = ref.layer
        if ref.part == "experts" and ref.expert is not None:
            if ref.expert >= self.plan.width:  # a class past the routed experts (LongCat's identity experts) stays
                return ref.renumbered(len(self.kept[layer]) + ref.expert - self.plan.width), load()
            if ref.expert not in self.new_id[layer]:
                return None
            self.experts_seen[layer].add(ref.expert)
            new_key = ref.renumbered(self.new_id[layer][ref.expert])
            return new_key, ref.to_disk(self.transform(ref, ref.to_module(load())))
        stored = load()
        tensor = ref.to_module(stored)
        if ref.part == "experts":
            if tensor.shape[0] not in (self.plan.width, self.plan.width + self.tail):
                raise FairMoeError(f"fused expert tensor {key} has first dimension {tensor.shape[0]}, "
                                   f"not the expert count {self.plan.width}")
            self.fused_seen[layer] += 1
            index = expert_index(self.kept[layer], tensor.shape[0], self.plan.width)
            return key, ref.to_disk(self.transform(ref, tensor).index_select(0, index))
        if tensor.dim() <= ref.axis or tensor.shape[ref.axis] not in (self.plan.width, self.plan.width + self.tail):
            return key, stored
        self.routers_seen[layer] += 1
        index = expert_index(self.kept[layer], tensor.shape[ref.axis], self.plan.width)
        return key, ref.to_disk(self.transform(ref, tensor).index_select(ref.axis, index))

    def transform(self, ref: CheckpointKey, tensor: torch.Tensor) -> torch.Tensor:
        """The compensation's change of one source tensor, told what the tensor is in a quantized format."""
        if self.user_transform is None:
            return tensor
        if self.quantized is not None:
            ref = dataclasses.replace(ref, name=encoded_weight(ref.name),
                                      role=self.quantized.role(ref.name, tensor.dtype))
        return self.user_transform(ref, tensor)

    def check_complete(self) -> None:
        for layer, kept in self.kept.items():
            if not self.routers_seen[layer]:
                raise FairMoeError(f"no router weight found for MoE layer {layer} in the source checkpoint"
                                   + (" (a quantized checkpoint must store its routers unquantized)"
                                      if self.quantized is not None else ""))
            if not self.fused_seen[layer] and self.experts_seen[layer] != set(kept):
                raise FairMoeError(f"layer {layer}: found experts {sorted(self.experts_seen[layer])} in the source "
                                   f"checkpoint, the plan keeps {kept}")
