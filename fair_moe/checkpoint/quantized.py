"""Quantized source checkpoints: the formats fair_moe reads and writes back, and what each of their tensors is.

transformers dequantises FP8, MXFP4 and compressed-tensors checkpoints while loading where no kernel for the format
is present (and always when asked to); fair_moe calibrates on that dequantised model and then rewrites the *source*
files key by key, so the output is in the source's format: kept experts' quantized tensors are copied byte for byte,
removed experts' are dropped, and ``quantization_config`` stays in config.json. A format here says

- how to ask transformers for a dequantising load (``dequantizing_config``), used for calibration and for the
  write-time check alike, so both see the same numbers whatever kernels the machine has;
- what each checkpoint tensor is (``role``): a quantized *payload* (copied as it is), a multiplicative *scale* of a
  weight (multiplying it multiplies the dequantised weight exactly), an *exponent* (MXFP4's E8M0 scales: only
  powers of two are exact), or *auxiliary* data (zero points, shapes, activation scales) that no change touches;
- which kinds of compensation can be written into it exactly (``writable``): router-only changes always (routers
  are stored unquantized in every supported format), a per-layer output scale where scales are plain numbers.

Anything else (an unknown ``quant_method``, a compressed-tensors layout transformers cannot load) is refused with
one line naming it, before any weights are read.
"""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass

from fair_moe.core.errors import FairMoeError
from fair_moe.core.lazy import lazy_module

torch = lazy_module("torch")

# What a compensation changes, as the writer needs to know it (``Compensation.writes``).
ROUTER = "router"  # only router tensors
EXPERT_SCALE = "expert-scale"  # experts' down projections multiplied by one number per layer
EXPERT_WEIGHTS = "expert-weights"  # experts' weights rewritten (merging)

PAYLOAD, SCALE, EXPONENT, AUXILIARY = "payload", "scale", "exponent", "auxiliary"
# Suffixes of the tensors that encode one weight ``X.weight`` (or, MXFP4, ``X``), longest first.
_ENCODING_SUFFIXES = ("_scale_inv", "_zero_point", "_packed", "_scale", "_shape", "_g_idx", "_blocks", "_scales")
ACTIVATION_SCALE = re.compile(r"(?:^|\.)(?:input|output|activation|k|v)_scale$")


def _is_fp8(dtype) -> bool:
    return dtype in (torch.float8_e4m3fn, torch.float8_e5m2)


@dataclass(frozen=True)
class QuantFormat:
    """One quantized checkpoint format (``quantization_config["quant_method"]``)."""

    method: str
    label: str
    writable: frozenset[str]

    def check(self, qconfig: dict) -> None:
        """Refuse variants of the format that transformers cannot load (one FairMoeError naming the variant)."""

    def dequantizing_config(self, qconfig: dict):
        """A transformers quantization config of the checkpoint's own class that makes ``from_pretrained``
        dequantise every weight to the requested dtype."""
        raise NotImplementedError

    def role(self, name: str, dtype) -> str | None:
        """What the checkpoint tensor ``name`` (a key's tail, e.g. ``down_proj.weight_scale_inv``) of ``dtype``
        is: PAYLOAD, SCALE, EXPONENT, AUXILIARY, or None for a plain floating-point tensor."""
        raise NotImplementedError

    def loading(self, qconfig: dict) -> contextlib.AbstractContextManager:
        """Entered around every ``from_pretrained`` of this format (a correction of transformers' loader)."""
        return contextlib.nullcontext()


class BlockFP8(QuantFormat):
    """DeepSeek-V3-style FP8: ``X.weight`` float8_e4m3fn with ``X.weight_scale_inv`` float32 block scales
    ([ceil(out/B0), ceil(in/B1)]), dequantised = weight × scale_inv (each scale over its block)."""

    def dequantizing_config(self, qconfig):
        from transformers import FineGrainedFP8Config

        return FineGrainedFP8Config(dequantize=True, modules_to_not_convert=qconfig.get("modules_to_not_convert"))

    def role(self, name, dtype):
        if name.endswith("weight_scale_inv"):
            return SCALE
        if ACTIVATION_SCALE.search(name):
            return AUXILIARY
        return PAYLOAD if _is_fp8(dtype) else None

    def loading(self, qconfig):
        block = qconfig.get("weight_block_size")
        return exact_fp8_blocks(tuple(block)) if block else contextlib.nullcontext()


