"""What a checkpoint key on disk is in the module tree, read with transformers' own conversion mapping.

transformers 5.x loads most MoE checkpoints through a conversion mapping (``conversion_mapping.py``): per-expert keys
``….experts.<j>.gate_proj.weight`` are stacked into the fused ``experts.gate_up_proj``, and many families rename
on the way (``mlp.gate.expert_bias`` → ``mlp.gate.e_score_correction_bias``, ``experts.fc1.weight`` →
``experts.gate_up_proj``, a block called ``moe`` on disk and ``mlp`` in the model). ``KeyMap`` applies the very
transforms the model's loader applies to one key and says which module tensor it fills and, for a per-expert key,
which expert it is (the digits the converter's ``*`` stands for), so the streaming rewriter needs no key format of
its own per family.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class MappedKey:
    """``target``: the module tensor a disk key fills (its path in the model); ``expert``: the expert id of a
    per-expert key and ``span`` where those digits are in the disk key (None for a key that is not per-expert);
    ``transposes``: the axis swaps the loader applies, in order, to make the module tensor of the disk tensor (a
    router stored ``[hidden, E]`` for a module weight ``[E, hidden]``)."""

    target: str
    expert: int | None = None
    span: tuple[int, int] | None = None
    transposes: tuple[tuple[int, int], ...] = ()


class KeyMap:
    """Disk key → module tensor, through the conversion mapping transformers uses to load ``model``'s class."""

    def __init__(self, model: nn.Module):
        try:
            from transformers.conversion_mapping import get_model_conversion_mapping
            from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
        except ImportError:  # a transformers without conversion mappings: disk keys are the module names
            self._rename = None
            self.renamings = self.converters = []
        else:
            transforms = get_model_conversion_mapping(model)
            self.renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
            self.converters = [t for t in transforms if isinstance(t, WeightConverter)]
            self._rename = rename_source_key
        self.prefix = getattr(model, "base_model_prefix", None) or None
        self.module_keys = dict.fromkeys(model.state_dict(keep_vars=True), True)

    def map(self, key: str) -> MappedKey:
        """The module tensor ``key`` fills, and its expert id when it is one expert's slice of a fused tensor."""
        if self._rename is None:
            return MappedKey(key)
        target, pattern = self._rename(key, self.renamings, self.converters, self.prefix, self.module_keys)
        if pattern is None:
            return MappedKey(target)
        transposes = self._transposes(pattern)
        if "*" not in pattern:
            return MappedKey(target, transposes=transposes)
        # source patterns are regular expressions in which ``*`` stands for the expert id
        found = re.search(pattern.replace("*", r"(\d+)"), key)
        if found is None:
            return MappedKey(target, transposes=transposes)
        last = found.lastindex  # the expert id is the last wildcard (``experts.*.…``)
        return MappedKey(target, int(found.group(last)), found.span(last), transposes)

    def _transposes(self, pattern: str) -> tuple[tuple[int, int], ...]:
        """The axis swaps of the one-to-one converter whose source is ``pattern``, when all it does is swap axes
        (``()`` otherwise: the key is then read in the layout it is stored in)."""
        from transformers.core_model_loading import Transpose

        for converter in self.converters:
            if pattern not in converter.source_patterns:
                continue
            if len(converter.source_patterns) != 1 or len(converter.target_patterns) != 1:
                return ()
            if not all(type(op) is Transpose and not op.check_dims for op in converter.operations):
                return ()
            return tuple((op.dim0, op.dim1) for op in converter.operations)
        return ()
