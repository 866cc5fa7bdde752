"""Finding the MoE blocks of a transformers model from its module tree.

transformers 5.x stores the routed experts of most MoE families as one module with fused 3-D parameters (expert
axis first: ``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``, or ``up_proj`` without a gate) next to a router
module whose logits weight is ``[E, H]``. ``discover`` walks one decoder layer after another and records, for the
first MoE block it meets, where the block, its router and its experts sit, which tensors carry the expert axis
(router rows, router and expert biases, selection biases such as ``e_score_correction_bias`` wherever they are
kept — in the router, in a statistics submodule as ``[1, E]``, or on the block itself), which module attributes
and config fields hold the expert count, the router's top-k and its expert groups. Nothing here knows a family
by name; what a structure cannot express is refused with the reason (``Unsupported``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from fair_moe.core.errors import FairMoeError

TOP_K_ATTRIBUTES = ("top_k", "num_experts_per_tok", "moe_topk", "moe_k", "top_k_experts", "experts_per_token")
TOP_K_FIELDS = ("num_experts_per_tok", "moe_topk", "moe_k", "top_k_experts", "num_experts_per_token", "moe_top_k",
                "experts_per_token")
GROUP_ATTRIBUTES = ("n_group", "num_group", "num_expert_group", "n_groups")
TOPK_GROUP_ATTRIBUTES = ("topk_group", "num_topk_group")
NOT_A_COUNT = ("per_tok", "per_token", "shared", "topk", "top_k", "group", "_k", "dense", "layer", "capacity")


TOP_K = "top_k"
EXPERT_MAJOR = "expert_major"


class Unsupported(FairMoeError):
    """The model's structure is not one fair_moe can prune; the message says what was found."""


@dataclass(frozen=True)
class MoEStructure:
    """Where the routed experts of a model are, as paths: ``layers_path`` (the decoder's ModuleList, from the model),
    ``block_path`` (from a decoder layer; "" when router and experts sit on the layer itself), ``router_path`` and
    ``experts_path`` (from the block). Tensor paths are relative to the block: ``router_tensors`` (path, expert
    axis) are sliced with the experts, ``logits_weight`` is the ``[E, H]`` weight the router's logits are computed
    with, ``selection_biases`` only bias selection; ``expert_tensors`` are relative to the experts module.
    ``count_attributes`` (relative to the block) and ``count_fields`` (of the text config) hold E. A router may score
    ``router_tail`` more classes after the E routed experts (shared experts weighted jointly with the routed ones):
    they are never units, and a router tensor of length E + tail keeps them (``expert_index``); ``experts_tail`` of
    them are computed by the experts module itself (zero-computation / identity experts), whose tensors of length
    E + tail keep theirs the same way. ``dispatch`` is how the block calls its experts module: ``top_k``
    (``experts(hidden [T, H], top_k_index [T, k], top_k_weights [T, k])``, transformers' fused-experts call) or
    ``expert_major`` (Llama 4: the router returns dense scores ``[T, E]``, 0 where an expert was not selected, and
    the experts module runs every expert on ``[E·T, H]`` rows, expert e's block the tokens scaled by their score for e,
    whose outputs the block sums over e). ``whole_layers`` are MoE layers that are not units, kept whole because
    their experts cannot be made unreachable (DeepSeek-V4's hash-routed layers pick experts from a fixed token-id
    table); ``layer_indices`` lists only the others, and a pruned checkpoint keeps E experts in these."""

    layers_path: str
    block_path: str
    router_path: str
    experts_path: str
    layer_indices: tuple[int, ...]
    num_experts: int
    top_k: int
    groups: int
    topk_group: int
    min_kept_per_group: int
    logits_weight: str
    router_tensors: tuple[tuple[str, int], ...]
    selection_biases: tuple[str, ...]
    expert_tensors: tuple[str, ...]
    count_attributes: tuple[str, ...]
    count_fields: tuple[str, ...]
    model_count_attributes: tuple[str, ...] = ()
    router_tail: int = 0  # classes the router scores after the E routed experts (e.g. jointly weighted shared experts)
    experts_tail: int = 0  # of those, the ones the experts module computes itself (LongCat's identity experts)
    tail_count_attributes: tuple[str, ...] = ()  # attributes caching E + router_tail
    dispatch: str = TOP_K  # how the block calls its experts: TOP_K or EXPERT_MAJOR (see below)
    whole_layers: tuple[int, ...] = ()  # MoE layers whose experts are kept whole (not units; see below)

    def block_of(self, layer: nn.Module) -> nn.Module | None:
        """The MoE block of one decoder layer (None for a dense layer)."""
        try:
            block = layer.get_submodule(self.block_path) if self.block_path else layer
            block.get_submodule(self.experts_path)
            block.get_submodule(self.router_path)
        except AttributeError:
            return None
        return block


