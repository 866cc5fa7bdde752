"""The write-time verification catches a checkpoint that is not the reference, and then nothing is written."""

import pytest
import torch

from fair_moe import prune
from fair_moe.strategies.compensations.layer_scale import LayerScale
from fair_moe.units.experts import keys, rewrite

FAST = ["--samples", "4", "--seq-len", "32", "--batch-size", "2", "--quiet"]


def _run(tiny_checkpoint, calib_files, out, *extra):
    calib = [x for f in calib_files for x in ("--calib-file", str(f))]
    return prune.main(["--model", str(tiny_checkpoint), "--out", str(out), "--budget", "0.5", "--allocation", "tod",
                       *calib, *FAST, *map(str, extra)])


def _assert_refused(rc, capsys, out):
    err = capsys.readouterr().err
    assert rc == 2 and "does not match the masked original" in err and "Traceback" not in err
    assert not out.exists() and [p.name for p in out.parent.iterdir()] == []


def test_a_wrong_streamed_router_row_is_caught(tiny_checkpoint, calib_files, tmp_path, capsys, monkeypatch):
    original = keys.ExpertKeyRewriter.__call__

    def corrupting(self, key, load):
        result = original(self, key, load)
        if result is not None and key.endswith("layers.1.mlp.gate.weight"):
            corrupted = result[1].clone()
            corrupted[0] += torch.randn(corrupted.shape[1], generator=torch.Generator().manual_seed(0))
            return result[0], corrupted  # one expert's row: adding one vector to every row changes no routing
        return result

    monkeypatch.setattr(keys.ExpertKeyRewriter, "__call__", corrupting)
    out = tmp_path / "out"
    _assert_refused(_run(tiny_checkpoint, calib_files, out, "--compensate", "none"), capsys, out)


def test_a_wrong_in_memory_slice_is_caught(tiny_checkpoint, calib_files, tmp_path, capsys, monkeypatch):
    original = rewrite.apply_plan

    def corrupting(model, plan):
        original(model, plan)
        with torch.no_grad():
            model.model.layers[0].mlp.experts.down_proj.mul_(1.5)
        return model

    monkeypatch.setattr(rewrite, "apply_plan", corrupting)
    out = tmp_path / "out"
    _assert_refused(_run(tiny_checkpoint, calib_files, out, "--compensate", "none", "--no-stream"), capsys, out)


@pytest.mark.parametrize("stream", [True, False])
def test_a_compensation_left_out_of_the_weights_is_caught(tiny_checkpoint, calib_files, tmp_path, capsys,
                                                          monkeypatch, stream):
    monkeypatch.setattr(LayerScale, "transform", lambda self, model, record: None)
    monkeypatch.setattr(LayerScale, "fold", lambda self, model, record: None)
    out = tmp_path / "out"
    extra = ["--compensate", "layer-scale"] + ([] if stream else ["--no-stream"])
    _assert_refused(_run(tiny_checkpoint, calib_files, out, *extra), capsys, out)
