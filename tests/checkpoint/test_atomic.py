"""Output folders appear whole or not at all."""

import pytest

from fair_moe.checkpoint.atomic import write_atomically


def test_write_atomically_leaves_nothing_on_failure(tmp_path):
    out = tmp_path / "out"

    def failing(folder):
        (folder / "partial.bin").write_bytes(b"x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_atomically(out, failing)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_write_atomically_overwrite_replaces_only_on_success(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        write_atomically(out, lambda f: (_ for _ in ()).throw(RuntimeError("boom")), overwrite=True)
    assert (out / "old.txt").read_text() == "old"
    write_atomically(out, lambda f: (f / "new.txt").write_text("new"), overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