def text_config(config):
    """The config of the language model (the config itself for a text-only model)."""
    getter = getattr(config, "get_text_config", None)
    return getter() if getter is not None else config


def tensor_at(module: nn.Module, name: str) -> torch.Tensor:
    """The parameter or buffer at a dotted ``name`` relative to ``module`` (``down_proj``, ``norm.weight``)."""
    module_path, _, attribute = name.rpartition(".")
    return getattr(module.get_submodule(module_path), attribute)


def _direct_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(module.named_parameters(recurse=False)), **dict(module.named_buffers(recurse=False))}


def _all_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


def expert_axis_of(tensor: torch.Tensor, num_experts: int, tail: int = 0) -> int | None:
    """0 for ``[E, …]`` (or ``[E + tail, …]``), 1 for a ``[1, E]`` statistics row, None for a tensor without an
    expert axis."""
    if tensor.dim() >= 1 and tensor.shape[0] in (num_experts, num_experts + tail):
        return 0
    if tensor.dim() == 2 and tensor.shape[0] == 1 and tensor.shape[1] == num_experts:
        return 1
    return None


def expert_index(kept, length: int, num_experts: int) -> torch.Tensor:
    """What to keep along an expert axis of ``length``: the kept experts (sorted ids), then every class past the
    E routed ones (a router's trailing classes, which are never units)."""
    return torch.tensor(sorted(kept) + list(range(num_experts, length)), dtype=torch.long)


def experts_count(module: nn.Module) -> int | None:
    """E when ``module`` is a fused-experts module: two or more direct 3-D tensors sharing the leading dimension,
    or, in a class named ``…Experts``, leading dimensions E and E + Z (LongCat allocates gate / up rows for Z
    zero-computation experts after the E routed ones; its down projection has E)."""
    leading = [t.shape[0] for t in _direct_tensors(module).values() if t.dim() == 3]
    if len(leading) < 2:
        return None
    if len(set(leading)) == 1:
        return leading[0]
    smallest = min(leading)
    if len(set(leading)) == 2 and max(leading) <= 2 * smallest and type(module).__name__.endswith("Experts"):
        return smallest
    return None


LAYER_LISTS = ("layers", "blocks")


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The language model's decoder layers and their path in ``model``."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = next((getattr(decoder, name) for name in LAYER_LISTS if decoder is not None
                   and isinstance(getattr(decoder, name, None), nn.ModuleList)), None)
    if layers is None and decoder is not None:  # a decoder that wraps the model holding the layers (Llama 4's
        layers = next((m for name, m in decoder.named_modules()  # language model is a ForCausalLM)
                       if isinstance(m, nn.ModuleList) and name.endswith(LAYER_LISTS)), None)
    if not isinstance(layers, nn.ModuleList):
        candidates = [(name, m) for name, m in model.named_modules()
                      if isinstance(m, nn.ModuleList) and name.endswith(LAYER_LISTS)]
        if not candidates:
            raise Unsupported(f"{type(model).__name__} has no decoder layers (a ModuleList named 'layers' or "
                              "'blocks')")
        name, layers = candidates[0]
        return name, layers
    for name, module in model.named_modules():
        if module is layers:
            return name, layers
    raise Unsupported(f"{type(model).__name__}: its decoder's layers are not part of the model")


def _find_experts(layer: nn.Module) -> list[tuple[str, int]]:
    """Fused-experts modules of one decoder layer; where several modules hold 3-D tensors, the routed experts are
    the one named ``…experts`` (not ``shared_experts``)."""
    found = [(name, n) for name, module in layer.named_modules() if (n := experts_count(module)) is not None]
    if len(found) > 1:
        named = [(name, n) for name, n in found
                 if name.rsplit(".", 1)[-1].endswith("experts") and "shared" not in name.rsplit(".", 1)[-1]]
        found = named or found
    return found


