"""What goes beside the weights for people: the model card (README.md) and allocation.png."""

from __future__ import annotations

from pathlib import Path

from fair_moe.plan import PrunePlan


def _counts_line(plan: PrunePlan) -> str:
    return ", ".join(f"{layer}: {n}" for layer, n in plan.kept_counts.items())


def model_card(plan: PrunePlan, results: dict | None = None) -> str:
    """A Hub model card with YAML metadata, what was pruned and how, and how to load it."""
    s = plan.settings
    base = plan.base_model or "unknown"
    calib = s.get("calibration") or {}
    uniform = plan.is_uniform
    load_kw = "" if uniform else ", trust_remote_code=True"
    kept_total = sum(plan.kept_counts.values())
    lines = [
        "---",
        f"base_model: {base}" if plan.base_model and not Path(base).exists() else "base_model: null",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags:",
        "- moe",
        "- pruned",
        "- fair-moe",
        "---",
        "",
        f"# {plan.model_type} with {plan.removed_total} routed experts pruned by fair_moe",
        "",
        f"Base model: `{base}`. fair_moe removed whole routed experts ({plan.removed_total} of "
        f"{plan.num_experts * len(plan.kept_counts)}; {kept_total} kept) and changed nothing else: this model equals the "
        "base model with the removed experts made unreachable (router logits set to -inf).",
        "",
        "## How it was pruned",
        "",
        f"- allocation: `{s.get('allocation')}`" + (f" (Tolerance of Difference, α* = {plan.alpha:.4f})" if plan.alpha is not None else ""),
        f"- removal signal: `{s.get('removal')}`; protection signal: `{s.get('protection')}`",
        f"- budget: {s.get('budget')}" if s.get("budget") is not None else f"- tolerance α: {s.get('tolerance')}",
        f"- minimum experts kept per layer: {s.get('min_keep')} (router top_k = {plan.top_k})",
        f"- calibration: {calib.get('samples', '?')} sequences × {calib.get('seq_len', '?')} tokens "
        f"({calib.get('tokens', '?')} tokens) from {', '.join(calib.get('sources', [])) or 'unknown'}, seed {calib.get('seed', '?')}",
        f"- routed experts kept per layer: {_counts_line(plan)}",
        "",
        "The kept expert ids of every layer are in `fair_moe_plan.json`; every expert's scores are in "
        "`fair_moe_scores.safetensors` (re-prune at another budget with `--scores`).",
        "",
        "## How to load it",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f'model = AutoModelForCausalLM.from_pretrained("PATH_OR_REPO"{load_kw})',
        'tokenizer = AutoTokenizer.from_pretrained("PATH_OR_REPO")',
        "```",
        "",
        "The layers keep the same number of experts, so this is the stock architecture (no remote code)."
        if uniform
        else "The layers keep different numbers of experts: the checkpoint carries `modeling_fair_moe.py` "
        "(registered through `auto_map`), so loading needs `trust_remote_code=True`.",
        "",
    ]
    if results:
        lines += ["## Evaluation", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in results.items()]
        lines.append("")
    return "\n".join(lines)


def plot_allocation(plan: PrunePlan, path: Path) -> None:
    """Bar chart of kept experts per MoE layer, with the uniform count at the same budget as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(plan.kept_counts)
    kept = [plan.kept_counts[i] for i in layers]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.35 * len(layers) + 2), 3.2))
    ax.bar(range(len(layers)), kept, color="#4c72b0", label=f"{plan.settings.get('allocation')} (kept)")
    ax.axhline(sum(kept) / len(kept), color="#dd8452", linestyle="--", label="uniform at the same budget")
    ax.axhline(plan.num_experts, color="grey", linewidth=0.8, label=f"original ({plan.num_experts})")
    ax.set_xticks(range(len(layers)), [str(i) for i in layers], fontsize=7)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("routed experts kept")
    title = f"{plan.model_type}: {plan.removed_total} experts removed"
    if plan.alpha is not None:
        title += f", α* = {plan.alpha:.3f}"
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
