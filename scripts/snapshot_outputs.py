"""Run a fixed set of prune commands and record what they wrote: plan contents and a hash of every tensor.

    python scripts/snapshot_outputs.py --out bench_out/snapshot_before.json
    python scripts/snapshot_outputs.py --out bench_out/snapshot_after.json --compare bench_out/snapshot_before.json

Used to show that a refactor changed no plan and no written byte: it drives only the command line, so the
same script runs against any version of the package. ``--compare`` prints every difference and exits 1 if
there is one (plan keys listed in ``--ignore-plan-keys`` are bookkeeping and are reported, not counted).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from safetensors import safe_open

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "fair_moe" / "data" / "demo_model"
VISION = ROOT / "fair_moe" / "data" / "vision_demo"

RUNS = {
    "default-0.25": ["--budget", "0.25"],
    "tod-reap-0.5": ["--budget", "0.5", "--allocation", "tod", "--removal", "reap", "--compensate", "none"],
    "uniform-ean-scale-0.5": ["--budget", "0.5", "--allocation", "uniform", "--removal", "ean",
                              "--compensate", "layer-scale"],
    "global-frequency-temperature-0.375": ["--budget", "0.375", "--allocation", "global", "--removal", "frequency",
                                           "--compensate", "router-temperature"],
    "uniform-reap-merge-0.25": ["--budget", "0.25", "--allocation", "uniform", "--removal", "reap",
                                "--compensate", "merge"],
    "tod-wasserstein-multi": ["--budget", "0.25,0.5", "--allocation", "tod", "--removal", "wasserstein",
                              "--compensate", "none"],
    "tod-tolerance-0.3": ["--tolerance", "0.3", "--allocation", "tod", "--removal", "ean", "--compensate", "none"],
}
VISION_RUNS = {
    "vision-neurons-tod-0.3": ["--budget", "0.3"],
    "vision-neurons-global-0.5": ["--budget", "0.5", "--allocation", "global"],
    "vision-heads-tod-0.25": ["--budget", "0.25", "--units", "heads"],
}


def tensor_hashes(folder: Path) -> dict[str, str]:
    hashes = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            for key in f.keys():
                t = f.get_tensor(key).contiguous()
                hashes[f"{shard.name}:{key}"] = hashlib.sha256(t.view(-1).view(dtype=__import__("torch").uint8)
                                                              .numpy().tobytes()).hexdigest()[:16]
    return hashes


def record(folder: Path) -> dict:
    out = {}
    for plan_file in sorted(folder.rglob("fair_moe_plan.json")):
        sub = plan_file.parent
        plan = json.loads(plan_file.read_text())
        plan.pop("fair_moe_version", None)
        config = json.loads((sub / "config.json").read_text())
        config.pop("transformers_version", None)
        out[str(sub.relative_to(folder)) or "."] = {
            "plan": plan, "config": config, "tensors": tensor_hashes(sub),
            "files": sorted(p.name for p in sub.iterdir() if p.is_file()),
        }
    return out


def run_all(work: Path) -> dict:
    results = {}
    images = work / "digits"
    sys.path.insert(0, str(ROOT / "scripts"))
    from train_vision_demo import digits_split, write_image_folder

    write_image_folder(images / "calib", *digits_split()["calib"])
    jobs = [(name, ["--model", str(DEMO), *args]) for name, args in RUNS.items()]
    jobs += [(name, ["--model", str(VISION), "--calib-images", str(images / "calib"), *args])
             for name, args in VISION_RUNS.items()]
    for name, args in jobs:
        out = work / name
        cmd = [sys.executable, "-m", "fair_moe.prune", *args, "--out", str(out), "--quiet"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            results[name] = {"error": done.stderr.strip().splitlines()[-1:]}
        else:
            results[name] = record(out)
        print(f"{name}: {'ok' if done.returncode == 0 else 'FAILED'}", file=sys.stderr)
    return results


def normalised(plan: dict) -> dict:
    """A plan as 0.2 writes it. 0.2 (issue 11) renamed, without changing a value: a compensation's table to
    ``per_layer``; ``settings.selected.layer_scale`` to ``settings.selected.compensation``; the vision plan's
    ``unit: "units"`` / ``num_experts`` to ``unit: "neurons" | "heads"`` / ``width`` (its ``top_k`` copy of
    min_keep dropped, ``settings.groups`` = 1 added); and dropped the internal ``settings.compensation_decided``."""
    plan = json.loads(json.dumps(plan))
    compensation = plan.get("compensation")
    for legacy in ("scales", "temperatures", "merges"):
        if compensation and legacy in compensation:
            compensation["per_layer"] = compensation.pop(legacy)
    settings = plan.get("settings", {})
    settings.pop("compensation_decided", None)
    selected = settings.get("selected")
    if selected and "layer_scale" in selected:
        selected["compensation"] = "layer-scale" if selected.pop("layer_scale") else "none"
    if "kept_units" in plan:
        plan.pop("unit", None)
        plan["width"] = plan.pop("num_experts", plan.get("width"))
        plan.pop("top_k", None)
        settings.setdefault("groups", 1)
    return plan


def compare(before: dict, after: dict, ignore: set[str]) -> int:
    differences = 0
    for name in sorted(set(before) | set(after)):
        a, b = before.get(name), after.get(name)
        if a is None or b is None:
            print(f"{name}: only in {'after' if a is None else 'before'}")
            differences += 1
            continue
        for sub in sorted(set(a) | set(b)):
            x, y = a.get(sub), b.get(sub)
            if not isinstance(x, dict) or not isinstance(y, dict) or "plan" not in x or "plan" not in y:
                if x != y:
                    print(f"{name}/{sub}: {x!r} != {y!r}")
                    differences += 1
                continue
            x["plan"], y["plan"] = normalised(x["plan"]), normalised(y["plan"])
            for key in sorted(set(x["plan"]) | set(y["plan"])):
                if x["plan"].get(key) != y["plan"].get(key):
                    counted = key not in ignore
                    differences += counted
                    print(f"{name}/{sub}: plan[{key!r}] differs{'' if counted else ' (bookkeeping, ignored)'}")
            for part in ("config", "tensors", "files"):
                if x[part] != y[part]:
                    keys = sorted(k for k in set(x[part]) | set(y[part]) if x[part].get(k) != y[part].get(k)) \
                        if isinstance(x[part], dict) else [part]
                    print(f"{name}/{sub}: {part} differ: {keys[:8]}{' …' if len(keys) > 8 else ''}")
                    differences += 1
            if all(x[p] == y[p] for p in ("config", "tensors", "files")):
                print(f"{name}/{sub}: config, files and {len(x['tensors'])} tensor hashes identical")
    print(f"{differences} difference(s)")
    return 1 if differences else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--compare", type=Path, help="an earlier snapshot to compare with")
    p.add_argument("--ignore-plan-keys", default="", help="comma-separated plan keys that are bookkeeping")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as work:
        results = run_all(Path(work))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    if args.compare:
        return compare(json.loads(args.compare.read_text()), results,
                       set(filter(None, args.ignore_plan_keys.split(","))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