def _router_of(block: nn.Module, experts_name: str, num_experts: int) -> tuple[str, str, int] | None:
    """(router path, path of its logits weight within the router, trailing classes) among the block's other
    children: a ``[E, H]`` weight, or a ``gate`` / ``router`` whose weight scores up to E more classes after the
    routed experts (``[E + tail, H]``; of several, the one with the fewest: a router MLP's hidden layers are wider
    than its logits layer, whose input is then the MLP's width, not H)."""
    children = sorted(block.named_children(), key=lambda item: item[0] not in ("gate", "router"))
    for name, child in children:
        if name == experts_name:
            continue
        for tensor_name, tensor in _all_tensors(child).items():
            if tensor.dim() == 2 and tensor.shape[0] == num_experts and tensor_name.endswith("weight"):
                return name, tensor_name, 0
    for name, child in children:
        if name not in ("gate", "router"):
            continue
        # the weight that scores the fewest classes past E: a router whose logits come out of an MLP (ZAYA's) has
        # wider hidden layers too
        found = [(tensor.shape[0] - num_experts, tensor_name) for tensor_name, tensor in _all_tensors(child).items()
                 if tensor.dim() == 2 and num_experts < tensor.shape[0] <= 2 * num_experts
                 and tensor_name.endswith("weight")]
        if found:
            tail, tensor_name = min(found)
            return name, tensor_name, tail
    return None


def _int_attributes(module: nn.Module, value: int, names=None) -> list[str]:
    found = []
    for attr, v in vars(module).items():
        if isinstance(v, int) and not isinstance(v, bool) and v == value and (names is None or attr in names):
            found.append(attr)
    return found


def _first_attribute(modules: list[nn.Module], names: tuple[str, ...]) -> int | None:
    for module in modules:
        for name in names:
            value = getattr(module, name, None)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            if isinstance(value, (list, tuple)) and value and all(isinstance(v, int) for v in value):
                return max(value)
    return None


def count_fields(config, num_experts: int) -> tuple[str, ...]:
    """Fields of the text config that hold the routed expert count."""
    text = text_config(config)
    names = set(text.to_dict()) | set(getattr(text, "attribute_map", {}))
    return tuple(sorted(name for name in names
                        if "expert" in name and not any(bad in name for bad in NOT_A_COUNT)
                        and getattr(text, name, None) == num_experts))


def discover(model: nn.Module, whole_marker: str | None = None) -> MoEStructure:
    """The MoE structure of ``model`` (weights may be on the meta device). ``Unsupported`` says what was found
    when the model is not a fused-experts MoE fair_moe can prune. A MoE block whose attribute ``whole_marker`` is
    true is kept whole (``MoEStructure.whole_layers``)."""
    layers_path, layers = decoder_layers(model)
    block_path, experts_attr, num_experts, indices = _locate_experts(model, layers)
    _check_no_other_stack(model, layers_path, num_experts)
    whole = tuple(i for i in indices if whole_marker and getattr(
        layers[i].get_submodule(block_path) if block_path else layers[i], whole_marker, False) is True)
    indices = [i for i in indices if i not in whole]
    if not indices:
        raise Unsupported(f"every MoE layer of {type(model).__name__} is one fair_moe keeps whole ({whole_marker})")
    first_layer = layers[indices[0]]
    block = first_layer.get_submodule(block_path) if block_path else first_layer
    router = _router_of(block, experts_attr, num_experts)
    if router is None:
        raise Unsupported(f"the MoE block {block_path or 'of each layer'} has experts with E={num_experts} but no "
                          "router whose weight is [E, hidden] (or, in a module named gate / router, [E + a few "
                          "trailing classes, hidden])")
    router_path, weight_in_router, tail = router
    router_module = block.get_submodule(router_path)
    experts_module = block.get_submodule(experts_attr)
    router_tensors, selection = _router_tensors(block, router_path, num_experts, tail)
    expert_tensors, experts_tail = _expert_tensors(experts_module, num_experts, tail)
    modules = [("", block), *[(f"{router_path}.{n}".rstrip("."), m) for n, m in router_module.named_modules()],
               (experts_attr, experts_module)]
    top_k = _first_attribute([router_module, block], TOP_K_ATTRIBUTES) or \
        _first_attribute([text_config(model.config)], TOP_K_FIELDS)
    if not top_k:
        raise Unsupported(f"cannot tell how many experts the router of {type(block).__name__} selects per token "
                          f"(no {' / '.join(TOP_K_ATTRIBUTES)} on it)")
    groups, topk_group, min_per_group = _groups(router_module, block, num_experts, top_k, bool(selection))
    return MoEStructure(
        layers_path=layers_path, block_path=block_path, router_path=router_path, experts_path=experts_attr,
        layer_indices=tuple(indices), num_experts=num_experts, top_k=int(top_k), groups=groups,
        topk_group=topk_group, min_kept_per_group=min_per_group,
        logits_weight=f"{router_path}.{weight_in_router}", router_tensors=router_tensors,
        selection_biases=selection, expert_tensors=expert_tensors,
        count_attributes=_count_attributes(modules, num_experts), count_fields=count_fields(model.config, num_experts),
        model_count_attributes=tuple(_int_attributes(model, num_experts, ("num_experts", "num_local_experts"))),
        router_tail=tail, experts_tail=experts_tail,
        tail_count_attributes=_count_attributes(modules, num_experts + tail) if tail else (),
        whole_layers=whole,
    )


