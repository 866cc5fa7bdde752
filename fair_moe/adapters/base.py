"""What fair_moe needs to know about an MoE model: its blocks (found from the module tree) and its checkpoint keys.

An adapter serves one ``config.model_type``. Where the model's routed experts are, which tensors carry the expert
axis, which attributes and config fields hold the expert count, the router's top-k and its expert groups are
found on the model itself (``structure.discover``, on a meta-device copy built from the config, cached); nothing
about routing is re-implemented: the masked reference runs each router's own code with the removed experts'
logits and selection scores at -inf (``units/experts/routing.py``). What stays per family is what the module
tree cannot say: a checkpoint key format that differs from the module names (GraniteMoE's ``input_linear``),
or a reason the family cannot be pruned although its structure looks like one that can.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from fair_moe.adapters.keymap import KeyMap
from fair_moe.adapters.structure import (
    OTHER_TOWERS,
    TOP_K,
    MoEStructure,
    Unsupported,
    auto_class_name,
    discover,
    is_selection_bias,
    meta_model,
    tensor_at,
    text_config,
)
from fair_moe.core.errors import FairMoeError

# The key formats save_pretrained writes for the fused-experts families (the original per-expert format).
LAYER_KEY = re.compile(r"^(?P<prefix>.*?layers\.)(?P<layer>\d+)\.(?P<rest>.+)$")
PER_EXPERT = re.compile(r"^(?P<head>(?:.*\.)?experts\.)(?P<expert>\d+)\.(?P<rest>.+)$")
FUSED_EXPERTS = re.compile(r"^(?:.*\.)?experts\.(?P<name>[A-Za-z_]\w*)$")
ROUTER_KEY = re.compile(r"^(?:.*\.)?(?:gate|router)(?:\.layer)?\.(?P<name>weight|bias|e_score_correction_bias)$")
DOWN_PROJECTION = re.compile(r"(?:^|\.)(?:down_proj|w2|output_linear)(?:\.weight|_weight|\.bias|_bias)?$")


@dataclass(frozen=True)
class CheckpointKey:
    """What one checkpoint tensor is to the rewriter.

    ``part`` is ``router`` (rows are experts) or ``experts``; ``name`` the tensor's name within the part
    (``gate.weight``, ``gate.e_score_correction_bias``, ``expert_bias`` … relative to the MoE block for the router
    part; ``down_proj.weight``, ``gate_up_proj`` … for experts); ``expert`` the expert id of a per-expert key, None
    for a fused tensor whose first axis is the expert axis; ``axis`` the expert axis of a router tensor. In a
    quantized checkpoint ``name`` is the weight the tensor encodes and ``role`` what the tensor is to it (payload,
    scale, exponent, auxiliary; ``fair_moe.checkpoint.quantized``); ``role`` is None for a plain tensor. ``target`` is
    the module tensor the key fills (``down_proj``, ``gate.e_score_correction_bias``), whatever the disk name;
    ``transposes`` the axis swaps that put the disk tensor in the module tensor's layout (``to_module`` /
    ``to_disk``); ``axis`` is an axis of the module tensor.
    """

    key: str
    layer: int
    part: str
    name: str
    expert: int | None = None
    prefix: str = ""
    suffix: str = ""
    role: str | None = None
    axis: int = 0
    target: str | None = None
    transposes: tuple[tuple[int, int], ...] = ()

    def renumbered(self, new_id: int) -> str:
        """This per-expert key with the expert id replaced."""
        return f"{self.prefix}{new_id}{self.suffix}"

    def to_module(self, tensor: torch.Tensor) -> torch.Tensor:
        """The disk tensor in the layout of the module tensor it fills."""
        for dim0, dim1 in self.transposes:
            tensor = tensor.transpose(dim0, dim1)
        return tensor

    def to_disk(self, tensor: torch.Tensor) -> torch.Tensor:
        """A tensor in the module's layout back in the disk layout (contiguous, to be written)."""
        for dim0, dim1 in reversed(self.transposes):
            tensor = tensor.transpose(dim0, dim1)
        return tensor.contiguous() if self.transposes else tensor


