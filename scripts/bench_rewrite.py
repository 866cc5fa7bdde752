"""Peak memory of the streaming rewriter against the size of the checkpoint it rewrites.

    python scripts/bench_rewrite.py                      # ~1.2 GB bf16 qwen2_moe checkpoint in 100 MB shards
    python scripts/bench_rewrite.py --layers 4 --experts 32

A random qwen2_moe checkpoint is written once (sharded), then a fresh subprocess rewrites it at budget
0.5 with an uneven plan and reports its peak RSS (ru_maxrss) next to the checkpoint size on disk.
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


def make_checkpoint(folder: Path, layers: int, experts: int, hidden: int, inter: int) -> None:
    from transformers import AutoModelForCausalLM, Qwen2MoeConfig

    config = Qwen2MoeConfig(vocab_size=8192, hidden_size=hidden, intermediate_size=2 * inter,
                            moe_intermediate_size=inter,
                            shared_expert_intermediate_size=2 * inter, num_hidden_layers=layers, num_attention_heads=8,
                            num_key_value_heads=4, num_experts=experts, num_experts_per_tok=4)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder, max_shard_size="100MB")


def child(source: str, out: str, layers: int, experts: int) -> dict:
    from fair_moe.checkpoint.stream import stream_rewrite
    from fair_moe.core.plan import PrunePlan
    from fair_moe.units.experts.keys import ExpertKeyRewriter

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    # uneven plan at budget 0.5: even layers keep 3/4 of their experts, odd layers 1/4
    kept = {i: list(range(3 * experts // 4)) if i % 2 == 0 else list(range(experts // 4)) for i in range(layers)}
    plan = PrunePlan("qwen2_moe", "experts", experts, kept, top_k=4)
    from transformers import AutoConfig

    from fair_moe.adapters import get_adapter

    rewriter = ExpertKeyRewriter(plan, get_adapter(AutoConfig.from_pretrained(source)))
    start = time.perf_counter()
    stats = stream_rewrite(Path(source), Path(out), rewriter, max_shard_bytes=100 * 2**20, progress=False)
    rewriter.check_complete()
    stats["seconds"] = time.perf_counter() - start
    stats["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    stats["baseline_rss_mib"] = base
    return stats


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--inter", type=int, default=384)
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    p.add_argument("--make", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.make:
        make_checkpoint(Path(args.make), args.layers, args.experts, args.hidden, args.inter)
        return 0
    if args.child:
        print(json.dumps(child(*args.child, args.layers, args.experts)))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        source, out = Path(tmp) / "src", Path(tmp) / "out"
        # Built in its own process: Linux carries the RSS high-water mark across fork + exec, so a parent
        # that held the model would inflate the measuring child's ru_maxrss.
        shape = ["--layers", str(args.layers), "--experts", str(args.experts), "--hidden", str(args.hidden),
                 "--inter", str(args.inter)]
        subprocess.run([sys.executable, __file__, "--make", str(source), *shape], check=True, capture_output=True)
        size = sum(f.stat().st_size for f in source.glob("*.safetensors"))
        cmd = [sys.executable, __file__, "--child", str(source), str(out), "--layers", str(args.layers),
               "--experts", str(args.experts)]
        stats = json.loads(
            subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        )
    print(json.dumps(stats))
    print("| checkpoint on disk | shards | written | peak RSS of the rewrite | RSS before it | time |")
    print("|---|---|---|---|---|---|")
    print(f"| {size / 2**20:.0f} MiB | {stats['shards']} out | {stats['written_bytes'] / 2**20:.0f} MiB | "
          f"{stats['peak_rss_mib']:.0f} MiB | {stats['baseline_rss_mib']:.0f} MiB | {stats['seconds']:.1f} s |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