def _locate_experts(model: nn.Module, layers: nn.ModuleList) -> tuple[str, str, int, list[int]]:
    """(block path, experts attribute, E, decoder indices of the MoE layers): the fused-experts module every MoE
    layer holds, at the same place in each."""
    found, indices = None, []
    for index, layer in enumerate(layers):
        experts = _find_experts(layer)
        if not experts:
            continue
        if len(experts) > 1:
            raise Unsupported(f"decoder layer {index} holds {len(experts)} fused-experts modules "
                              f"({', '.join(name for name, _ in experts)}); fair_moe prunes one expert set per layer")
        experts_name, num_experts = experts[0]
        block_path, _, experts_attr = experts_name.rpartition(".")
        if found is None:
            found = (block_path, experts_attr, num_experts)
        elif (block_path, experts_attr) != found[:2]:
            raise Unsupported(f"MoE blocks sit at different places in different layers ({found[0]!r}, "
                              f"{block_path!r})")
        indices.append(index)
    if found is None:
        raise Unsupported(f"model_type {model.config.model_type!r} has no MoE layers fair_moe can prune: the decoder "
                          f"layers of {type(model).__name__} hold no fused-experts module (looked for a module with "
                          "two or more 3-D parameters sharing a leading expert axis, transformers' gate_up_proj / "
                          "down_proj experts)")
    return (*found, indices)


def _router_tensors(block: nn.Module, router_path: str, num_experts: int, tail: int
                    ) -> tuple[tuple[tuple[str, int], ...], tuple[str, ...]]:
    """((block-relative path, expert axis) of every router-side tensor with an expert axis, the selection biases
    among them): the router's own tensors, and selection biases some families keep on the block itself."""
    router_tensors, selection = [], []
    candidates = [(f"{router_path}.{name}", name, tensor, tail)
                  for name, tensor in _all_tensors(block.get_submodule(router_path)).items()]
    candidates += [(name, name, tensor, 0) for name, tensor in _direct_tensors(block).items()]
    for path, name, tensor, trailing in candidates:
        axis = expert_axis_of(tensor, num_experts, trailing)
        if axis is not None:
            router_tensors.append((path, axis))
            if is_selection_bias(name):
                selection.append(path)
    return tuple(router_tensors), tuple(selection)


def _expert_tensors(experts: nn.Module, num_experts: int, tail: int) -> tuple[tuple[str, ...], int]:
    """(the experts module's tensors with an expert axis first, how many classes past E they also hold).

    Names are relative to the experts module: its own tensors (``down_proj``), and ``[E, …]`` matrices of the modules
    inside it (``post_expert_norm.weight``: a per-expert norm scale ``[E, hidden]``)."""
    rows = {n: t.shape[0] for n, t in _direct_tensors(experts).items() if t.dim() >= 1
            and num_experts <= t.shape[0] <= 2 * num_experts}
    experts_tail = max(rows.values()) - num_experts
    if experts_tail and experts_tail != tail:
        raise Unsupported(f"the experts module holds {experts_tail} classes after the E={num_experts} routed experts "
                          f"but the router scores {tail}: fair_moe cannot tell which classes are experts")
    rows.update(_nested_expert_rows(experts, num_experts + experts_tail))
    return tuple(sorted(n for n, r in rows.items() if r in (num_experts, num_experts + experts_tail))), experts_tail


