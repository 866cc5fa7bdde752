"""Quantized copies of saved tiny checkpoints, in the on-disk formats fair_moe reads (built here, no GPU needed).

Each writer reads a float checkpoint folder written by ``save_pretrained`` and writes the same model in one format:

- ``to_fp8``: DeepSeek-V3-style FP8, every decoder linear's ``weight`` float8_e4m3fn with ``weight_scale_inv``
  float32 block scales (amax / 448 per block), routers / norms / embeddings / lm_head unquantized;
- ``to_mxfp4``: gpt-oss-style MXFP4 experts (``*_blocks`` two FP4 codes per byte, ``*_scales`` E8M0 exponents);
- ``to_compressed_tensors``: llm-compressor's format, quantized with compressed-tensors' own compressors.

``fp8_block_value`` / ``mxfp4_value`` give the exact float value a quantized weight encodes.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max
# Every linear weight inside a decoder layer, but not the router (``mlp.gate`` / ``mlp.router``).
DECODER_LINEAR = re.compile(r"^model\.layers\.\d+\.(?:self_attn|mlp)\.(?!gate\.|router\.).*\.weight$")


def _copy_side_files(source: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        if path.is_file() and path.suffix != ".safetensors" and path.name != "config.json":
            shutil.copy2(path, out / path.name)


def _write(source: Path, out: Path, tensors: dict, quantization_config: dict) -> Path:
    _copy_side_files(source, out)
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = quantization_config
    (out / "config.json").write_text(json.dumps(config, indent=2))
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def fp8_block(weight: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 [out, in], scale_inv [ceil(out/B0), ceil(in/B1)]); the last partial blocks are ordinary blocks."""
    rows, cols = weight.shape
    grid = (math.ceil(rows / block[0]), math.ceil(cols / block[1]))
    padded = torch.zeros(grid[0] * block[0], grid[1] * block[1])
    padded[:rows, :cols] = weight.float()
    blocks = padded.view(grid[0], block[0], grid[1], block[1])
    amax = blocks.abs().amax(dim=(1, 3))
    scale_inv = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (blocks / scale_inv[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q.view(grid[0] * block[0], grid[1] * block[1])[:rows, :cols].contiguous(), scale_inv.contiguous()


def fp8_block_value(q: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    expanded = scale_inv.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    return q.float() * expanded[: q.shape[0], : q.shape[1]]


def to_fp8(source: Path, out: Path, block: tuple[int, int] = (16, 16)) -> Path:
    tensors = {}
    for key, tensor in load_file(str(source / "model.safetensors")).items():
        if DECODER_LINEAR.match(key) and tensor.dim() == 2:
            tensors[key], tensors[key + "_scale_inv"] = fp8_block(tensor, block)
        else:
            tensors[key] = tensor
    return _write(source, out, tensors, {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                         "weight_block_size": list(block)})


FP4_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def mxfp4(weight_out_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., out, in] → blocks uint8 [..., out, in/32, 16] (element 2b in byte b's low nibble, 2b+1 in its high
    one) and scales uint8 [..., out, in/32] (value 2^(byte − 127), the smallest power of two with |x| / 2^e ≤ 6)."""
    *lead, rows, cols = weight_out_in.shape
    groups = weight_out_in.float().reshape(*lead, rows, cols // 32, 32)
    amax = groups.abs().amax(-1)
    exponent = torch.ceil(torch.log2(amax.clamp(min=torch.finfo(torch.float32).tiny) / 6.0))
    exponent = torch.where(amax > 0, exponent, torch.full_like(exponent, -127.0)).clamp(-127, 127)
    scaled = groups / torch.exp2(exponent)[..., None]
    code = (scaled.abs().clamp(max=6.0)[..., None] - FP4_VALUES[:8]).abs().argmin(-1) | ((scaled < 0).long() << 3)
    code = code.to(torch.uint8)
    return (code[..., 0::2] | (code[..., 1::2] << 4)).contiguous(), (exponent + 127).to(torch.uint8).contiguous()


def mxfp4_value(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """[..., out, in] in float32."""
    values = torch.stack([FP4_VALUES[(blocks & 0x0F).long()], FP4_VALUES[(blocks >> 4).long()]], -1).flatten(-2)
    return (values * torch.exp2(scales.float() - 127)[..., None]).flatten(-2)


MXFP4_EXPERTS = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)$")


def to_mxfp4(source: Path, out: Path) -> Path:
    """gpt_oss: fused expert matrices [E, in, out] on disk become ``<name>_blocks`` / ``<name>_scales`` of their
    transpose [E, out, in]."""
    tensors = {}
    for key, tensor in load_file(str(source / "model.safetensors")).items():
        if MXFP4_EXPERTS.match(key):
            tensors[key + "_blocks"], tensors[key + "_scales"] = mxfp4(tensor.transpose(-1, -2))
        else:
            tensors[key] = tensor
    return _write(source, out, tensors, {
        "quant_method": "mxfp4",
        "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens",
                                   "lm_head"]})


# name → (compressed-tensors preset, storage format)
CT_SCHEMES = {"w4a16": ("W4A16", "pack-quantized"), "w8a16": ("W8A16", "pack-quantized"),
              "fp8": ("FP8_DYNAMIC", "float-quantized")}


def _qparams(weight: torch.Tensor, args):
    from compressed_tensors.quantization.utils import calculate_qparams

    if args.strategy == "group":
        groups = weight.reshape(weight.shape[0], -1, args.group_size)
        low, high = groups.amin(-1), groups.amax(-1)
    elif args.strategy == "channel":
        low, high = weight.amin(-1, keepdim=True), weight.amax(-1, keepdim=True)
    else:
        low, high = weight.amin().reshape(1), weight.amax().reshape(1)
    return calculate_qparams(low, high, args)


def to_compressed_tensors(source: Path, out: Path, scheme: str = "w4a16", group_size: int = 16) -> Path:
    """Every decoder linear but the routers, compressed by compressed-tensors itself (symmetric)."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig, preset_name_to_scheme

    preset, storage = CT_SCHEMES[scheme]
    quant_scheme = preset_name_to_scheme(preset, ["Linear"])
    if quant_scheme.weights.strategy == "group":
        quant_scheme.weights.group_size = group_size
    quant_scheme.format = storage
    compressor = BaseCompressor.get_value_from_registry(storage)
    tensors = {}
    for key, tensor in load_file(str(source / "model.safetensors")).items():
        if not (DECODER_LINEAR.match(key) and tensor.dim() == 2):
            tensors[key] = tensor
            continue
        scale, zero_point = _qparams(tensor, quant_scheme.weights)
        packed = compressor.compress({"weight": tensor, "weight_scale": scale.to(tensor.dtype),
                                      "weight_zero_point": zero_point}, quant_scheme)
        tensors.update({key[: -len("weight")] + name: t.contiguous() for name, t in packed.items()})
    config = QuantizationConfig(config_groups={"group_0": quant_scheme}, format=storage,
                                quantization_status="compressed",
                                ignore=["lm_head", "re:.*mlp.gate$", "re:.*mlp.router$"]).model_dump(mode="json")
    return _write(source, out, tensors, config)
