"""Hostile inputs and faults through the command line: the user's model is never touched, every fault ends in one
clear ``error:`` line, and nothing is left in or beside ``--out``.

Every case checks the same things:

1. the exit status (2 for input errors and disk faults, 130 / 143 for SIGINT / SIGTERM, -9 for SIGKILL);
2. stderr holds exactly one line starting with ``error:`` and it names the problem and the flag to change
   (a SIGKILLed process prints nothing at all);
3. stderr holds no ``Traceback``;
4. the sha256 of every file of the source model (and of every other input) is the same before and after;
5. the folder ``--out`` lies in holds exactly what it held before: no ``--out``, no ``.NAME.fair_moe-partial-*``
   container, no other new file. A SIGKILL may leave the one container of the killed process; the next normal
   run into the same ``--out`` removes it and leaves only the output folder.

Input errors run in-process (``main(argv)``, stderr from ``capsys``); signals, kills and concurrent runs run
``python -m fair_moe.prune`` in a subprocess. Cases that write into or next to the source use a copy of the
session's tiny checkpoint, never the shared one.
"""

from __future__ import annotations

import collections
import errno
import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import tiny_qwen2_moe_config, write_checkpoint

from fair_moe.checkpoint.atomic import PARTIAL
from fair_moe.cli import eval as eval_cli
from fair_moe.cli import prune as prune_cli
from fair_moe.cli import push as push_cli
from fair_moe.core.plan import PLAN_FILE
from fair_moe.core.scores import SCORES_FILE, Scores

REPO = Path(__file__).resolve().parents[2]
HELDOUT = REPO / "fair_moe" / "data" / "heldout" / "python.txt"
FAST = ["--samples", "4", "--seq-len", "32", "--batch-size", "2", "--quiet"]
METHOD = ["--allocation", "tod", "--compensate", "none"]  # the method does not matter to these cases
PHASE_TIMEOUT = 240  # seconds a subprocess may take to reach the moment a test acts at, or to end


# --- helpers -------------------------------------------------------------------------------------------------------