def _nested_expert_rows(experts: nn.Module, rows: int) -> dict[str, int]:
    """Dotted name → rows of the ``[rows, …]`` matrices held by modules inside the experts module."""
    found = {}
    for prefix, module in experts.named_modules():
        if not prefix:
            continue
        found.update({f"{prefix}.{n}": t.shape[0] for n, t in _direct_tensors(module).items()
                      if t.dim() >= 2 and t.shape[0] == rows})
    return found


def _count_attributes(modules: list[tuple[str, nn.Module]], count: int) -> tuple[str, ...]:
    """Block-relative paths of the integer attributes (named for experts or classes, or a Linear's out_features)
    equal to ``count`` on the given (prefix, module) pairs: what caches the expert count and must follow a resize
    (ZAYA's router caches E + 1 as ``num_router_classes``)."""
    found = []
    for prefix, module in modules:
        names = [a for a in _int_attributes(module, count) if "expert" in a or "classes" in a]
        if isinstance(module, nn.Linear) and module.out_features == count:
            names.append("out_features")
        found += [f"{prefix}.{a}" if prefix else a for a in names]
    return tuple(found)


OTHER_TOWERS = ("vision", "visual", "audio", "talker", "code2wav", "mtp")


def _check_no_other_stack(model: nn.Module, layers_path: str, num_experts: int) -> None:
    """Experts outside the language decoder's layers would share its expert count field (an encoder stack, a second
    decoder); those of another modality's tower have configs of their own and stay as they are."""
    for name, module in model.named_modules():
        if name.startswith(layers_path + ".") or any(t in name for t in OTHER_TOWERS):
            continue
        if experts_count(module) == num_experts:
            raise Unsupported(f"routed experts also sit outside the decoder layers {layers_path!r} (at {name!r}) and "
                              "share their expert count: fair_moe prunes one decoder stack")


def is_selection_bias(name: str) -> bool:
    """A tensor that biases which experts are selected without being part of the weights (DeepSeek-V3's
    ``e_score_correction_bias``, ``expert_bias``, ZAYA's ``balancing_biases``); a linear layer's own ``bias`` is part
    of the logits."""
    last = name.rsplit(".", 1)[-1]
    return last.endswith(("bias", "biases")) and last not in ("bias", "biases")


def _groups(router: nn.Module, block: nn.Module, num_experts: int, top_k: int, biased: bool) -> tuple[int, int, int]:
    """(groups, groups selected per token, experts every group must keep) of a group-limited router."""
    method = getattr(router, "topk_method", None)
    groups = _first_attribute([router, block], GROUP_ATTRIBUTES) or 1
    if method is not None and method != "group_limited_greedy" and not biased:
        groups = 1  # DeepSeek-V2's greedy routing ignores n_group
    if groups <= 1 or num_experts % groups:
        return 1, 1, 0
    topk_group = _first_attribute([router, block], TOPK_GROUP_ATTRIBUTES) or groups
    # a group is ranked by its best expert (DeepSeek-V2) or by the sum of its best two (DeepSeek-V3 and most others)
    per_group = 1 if method == "group_limited_greedy" else 2
    return groups, topk_group, max(per_group, -(-top_k // topk_group))


def meta_model(config, auto_class: str, trust_remote_code: bool = False) -> nn.Module:
    """The model built on the meta device: shapes without memory."""
    import transformers

    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        return getattr(transformers, auto_class).from_config(config, trust_remote_code=trust_remote_code)


def auto_class_name(config) -> str:
    """The transformers Auto class a checkpoint of ``config`` loads with: a causal LM, or the image-text (or
    multimodal) class for models whose language tower sits beside other towers, so their checkpoints keep them."""
    from transformers.models.auto import modeling_auto as auto

    model_type = getattr(config, "model_type", None)
    multimodal = any(hasattr(config, f) for f in ("vision_config", "audio_config", "thinker_config"))
    if model_type in auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not multimodal:
        return "AutoModelForCausalLM"
    if model_type in auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        return "AutoModelForImageTextToText"
    if model_type in getattr(auto, "MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES", {}):
        return "AutoModelForMultimodalLM"
    return "AutoModelForCausalLM"
