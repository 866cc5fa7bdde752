"""Output folders appear whole or not at all; --out is claimed for one run at a time; the source is never touched."""

import os
import subprocess
import sys

import pytest

from fair_moe.checkpoint.atomic import OutputClaim, check_apart, write_atomically
from fair_moe.core.errors import FairMoeError


def _fair_moe_output(folder):
    folder.mkdir()
    (folder / "fair_moe_plan.json").write_text("{}")
    (folder / "old.txt").write_text("old")
    return folder


def test_write_atomically_leaves_nothing_on_failure(tmp_path):
    out = tmp_path / "out"

    def failing(folder):
        (folder / "partial.bin").write_bytes(b"x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_atomically(out, failing)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_a_fair_moe_output_only_on_success(tmp_path):
    out = _fair_moe_output(tmp_path / "out")
    with pytest.raises(RuntimeError):
        write_atomically(out, lambda f: (_ for _ in ()).throw(RuntimeError("boom")), overwrite=True)
    assert (out / "old.txt").read_text() == "old"
    write_atomically(out, lambda f: (f / "fair_moe_plan.json").write_text("new"), overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["fair_moe_plan.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_overwrite_refuses_a_folder_fair_moe_did_not_write(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    with pytest.raises(FairMoeError, match="not written by fair_moe"):
        write_atomically(out, lambda f: None, overwrite=True)
    assert (out / "thesis.tex").read_text() == "precious"


def test_a_disk_fault_is_one_clear_error(tmp_path):
    def no_space(folder):
        raise OSError(28, "No space left on device", str(folder / "model.safetensors"))

    with pytest.raises(FairMoeError, match="No space left on device.*model.safetensors"):
        write_atomically(tmp_path / "out", no_space)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("target,relation", [("", "is"), ("sub/out", "lies inside"), ("..", "contains")])
def test_writing_into_the_source_is_refused(tmp_path, target, relation):
    source = tmp_path / "model"
    source.mkdir()
    with pytest.raises(FairMoeError, match=f"--out .* {relation} the source model"):
        check_apart(source, (source / target) if target != ".." else tmp_path, "--out")
    check_apart(source, tmp_path / "elsewhere", "--out")  # a sibling is fine


def test_a_symlink_into_the_source_is_followed(tmp_path):
    source = tmp_path / "model"
    source.mkdir()
    (tmp_path / "link").symlink_to(source)
    with pytest.raises(FairMoeError, match="is the source model"):
        check_apart(source, tmp_path / "link", "--out")


def test_a_killed_run_leaves_only_its_container_and_the_next_run_clears_it(tmp_path):
    out = tmp_path / "out"
    code = ("import os; from fair_moe.checkpoint.atomic import OutputClaim; "
            f"c = OutputClaim({str(out)!r}).__enter__(); "
            "c.staging.mkdir(); (c.staging / 'half.bin').write_bytes(b'x'); os.kill(os.getpid(), 9)")
    subprocess.run([sys.executable, "-c", code])
    left = list(tmp_path.iterdir())
    assert len(left) == 1 and left[0].name.startswith(".out.fair_moe-partial-")
    write_atomically(out, lambda f: (f / "fair_moe_plan.json").write_text("{}"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_run_killed_mid_replace_gets_its_previous_output_back(tmp_path):
    out = _fair_moe_output(tmp_path / "out")
    container = tmp_path / f".out.fair_moe-partial-{os.getpid() + 100000}"
    container.mkdir()
    out.rename(container / "old")  # killed between moving the old output away and moving the new one in
    with OutputClaim(out, overwrite=True):
        assert (out / "old.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_second_run_into_the_same_out_is_refused_while_the_first_holds_it(tmp_path):
    out = tmp_path / "out"
    with OutputClaim(out):
        code = (f"from fair_moe.checkpoint.atomic import OutputClaim; from fair_moe.core.errors import FairMoeError\n"
                f"try:\n    OutputClaim({str(out)!r}).__enter__()\nexcept FairMoeError as e:\n    print(e)")
        message = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout
        assert "another fair_moe run is writing --out" in message
    assert list(tmp_path.iterdir()) == []  # released and removed on exit
    with OutputClaim(out):  # and free again
        pass
