"""What fair_moe needs to know about one MoE family, and the shared fused-experts layout.

transformers 5.x stores the routed experts of most MoE families as one module with fused 3-D
parameters (``experts.gate_up_proj [E, 2I, H]``, ``experts.down_proj [E, H, I]``) next to a router
module (``gate`` or ``router``) whose ``weight`` is ``[E, H]``. An adapter names those modules, the
config fields that hold E and the expert sizes, how the router turns its logits into top-k weights (so
that the masked reference, removed experts' logits at -inf, is computed from the router's real
logits), and the checkpoint key format on disk (which keys are router rows, per-expert tensors or fused
expert tensors, and which are down projections), so that the streaming rewriter and the key checks ask
the adapter instead of guessing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

from fair_moe.core.errors import FairMoeError

# The key formats save_pretrained writes for the fused-experts families (the original per-expert format).
PER_EXPERT_KEY = re.compile(r"^(?P<head>.*?\.layers\.(?P<layer>\d+)\..*?\.experts\.)(?P<expert>\d+)\.(?P<rest>.+)$")
FUSED_EXPERTS_KEY = re.compile(r"^.*?\.layers\.(?P<layer>\d+)\..*?\.experts\.(?P<name>[A-Za-z_]\w*)$")
ROUTER_KEY = re.compile(r"^.*?\.layers\.(?P<layer>\d+)\.(?:.*\.)?(?:gate|router)(?:\.layer)?"
                        r"\.(?P<name>weight|bias|e_score_correction_bias)$")
DOWN_PROJECTION = re.compile(r"(?:^|\.)(?:down_proj|w2|output_linear)(?:\.weight|\.bias|_bias)?$")
SELECTION_BIAS = "e_score_correction_bias"


@dataclass(frozen=True)
class CheckpointKey:
    """What one checkpoint tensor is to the rewriter.

    ``part`` is ``router`` (rows are experts) or ``experts``; ``name`` the tensor's name within the part
    (``weight``, ``e_score_correction_bias``, ``down_proj.weight``, ``gate_up_proj`` …); ``expert`` the
    expert id of a per-expert key, None for a fused tensor whose first axis is the expert axis. In a quantized
    checkpoint ``name`` is the weight the tensor encodes and ``role`` what the tensor is to it (payload, scale,
    exponent, auxiliary; ``fair_moe.checkpoint.quantized``); ``role`` is None for a plain tensor.
    """

    key: str
    layer: int
    part: str
    name: str
    expert: int | None = None
    prefix: str = ""
    suffix: str = ""
    role: str | None = None

    def renumbered(self, new_id: int) -> str:
        """This per-expert key with the expert id replaced."""
        return f"{self.prefix}{new_id}{self.suffix}"


@dataclass
class MoELayer:
    """One sparse MoE block of a decoder.

    ``index`` is the decoder layer index (the key used in ``fair_moe_plan.json``); ``groups`` is the
    router's group count for group-limited routing (1 when the router has none).
    """

    index: int
    block: nn.Module
    router: nn.Module
    experts: nn.Module
    num_experts: int
    top_k: int
    groups: int = 1


@dataclass
class FusedExpertsAdapter:
    """Adapter for families whose experts are one fused-parameter module.

    Attributes:
        model_type: ``config.model_type`` this adapter serves.
        count_field: config field holding the routed expert count.
        block_attr: attribute of a decoder layer holding the sparse MoE block.
        router_attr / experts_attr: attributes of the block.
        count_attributes: module attributes that cache the expert count and must follow a resize.
        always_normalize: the router renormalises top-k weights whatever the config says (Mixtral).
    """

    model_type: str
    count_field: str = "num_experts"
    block_attr: str = "mlp"
    router_attr: str = "gate"
    experts_attr: str = "experts"
    count_attributes: tuple[str, ...] = ("num_experts", "num_local_experts", "n_routed_experts")
    always_normalize: bool = False
    layers_path: str = "model.layers"
    fused_key_names: tuple[str, ...] = ()  # fused expert tensors saved outside ``experts.`` (GraniteMoE)
    extra_config_fields: dict[str, str] = field(default_factory=dict)

    # ---- discovery -------------------------------------------------------------------------
    def num_experts(self, config) -> int:
        return int(getattr(config, self.count_field))

    def top_k(self, config) -> int:
        return int(config.num_experts_per_tok)

    def num_groups(self, config) -> int:
        """Expert groups of a group-limited router (1 when routing is not group-limited)."""
        return 1

    def min_kept_per_group(self, config) -> int:
        """Experts every group must keep to stay selectable (0 without group-limited routing)."""
        return 0

    def expert_intermediate_size(self, config) -> int:
        """Hidden width of one routed expert."""
        return int(getattr(config, "moe_intermediate_size", None) or config.intermediate_size)

    def shared_intermediate_size(self, config) -> int:
        """Hidden width of the shared expert(s) beside the routed ones (0 when there are none)."""
        return int(getattr(config, "shared_expert_intermediate_size", 0) or 0)

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        try:
            return model.get_submodule(self.layers_path)
        except AttributeError as err:
            raise FairMoeError(
                f"model of type {type(model).__name__} has no {self.layers_path!r}: pass a causal LM "
                "(AutoModelForCausalLM) to --model"
            ) from err

    def moe_layers(self, model: nn.Module) -> list[MoELayer]:
        """Every sparse MoE block, in decoder order. Dense layers are skipped."""
        config = model.config
        layers = []
        for index, layer in enumerate(self.decoder_layers(model)):
            block = getattr(layer, self.block_attr, None)
            if block is None or not hasattr(block, self.experts_attr) or not hasattr(block, self.router_attr):
                continue
            layers.append(
                MoELayer(
                    index=index,
                    block=block,
                    router=getattr(block, self.router_attr),
                    experts=getattr(block, self.experts_attr),
                    num_experts=self.num_experts(config),
                    top_k=self.top_k(config),
                    groups=self.num_groups(config),
                )
            )
        return layers

    def moe_layer_indices(self, config) -> list[int]:
        """Decoder indices of the sparse layers, from the config alone (no weights needed).

        Mirrors the decoder-layer constructors: ``mlp_only_layers`` and ``decoder_sparse_step`` (Qwen),
        ``first_k_dense_replace`` (DeepSeek, GLM); families without them are sparse everywhere.
        """
        n = config.num_hidden_layers
        mlp_only = set(getattr(config, "mlp_only_layers", None) or [])
        step = getattr(config, "decoder_sparse_step", None) or 1
        first_dense = getattr(config, "first_k_dense_replace", None) or 0
        return [i for i in range(n) if i not in mlp_only and (i + 1) % step == 0 and i >= first_dense]

    # ---- routing ---------------------------------------------------------------------------
    def route(
        self, router: nn.Module, logits: torch.Tensor, removed: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k weights and ids [tokens, top_k] from router logits [tokens, E], as the router computes them,
        with the experts flagged in ``removed [E]`` made unreachable.

        Default (Qwen-MoE, OLMoE, Mixtral): softmax over all experts, top-k of the probabilities, optional
        renormalisation. Removed experts get logit -inf, hence probability 0.
        """
        if removed is not None:
            logits = logits.masked_fill(removed.to(logits.device), float("-inf"))
        probs = torch.softmax(logits, dim=-1, dtype=torch.float)
        weights, ids = torch.topk(probs, router.top_k, dim=-1)
        if self.always_normalize or getattr(router, "norm_topk_prob", False):
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if not self.always_normalize:
            weights = weights.to(logits.dtype)
        return weights, ids

    def router_logits(self, router_output) -> torch.Tensor:
        """The logits [tokens, E] out of whatever the router's forward returned."""
        return router_output[0]

    def replace_router_output(self, router_output, logits: torch.Tensor, weights, ids):
        return (logits, weights, ids)

    # ---- rewriting -------------------------------------------------------------------------
    def set_count(self, config, n: int) -> None:
        setattr(config, self.count_field, n)

    def router_tensor_names(self, router: nn.Module, num_experts: int) -> list[str]:
        """The router's parameters and buffers whose first axis is the expert axis."""
        return expert_axis_tensors(router, num_experts)

    def expert_tensor_names(self, experts: nn.Module, num_experts: int) -> list[str]:
        """The experts module's parameters and buffers whose first axis is the expert axis."""
        return expert_axis_tensors(experts, num_experts)

    # ---- checkpoint key format -------------------------------------------------------------
    def classify_key(self, key: str) -> CheckpointKey | None:
        """Router rows, per-expert or fused expert tensors of a saved checkpoint; None for any other key."""
        match = PER_EXPERT_KEY.match(key)
        if match:
            return CheckpointKey(key, int(match["layer"]), "experts", match["rest"], int(match["expert"]),
                                 match["head"], "." + match["rest"])
        match = FUSED_EXPERTS_KEY.match(key)
        if match:
            return CheckpointKey(key, int(match["layer"]), "experts", match["name"])
        for name in self.fused_key_names:
            match = re.match(rf"^.*?\.layers\.(?P<layer>\d+)\..*?\.{re.escape(name)}$", key)
            if match:
                return CheckpointKey(key, int(match["layer"]), "experts", name)
        match = ROUTER_KEY.match(key)
        if match:
            return CheckpointKey(key, int(match["layer"]), "router", match["name"])
        return None

    def is_down_projection(self, name: str) -> bool:
        """Whether an experts tensor (module attribute or checkpoint name) is a down projection or its bias."""
        return bool(DOWN_PROJECTION.search(name))

    def is_selection_bias(self, name: str) -> bool:
        """Whether a router tensor only biases selection (it is not part of the logits)."""
        return name.endswith(SELECTION_BIAS)

    def saved_expert_ids(self, keys) -> dict[int, set[int]]:
        """Per decoder layer, the expert ids of the per-expert keys among ``keys`` of a saved checkpoint."""
        found: dict[int, set[int]] = {}
        for key in keys:
            ref = self.classify_key(key)
            if ref is not None and ref.expert is not None and key.startswith(self.layers_path + "."):
                found.setdefault(ref.layer, set()).add(ref.expert)
        return found


def expert_axis_tensors(module: nn.Module, num_experts: int) -> list[str]:
    """Direct parameters and buffers of ``module`` whose first dimension is the expert dimension."""
    tensors = {**dict(module.named_parameters(recurse=False)), **dict(module.named_buffers(recurse=False))}
    return sorted(name for name, t in tensors.items() if t.dim() >= 1 and t.shape[0] == num_experts)
