"""The command line, as a user runs it, on a tiny checkpoint of every supported model type.

    python scripts/smoke_families.py                    # every type of tests/families.py's all_configs (~25 min)
    python scripts/smoke_families.py llama4 ergo        # some of them
    python scripts/smoke_families.py --dtype bfloat16 --only-default   # half precision (verified by parts)

For each type it writes a tiny random checkpoint with a byte-level tokenizer (``tests/conftest.py``'s
``write_checkpoint``) into ``bench_out/smoke/models/TYPE`` and runs ``fair-moe-prune`` on it twice, on two small
calibration files at budget 0.5: with the default flags (auto allocation, auto compensation) and with
``--allocation tod --compensate router-kd --layerwise``. Each run writes, reloads and verifies its checkpoint, so
exit status 0 means a checkpoint equal to the masked original was written. Prints one line per run (exit status,
seconds, the command's last line) and a summary; the families' test matrix is ``tests/units/experts/``, this is the
same path through the command line.
"""

from __future__ import annotations

import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

VARIANTS = {"default": [], "tod+router-kd+layerwise": ["--allocation", "tod", "--compensate", "router-kd",
                                                        "--layerwise"]}


def calibration_files(folder: Path) -> list[Path]:
    rng = random.Random(0)
    code, prose = folder / "code.txt", folder / "prose.txt"
    code.write_text("\n".join(f"def f{i}(x):\n    return x * {rng.randint(0, 99)} + {i}" for i in range(300)))
    words = ["the", "license", "permission", "granted", "software", "any", "person", "copy", "notice"]
    prose.write_text(" ".join(rng.choice(words) for _ in range(3000)))
    return [code, prose]


def run(model: Path, out: Path, calib: list[Path], extra: list[str]) -> tuple[int, float, str]:
    """(exit status, seconds, last line) of one ``fair_moe.prune`` run."""
    args = [sys.executable, "-m", "fair_moe.prune", "--model", str(model), "--samples", "16", "--seq-len", "48",
            "--budget", "0.5", "--out", str(out), "--overwrite", "--quiet", *extra]
    for path in calib:
        args += ["--calib-file", str(path)]
    start = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True, cwd=ROOT)
    lines = (done.stdout + done.stderr).strip().splitlines()
    return done.returncode, time.perf_counter() - start, lines[-1] if lines else ""


def main(argv: list[str]) -> int:
    import argparse

    from conftest import write_checkpoint
    from families import all_configs

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("types", nargs="*", help="model types (default: every supported one)")
    parser.add_argument("--dtype", default=None, help="passed to fair-moe-prune --dtype")
    parser.add_argument("--only-default", action="store_true", help="run the default flags only")
    args = parser.parse_args(argv)
    variants = {"default": []} if args.only_default else VARIANTS
    dtype = ["--dtype", args.dtype] if args.dtype else []
    root = ROOT / "bench_out" / "smoke"
    root.mkdir(parents=True, exist_ok=True)
    calib = calibration_files(root)
    configs = all_configs()
    names = args.types or list(configs)
    failed = []
    for name in names:
        folder = root / "models" / name
        if not folder.exists():
            write_checkpoint(folder, configs[name])
        for variant, extra in variants.items():
            label = f"{variant}{' ' + args.dtype if args.dtype else ''}"
            out = root / "out" / f"{name}-{variant}{'-' + args.dtype if args.dtype else ''}"
            status, seconds, last = run(folder, out, calib, [*extra, *dtype])
            print(f"{name:22s} {label:24s} exit {status}  {seconds:6.1f} s  {last[:110]}", flush=True)
            if status:
                failed.append(f"{name} ({label})")
    runs = len(names) * len(variants)
    print(f"{runs - len(failed)} of {runs} runs wrote a verified checkpoint"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
