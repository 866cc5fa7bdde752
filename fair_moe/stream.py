"""Streaming checkpoint surgery: read the source safetensors shard by shard, write pruned shards.

Only one source tensor and one output shard are in memory at a time, so a checkpoint far larger than
RAM can be rewritten. Keys keep the source's own on-disk format; the rules are the same as the
in-memory rewriter's (METHOD.md §4):

- per-expert keys ``….layers.<l>.….experts.<j>.…``: dropped when j was removed, renumbered otherwise
  (kept experts keep their relative order);
- fused expert tensors ``….layers.<l>.….experts.<name>`` (GPT-OSS) or ``input_linear`` / ``output_linear``
  (GraniteMoE) with the expert count as first dimension: sliced along it;
- router tensors (``gate`` / ``router`` weight, bias, ``e_score_correction_bias``) of layer l: rows sliced;
- with a layer-scale compensation, layer l's down projections (``down_proj`` / ``w2``, weight and bias)
  are multiplied by its scale (in float32, cast back to the tensor's dtype).

Every MoE layer of the plan must have its router found and its experts sliced to the planned count;
anything else is an error, and the caller also reloads the result and compares it with the masked
original, so a layout these rules do not cover cannot slip through.
"""

from __future__ import annotations

import json
import re
import shutil
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from fair_moe.errors import FairMoeError
from fair_moe.plan import PrunePlan

PER_EXPERT = re.compile(r"^(?P<head>.*?\.layers\.(?P<layer>\d+)\..*?\.experts\.)(?P<expert>\d+)(?P<rest>\..+)$")
# Fused on disk: GPT-OSS ``experts.gate_up_proj`` etc.; GraniteMoE ``input_linear`` / ``output_linear``.
FUSED_EXPERTS = re.compile(r"^.*?\.layers\.(?P<layer>\d+)\..*?\.(?:experts\.(?P<name>[A-Za-z_]\w*)"
                           r"|(?P<granite>(?:input|output)_linear\.weight))$")
ROUTER = re.compile(r"^.*?\.layers\.(?P<layer>\d+)\.(?:.*\.)?(?:gate|router)(?:\.layer)?"
                    r"\.(?:weight|bias|e_score_correction_bias)$")
DOWN = re.compile(r"(?:^|\.)(?:down_proj|w2|output_linear)(?:\.weight|\.bias|_bias)?$")
SKIP_FILES = re.compile(r"(\.safetensors|\.bin|\.pt|\.pth|model\.safetensors\.index\.json|pytorch_model\.bin\.index\.json"
                        r"|^config\.json|^README\.md|^fair_moe_.*)$")