def hash_tree(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (recursively), keyed by relative path; folders are listed as ``<dir>``
    and symlinks by their target (never followed), so a new empty folder or a re-pointed link shows too."""
    root = Path(root).resolve()
    if root.is_file():
        return {".": hashlib.sha256(root.read_bytes()).hexdigest()}
    tree: dict[str, str] = {}
    for folder, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            path = Path(folder) / name
            key = str(path.relative_to(root))
            if path.is_symlink():
                tree[key] = f"-> {os.readlink(path)}"
            elif path.is_dir():
                tree[key] = "<dir>"
            else:
                tree[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return tree


def one_error_line(stderr: str, *expected: str) -> str:
    """The one ``error:`` line of ``stderr``, after checking that there is exactly one, that it holds every
    ``expected`` substring, and that no traceback was printed."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, f"expected exactly one error: line, got {lines}\n--- stderr ---\n{stderr}"
    for text in expected:
        assert text in lines[0], f"{text!r} not in {lines[0]!r}"
    return lines[0]


def partial_containers(out: Path) -> list[Path]:
    """fair_moe's work containers beside ``out`` (``.NAME.fair_moe-partial-<pid>``)."""
    return sorted(out.parent.glob(f".{out.name}.{PARTIAL}-*")) if out.parent.is_dir() else []


def assert_clean(before: dict[Path, dict[str, str]], out: Path | None = None) -> None:
    """Every snapshot root hashes as before (``before`` is {root: hash_tree(root)}); nothing was left beside
    ``out`` either."""
    for root, tree in before.items():
        assert hash_tree(root) == tree, f"{root} changed"
    if out is not None:
        assert partial_containers(out) == []


def run_main(main: Callable[[list[str]], int], argv: list, capsys) -> tuple[int, str]:
    """Run a command's ``main`` in-process the way ``python -m`` would: an exception that escapes it prints its
    traceback and gives exit status 1 (so the checks below still run and report it). Returns (status, stderr)."""
    capsys.readouterr()
    try:
        status = main([str(a) for a in argv])
    except SystemExit as exit_:
        status = exit_.code if isinstance(exit_.code, int) else 1
    except Exception:
        traceback.print_exc()
        status = 1
    return status, capsys.readouterr().err


# --- shared inputs -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pruned(tiny_checkpoint, calib_files, tmp_path_factory):
    """A fair_moe output folder (plan, scores, card); its scores feed the --scores cases. Never written to."""
    out = tmp_path_factory.mktemp("hostile_pruned") / "pruned"
    calib = [x for f in calib_files for x in ("--calib-file", f)]
    assert prune_cli.main([str(a) for a in ("--model", tiny_checkpoint, "--out", out, "--budget", "0.5",
                                            *METHOD, *calib, *FAST)]) == 0
    return out


@pytest.fixture(scope="module")
def nan_scores(pruned, tmp_path_factory):
    scores = Scores.load(pruned)
    scores.removal["reap"][1, 2] = math.nan
    path = tmp_path_factory.mktemp("hostile_nan") / SCORES_FILE
    scores.save(path)
    return path


@pytest.fixture(scope="module")
def other_scores(calib_files, tmp_path_factory):
    """Scores of another tiny model (8 experts per layer instead of 12)."""
    folder = tmp_path_factory.mktemp("hostile_other")
    model = write_checkpoint(folder / "model", tiny_qwen2_moe_config(num_experts=8))
    calib = [x for f in calib_files for x in ("--calib-file", f)]
    assert prune_cli.main([str(a) for a in ("--model", model, "--out", folder / "out", "--budget", "0.25",
                                            *METHOD, *calib, *FAST)]) == 0
    return folder / "out" / SCORES_FILE


class World:
    """One case's surroundings: ``tmp`` (where ``--out`` and every file a case makes live), the source model
    (the shared tiny checkpoint unless the case copies it), and the inputs whose bytes must not change."""

    def __init__(self, tmp: Path, tiny_checkpoint: Path, calib_files: list[Path], monkeypatch,
                 request: pytest.FixtureRequest):
        self.tmp = tmp
        self.source = Path(tiny_checkpoint)
        self.out = tmp / "out"
        self.calib_files = calib_files
        self.monkeypatch = monkeypatch
        self.request = request
        self.inputs: list[Path] = [*calib_files]

    def copy_source(self, source: Path | None = None, at: Path | None = None) -> Path:
        """Copy the model (default: the tiny checkpoint) into ``tmp`` and make the copy the source."""
        self.source = Path(shutil.copytree(source or self.source, at or self.tmp / "model", symlinks=True))
        return self.source

    def fixture(self, name: str) -> Path:
        """A module fixture (a scores file, the pruned folder), registered as an input that must not change."""
        path = Path(self.request.getfixturevalue(name))
        self.inputs.append(path)
        return path

    def argv(self, *extra, model=None, out=None, budget: str | None = "0.25", calib: bool = True) -> list:
        """--model / --out / --budget, the fast settings and the two calibration files, then ``extra`` (which
        overrides any single-valued flag before it)."""
        args = ["--model", model or self.source, "--out", out or self.out, *FAST, *METHOD]
        if budget is not None:
            args += ["--budget", budget]
        if calib:
            args += [x for f in self.calib_files for x in ("--calib-file", f)]
        return [*args, *extra]

    def snapshot(self) -> dict[Path, dict[str, str]]:
        roots = [self.tmp, self.source, *self.inputs]
        return {Path(r).resolve(): hash_tree(r) for r in roots}


@pytest.fixture
def world(tmp_path, tiny_checkpoint, calib_files, monkeypatch, request):
    return World(tmp_path, tiny_checkpoint, calib_files, monkeypatch, request)


# --- the in-process cases ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """``build(world)`` makes what the case needs and returns the prune argv; ``expect`` are substrings of the one
    ``error:`` line; ``bug`` (when the package gets it wrong today) marks the case as a strict xfail."""

    build: Callable[[World], list]
    expect: tuple[str, ...]
    bug: str | None = None


def _out_is_source(overwrite: bool):
    def build(w: World) -> list:
        source = w.copy_source()
        return w.argv(*(["--overwrite"] if overwrite else []), out=source)

    return build


def _fair_moe_output_as_source(w: World) -> Path:
    """A copy of a fair_moe output folder as the source: --overwrite would be allowed to replace it."""
    return w.copy_source(w.fixture("pruned"), w.tmp / "previous")


def _out_is_fair_moe_source(w: World) -> list:
    source = _fair_moe_output_as_source(w)
    return w.argv("--overwrite", out=source)


def _out_inside_source(w: World) -> list:
    return w.argv(out=w.copy_source() / "sub")


def _out_inside_linked_source(w: World) -> list:
    source = w.copy_source()
    link = w.tmp / "link"
    link.symlink_to(source, target_is_directory=True)
    return w.argv(model=link, out=source / "sub")


def _out_contains_source(w: World) -> list:
    w.copy_source(at=w.tmp / "models" / "model")
    return w.argv("--overwrite", out=w.tmp / "models")


def _out_contains_fair_moe_source(w: World) -> list:
    """Re-pruning OUT/budget-0.25 of a multi-budget run into OUT with --overwrite would replace the source."""
    w.copy_source(w.fixture("pruned"), w.tmp / "multi" / "budget-0.25")
    return w.argv("--overwrite", out=w.tmp / "multi")


def _out_links_to_source(w: World) -> list:
    link = w.tmp / "link"
    link.symlink_to(w.copy_source(), target_is_directory=True)
    return w.argv(out=link)


def _out_links_to_fair_moe_source(w: World) -> list:
    link = w.tmp / "link"
    link.symlink_to(_fair_moe_output_as_source(w), target_is_directory=True)
    return w.argv("--overwrite", out=link)


def _offload_inside_source(w: World) -> list:
    return w.argv("--device-map", "auto", "--offload-folder", w.copy_source() / "offload")


def _multi_budget_inside_source(w: World) -> list:
    return w.argv("--budget", "0.25,0.5", out=w.copy_source() / "sub")


def _not_ours_with_overwrite(w: World) -> list:
    w.out.mkdir()
    (w.out / "notes.txt").write_text("the user's own file")
    return w.argv("--overwrite")


def _existing_out(w: World) -> list:
    w.out.mkdir()
    (w.out / "keep.txt").write_text("mine")
    return w.argv()


def _out_is_a_file(w: World) -> list:
    w.out.write_text("not a folder")
    return w.argv()


def _out_under_a_file(w: World) -> list:
    (w.tmp / "afile").write_text("not a folder")
    return w.argv(out=w.tmp / "afile" / "out")


def _edit_config(change: Callable[[Path], None]):
    def build(w: World) -> list:
        change(w.copy_source() / "config.json")
        return w.argv()

    return build


def _unknown_model_type(config: Path) -> None:
    data = json.loads(config.read_text())
    data["model_type"] = "no_such_model_type"
    config.write_text(json.dumps(data))


def _truncated_weights(w: World) -> list:
    weights = w.copy_source() / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    return w.argv()


def _no_weights(w: World) -> list:
    (w.copy_source() / "model.safetensors").unlink()
    return w.argv()


def _scores(fixture: str):
    def build(w: World) -> list:
        return w.argv("--scores", w.fixture(fixture), calib=False)

    return build


def _random_bytes_scores(w: World) -> list:
    path = w.tmp / SCORES_FILE
    path.write_bytes(os.urandom(4096))
    return w.argv("--scores", path, calib=False)


def _calib_dir(w: World) -> list:
    (w.tmp / "texts").mkdir()
    return w.argv("--calib-file", w.tmp / "texts", calib=False)


def _dangling_calib(w: World) -> list:
    (w.tmp / "calib.txt").symlink_to(w.tmp / "deleted.txt")
    return w.argv("--calib-file", w.tmp / "calib.txt", calib=False)


def _binary_calib(w: World) -> list:
    (w.tmp / "weights.txt").write_bytes(os.urandom(64 * 1024))
    return w.argv("--calib-file", w.tmp / "weights.txt", "--calib-file", w.calib_files[0], calib=False)


def _jsonl_without_text(w: World) -> list:
    path = w.tmp / "records.jsonl"
    path.write_text("\n".join(json.dumps({"content": f"def f{i}(x): return x"}) for i in range(50)))
    return w.argv("--calib-file", path, calib=False)


Usage = collections.namedtuple("Usage", "total used free")


def _no_free_space(w: World) -> list:
    w.monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(2**40, 2**40 - 2**20, 2**20))
    return w.argv()


def _save_fails(target: str, code: int):
    """``target``'s save_file raises the OSError of ``code`` (PermissionError for EACCES), as a full disk or a
    folder whose permissions changed mid-run would (the tests run as root, so chmod cannot do it)."""
    kind = PermissionError if code == errno.EACCES else OSError

    def save_file(tensors, filename, *args, **kwargs):
        raise kind(code, os.strerror(code), str(filename))

    def build(w: World) -> list:
        w.monkeypatch.setattr(target, save_file)
        return w.argv()

    return build


CASES: dict[str, Case] = {
    # the source model is never a place to write
    "out is the source": Case(_out_is_source(False), ("--out", "the source model")),
    "out is the source, --overwrite": Case(_out_is_source(True), ("--out", "the source model")),
    "out is the source (a fair_moe output), --overwrite": Case(_out_is_fair_moe_source,
                                                               ("--out", "is the source model")),
    "out inside the source": Case(_out_inside_source, ("--out", "lies inside the source model")),
    "out inside the source reached by a symlink": Case(_out_inside_linked_source,
                                                       ("--out", "lies inside the source model")),
    "out contains the source, --overwrite": Case(_out_contains_source, ("--out", "contains the source model")),
    "out contains the source (OUT/budget-B), --overwrite": Case(_out_contains_fair_moe_source,
                                                                ("--out", "contains the source model")),
    "out is a symlink to the source": Case(_out_links_to_source, ("--out", "the source model")),
    "out is a symlink to the source (a fair_moe output), --overwrite": Case(_out_links_to_fair_moe_source,
                                                                            ("--out", "is the source model")),
    "offload folder inside the source": Case(_offload_inside_source,
                                             ("--offload-folder", "lies inside the source model")),
    "multi-budget out inside the source": Case(_multi_budget_inside_source, ("--out", "lies inside the source model")),
    # --out itself
    "overwrite a folder fair_moe did not write": Case(_not_ours_with_overwrite,
                                                      ("--out", "was not written by fair_moe", "--overwrite")),
    "existing out without --overwrite": Case(_existing_out, ("--out", "exists and is not empty", "--overwrite")),
    "out is a file": Case(_out_is_a_file, ("--out", "exists and is not a folder")),
    "out under a file": Case(_out_under_a_file, ("cannot prepare --out", "choose another --out")),
    # a broken model
    "config.json is not JSON": Case(_edit_config(lambda c: c.write_text('{"model_type": "qwen2_moe", ')),
                                    ("--model", "not a valid JSON")),
    "unknown model_type": Case(_edit_config(_unknown_model_type), ("--model", "no_such_model_type")),
    "truncated model.safetensors": Case(_truncated_weights, ("cannot load the weights of --model", "truncated")),
    "no weights": Case(_no_weights, ("cannot load the weights of --model", "model.safetensors")),
    # --scores
    "scores with NaN": Case(_scores("nan_scores"), ("NaN", "--scores", "calibrate again without --scores")),
    "scores of another model": Case(_scores("other_scores"), ("--scores", "computed for another model")),
    "scores file that is not safetensors": Case(_random_bytes_scores, ("--scores", "is not a fair_moe scores file")),
    # calibration text
    "calib path is a folder": Case(_calib_dir, ("--calib-file", "texts")),
    "calib file is a dangling symlink": Case(_dangling_calib, ("calib.txt", "does not exist", "--calib-file")),
    "calib file is binary": Case(_binary_calib, ("--calib-file", "weights.txt")),
    "jsonl without the text field": Case(_jsonl_without_text, ("has no 'text' field", "--text-field")),
    # numbers
    "budget nan": Case(lambda w: w.argv(budget="nan"), ("--budget nan", "between 0 and 1")),
    "budget 1e-9": Case(lambda w: w.argv(budget="1e-9"), ("--budget 1e-09", "removes 0 of 12", "raise --budget")),
    "budget 0.25,abc": Case(lambda w: w.argv(budget="0.25,abc"), ("--budget '0.25,abc'", "is not a number")),
    "budget 1.5": Case(lambda w: w.argv(budget="1.5"), ("--budget 1.5", "between 0 and 1")),
    "samples 0": Case(lambda w: w.argv("--samples", "0"), ("--samples", "≥ 1")),
    "seq-len 1": Case(lambda w: w.argv("--seq-len", "1"), ("--seq-len ≥ 2",)),
    "min-keep below top_k": Case(lambda w: w.argv("--min-keep", "1"), ("--min-keep 1 is below", "top_k=3")),
    "ppl-file missing": Case(lambda w: w.argv("--ppl-file", w.tmp / "gone.txt"), ("--ppl-file", "gone.txt")),
    # method flags that do not go together
    "tolerance with uniform": Case(lambda w: w.argv("--tolerance", "0.3", "--allocation", "uniform", budget=None),
                                   ("--tolerance", "--allocation")),
    "unknown compensate option": Case(
        lambda w: w.argv("--compensate", "router-kd", "--compensate-option", "stepz=2"),
        ("--compensate-option 'stepz=2'", "router-kd")),
    "reap removal of neurons": Case(lambda w: w.argv("--removal", "reap", "--units", "neurons"),
                                    ("--removal reap is not available for --units neurons",)),
    "consensus removal of neurons": Case(lambda w: w.argv("--removal", "consensus", "--units", "neurons"),
                                         ("--removal consensus is not available", "at least 2 of the signals")),
    # disk faults (simulated)
    "no free space": Case(_no_free_space, ("--out", "MiB free", "choose another --out")),
    "ENOSPC writing weights": Case(_save_fails("fair_moe.checkpoint.stream.save_file", errno.ENOSPC),
                                   ("writing --out", "No space left on device", "nothing was written")),
    "EACCES writing weights": Case(_save_fails("fair_moe.checkpoint.stream.save_file", errno.EACCES),
                                   ("writing --out", "Permission denied", "nothing was written")),
    "ENOSPC writing the scores file": Case(_save_fails("safetensors.torch.save_file", errno.ENOSPC),
                                           ("writing --out", "No space left on device", SCORES_FILE)),
}


def _params():
    for name, case in CASES.items():
        marks = [pytest.mark.xfail(reason=case.bug, strict=True)] if case.bug else []
        yield pytest.param(name, id=name.replace(" ", "-"), marks=marks)


@pytest.mark.parametrize("name", list(_params()))
def test_bad_input_is_refused_and_touches_nothing(name, world, capsys):
    """Exit 2, one error: line naming the problem and the flag, no traceback, source and inputs byte-identical,
    nothing new beside --out."""
    case = CASES[name]
    argv = case.build(world)
    before = world.snapshot()
    status, stderr = run_main(prune_cli.main, argv, capsys)
    one_error_line(stderr, *case.expect)
    assert status == 2, stderr
    out = Path(argv[argv.index("--out") + 1])
    assert_clean(before, out)


# --- signals, kills and concurrent runs (subprocesses) ---------------------------------------------------------------

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "OMP_NUM_THREADS": "1",
       "PYTHONUNBUFFERED": "1"}
# Long calibration on the bundled sample's text (thousands of batches): a signal sent once its bar shows lands in it.
LONG_TEXT = sorted((REPO / "fair_moe" / "data" / "calib").glob("*.txt"))
SLOW_CALIBRATION = ["--samples", "4000", "--seq-len", "32", "--batch-size", "1"]


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # a child started from an ignoring shell would ignore SIGINT


class Cli:
    """``python -m fair_moe.prune ARGV`` in a subprocess, its stdout and stderr collected as they come."""

    def __init__(self, argv: list):
        self.proc = subprocess.Popen([sys.executable, "-m", "fair_moe.prune", *map(str, argv)], cwd=REPO, env=ENV,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=_default_sigint)
        self._out: list[bytes] = []
        self._err: list[bytes] = []
        self._readers = [threading.Thread(target=self._read, args=(s, b), daemon=True)
                         for s, b in ((self.proc.stdout, self._out), (self.proc.stderr, self._err))]
        for reader in self._readers:
            reader.start()

    @staticmethod
    def _read(stream, chunks: list[bytes]) -> None:
        for chunk in iter(lambda: stream.read1(65536), b""):
            chunks.append(chunk)

    @property
    def stderr(self) -> str:
        return b"".join(self._err).decode(errors="replace")

    def wait_for(self, ready: Callable[[], bool], what: str) -> None:
        """Poll every 5 ms until ``ready()``; fail if the process ends first or PHASE_TIMEOUT passes."""
        deadline = time.monotonic() + PHASE_TIMEOUT
        while not ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"the run ended ({self.proc.returncode}) before {what}\n{self.stderr}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what} after {PHASE_TIMEOUT} s\n{self.stderr}")
            time.sleep(0.005)

    def calibrating(self) -> None:
        self.wait_for(lambda: "calibrating" in self.stderr, "calibration")

    def writing(self, out: Path) -> None:
        self.wait_for(lambda: any((c / "checkpoint").exists() for c in partial_containers(out)), "writing")

    def finish(self) -> int:
        status = self.proc.wait(PHASE_TIMEOUT)
        for reader in self._readers:
            reader.join(PHASE_TIMEOUT)
        return status

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.finish()


@pytest.fixture
def cli():
    """Starts ``Cli`` runs and kills any still running when the test ends."""
    started: list[Cli] = []

    def start(argv: list) -> Cli:
        started.append(Cli(argv))
        return started[-1]

    yield start
    for run in started:
        run.stop()


def _argv(model: Path, out: Path, calib_files: list[Path], *extra) -> list:
    calib = [x for f in calib_files for x in ("--calib-file", f)]
    return ["--model", model, "--out", out, "--budget", "0.25", *METHOD, *calib, *extra]


@pytest.mark.parametrize("sig, status, phase", [
    pytest.param(signal.SIGINT, 130, "calibration", id="SIGINT-calibration"),
    pytest.param(signal.SIGTERM, 143, "calibration", id="SIGTERM-calibration"),
    pytest.param(signal.SIGTERM, 143, "writing", id="SIGTERM-writing"),
])
def test_signal_cleans_up(sig, status, phase, tiny_checkpoint, calib_files, tmp_path, cli):
    """SIGINT / SIGTERM mid-run: exit 130 / 143 with one error: line, no traceback, the source unchanged and
    nothing left beside --out (the run removes its container)."""
    out = tmp_path / "out"
    before = {tmp_path: hash_tree(tmp_path), Path(tiny_checkpoint): hash_tree(tiny_checkpoint)}
    if phase == "calibration":  # no --quiet: the calibration bar tells when calibration runs
        run = cli(_argv(tiny_checkpoint, out, LONG_TEXT, *SLOW_CALIBRATION))
        run.calibrating()
    else:
        run = cli(_argv(tiny_checkpoint, out, calib_files, *FAST))
        run.writing(out)
    run.proc.send_signal(sig)
    assert run.finish() == status, run.stderr
    one_error_line(run.stderr, f"interrupted by {sig.name}", "nothing half-written")
    assert_clean(before, out)


@pytest.mark.parametrize("phase", ["calibration", "writing"])
def test_sigkill_leaves_at_most_the_container_and_the_next_run_succeeds(phase, tiny_checkpoint, calib_files, tmp_path,
                                                                        cli, capsys):
    """SIGKILL mid-run: the process dies with -9, the source is unchanged, and at most the killed run's own
    ``.out.fair_moe-partial-<pid>`` folder remains; the next run into the same --out clears it and leaves only
    the output folder."""
    out = tmp_path / "out"
    entries = sorted(p.name for p in tmp_path.iterdir())
    source = hash_tree(tiny_checkpoint)
    if phase == "calibration":
        run = cli(_argv(tiny_checkpoint, out, LONG_TEXT, *SLOW_CALIBRATION))
        run.calibrating()
    else:
        run = cli(_argv(tiny_checkpoint, out, calib_files, *FAST))
        run.writing(out)
    run.proc.send_signal(signal.SIGKILL)
    assert run.finish() == -signal.SIGKILL
    assert "Traceback" not in run.stderr
    assert hash_tree(tiny_checkpoint) == source
    assert not out.exists()
    left = sorted(set(p.name for p in tmp_path.iterdir()) - set(entries))
    assert left in ([], [f".out.{PARTIAL}-{run.proc.pid}"]), left

    status, stderr = run_main(prune_cli.main, _argv(tiny_checkpoint, out, calib_files, *FAST), capsys)
    assert status == 0, stderr
    assert "Traceback" not in stderr and not [line for line in stderr.splitlines() if line.startswith("error:")]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*entries, "out"])
    assert (out / PLAN_FILE).is_file()
    assert hash_tree(tiny_checkpoint) == source


def test_second_run_into_the_same_out_is_refused(tiny_checkpoint, calib_files, tmp_path, cli, capsys):
    """While one run holds --out, a second run into it ends with exit 2 and one line naming the other run, and
    creates nothing; the first run then completes normally and leaves only its output."""
    out = tmp_path / "out"
    entries = sorted(p.name for p in tmp_path.iterdir())
    source = hash_tree(tiny_checkpoint)
    first = cli(_argv(tiny_checkpoint, out, LONG_TEXT, "--samples", "600", "--seq-len", "32", "--batch-size", "1"))
    first.calibrating()
    holding = sorted(p.name for p in tmp_path.iterdir())

    status, stderr = run_main(prune_cli.main, _argv(tiny_checkpoint, out, calib_files, *FAST), capsys)
    one_error_line(stderr, "another fair_moe run", "--out")
    assert status == 2
    assert first.proc.poll() is None, "the first run ended before the second was refused: the test proves nothing"
    assert sorted(p.name for p in tmp_path.iterdir()) == holding  # the refused run made nothing

    assert first.finish() == 0, first.stderr
    assert "Traceback" not in first.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*entries, "out"])
    assert (out / PLAN_FILE).is_file()
    assert hash_tree(tiny_checkpoint) == source


# --- fair_moe.eval ---------------------------------------------------------------------------------------------------


@pytest.fixture
def model_copy(tiny_checkpoint, tmp_path):
    return Path(shutil.copytree(tiny_checkpoint, tmp_path / "model"))


def test_eval_missing_model(tmp_path, capsys):
    """A --model path that does not exist: exit 2, one line naming --model; the output folder is not made."""
    before = {tmp_path: hash_tree(tmp_path)}
    status, stderr = run_main(eval_cli.main, ["--model", tmp_path / "missing", "--ppl-file", HELDOUT,
                                              "--output-json", tmp_path / "results" / "r.json"], capsys)
    one_error_line(stderr, "--model", "missing", "does not exist")
    assert status == 2
    assert_clean(before)


def test_eval_unknown_task_fails_before_loading(model_copy, tmp_path, monkeypatch, capsys):
    """An unknown --tasks name is refused before any model loads; nothing is written and the model is unchanged."""
    from fair_moe.workflow import evaluate

    monkeypatch.setattr(evaluate, "evaluate", lambda *a, **k: pytest.fail("a model was evaluated"))
    before = {tmp_path: hash_tree(tmp_path)}
    status, stderr = run_main(eval_cli.main, ["--model", model_copy, "--tasks", "no_such_task",
                                              "--output-json", tmp_path / "results" / "r.json"], capsys)
    one_error_line(stderr, "no_such_task", "--tasks")
    assert status == 2
    assert_clean(before)


def test_eval_output_json_in_a_new_folder(model_copy, tmp_path, capsys):
    """--output-json inside folders that do not exist yet: the run succeeds and creates them and the file only."""
    source = hash_tree(model_copy)
    results = tmp_path / "new" / "deeper" / "r.json"
    status, stderr = run_main(eval_cli.main, ["--model", model_copy, "--ppl-file", HELDOUT, "--ppl-seq-len", "128",
                                              "--output-json", results], capsys)
    assert status == 0, stderr
    assert "Traceback" not in stderr and not [line for line in stderr.splitlines() if line.startswith("error:")]
    metrics = json.loads(results.read_text())["metrics"]
    assert math.isfinite(metrics["perplexity/python"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "new"]
    assert [p.name for p in results.parent.iterdir()] == ["r.json"]
    assert hash_tree(model_copy) == source


# --- fair_moe.push ---------------------------------------------------------------------------------------------------


class FakeApi:
    """An HfApi stand-in: ``fail_at`` ("create_repo" / "upload_folder") raises a connection error there; the
    model card as it was at upload time is kept in ``card_at_upload``."""

    def __init__(self, token: str | None = "hf_test", fail_at: str | None = None):
        self.token = token
        self.fail_at = fail_at
        self.card_at_upload: str | None = None

    def create_repo(self, **kwargs):
        if self.fail_at == "create_repo":
            raise ConnectionError("Name or service not known")
        return f"https://huggingface.co/{kwargs['repo_id']}"

    def upload_folder(self, **kwargs):
        self.card_at_upload = (Path(kwargs["folder_path"]) / "README.md").read_text()
        if self.fail_at == "upload_folder":
            raise ConnectionError("Connection reset by peer")


@pytest.mark.parametrize("token, fail_at, expect", [
    pytest.param(None, None, ("no Hugging Face token", "HF_TOKEN"), id="no-token"),
    pytest.param("hf_test", "create_repo", ("upload to me/pruned failed", "ConnectionError", "intact"),
                 id="network-error-creating-the-repo"),
    pytest.param("hf_test", "upload_folder", ("upload to me/pruned failed", "ConnectionError", "intact"),
                 id="network-error-uploading"),
])
def test_failed_push_leaves_the_folder_as_it_was(token, fail_at, expect, pruned, tmp_path, monkeypatch, capsys):
    """A missing token or a network error: exit 2, one line, and every file of the local folder, README.md
    included (which --results rewrites for the upload), byte-identical."""
    folder = Path(shutil.copytree(pruned, tmp_path / "pruned"))
    results = tmp_path / "results.json"
    results.write_text('{"metrics": {"fair_moe_heldout_mc/acc": 0.5}, "recovery": {"average": 0.97}}')
    api = FakeApi(token, fail_at)
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    monkeypatch.setattr("huggingface_hub.HfApi", lambda *a, **k: api)
    before = {tmp_path: hash_tree(tmp_path)}
    status, stderr = run_main(push_cli.main, [folder, "me/pruned", "--results", results], capsys)
    one_error_line(stderr, *expect)
    assert status == 2
    assert_clean(before)
    if fail_at == "upload_folder":  # the card did carry the results while uploading, and was put back after
        assert "| recovery/average | 0.9700 |" in api.card_at_upload


def test_eval_threads_sets_torchs_cpu_threads_and_refuses_zero(model_copy, tmp_path, capsys):
    """--threads N reaches torch before the evaluation runs; 0 is one error line and nothing is written."""
    import torch

    before = torch.get_num_threads()
    try:
        status, stderr = run_main(eval_cli.main, ["--model", model_copy, "--ppl-file", HELDOUT, "--ppl-seq-len", "128",
                                                  "--threads", "3", "--output-json", tmp_path / "r.json"], capsys)
        assert status == 0, stderr
        assert torch.get_num_threads() == 3 != before
    finally:
        torch.set_num_threads(before)
    status, stderr = run_main(eval_cli.main, ["--model", model_copy, "--ppl-file", HELDOUT, "--threads", "0",
                                              "--output-json", tmp_path / "refused" / "r.json"], capsys)
    one_error_line(stderr, "--threads must be at least 1, got 0")
    assert status == 2 and not (tmp_path / "refused").exists()
