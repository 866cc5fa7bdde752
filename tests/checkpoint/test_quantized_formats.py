"""Quantized formats: what each checkpoint tensor is, which formats are refused and how, exact FP8 partial blocks."""

import json

import pytest
import torch
from quantize import fp8_block, fp8_block_value
from transformers import AutoConfig

from fair_moe.checkpoint.quantized import (
    AUXILIARY,
    EXPONENT,
    FORMATS,
    PAYLOAD,
    SCALE,
    encoded_weight,
    quantized_source,
    source_format,
)
from fair_moe.core.errors import FairMoeError


@pytest.mark.parametrize("name, weight", [
    ("down_proj.weight_scale_inv", "down_proj.weight"),
    ("down_proj.weight_packed", "down_proj.weight"),
    ("down_proj.weight_scale", "down_proj.weight"),
    ("down_proj.weight_zero_point", "down_proj.weight"),
    ("down_proj.weight_shape", "down_proj.weight"),
    ("down_proj_blocks", "down_proj"),
    ("gate_up_proj_scales", "gate_up_proj"),
    ("down_proj.weight", "down_proj.weight"),
    ("e_score_correction_bias", "e_score_correction_bias"),
])
def test_a_quantized_tensor_names_the_weight_it_encodes(name, weight):
    assert encoded_weight(name) == weight


@pytest.mark.parametrize("method, name, dtype, role", [
    ("fp8", "down_proj.weight", torch.float8_e4m3fn, PAYLOAD),
    ("fp8", "down_proj.weight_scale_inv", torch.float32, SCALE),
    ("fp8", "down_proj.input_scale", torch.float32, AUXILIARY),
    ("fp8", "weight", torch.bfloat16, None),  # an unquantized tensor of an FP8 checkpoint (the router)
    ("mxfp4", "down_proj_blocks", torch.uint8, PAYLOAD),
    ("mxfp4", "down_proj_scales", torch.uint8, EXPONENT),
    ("mxfp4", "down_proj_bias", torch.float32, None),
    ("compressed-tensors", "down_proj.weight_packed", torch.int32, PAYLOAD),
    ("compressed-tensors", "down_proj.weight", torch.float8_e4m3fn, PAYLOAD),
    ("compressed-tensors", "down_proj.weight_scale", torch.bfloat16, SCALE),
    ("compressed-tensors", "down_proj.weight_zero_point", torch.int32, AUXILIARY),
    ("compressed-tensors", "down_proj.weight_shape", torch.int64, AUXILIARY),
    ("compressed-tensors", "weight", torch.float32, None),
])
def test_every_tensor_of_a_format_has_its_role(method, name, dtype, role):
    assert FORMATS[method].role(name, dtype) == role


def test_only_router_changes_can_be_written_into_mxfp4():
    assert FORMATS["mxfp4"].writable == {"router"}
    assert FORMATS["fp8"].writable == FORMATS["compressed-tensors"].writable == {"router", "expert-scale"}


class _Config:
    def __init__(self, qconfig):
        self.quantization_config = qconfig


def test_an_unknown_quantization_is_refused_with_its_name():
    with pytest.raises(FairMoeError, match=r"quantized with 'gptq'.*fp8.*mxfp4.*compressed-tensors"):
        source_format(_Config({"quant_method": "gptq", "bits": 4}))
    assert source_format(_Config(None)) is None


@pytest.mark.parametrize("weights, storage, what", [
    ({"num_bits": 4, "type": "int", "symmetric": False, "strategy": "group"}, "pack-quantized", "asymmetric"),
    ({"num_bits": 8, "type": "float", "symmetric": True, "strategy": "block"}, "float-quantized", "block-wise"),
    ({"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"}, "int-quantized", "int-quantized"),
])
def test_compressed_tensors_layouts_transformers_cannot_load_are_refused(weights, storage, what):
    qconfig = {"quant_method": "compressed-tensors", "format": storage,
               "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights}}}
    with pytest.raises(FairMoeError, match=what):
        source_format(_Config(qconfig))


def test_partial_fp8_blocks_load_as_the_exact_dequantised_weight(tmp_path):
    """A 24-row weight with 16-row blocks (DeepSeek-V3's kv_a_proj_with_mqa has 576 rows with 128-row blocks):
    loading through fair_moe gives payload × its block's scale for every element."""
    from conftest import write_checkpoint
    from families import family_configs
    from quantize import to_fp8

    from fair_moe.checkpoint.loading import load_model

    source = write_checkpoint(tmp_path / "float", family_configs()["deepseek_v3"])
    folder = to_fp8(source, tmp_path / "fp8", block=(16, 16))
    from safetensors.torch import load_file

    disk = load_file(str(folder / "model.safetensors"))
    key = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"
    assert disk[key].shape[0] % 16 != 0  # the case transformers' own dequantisation gets wrong
    quantized = quantized_source(AutoConfig.from_pretrained(folder))
    model = load_model(str(folder), "AutoModelForCausalLM", torch.float32, torch.device("cpu"), quantized=quantized)
    expected = fp8_block_value(disk[key], disk[key + "_scale_inv"], (16, 16))
    assert torch.equal(model.get_parameter(key), expected)
    assert json.loads((folder / "config.json").read_text())["quantization_config"]["weight_block_size"] == [16, 16]


def test_fp8_block_quantisation_of_the_fixture_is_faithful():
    weight = torch.randn(24, 40)
    q, scale_inv = fp8_block(weight, (16, 16))
    assert scale_inv.shape == (2, 3) and q.dtype == torch.float8_e4m3fn
    assert (fp8_block_value(q, scale_inv, (16, 16)) - weight).abs().max() <= 0.07 * weight.abs().max()
