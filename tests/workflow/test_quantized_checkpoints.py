"""Quantized checkpoints in, the same format out: pruned FP8, MXFP4 and compressed-tensors checkpoints reload through
transformers as the dequantised masked original, kept experts' quantized bytes are the source's, and what a format
cannot hold exactly is refused or left out of auto."""

import json
import re

import pytest
import torch
from conftest import write_checkpoint
from families import family_configs, grouped_uneven_plan
from quantize import to_compressed_tensors, to_fp8, to_mxfp4
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from fair_moe import prune
from fair_moe.checkpoint.loading import load_model
from fair_moe.checkpoint.quantized import quantized_source
from fair_moe.core.plan import PrunePlan
from fair_moe.workflow.api import reference

FAST = ["--samples", "4", "--seq-len", "32", "--batch-size", "2", "--quiet"]
# name → (family, writer); each fixture is the family's tiny float checkpoint written in the format
FORMATS = {
    # 8 × 8 blocks divide every dimension: plain from_pretrained dequantises them right (partial blocks:
    # tests/checkpoint/test_quantized.py)
    "fp8": ("deepseek_v3", lambda src, out: to_fp8(src, out, block=(8, 8))),
    "mxfp4": ("gpt_oss", to_mxfp4),
    "ct-w4a16": ("qwen3_moe", lambda src, out: to_compressed_tensors(src, out, "w4a16")),
    "ct-fp8": ("qwen3_moe", lambda src, out: to_compressed_tensors(src, out, "fp8")),
}
PER_EXPERT = re.compile(r"^(?P<head>.*\.layers\.(?P<layer>\d+)\.mlp\.experts\.)(?P<expert>\d+)\.(?P<rest>.+)$")
FUSED = re.compile(r"^.*\.layers\.(?P<layer>\d+)\.mlp\.experts\.(?P<name>\w+)$")


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """name → folder of the quantized tiny checkpoint (built lazily, once per module)."""
    built = {}

    def get(name):
        if name not in built:
            family, writer = FORMATS[name]
            config = family_configs()[family]
            if family == "gpt_oss":
                config.intermediate_size = 32  # MXFP4 groups 32 input values
            source = write_checkpoint(tmp_path_factory.mktemp(f"{name}-float"), config)
            built[name] = writer(source, tmp_path_factory.mktemp(name))
        return built[name]

    return get


def _prune(model, out, *extra):
    return prune.main(["--model", str(model), "--out", str(out), *FAST, *map(str, extra)])


def _dequantised(folder):
    """The checkpoint through from_pretrained with its format's dequantising config (for FP8_DYNAMIC
    compressed-tensors the default load would also quantize activations, which is the format's runtime, not its
    weights)."""
    return load_model(str(folder), "AutoModelForCausalLM", torch.float32, torch.device("cpu"), trust_remote_code=True,
                      quantized=quantized_source(AutoConfig.from_pretrained(folder, trust_remote_code=True)))


def _masked_original_logits(source, plan, ids):
    model = _dequantised(source)
    with torch.no_grad(), reference(model, plan):
        return model(input_ids=ids).logits


def _assert_kept_quantized_bytes_are_the_sources(source, out, plan, quantized_dtypes):
    """Every quantized expert tensor of the output is the source's tensor of the kept expert it came from."""
    src, new = load_file(str(source / "model.safetensors")), load_file(str(out / "model.safetensors"))
    checked = 0
    for key, tensor in new.items():
        if tensor.dtype not in quantized_dtypes:
            continue
        match, fused = PER_EXPERT.match(key), FUSED.match(key)
        if match:
            layer = int(match["layer"])
            old = f"{match['head']}{plan.kept[layer][int(match['expert'])]}.{match['rest']}"
            expected = src[old]
        elif fused and int(fused["layer"]) in plan.kept:
            expected = src[key][torch.tensor(plan.kept[int(fused["layer"])])]
        else:
            assert torch.equal(tensor.view(torch.uint8), src[key].view(torch.uint8)), key  # not an expert: as is
            continue
        assert torch.equal(tensor.view(torch.uint8), expected.view(torch.uint8)), key
        checked += 1
    assert checked > 0


QUANTIZED_DTYPES = {"fp8": {torch.float8_e4m3fn}, "mxfp4": {torch.uint8}, "ct-w4a16": {torch.int32},
                    "ct-fp8": {torch.float8_e4m3fn}}


