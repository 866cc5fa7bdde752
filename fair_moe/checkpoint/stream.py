"""Streaming checkpoint rewrite: read the source safetensors shard by shard, write new shards.

Only one source tensor and one output shard are in memory at a time, so a checkpoint far larger than
RAM can be rewritten. What each key becomes is decided by a ``rewrite(key, load) -> (new key, tensor) |
None`` callable (``load()`` reads the source tensor only when it is needed); the engine knows nothing
about experts or families.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from fair_moe.core.errors import FairMoeError

KeyRewrite = Callable[[str, Callable[[], torch.Tensor]], "tuple[str, torch.Tensor] | None"]
# What a pruned checkpoint takes over from its source besides weights and config: tokenizer / processor files,
# the generation config, the licence and notices. Not the base model's own card, training notes or metrics.
SIDE_FILES = re.compile(r"^(tokenizer.*|vocab.*|merges\.txt|special_tokens_map\.json|added_tokens\.json"
                        r"|chat_template\..*|generation_config\.json|preprocessor_config\.json"
                        r"|processor_config\.json|.*\.tiktoken|.*\.model|LICEN[CS]E.*|NOTICE.*|USE_POLICY.*)$")


def weight_files(folder: Path) -> list[Path]:
    """The ``.safetensors`` weight files of a checkpoint folder, without fair_moe's own files (scores, learned
    compensation tensors) that sit beside the weights of a pruned checkpoint."""
    return sorted(p for p in Path(folder).glob("*.safetensors") if not p.name.startswith("fair_moe_"))


def source_shards(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder (index order when there is an index)."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / n for n in names]
    shards = weight_files(folder)
    if not shards:
        raise FairMoeError(f"{folder} holds no .safetensors weights: the streaming rewriter needs safetensors "
                           "(re-save the model with save_pretrained)")
    return shards


def stream_rewrite(source: Path, out: Path, rewrite: KeyRewrite, max_shard_bytes: int = 2 * 2**30,
                   progress: bool = True) -> dict:
    """Write the rewritten tensors of ``source`` into ``out`` (shards + index when more than one).

    Returns {"source_bytes", "written_bytes", "shards"}.
    """
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
                result = rewrite(key, lambda k=key: f.get_tensor(k))
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


def copy_side_files(source: Path, out: Path, remote_code: bool = False) -> list[str]:
    """Copy the source's tokenizer / processor files, generation config and licence files (``SIDE_FILES``), and its
    Python files when its config registers remote code (``remote_code``). Returns the names copied."""
    copied = []
    for path in sorted(Path(source).iterdir()):
        if path.is_file() and (SIDE_FILES.match(path.name) or (remote_code and path.suffix == ".py")):
            shutil.copy2(path, Path(out) / path.name)
            copied.append(path.name)
    return copied


def streamable_source(name: str) -> Path | None:
    """The local checkpoint folder to stream weights from, if ``name`` is one with safetensors."""
    path = Path(name)
    return path if path.is_dir() and weight_files(path) else None
