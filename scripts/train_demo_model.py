"""Train the small MoE that fair_moe ships as its embedded default, and the benchmark fixtures, on CPU.

    python scripts/train_demo_model.py                        # qwen2_moe demo -> fair_moe/data/demo_model
    python scripts/train_demo_model.py --fixture olmoe        # -> bench_out/fixtures/olmoe/{model,calib,heldout}
    python scripts/train_demo_model.py --fixture mixtral      # 8 experts, top-2, renormalised
    python scripts/train_demo_model.py --fixture deepseek     # sigmoid + selection bias, shared expert
    python scripts/train_demo_model.py --fixture qwen3        # 16 experts, top-2, renormalised, no shared expert
    python scripts/train_demo_model.py --fixture qwen2moe6    # qwen2_moe, 6 layers, 30 experts top-4, shared expert
    python scripts/train_demo_model.py --fixture deepseek_grouped  # deepseek_v3, 4 groups of 8, top-2 groups

Fixtures are the models the quality benchmark (scripts/bench_quality.py) runs on besides the demo; each
takes its own train / calibration / held-out split of the corpus (``--corpus-seed``), so its held-out text
is not the demo's. ``--fixture`` only fills in the arguments listed in ``FIXTURES``; any flag overrides.

The text comes from scripts/demo_corpus.py (Python stdlib code, licence texts, Python reference docs).
A byte-level BPE tokenizer is trained on the training split, then the model is trained with
domain-balanced batches and the router's load-balancing loss. The calibration and held-out samples
(disjoint from training documents) are written to fair_moe/data/{calib,heldout}/ next to the model,
and TRAINING.md records held-out perplexity per domain and how unevenly tokens route to experts.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    DeepseekV3Config,
    MixtralConfig,
    OlmoeConfig,
    PreTrainedTokenizerFast,
    Qwen2MoeConfig,
    Qwen3MoeConfig,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo_corpus import DOC_SEPARATOR, DOMAINS, collect  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EOS = "<|endoftext|>"
# name → arguments; outputs go to bench_out/fixtures/<name>/. ``threads`` is the CPU thread count the battery's
# instance was trained with, pinned by the preset (--threads overrides it). Training is bitwise reproducible only on
# 1 thread and on the same kind of machine: deepseek_grouped (retrained 2026-12-01, equal safetensors), mixtral and
# deepseek (retrained 2026-12-02 on 1 thread: the battery's dense held-out perplexity to every digit,
# 31.879376428410776 and 28.645861281511518) reproduced on the machine of those sessions. On 2 threads neither
# another count nor the same count (olmoe16: held-out python 67.45 against 64.30) gave the same model; and on another
# machine (AMD EPYC with AVX-512, a later session of 2026-12-02, same torch and transformers) 1 thread did not either:
# qwen2moe6 gave dense 61.50 where its 1-thread instance of 2026-12-01 has 58.46, and even evaluating the shipped demo
# model differs from the earlier machine by 3e-7 relative. So a fixture is reproducible in recipe everywhere, in
# weights only on the machine kind it was trained on. olmoe, qwen2moe6, olmoe16 and qwen3 were first trained on 2
# threads; the battery now runs 1-thread instances of all four (2026-12-07, AMD EPYC, where qwen2moe6 and olmoe16
# reproduced the 1-thread retrains of 2026-12-02; the earlier instances' cells are kept in benchmarks/battery/).
FIXTURES = {
    "olmoe": {"arch": "olmoe", "steps": 800, "corpus_seed": 0, "threads": 1},
    "mixtral": {"arch": "mixtral", "steps": 1000, "corpus_seed": 1, "threads": 1},
    "deepseek": {"arch": "deepseek_v3", "steps": 500, "corpus_seed": 2, "threads": 1},  # the battery's: 500 steps
    "qwen3": {"arch": "qwen3_moe", "steps": 500, "corpus_seed": 3, "threads": 1},  # trained after sequential judging
    # the shape of the model issue 10's new user tried: 6 layers, 30 experts top-4, shared expert; trained after the
    # rule's last change, run once as a check
    "qwen2moe6": {"arch": "qwen2_moe", "steps": 600, "corpus_seed": 4, "layers": 6, "experts": 30, "threads": 1},
    # 16 experts, 5 layers, no shared expert: trained after the last change to the default, run once as a check
    "olmoe16": {"arch": "olmoe", "steps": 600, "corpus_seed": 5, "layers": 5, "experts": 16, "threads": 1},
    # group-limited routing (4 groups of 8, the top 2 groups), which no other fixture has: trained on 2026-11-30 to
    # stay unseen, first run on 2026-12-01 as the check of a rule change that was not adopted
    "deepseek_grouped": {"arch": "deepseek_v3", "steps": 500, "corpus_seed": 6, "groups": 4, "threads": 1},
    # fine-grained renormalised softmax routing (24 experts, top-4, no shared expert), which no other fixture has:
    # trained on 2026-12-02 as the unseen check of the rule change made that day (sign test needs a mean gain)
    "qwen3_24": {"arch": "qwen3_moe", "steps": 500, "corpus_seed": 7, "layers": 5, "experts": 24, "top_k": 4,
                 "threads": 1},
    # fine-grained routing (64 small experts, top-8, softmax without renormalisation, no shared expert), the shape of
    # OLMoE-1B-7B and of most large MoEs, which no other fixture has: trained later on 2026-12-02 and run once with the
    # shipped rule, as a check nobody tuned on
    "olmoe64": {"arch": "olmoe", "steps": 500, "corpus_seed": 8, "experts": 64, "top_k": 8, "expert_size": 48,
                "threads": 1},
}


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=EOS)


def build_config(arch: str, vocab_size: int, layers: int = 4, experts: int | None = None, groups: int = 1,
                 top_k: int | None = None, expert_size: int | None = None):
    """The architecture's config; ``layers``, ``experts`` and ``top_k`` (None: the arch's own) apply where the arch
    does not fix its own count (mixtral and deepseek_v3 do), ``expert_size`` (None: the arch's own) is a routed
    expert's intermediate size for qwen2_moe, olmoe and qwen3_moe, ``groups`` (deepseek_v3) splits its experts into
    groups of which the router takes the best two (one: none)."""
    common = dict(
        vocab_size=vocab_size,
        hidden_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        num_experts=experts or 32,
        num_experts_per_tok=top_k or 4,
        output_router_logits=True,
        router_aux_loss_coef=0.01,
        tie_word_embeddings=True,
        eos_token_id=0,
        bos_token_id=0,
        pad_token_id=0,
    )
    if arch == "qwen2_moe":
        return Qwen2MoeConfig(
            **common,
            intermediate_size=256,
            moe_intermediate_size=expert_size or 96,
            shared_expert_intermediate_size=192,
            norm_topk_prob=False,
        )
    if arch == "olmoe":
        return OlmoeConfig(**common, intermediate_size=expert_size or 96, norm_topk_prob=False)
    if arch == "mixtral":  # few large experts, top-2, always renormalised
        common.update(num_experts_per_tok=2)
        common.pop("num_experts")
        return MixtralConfig(**common, num_local_experts=8, intermediate_size=256)
    if arch == "deepseek_v3":  # sigmoid scores + selection bias (balanced without an aux loss), a shared expert
        common.pop("num_experts")
        common.pop("output_router_logits")
        common.pop("router_aux_loss_coef")
        return DeepseekV3Config(**{**common, "num_key_value_heads": 4}, n_routed_experts=32, n_shared_experts=1,
                                moe_intermediate_size=64, intermediate_size=256, first_k_dense_replace=0,
                                n_group=groups, topk_group=min(2, groups), norm_topk_prob=True,
                                routed_scaling_factor=2.5, q_lora_rank=None, kv_lora_rank=32, qk_rope_head_dim=16,
                                qk_nope_head_dim=16, v_head_dim=32)
    if arch == "qwen3_moe":  # mid-sized experts (16, top-2 unless given), renormalised, no shared expert
        common.update(num_experts=experts or 16, num_experts_per_tok=top_k or 2)
        return Qwen3MoeConfig(**common, head_dim=32, intermediate_size=256, moe_intermediate_size=expert_size or 128,
                              norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[])
    raise ValueError(f"unknown --arch {arch!r}; use qwen2_moe, olmoe, mixtral, deepseek_v3 or qwen3_moe")


class SelectionBiasBalancer:
    """Auxiliary-loss-free balancing (DeepSeek-V3): after each step every router's selection bias moves by
    ``rate`` towards experts chosen less than average (and away from those chosen more)."""

    def __init__(self, model, rate: float = 0.01):
        self.rate = rate
        self.counts: dict = {}
        self.routers = [m for m in model.modules() if hasattr(m, "e_score_correction_bias")]
        self.handles = [r.register_forward_hook(self._count) for r in self.routers]

    def _count(self, router, args, output):
        ids = output[2]
        counts = torch.bincount(ids.flatten(), minlength=router.e_score_correction_bias.numel())
        self.counts[router] = self.counts.get(router, 0) + counts

    @torch.no_grad()
    def step(self) -> None:
        for router, counts in self.counts.items():
            router.e_score_correction_bias += self.rate * torch.sign(counts.float().mean() - counts.float())
        self.counts = {}


def token_stream(tokenizer, docs: list[str]) -> torch.Tensor:
    ids: list[int] = []
    for doc in docs:
        ids.extend(tokenizer(doc)["input_ids"])
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def sample_batch(streams: dict[str, torch.Tensor], batch: int, seq: int, gen: torch.Generator) -> torch.Tensor:
    """Batch [batch, seq] whose rows pick a domain with probability proportional to sqrt(its size).

    The square root keeps the small ``docs`` domain from being repeated for dozens of epochs while
    still showing it far more often than its raw share.
    """
    names = sorted(streams)
    weights = torch.tensor([len(streams[n]) ** 0.5 for n in names], dtype=torch.double)
    picks = torch.multinomial(weights, batch, replacement=True, generator=gen)
    rows = []
    for i in range(batch):
        stream = streams[names[int(picks[i])]]
        start = int(torch.randint(0, len(stream) - seq - 1, (1,), generator=gen))
        rows.append(stream[start : start + seq])
    return torch.stack(rows)


@torch.no_grad()
def evaluate(model, streams: dict[str, torch.Tensor], seq: int) -> tuple[dict[str, float], torch.Tensor]:
    """Held-out perplexity per domain (non-overlapping windows) and the routing histogram [L, E]."""
    model.eval()
    ppl = {}
    counts = None
    chosen: list = []  # the ids every router actually chose (selection biases included)
    handles = [m.register_forward_hook(lambda r, a, out: chosen.append((r, out[2])))
               for m in model.modules() if type(m).__name__.endswith(("Router", "TopkRouter", "TopKRouter"))]
    for name in sorted(streams):
        stream = streams[name]
        n = (len(stream) - 1) // seq
        nll, toks = 0.0, 0
        for i in range(0, n, 8):
            batch = torch.stack([stream[j * seq : j * seq + seq] for j in range(i, min(n, i + 8))])
            chosen.clear()
            out = model(input_ids=batch, labels=batch)
            nll += out.loss.item() * batch.numel()
            toks += batch.numel()
            order = {}
            for router, ids in chosen:
                order.setdefault(router, []).append(ids)
            width = model.config.num_local_experts if hasattr(model.config, "num_local_experts") else None
            layer_counts = torch.stack([torch.bincount(torch.cat(v).flatten(), minlength=width or router_width(r))
                                        for r, v in order.items()])
            counts = layer_counts if counts is None else counts + layer_counts
        ppl[name] = math.exp(nll / toks)
    for handle in handles:
        handle.remove()
    model.train()
    return ppl, counts


def router_width(router) -> int:
    return router.weight.shape[0]


def routing_report(counts: torch.Tensor) -> list[str]:
    """Per layer: experts never chosen, share of the least / most chosen live expert, their ratio, entropy."""
    lines = ["| layer | experts never chosen | min share (chosen) | max share | max/min | normalised entropy |",
             "|---|---|---|---|---|---|"]
    for layer, row in enumerate(counts.double()):
        share = row / row.sum()
        live = share[share > 0]
        entropy = -(live * live.log()).sum() / math.log(len(row))
        lines.append(
            f"| {layer} | {int((share == 0).sum())} | {live.min():.4f} | {share.max():.4f} | "
            f"{share.max() / live.min():.1f} | {entropy:.3f} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fixture", choices=sorted(FIXTURES), help="a benchmark fixture: its preset arguments, "
                        "output in bench_out/fixtures/NAME/ (model/, calib/, heldout/)")
    parser.add_argument("--arch", default="qwen2_moe",
                        choices=["qwen2_moe", "olmoe", "mixtral", "deepseek_v3", "qwen3_moe"])
    parser.add_argument("--out", type=Path, default=ROOT / "fair_moe" / "data" / "demo_model")
    parser.add_argument("--samples-out", type=Path, default=ROOT / "fair_moe" / "data",
                        help="where calib/ and heldout/ text samples go (skipped with --no-samples)")
    parser.add_argument("--no-samples", action="store_true")
    parser.add_argument("--steps", type=int, default=1400)
    parser.add_argument("--batch", type=int, default=12)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--corpus-seed", type=int, default=0, help="seed of the train / calib / held-out split")
    parser.add_argument("--threads", type=int, default=2,
                        help="CPU threads (a --fixture pins the count its battery instance was trained with)")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers")
    parser.add_argument("--experts", type=int, default=None,
                        help="routed experts per layer (qwen2_moe, olmoe: 32 when not given; qwen3_moe: 16; the "
                             "other archs fix their own)")
    parser.add_argument("--top-k", type=int, default=None,
                        help="experts per token (qwen2_moe, olmoe: 4 when not given; qwen3_moe: 2)")
    parser.add_argument("--expert-size", type=int, default=None,
                        help="a routed expert's intermediate size (qwen2_moe, olmoe: 96 if not given; qwen3_moe: 128)")
    parser.add_argument("--groups", type=int, default=1,
                        help="expert groups of a deepseek_v3 router (group-limited routing: the best 2 groups)")
    args = parser.parse_args(argv)
    if args.fixture:
        given = set(a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:]) if a.startswith("--"))
        for key, value in FIXTURES[args.fixture].items():
            if f"--{key.replace('_', '-')}" not in given:
                setattr(args, key, value)
        if "--out" not in given:
            args.out = ROOT / "bench_out" / "fixtures" / args.fixture / "model"
        if "--samples-out" not in given:
            args.samples_out = args.out.parent

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    splits = collect(seed=args.corpus_seed)
    tokenizer = train_tokenizer([d for s in splits.values() for d in s.train], args.vocab)
    train = {n: token_stream(tokenizer, splits[n].train) for n in DOMAINS}
    heldout = {n: token_stream(tokenizer, splits[n].heldout) for n in DOMAINS}
    print({n: len(t) for n, t in train.items()}, "train tokens;", {n: len(t) for n, t in heldout.items()}, "held-out")

    config = build_config(args.arch, len(tokenizer), args.layers, args.experts, args.groups, args.top_k,
                          args.expert_size)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps)))
    )
    gen = torch.Generator().manual_seed(args.seed)
    balancer = SelectionBiasBalancer(model) if args.arch == "deepseek_v3" else None
    model.train()
    for step in range(args.steps):
        batch = sample_batch(train, args.batch, args.seq, gen)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if balancer is not None:
            balancer.step()
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step:4d} loss {loss.item():.3f} {time.time() - t0:6.0f}s", flush=True)

    ppl, counts = evaluate(model, heldout, args.seq)
    minutes = (time.time() - t0) / 60
    print("held-out perplexity", ppl, f"{minutes:.1f} min")

    if hasattr(model.config, "output_router_logits"):
        model.config.output_router_logits = False
    args.out.mkdir(parents=True, exist_ok=True)
    model.to(torch.float16).save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    report = [
        f"# Demo model ({args.arch})",
        "",
        f"Trained by `python scripts/train_demo_model.py {' '.join(argv if argv is not None else sys.argv[1:])}` "
        f"in {minutes:.1f} minutes on {args.threads} CPU thread(s) (seed {args.seed}, corpus split seed "
        f"{args.corpus_seed}, {args.steps} steps of {args.batch} x {args.seq} tokens, domains drawn in proportion to "
        "the square root of their size; "
        + ("selection-bias balancing without an auxiliary loss)." if args.arch == "deepseek_v3"
           else "load-balancing loss 0.01)."),
        "Text: Python standard-library sources (`python`), licence and copyright texts from /usr/share "
        "(`licenses`), Python reference documentation from `pydoc_data.topics` (`docs`); documents are split "
        "into train / calibration / held-out parts by scripts/demo_corpus.py, so no held-out or calibration "
        "document was trained on.",
        "",
        "## Held-out perplexity",
        "",
        "| domain | perplexity |",
        "|---|---|",
        *[f"| {n} | {p:.2f} |" for n, p in ppl.items()],
        "",
        "## How unevenly tokens route (held-out text, top-k selections per expert)",
        "",
        *routing_report(counts),
        "",
    ]
    (args.out / "TRAINING.md").write_text("\n".join(report))
    (args.out / "training_metrics.json").write_text(
        json.dumps({"heldout_perplexity": ppl, "expert_counts": counts.tolist(), "minutes": minutes}, indent=1)
    )
    if not args.no_samples:
        for part in ("calib", "heldout"):
            folder = args.samples_out / part
            folder.mkdir(parents=True, exist_ok=True)
            for name in DOMAINS:
                (folder / f"{name}.txt").write_text(DOC_SEPARATOR.join(getattr(splits[name], part)), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
