"""Where the time of a default run goes: calibration, selection and compensation against one plain forward +
backward over the same calibration tokens.

    python scripts/bench_phases.py                          # the demo model, budgets 0.25 and 0.5
    python scripts/bench_phases.py --model bench_out/fixtures/olmoe/model --calib-dir bench_out/fixtures/olmoe/calib

The run is the command with no method flags (``--allocation auto --compensate auto``), through ``run_prune``, so
its phases are the ones the command prints. The floor is measured in the same process on the same calibration
windows: once with parameter gradients (a training step) and once with activation gradients only (what the
calibration needs at the least). The target: calibration + selection + compensation ≤ 3 × the floor.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fair_moe.calibration import BUNDLED_CALIB_DIR, DEMO_MODEL_DIR  # noqa: E402
from fair_moe.core.budget import Budget  # noqa: E402
from fair_moe.workflow.prune import run_prune  # noqa: E402
from fair_moe.workflow.report import Console  # noqa: E402
from fair_moe.workflow.settings import CalibrationSettings, OutputSettings, PruneSettings, RuntimeSettings  # noqa: E402


def floor_seconds(model_dir: str, files: list[Path], samples: int, seq_len: int, batch_size: int) -> dict:
    """One forward + backward over the calibration windows the run uses, with and without parameter gradients."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fair_moe.calibration.text import sources_from_files, text_batches
    from fair_moe.units.autograd import activation_gradients_only
    from fair_moe.workflow.scoring import selection_windows

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    data = text_batches(tokenizer, sources_from_files(files), samples, seq_len, batch_size, 0,
                        selection_windows(samples), selection_windows(samples))
    result = {"tokens": sum(b.numel() for _, b in data.batches)}
    for name in ("params", "activations"):
        start = time.perf_counter()
        context = activation_gradients_only(model) if name == "activations" else torch.enable_grad()
        with context:
            for _, ids in data.batches:
                model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        model.zero_grad(set_to_none=True)
        result[name] = time.perf_counter() - start
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(DEMO_MODEL_DIR))
    p.add_argument("--calib-dir", type=Path, default=BUNDLED_CALIB_DIR)
    p.add_argument("--budgets", default="0.25,0.5")
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    files = sorted(args.calib_dir.glob("*.txt"))
    floor = floor_seconds(args.model, files, args.samples, args.seq_len, args.batch_size)
    print(f"floor over {floor['tokens']} calibration tokens: {floor['params']:.1f} s with parameter gradients, "
          f"{floor['activations']:.1f} s with activation gradients only")
    print("\n| budget | calibrate s | select s | compensate s | write + verify s | (calibrate + select + compensate) "
          "÷ floor (params / activations) | chosen |")
    print("|---|---|---|---|---|---|---|")
    for budget in args.budgets.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            settings = PruneSettings(
                model=args.model, budgets=Budget.parse(budget),
                calibration=CalibrationSettings(files=tuple(files), samples=args.samples, seq_len=args.seq_len,
                                                batch_size=args.batch_size),
                runtime=RuntimeSettings(progress=False), output=OutputSettings(out=Path(tmp) / "out"))
            result = run_prune(settings, Console(quiet=True))
        s = result.seconds
        work = s["calibrate"] + s["select"] + s["compensate"]
        plan = result.plans[0]
        chosen = plan.settings.get("selected", {})
        method = f"{chosen.get('allocation')}+{chosen.get('removal')}" + (
            f"+{plan.compensation.kind}" if plan.compensation else "")
        print(f"| {budget} | {s['calibrate']:.1f} | {s['select']:.1f} | {s['compensate']:.1f} | "
              f"{s.get('write', 0) + s.get('verify', 0):.1f} | {work / floor['params']:.2f} / "
              f"{work / floor['activations']:.2f} | {method} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
