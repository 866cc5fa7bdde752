"""A model that keeps some modules in float32 when loaded in half precision (ergo: its embedding, routers and
per-expert norms): the written checkpoint is reloaded, and compared, in the dtype the model was loaded in."""

import pytest
import torch
from conftest import write_checkpoint
from families import all_configs
from transformers import AutoModelForCausalLM

from fair_moe import prune
from fair_moe.metrics import compute_dtype


@pytest.fixture(scope="module")
def ergo_checkpoint(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("ergo") / "src", all_configs()["ergo"], seed=2)


def test_compute_dtype_is_the_dtype_most_parameters_are_in(ergo_checkpoint):
    model = AutoModelForCausalLM.from_pretrained(ergo_checkpoint, dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.float32  # its embedding stays float32
    assert compute_dtype(model) == torch.bfloat16


@pytest.mark.parametrize("write", [[], ["--no-stream"]])
def test_a_half_precision_run_verifies_its_checkpoint(ergo_checkpoint, tmp_path, write):
    calib = tmp_path / "a.txt"
    calib.write_text("def f(x):\n    return x + 1\n" * 200)
    out = tmp_path / "out"
    assert prune.main([str(a) for a in ["--model", ergo_checkpoint, "--calib-file", calib, "--samples", "8",
                                        "--seq-len", "32", "--batch-size", "4", "--budget", "0.5", "--allocation",
                                        "tod", "--compensate", "none", "--dtype", "bfloat16", "--quiet", *write,
                                        "--out", out]]) == 0
    assert (out / "model.safetensors").is_file()
