"""Cost of fair_moe's calibration pass against two floors over the same tokens.

    python scripts/bench_calibration.py                     # demo model and a 16-layer × 64-expert top-8 config
    python scripts/bench_calibration.py --only demo --batches 4

Each measurement runs in a fresh subprocess, so peak RSS (ru_maxrss) is that mode's own: the number
reported is the peak above the RSS right after the model was loaded (weights excluded). Floors:
``params``: one plain forward + backward with parameter gradients (the training step a user would run);
``activations``: the same with every parameter frozen and only the embedding output requiring grad — the
true minimum for a score that needs ∂L/∂activations, since fair_moe stores no parameter gradient either.
fair_moe's pass additionally keeps per-expert statistics.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build(name: str):
    from transformers import AutoModelForCausalLM, Qwen2MoeConfig

    from fair_moe.calibration import DEMO_MODEL_DIR

    if name == "demo":
        return AutoModelForCausalLM.from_pretrained(DEMO_MODEL_DIR, dtype=torch.float32).eval()
    config = Qwen2MoeConfig(vocab_size=4096, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
                            shared_expert_intermediate_size=256, num_hidden_layers=16, num_attention_heads=4,
                            num_key_value_heads=2, num_experts=64, num_experts_per_tok=8, max_position_embeddings=1024)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(name: str, mode: str, batches: int, batch: int, seq: int) -> dict:
    from fair_moe.adapters import get_adapter
    from fair_moe.units.experts.calibrate import run_calibration

    torch.set_num_threads(2)
    model = build(name)
    gen = torch.Generator().manual_seed(0)
    data = [(i % 2, torch.randint(0, model.config.vocab_size, (batch, seq), generator=gen)) for i in range(batches)]
    # one warm-up step outside the timing
    model(input_ids=data[0][1][:1, :32], labels=data[0][1][:1, :32]).loss.backward()
    model.zero_grad(set_to_none=True)
    base = rss_mib()
    start = time.perf_counter()
    if mode == "floor":
        for _, ids in data:
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    elif mode == "floor-activations":
        from fair_moe.units.autograd import activation_gradients_only

        with activation_gradients_only(model):
            for _, ids in data:
                model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    else:
        run_calibration(model, get_adapter(model.config).moe_layers(model), data, 2, seed=0, progress=False)
    seconds = time.perf_counter() - start
    return {"model": name, "mode": mode, "seconds": seconds, "peak_mib_above_weights": rss_mib() - base,
            "tokens": batches * batch * seq}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=["demo", "large"])
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--child", nargs=2, metavar=("MODEL", "MODE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(measure(*args.child, args.batches, args.batch, args.seq)))
        return 0
    rows = []
    for name in [args.only] if args.only else ["demo", "large"]:
        for mode in ("floor", "floor-activations", "fair_moe"):
            cmd = [sys.executable, __file__, "--child", name, mode, "--batches", str(args.batches),
                   "--batch", str(args.batch), "--seq", str(args.seq)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            rows.append(json.loads(out))
            print(rows[-1], flush=True)
    print(table(rows))
    return 0


def table(rows: list[dict]) -> str:
    """One line per model: fair_moe against both floors (time and peak memory above the weights)."""
    lines = ["| model | tokens | floor (param. grads) s | floor (activation grads) s | fair_moe s | ÷ param. floor | "
             "÷ activation floor | peak MiB: param. floor / activation floor / fair_moe |",
             "|---|---|---|---|---|---|---|---|"]
    by_model: dict[str, dict[str, dict]] = {}
    for row in rows:
        by_model.setdefault(row["model"], {})[row["mode"]] = row
    for name, modes in by_model.items():
        floor, act, ours = modes["floor"], modes["floor-activations"], modes["fair_moe"]
        lines.append(f"| {name} | {ours['tokens']} | {floor['seconds']:.1f} | {act['seconds']:.1f} | "
                     f"{ours['seconds']:.1f} | {ours['seconds'] / floor['seconds']:.2f} | "
                     f"{ours['seconds'] / act['seconds']:.2f} | {floor['peak_mib_above_weights']:.0f} / "
                     f"{act['peak_mib_above_weights']:.0f} / {ours['peak_mib_above_weights']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