class MXFP4(QuantFormat):
    """gpt-oss-style MXFP4 experts: fused ``experts.<name>_blocks`` uint8 [E, out, in/32, 16] (two FP4 codes per
    byte) with ``experts.<name>_scales`` uint8 [E, out, in/32] (E8M0 exponents); biases and routers plain."""

    def dequantizing_config(self, qconfig):
        from transformers import Mxfp4Config

        return Mxfp4Config(dequantize=True)

    def role(self, name, dtype):
        if name.endswith("_blocks"):
            return PAYLOAD
        if name.endswith("_scales"):
            return EXPONENT
        return None


# compressed-tensors layouts transformers 5.x loads for per-expert MoE weights (the others fail inside its loader)
CT_LOADABLE_FORMATS = ("pack-quantized", "float-quantized", "naive-quantized")


class CompressedTensors(QuantFormat):
    """llm-compressor's format with per-expert keys: ``X.weight_packed`` int32 (or ``X.weight`` FP8) with
    ``X.weight_scale`` (dequantised = (q − zero point) × scale), ``X.weight_shape``, optional zero points."""

    def check(self, qconfig):
        if qconfig.get("sparsity_config"):
            raise FairMoeError("this compressed-tensors checkpoint is also sparse-compressed (sparsity_config), which "
                               "fair_moe cannot rewrite: use a checkpoint without sparsity compression")
        default_format = qconfig.get("format")
        for name, group in (qconfig.get("config_groups") or {}).items():
            weights = group.get("weights") or {}
            layout = group.get("format") or default_format
            problem = None
            if layout not in CT_LOADABLE_FORMATS:
                problem = f"format {layout!r}"
            elif weights.get("symmetric") is False:
                problem = "asymmetric weights (zero points)"
            elif weights.get("strategy") == "block":
                problem = "block-wise weight scales"
            if problem:
                raise FairMoeError(f"compressed-tensors group {name!r} uses {problem}, which the installed "
                                   "transformers cannot load for MoE experts; fair_moe reads symmetric pack-quantized "
                                   "(W4A16, W8A16) and per-channel / per-tensor float-quantized (FP8) experts")

    def dequantizing_config(self, qconfig):
        from transformers import CompressedTensorsConfig

        return CompressedTensorsConfig(dequantize=True)

    def role(self, name, dtype):
        if name.endswith(("weight_packed",)) or (name.endswith("weight") and (_is_fp8(dtype) or dtype == torch.int8)):
            return PAYLOAD
        if name.endswith("weight_scale"):
            return SCALE
        if name.endswith(("weight_zero_point", "weight_shape", "weight_g_idx")) or ACTIVATION_SCALE.search(name):
            return AUXILIARY
        return None


FORMATS: dict[str, QuantFormat] = {
    f.method: f for f in (
        BlockFP8("fp8", "FP8 with block scales", frozenset({ROUTER, EXPERT_SCALE})),
        MXFP4("mxfp4", "MXFP4", frozenset({ROUTER})),
        CompressedTensors("compressed-tensors", "compressed-tensors", frozenset({ROUTER, EXPERT_SCALE})),
    )
}


def quantization_config(config) -> dict | None:
    """The checkpoint's ``quantization_config`` as a dict (None when it is not quantized)."""
    qconfig = getattr(config, "quantization_config", None)
    if qconfig is None:
        return None
    return qconfig if isinstance(qconfig, dict) else qconfig.to_dict()