@dataclass
class MoELayer:
    """One sparse MoE block of a decoder.

    ``index`` is the decoder layer index (the key used in ``fair_moe_plan.json``); ``groups`` is the router's group
    count for group-limited routing (1 when the router has none); ``structure`` says where its tensors are.
    """

    index: int
    block: nn.Module
    router: nn.Module
    experts: nn.Module
    num_experts: int
    top_k: int
    groups: int = 1
    structure: MoEStructure | None = field(default=None, repr=False)

    def owner(self, path: str) -> tuple[nn.Module, str]:
        """(module, attribute) of a block-relative tensor path."""
        module_path, _, name = path.rpartition(".")
        return (self.block.get_submodule(module_path) if module_path else self.block), name

    def tensor(self, path: str) -> torch.Tensor:
        module, name = self.owner(path)
        return getattr(module, name)

    def expert_owner(self, name: str) -> tuple[nn.Module, str]:
        """(module, attribute) of an experts-module-relative tensor name (``down_proj``, ``norm.weight``)."""
        return self.owner(f"{self.structure.experts_path}.{name}")

    def expert_tensor(self, name: str) -> torch.Tensor:
        return self.tensor(f"{self.structure.experts_path}.{name}")

    def router_tensors(self) -> list[tuple[str, int]]:
        """(block-relative path, expert axis) of every router-side tensor with an expert axis."""
        return list(self.structure.router_tensors)

    def logit_tensors(self) -> list[str]:
        """Block-relative paths of the tensors the router's logits are made of: its ``[E, H]`` weight and, where the
        same linear layer has one, its bias."""
        weight = self.structure.logits_weight
        bias = weight[: -len("weight")] + "bias"
        return [weight] + [path for path, axis in self.structure.router_tensors if path == bias and axis == 0]

    def selection_biases(self) -> list[torch.Tensor]:
        return [self.tensor(path) for path in self.structure.selection_biases]

    def logits_weight(self) -> torch.Tensor:
        return self.tensor(self.structure.logits_weight)