def source_shards(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder (index order when there is an index)."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / n for n in names]
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        raise FairMoeError(f"{folder} holds no .safetensors weights: the streaming rewriter needs safetensors "
                           "(re-save the model with save_pretrained)")
    return shards


class KeyRewriter:
    """Decides, key by key, what a source tensor becomes in the pruned checkpoint."""

    def __init__(self, plan: PrunePlan):
        self.plan = plan
        self.kept = {layer: sorted(ids) for layer, ids in plan.kept_experts.items()}
        self.new_id = {layer: {old: new for new, old in enumerate(ids)} for layer, ids in self.kept.items()}
        self.scales = plan.layer_scales or {}
        self.temperatures = plan.router_temperatures or {}
        self.routers_seen: dict[int, int] = defaultdict(int)
        self.experts_seen: dict[int, set[int]] = defaultdict(set)
        self.fused_seen: dict[int, int] = defaultdict(int)

    def rewrite(self, key: str, tensor_fn) -> tuple[str, torch.Tensor] | None:
        """(new key, tensor) or None to drop; ``tensor_fn()`` loads the source tensor only when needed."""
        match = PER_EXPERT.match(key)
        if match and int(match["layer"]) in self.kept:
            layer, expert = int(match["layer"]), int(match["expert"])
            if expert not in self.new_id[layer]:
                return None
            new_key = f"{match['head']}{self.new_id[layer][expert]}{match['rest']}"
            self.experts_seen[layer].add(expert)
            return new_key, self._scaled(layer, match["rest"].lstrip("."), tensor_fn())
        match = FUSED_EXPERTS.match(key)
        if match and int(match["layer"]) in self.kept:
            layer = int(match["layer"])
            tensor = tensor_fn()
            if tensor.shape[0] != self.plan.num_experts:
                raise FairMoeError(f"fused expert tensor {key} has first dimension {tensor.shape[0]}, "
                                   f"not the expert count {self.plan.num_experts}")
            self.fused_seen[layer] += 1
            sliced = tensor.index_select(0, torch.tensor(self.kept[layer]))
            return key, self._scaled(layer, match["name"] or match["granite"], sliced)
        match = ROUTER.match(key)
        if match and int(match["layer"]) in self.kept:
            layer = int(match["layer"])
            tensor = tensor_fn()
            if tensor.shape[0] == self.plan.num_experts:
                self.routers_seen[layer] += 1
                tensor = tensor.index_select(0, torch.tensor(self.kept[layer]))
                if layer in self.temperatures and not key.endswith("e_score_correction_bias"):
                    tensor = (tensor.float() * self.temperatures[layer]).to(tensor.dtype)
            return key, tensor
        return key, tensor_fn()

    def _scaled(self, layer: int, name: str, tensor: torch.Tensor) -> torch.Tensor:
        if layer not in self.scales or not DOWN.search(name):
            return tensor
        return (tensor.float() * self.scales[layer]).to(tensor.dtype)

    def check_complete(self) -> None:
        for layer, kept in self.kept.items():
            if not self.routers_seen[layer]:
                raise FairMoeError(f"no router weight found for MoE layer {layer} in the source checkpoint")
            if not self.fused_seen[layer] and self.experts_seen[layer] != set(kept):
                raise FairMoeError(f"layer {layer}: found experts {sorted(self.experts_seen[layer])} in the source "
                                   f"checkpoint, the plan keeps {kept}")


def stream_rewrite(source: Path, out: Path, plan: PrunePlan, max_shard_bytes: int = 2 * 2**30,
                   progress: bool = True) -> dict:
    """Write the pruned weights of ``source`` into ``out`` (shards + index when more than one).

    Returns {"source_bytes", "written_bytes", "shards"}.
    """
    rewriter = KeyRewriter(plan)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    buffer: dict[str, torch.Tensor] = {}
    buffered = 0
    parts: list[tuple[Path, list[str]]] = []
    source_bytes = written = 0

    def flush() -> None:
        nonlocal buffer, buffered
        if not buffer:
            return
        path = out / f".part-{len(parts):05d}.safetensors"
        save_file(buffer, str(path), metadata={"format": "pt"})
        parts.append((path, list(buffer)))
        buffer, buffered = {}, 0

    for shard in tqdm(source_shards(source), desc="rewriting shards", unit="shard", disable=not progress):
        source_bytes += shard.stat().st_size
        with safe_open(str(shard), "pt") as f:
            for key in f.keys():
                result = rewriter.rewrite(key, lambda k=key: f.get_tensor(k))
                if result is None:
                    continue
                new_key, tensor = result
                tensor = tensor.contiguous()
                size = tensor.numel() * tensor.element_size()
                if buffered and buffered + size > max_shard_bytes:
                    flush()
                buffer[new_key] = tensor
                buffered += size
                written += size
    flush()
    rewriter.check_complete()
    if len(parts) == 1:
        parts[0][0].rename(out / "model.safetensors")
    else:
        weight_map = {}
        for i, (path, keys) in enumerate(parts, 1):
            name = f"model-{i:05d}-of-{len(parts):05d}.safetensors"
            path.rename(out / name)
            weight_map.update({k: name for k in keys})
        index = {"metadata": {"total_size": written}, "weight_map": dict(sorted(weight_map.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return {"source_bytes": source_bytes, "written_bytes": written, "shards": len(parts)}


def copy_side_files(source: Path, out: Path) -> None:
    """Tokenizer, generation config and other small files of the source, weights and config excepted."""
    for path in Path(source).iterdir():
        if path.is_file() and not SKIP_FILES.search(path.name):
            shutil.copy2(path, Path(out) / path.name)