def source_format(config) -> QuantFormat | None:
    """The format of a quantized checkpoint's config (None when not quantized); FairMoeError for one fair_moe cannot
    rewrite, naming it."""
    qconfig = quantization_config(config)
    if qconfig is None:
        return None
    method = qconfig.get("quant_method")
    if method not in FORMATS:
        raise FairMoeError(f"the checkpoint is quantized with {method!r}, which fair_moe cannot read and write back; "
                           f"it reads {', '.join(f.label + ' (' + m + ')' for m, f in FORMATS.items())}. Dequantise "
                           "the checkpoint first (load it and save_pretrained in bf16) and prune that")
    fmt = FORMATS[method]
    fmt.check(qconfig)
    return fmt


def encoded_weight(name: str) -> str:
    """The weight a quantized tensor encodes: ``down_proj.weight_scale_inv`` → ``down_proj.weight``,
    ``down_proj_blocks`` → ``down_proj``; other names unchanged."""
    head, dot, last = name.rpartition(".")
    for suffix in _ENCODING_SUFFIXES:
        if last.endswith(suffix) and last != suffix.lstrip("_"):
            return head + dot + last[: -len(suffix)]
    return name


@contextlib.contextmanager
def exact_fp8_blocks(block: tuple[int, int]):
    """While loading, dequantise FP8 tensors whose shape is not a multiple of the block size correctly.

    transformers 5.x derives the block from ``weight.shape // scale.shape``, which is wrong when a dimension is not a
    multiple of the configured block (DeepSeek-V3's 576-row ``kv_a_proj_with_mqa`` with 128-wide blocks raises; a
    24-row weight with 16-row blocks is silently mis-scaled). Such tensors are dequantised here with the configured
    block and the last partial block cropped, as the FP8 kernels do; every other tensor goes to transformers' own code.
    """
    try:
        from transformers.integrations.finegrained_fp8 import Fp8Dequantize
    except ImportError:  # a transformers without the dequantising loader: nothing to correct
        yield
        return
    original = Fp8Dequantize._dequantize_one
    rows_block, cols_block = block

    def dequantize_one(self, quantized, scales, output_dtype=None):
        rows, cols = quantized.shape[-2:]
        partial = rows % rows_block or cols % cols_block
        grid = (math.ceil(rows / rows_block), math.ceil(cols / cols_block))
        if not (_is_fp8(quantized.dtype) and partial and scales.dim() >= 2 and tuple(scales.shape[-2:]) == grid):
            return original(self, quantized, scales, output_dtype)
        expanded = scales.float().repeat_interleave(rows_block, -2).repeat_interleave(cols_block, -1)
        dtype = output_dtype or (scales.dtype if scales.dtype.is_floating_point and scales.element_size() >= 2
                                 else torch.bfloat16)
        return (quantized.float() * expanded[..., :rows, :cols]).to(dtype)

    Fp8Dequantize._dequantize_one = dequantize_one
    try:
        yield
    finally:
        Fp8Dequantize._dequantize_one = original


@dataclass(frozen=True)
class QuantizedSource:
    """A quantized checkpoint being pruned: its format and its ``quantization_config``."""

    format: QuantFormat
    config: dict

    def load_kwargs(self) -> dict:
        """``from_pretrained`` keyword arguments for a dequantising load."""
        return {"quantization_config": self.format.dequantizing_config(self.config)}

    def loading(self) -> contextlib.AbstractContextManager:
        return self.format.loading(self.config)

    def describe(self) -> str:
        """For the console and the model card: ``FP8 with block scales (fp8, weight_block_size [128, 128])``."""
        details = [self.format.method]
        if self.config.get("weight_block_size"):
            details.append(f"weight_block_size {list(self.config['weight_block_size'])}")
        return f"{self.format.label} ({', '.join(details)})"


def quantized_source(config) -> QuantizedSource | None:
    """The quantized source behind ``config`` (None when it is not quantized); FairMoeError for an unreadable one."""
    fmt = source_format(config)
    return None if fmt is None else QuantizedSource(fmt, quantization_config(config))