@dataclass
class FusedExpertsAdapter:
    """Everything fair_moe asks about one model type. Structure is found on the model; the attributes are the
    per-family facts the module tree cannot tell.

    Attributes:
        model_type: ``config.model_type`` this adapter serves (None: any type whose structure is found).
        fused_key_names: fused expert tensors a checkpoint stores outside ``experts.`` (GraniteMoE's
            ``input_linear.weight``), relative to the MoE block.
        unsupported: why a type whose structure is found still cannot be pruned (None: it can).
        dispatch: how the block calls its experts module (``MoEStructure.dispatch``); the module tree cannot tell.
        whole_marker: a boolean attribute of the MoE block that marks a layer whose experts are kept whole
            (``MoEStructure.whole_layers``), and ``whole_reason`` why, for the console and the model card.
        output_norm: the decoder-layer module that RMS-normalises the experts' summed output before anything else
            reads it (Gemma 4's ``post_feedforward_layernorm_2``): a per-layer scale of that output changes nothing.
    """

    model_type: str | None = None
    fused_key_names: tuple[str, ...] = ()
    unsupported: str | None = None
    dispatch: str = TOP_K
    whole_marker: str | None = None
    whole_reason: str = ""
    output_norm: str | None = None
    _structures: dict = field(default_factory=dict, repr=False)

    # ---- structure ---------------------------------------------------------------------------
    def structure(self, config) -> MoEStructure:
        """The MoE structure of ``config``'s model (from a meta-device build, cached per config)."""
        return self._built(config)[0]

    def key_map(self, config) -> KeyMap:
        """How the checkpoint keys of ``config``'s model map onto its module tensors (cached per config)."""
        return self._built(config)[1]

    def _built(self, config) -> tuple[MoEStructure, KeyMap]:
        key = json.dumps(config.to_dict(), sort_keys=True, default=str)
        if key not in self._structures:
            if self.unsupported:
                raise Unsupported(f"model_type {config.model_type!r}: {self.unsupported}")
            model = meta_model(config, auto_class_name(config))
            structure = dataclasses.replace(discover(model, self.whole_marker), dispatch=self.dispatch)
            self._structures[key] = (structure, KeyMap(model))
        return self._structures[key]

    def auto_class(self, config) -> str:
        return auto_class_name(config)

    def num_experts(self, config) -> int:
        return self.structure(config).num_experts

    def top_k(self, config) -> int:
        return self.structure(config).top_k

    def num_groups(self, config) -> int:
        """Expert groups of a group-limited router (1 when routing is not group-limited)."""
        return self.structure(config).groups

    def min_kept_per_group(self, config) -> int:
        """Experts every group must keep to stay selectable (0 without group-limited routing)."""
        return self.structure(config).min_kept_per_group

    def expert_intermediate_size(self, config) -> int:
        """Hidden width of one routed expert."""
        text = text_config(config)
        for name in ("moe_intermediate_size", "expert_ffn_hidden_size", "intermediate_size"):
            value = getattr(text, name, None)
            if isinstance(value, int):
                return value
            if isinstance(value, (list, tuple)) and value:
                return int(value[0])
        return int(text.hidden_size)

    def shared_intermediate_size(self, config) -> int:
        """Hidden width of the shared expert(s) beside the routed ones (0 when there are none)."""
        text = text_config(config)
        for name in ("shared_expert_intermediate_size", "shared_intermediate_size", "shared_experts_intermediate_size",
                     "moe_shared_expert_intermediate_size"):
            if isinstance(getattr(text, name, None), int):
                return int(getattr(text, name))
        shared = getattr(text, "n_shared_experts", None)
        return int(shared) * self.expert_intermediate_size(config) if isinstance(shared, int) else 0

    def whole_counts(self, config) -> dict[int, int]:
        """MoE layers kept whole (not units) → the experts each keeps (``PrunePlan.whole``)."""
        structure = self.structure(config)
        return {index: structure.num_experts for index in structure.whole_layers}

    def moe_layer_indices(self, config) -> list[int]:
        """Decoder indices of the sparse layers, from the config alone (a meta-device build, no weights)."""
        return list(self.structure(config).layer_indices)

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        path = self.structure(model.config).layers_path
        try:
            return model.get_submodule(path)
        except AttributeError as err:
            raise FairMoeError(f"model of type {type(model).__name__} has no {path!r}: pass the model class "
                               f"{self.auto_class(model.config)} loads") from err

    def moe_layers(self, model: nn.Module) -> list[MoELayer]:
        """Every sparse MoE block whose experts are units, in decoder order (dense layers and layers kept whole are
        skipped)."""
        structure = self.structure(model.config)
        layers = []
        for index, layer in enumerate(self.decoder_layers(model)):
            block = structure.block_of(layer)
            if block is None or index not in structure.layer_indices:  # a dense layer, or one kept whole
                continue
            router = block.get_submodule(structure.router_path)
            experts = block.get_submodule(structure.experts_path)
            num_experts = min(tensor_at(experts, name).shape[0] for name in structure.expert_tensors)
            top_k = getattr(router, "top_k", None)
            layers.append(MoELayer(index=index, block=block, router=router, experts=experts, num_experts=num_experts,
                                   top_k=int(top_k) if isinstance(top_k, int) else structure.top_k,
                                   groups=structure.groups, structure=structure))
        return layers

    # ---- rewriting -------------------------------------------------------------------------
    def set_count(self, config, n: int) -> None:
        """Write the routed expert count into every config field that holds it."""
        text = text_config(config)
        for name in self.count_fields(config):
            setattr(text, name, n)

    def count_fields(self, config) -> tuple[str, ...]:
        return self.structure(config).count_fields

    def expert_tensor_names(self, experts: nn.Module, num_experts: int) -> list[str]:
        """The experts module's parameters and buffers whose first axis is the expert axis."""
        tensors = {**dict(experts.named_parameters(recurse=False)), **dict(experts.named_buffers(recurse=False))}
        return sorted(name for name, t in tensors.items() if t.dim() >= 1 and t.shape[0] == num_experts)

    # ---- checkpoint key format -------------------------------------------------------------
    def classify_key(self, key: str, config=None, encoded: Callable[[str], str] | None = None
                     ) -> CheckpointKey | None:
        """Router rows, per-expert or fused expert tensors of a saved checkpoint; None for any other key.

        With ``config``, a key is read the way transformers loads it (``KeyMap``: the model class's own conversion
        mapping), so any family's renamed or per-expert format is understood from the module tensor it fills;
        without, by the per-expert / fused / router patterns ``save_pretrained`` writes for the common layout.
        ``encoded`` (for a quantized checkpoint) names the weight a quantized tensor encodes. For the many keys of
        one checkpoint use ``key_classifier``."""
        return self.key_classifier(config, encoded)(key)

    def key_classifier(self, config=None, encoded: Callable[[str], str] | None = None
                       ) -> Callable[[str], CheckpointKey | None]:
        """``classify_key`` bound to one config, which must not change while it is used: the config's structure
        and key map are looked up once (each lookup serialises the config, about 0.4 ms — a minute over the
        ~10⁵ keys of a large checkpoint if done per key)."""
        if config is None:
            return self._classify_by_pattern
        structure, key_map = self._built(config)

        def classify(key: str) -> CheckpointKey | None:
            found = self._place(key, key, structure, key_map)
            weight_key = encoded(key) if encoded is not None else key
            if found is None and weight_key != key:  # a quantized tensor, placed by the weight it encodes
                found = self._place(key, weight_key, structure, key_map)
            return found

        return classify

    def _classify_by_pattern(self, key: str) -> CheckpointKey | None:
        """``classify_key`` without a config: the patterns ``save_pretrained`` writes for the common layout."""
        match = LAYER_KEY.match(key)
        if match is None or any(t in match["prefix"] for t in OTHER_TOWERS):
            return None
        layer, rest = int(match["layer"]), match["rest"]
        per_expert = PER_EXPERT.match(rest)
        if per_expert:
            head = match["prefix"] + match["layer"] + "." + per_expert["head"]
            return CheckpointKey(key, layer, "experts", per_expert["rest"], int(per_expert["expert"]), head,
                                 "." + per_expert["rest"])
        fused = FUSED_EXPERTS.match(rest)
        if fused:
            return CheckpointKey(key, layer, "experts", fused["name"])
        for name in self.fused_key_names:
            if rest.endswith("." + name):
                return CheckpointKey(key, layer, "experts", name)
        router = ROUTER_KEY.match(rest)
        if router:
            return CheckpointKey(key, layer, "router", router["name"])
        return None

    @staticmethod
    def _place(key: str, weight_key: str, structure: MoEStructure, key_map: KeyMap) -> CheckpointKey | None:
        """What ``key`` is when it holds (part of) the module tensor that ``weight_key`` maps to; ``name`` keeps
        the disk name's last part so that its role in a quantized format can be read from it
        (``down_proj.weight_scale_inv`` is where ``down_proj.weight`` is)."""
        mapped = key_map.map(weight_key)
        prefix = structure.layers_path + "."
        if not mapped.target.startswith(prefix):
            return None
        index, _, rest = mapped.target[len(prefix):].partition(".")
        if not index.isdigit() or int(index) not in structure.layer_indices:
            return None
        block = structure.block_path + "." if structure.block_path else ""
        if not rest.startswith(block):
            return None
        rel, layer = rest[len(block):], int(index)
        quant_suffix = key[len(weight_key):]
        for path, axis in structure.router_tensors:
            if rel == path:
                return CheckpointKey(key, layer, "router", path, axis=axis, target=path, transposes=mapped.transposes)
        experts = structure.experts_path + "."
        if not rel.startswith(experts) or rel[len(experts):] not in structure.expert_tensors:
            return None
        target = rel[len(experts):]
        if mapped.expert is None:
            return CheckpointKey(key, layer, "experts", target + quant_suffix, target=target,
                                 transposes=mapped.transposes)
        start, end = mapped.span
        disk_name = weight_key[end:].lstrip(".") + quant_suffix
        return CheckpointKey(key, layer, "experts", disk_name, mapped.expert, key[:start], key[end:], target=target,
                             transposes=mapped.transposes)

    def is_down_projection(self, name: str) -> bool:
        """Whether an experts tensor (module attribute, or the module attribute a checkpoint key fills) is a down
        projection or its bias."""
        return bool(DOWN_PROJECTION.search(name))

    def is_selection_bias(self, name: str) -> bool:
        """Whether a router tensor only biases selection (it is not part of the logits)."""
        return is_selection_bias(name)

    def is_logit_tensor(self, config, name: str) -> bool:
        """Whether a router-part tensor (block-relative path, or a path ending it) is part of the router's logits:
        its ``[E, H]`` weight or that linear layer's bias, not a selection bias or a per-expert scale."""
        weight = self.structure(config).logits_weight
        logit = (weight, weight[: -len("weight")] + "bias")
        return any(name == p or p.endswith("." + name) or name.endswith("." + p) for p in logit)

    def saved_expert_ids(self, keys, config=None) -> dict[int, set[int]]:
        """Per decoder layer, the expert ids of the per-expert keys among ``keys`` of a saved checkpoint."""
        found: dict[int, set[int]] = {}
        classify = self.key_classifier(config)
        for key in keys:
            ref = classify(key)
            if ref is not None and ref.expert is not None:
                found.setdefault(ref.layer, set()).add(ref.expert)
        return found