@pytest.mark.parametrize("name", list(FORMATS))
def test_an_uneven_plan_keeps_the_format_and_equals_the_masked_original(quantized, name, tmp_path):
    source = quantized(name)
    model = _dequantised(source)
    plan = grouped_uneven_plan(model)
    (tmp_path / "plan").mkdir()
    plan.save(tmp_path / "plan")
    out = tmp_path / "out"
    assert _prune(source, out, "--plan", tmp_path / "plan" / "fair_moe_plan.json") == 0
    written = json.loads((out / "config.json").read_text())
    assert written["quantization_config"] == json.loads((source / "config.json").read_text())["quantization_config"]
    _assert_kept_quantized_bytes_are_the_sources(source, out, plan, QUANTIZED_DTYPES[name])
    ids = torch.randint(1, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = _dequantised(out)(input_ids=ids).logits
    assert (got - _masked_original_logits(source, plan, ids)).abs().max() < 1e-4
    assert "the base checkpoint is quantized" in (out / "README.md").read_text()


@pytest.mark.parametrize("name", ["fp8", "ct-w4a16"])
def test_layer_scales_go_into_the_scale_tensors_and_the_payload_is_untouched(quantized, name, tmp_path, calib_files):
    source = quantized(name)
    out = tmp_path / "out"
    calib = [x for f in calib_files for x in ("--calib-file", f)]
    assert _prune(source, out, "--budget", "0.5", "--allocation", "uniform", "--removal", "frequency",
                  "--compensate", "layer-scale", *calib) == 0
    plan = PrunePlan.load(out)
    scales = plan.compensation.per_layer
    assert all(abs(s - 1) > 1e-3 for s in scales.values())
    _assert_kept_quantized_bytes_are_the_sources(source, out, plan, QUANTIZED_DTYPES[name])
    src, new = load_file(str(source / "model.safetensors")), load_file(str(out / "model.safetensors"))
    suffix = "down_proj.weight_scale_inv" if name == "fp8" else "down_proj.weight_scale"
    for layer, kept in plan.kept.items():
        for new_id, old_id in enumerate(kept):
            old = src[f"model.layers.{layer}.mlp.experts.{old_id}.{suffix}"]
            got = new[f"model.layers.{layer}.mlp.experts.{new_id}.{suffix}"]
            assert torch.equal(got, (old.float() * scales[layer]).to(old.dtype))
    ids = torch.randint(1, 200, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = _dequantised(out)(input_ids=ids).logits
    tolerance = 1e-4 if name == "fp8" else 2e-2  # compressed-tensors keeps bf16 scales: s × c is rounded to bf16
    assert (got - _masked_original_logits(source, plan, ids)).abs().max() < tolerance


def test_dequantize_writes_plain_weights_without_the_quantization_config(quantized, tmp_path):
    source = quantized("fp8")
    model = _dequantised(source)
    plan = grouped_uneven_plan(model)
    (tmp_path / "plan").mkdir()
    plan.save(tmp_path / "plan")
    out = tmp_path / "out"
    assert _prune(source, out, "--plan", tmp_path / "plan" / "fair_moe_plan.json", "--dequantize") == 0
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert {t.dtype for t in load_file(str(out / "model.safetensors")).values()} <= {torch.float32, torch.bfloat16}
    ids = torch.randint(1, 200, (2, 12), generator=torch.Generator().manual_seed(2))
    reloaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32)
    with torch.no_grad():
        got = reloaded(input_ids=ids).logits
    assert (got - _masked_original_logits(source, plan, ids)).abs().max() < 1e-4


@pytest.mark.parametrize("extra, message", [
    (["--compensate", "layer-scale"], "--compensate layer-scale changes expert-scale, which cannot be written "
                                      "exactly into MXFP4"),
    (["--compensate", "merge"], "--compensate merge changes expert-weights"),
    (["--no-stream"], "--no-stream would save the dequantised model"),
])
def test_what_mxfp4_cannot_hold_is_refused_before_any_work(quantized, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    assert _prune(quantized("mxfp4"), out, "--budget", "0.5", *extra) == 2
    err = capsys.readouterr().err
    assert message in err and "--dequantize" in err and "Traceback" not in err
    assert not out.exists()


def test_auto_leaves_out_compensations_the_format_cannot_hold(quantized, tmp_path, calib_files):
    out = tmp_path / "out"
    calib = [x for f in calib_files for x in ("--calib-file", f)]
    assert _prune(quantized("mxfp4"), out, "--budget", "0.5", "--allocation", "uniform", "--removal", "frequency",
                  *calib) == 0
    decision = PrunePlan.load(out).settings["compensation_decision"]
    assert set(decision["not_considered"]) == {"layer-scale"}
    assert "layer-scale" not in {row["compensation"] for row in decision["candidates"]}


def test_dequantize_on_a_float_checkpoint_is_refused(tiny_checkpoint, tmp_path, capsys):
    assert _prune(tiny_checkpoint, tmp_path / "out", "--budget", "0.5", "--dequantize") == 2
    assert "is not quantized" in capsys.readouterr().err


def test_an_unknown_quantization_is_one_line(tiny_checkpoint, tmp_path, capsys):
    import shutil

    folder = tmp_path / "gptq"
    shutil.copytree(tiny_checkpoint, folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128}
    (folder / "config.json").write_text(json.dumps(config))
    assert _prune(folder, tmp_path / "out", "--budget", "0.5") == 2
    err = capsys.readouterr().err
    assert "quantized with 'gptq'" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
