"""Calibration of a model that does not fit in the memory it is given: \
accelerate disk offload + layer-wise recomputation.

    python scripts/bench_offload.py                       # 16 layers × 64 experts, fp32 (~2.4 GB), 128 MB allowed
    python scripts/bench_offload.py --max-memory 256MB

A random qwen2_moe checkpoint is written once (in its own process); then a fresh process loads it with
``device_map="auto"``, ``max_memory={"cpu": LIMIT}`` and an offload folder, runs fair_moe's layer-wise
calibration, and reports its peak RSS next to the size of the weights. A third process runs the
in-memory one-pass calibration on the same batches for comparison (time, RSS, and whether the scores agree).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make(folder: Path, inter: int) -> None:
    from transformers import AutoModelForCausalLM, Qwen2MoeConfig

    config = Qwen2MoeConfig(vocab_size=4096, hidden_size=256, intermediate_size=512, moe_intermediate_size=inter,
                            shared_expert_intermediate_size=256, num_hidden_layers=16, num_attention_heads=4,
                            num_key_value_heads=2, num_experts=64, num_experts_per_tok=8, max_position_embeddings=1024)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder, max_shard_size="200MB")


class AnonPeak:
    """Peak anonymous (non-file-backed) resident memory, sampled every 5 ms from /proc/self/status.

    ru_maxrss also counts the pages of memory-mapped weight files (accelerate's disk offload and
    safetensors both map files), which the kernel can drop at any time; RssAnon is what must fit.
    """

    def __init__(self):
        import threading

        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) // 1024
        return 0

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            self._stop.wait(0.005)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._sample())


def measure(folder: Path, mode: str, limit: str, out: Path) -> dict:
    from transformers import AutoModelForCausalLM

    from fair_moe.adapters import get_adapter
    from fair_moe.strategies.signals import compute_signals
    from fair_moe.units.experts.calibrate import run_calibration
    from fair_moe.units.experts.layerwise import run_calibration_layerwise

    torch.set_num_threads(2)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    anon = AnonPeak().__enter__()
    kwargs = {}
    if mode == "offload":
        kwargs = {"device_map": "auto", "max_memory": {"cpu": limit}, "offload_folder": str(folder / "offload")}
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs).eval()
    gen = torch.Generator().manual_seed(0)
    batches = [(i % 2, torch.randint(0, 4096, (2, 256), generator=gen)) for i in range(2)]
    layers = get_adapter(model.config).moe_layers(model)
    start = time.perf_counter()
    run = run_calibration_layerwise if mode == "offload" else run_calibration
    removal, protection = compute_signals(run(model, layers, batches, 2, 0, progress=False))
    seconds = time.perf_counter() - start
    anon.__exit__(None, None, None)
    torch.save({"reap": removal["reap"], "taylor": protection}, out)
    return {"mode": mode, "seconds": seconds, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "rss_after_imports_mib": base, "peak_anon_mib": anon.peak}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-memory", default="128MB")
    p.add_argument("--inter", type=int, default=768,
                   help="expert intermediate size (768: about 2.4 GB of fp32 weights)")
    p.add_argument("--make", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.make:
        make(args.make, args.inter)
        return 0
    if args.child:
        print(json.dumps(measure(Path(args.child[0]), args.child[1], args.max_memory, Path(args.child[2]))))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        subprocess.run([sys.executable, __file__, "--make", str(folder), "--inter", str(args.inter)], check=True,
                       capture_output=True)
        size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        rows = []
        for mode in ("offload", "memory"):
            cmd = [sys.executable, __file__, "--child", str(folder), mode, str(Path(tmp) / f"{mode}.pt"),
                   "--max-memory", args.max_memory]
            rows.append(
                json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
            )
        a, b = (torch.load(Path(tmp) / f"{m}.pt") for m in ("offload", "memory"))
        same = all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-9) for k in a)
    print(f"weights on disk: {size / 2**20:.0f} MiB; --max-memory cpu={args.max_memory}; scores agree: {same}")
    print("| run | peak anonymous RSS | peak RSS (incl. mapped files) | RSS after imports | time |\n"
          "|---|---|---|---|---|")
    for r in rows:
        label = f"offloaded, layer-wise (cpu={args.max_memory})" if r["mode"] == "offload" else "in memory, one pass"
        print(f"| {label} | {r['peak_anon_mib']:.0f} MiB | {r['peak_rss_mib']:.0f} MiB "
              f"| {r['rss_after_imports_mib']:.0f} MiB "
              f"| {r['seconds']:.1f} s |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
