"""The installed wheel: everything the README's commands need is inside it, and its console scripts work from an
empty directory (the wheel goes into a fresh venv with --no-deps, over the test venv's installed packages)."""

import os
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv bin folder, wheel path) with fair_moe installed from its wheel."""
    tmp = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w",
                    str(tmp / "dist"), str(ROOT)], check=True, capture_output=True)
    wheel = next((tmp / "dist").glob("fair_moe-*.whl"))
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp / "venv")], check=True)
    venv_site = next((tmp / "venv" / "lib").glob("python*/site-packages"))
    # the test venv's packages (torch, transformers, …) are visible; its editable fair_moe is not (a .pth line only
    # adds a path, it does not run that path's own .pth files)
    (venv_site / "test_venv.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(tmp / "venv" / "bin" / "python"), "install",
                    "--no-deps", "--quiet", str(wheel)], check=True, capture_output=True)
    return tmp / "venv" / "bin", wheel


def _run(bin_dir: Path, *args, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    return subprocess.run([str(bin_dir / args[0]), *map(str, args[1:])], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def test_the_wheel_carries_what_the_commands_need(installed):
    _, wheel = installed
    names = zipfile.ZipFile(wheel).namelist()
    for needed in ("fair_moe/data/demo_model/model.safetensors", "fair_moe/data/vision_demo/model.safetensors",
                   "fair_moe/data/vision_demo_images/digit_3/", "fair_moe/data/eval_tasks/fair_moe_heldout/utils.py",
                   "fair_moe/data/configs/eval/standard.yaml", "fair_moe/data/configs/models/qwen1.5-moe-a2.7b.json",
                   "fair_moe/data/calib/python.txt", "fair_moe/units/experts/modeling_template.py"):
        assert any(n.startswith(needed) for n in names), needed
    assert any(n.endswith("licenses/LICENSE") for n in names)
    assert not any(n.startswith(("tests/", "scripts/")) for n in names)


def test_console_scripts_answer_from_an_empty_folder(installed, tmp_path):
    bin_dir, _ = installed
    for script in ("fair-moe-prune", "fair-moe-eval", "fair-moe-push"):
        done = _run(bin_dir, script, "--help", cwd=tmp_path)
        assert done.returncode == 0 and f"usage: {script}" in done.stdout, done.stderr
    import_path = _run(bin_dir, "python", "-c", "import fair_moe; print(fair_moe.__file__)", cwd=tmp_path)
    assert str(bin_dir.parent) in import_path.stdout  # the wheel's copy, not the checkout's


def test_the_demo_prunes_from_the_installed_package(installed, tmp_path):
    bin_dir, _ = installed
    done = _run(bin_dir, "fair-moe-prune", "--model", "demo", "--budget", "0.25", "--out", "demo_out",
                "--samples", "8", "--seq-len", "64", "--allocation", "uniform", "--compensate", "none", "--quiet",
                cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "wrote demo_out" and done.stderr == ""  # --quiet: the final path and nothing else
    assert (tmp_path / "demo_out" / "model.safetensors").is_file()
    vision = _run(bin_dir, "fair-moe-prune", "--model", "demo-vision", "--calib-images", "demo-digits", "--budget",
                  "0.3", "--out", "vit_out", "--samples", "40", "--quiet", cwd=tmp_path)
    assert vision.returncode == 0, vision.stderr
    assert vision.stdout.strip() == "wrote vit_out" and vision.stderr == ""
    assert (tmp_path / "vit_out" / "fair_moe_plan.json").is_file()
