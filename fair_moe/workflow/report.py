"""What goes beside the weights for people: the model card (README.md) and allocation.png; and the console."""

from __future__ import annotations

from pathlib import Path

from fair_moe.core.plan import PrunePlan
from fair_moe.strategies import AUTO, COMPENSATIONS
from fair_moe.units import UNIT_KINDS


def chosen_method(plan: PrunePlan) -> tuple[str, str]:
    """The allocation and removal signal that made the plan (what ``auto`` chose, for auto plans)."""
    selected = plan.settings.get("selected") or {}
    return (selected.get("allocation", plan.settings.get("allocation")),
            selected.get("removal", plan.settings.get("removal")))


def weights_sentence(plan: PrunePlan) -> str:
    """Exactly what was done to the weights."""
    unit = UNIT_KINDS.get(plan.unit)
    removed = (f"fair_moe removed {plan.removed_total} of {plan.width * len(plan.kept)} {unit.noun} "
               f"({sum(plan.kept_counts.values())} kept): their tensors were sliced out")
    if plan.compensation is None:
        return removed + (" and nothing else was changed, so this model equals the base model "
                          f"with {unit.removal_means}.")
    return removed + "; besides, " + COMPENSATIONS.get(plan.compensation.kind).changes + "."


def _counts_line(plan: PrunePlan) -> str:
    return ", ".join(f"{layer}: {n}" for layer, n in plan.kept_counts.items())


def model_card(plan: PrunePlan, results: dict | None = None) -> str:
    """A Hub model card with YAML metadata, what was pruned and how, and how to load it."""
    unit = UNIT_KINDS.get(plan.unit)
    s = plan.settings
    base = plan.base_model or "unknown"
    calib = s.get("calibration") or {}
    allocation, removal = chosen_method(plan)
    load_kw = "" if plan.is_uniform else ", trust_remote_code=True"
    local_base = plan.base_model is None or Path(base).exists()
    how = [
        f"- allocation: `{allocation}`" + (f" (Tolerance of Difference, α* = {plan.alpha:.4f})"
                                            if plan.alpha is not None else "")
        + (f", chosen by `--allocation auto` among {len(s.get('candidates', []))} candidate plans judged on "
           "held-out calibration windows" if s.get("allocation") == AUTO else ""),
        f"- removal signal: `{removal}`; protection signal: `{s.get('protection')}`",
        f"- budget: {s.get('budget')}" if s.get("budget") is not None else f"- tolerance α: {s.get('tolerance')}",
        f"- minimum {unit.noun} kept per layer: {s.get('min_keep')}"
        + (f" (router top_k = {plan.top_k})" if plan.top_k is not None else ""),
        "- compensation: " + (COMPENSATIONS.get(plan.compensation.kind).summary(plan.compensation)
                              if plan.compensation else "none"),
        "- calibration: " + ", ".join(f"{k} {v}" for k, v in calib.items()),
        f"- {unit.noun} kept per layer: {_counts_line(plan)}",
    ]
    lines = [
        "---",
        "base_model: null" if local_base else f"base_model: {base}",
        "library_name: transformers",
        f"pipeline_tag: {unit.pipeline_tag}",
        "tags:",
        *[f"- {tag}" for tag in unit.card_tags],
        "- pruned",
        "- fair-moe",
        "---",
        "",
        f"# {plan.model_type} with {plan.removed_total} {unit.noun} pruned by fair_moe",
        "",
        f"Base model: `{base}`. " + weights_sentence(plan),
        "",
        "## How it was pruned",
        "",
        *how,
        "",
        "The kept ids of every layer are in `fair_moe_plan.json`; every unit's scores are in "
        "`fair_moe_scores.safetensors` (re-prune at another budget with `--scores`).",
        "",
        "## How to load it",
        "",
        "```python",
        f"from transformers import {unit.auto_class}",
        f'model = {unit.auto_class}.from_pretrained("PATH_OR_REPO"{load_kw})',
        "```",
        "",
        "Every layer keeps the same number of units, so this is the stock architecture (no remote code)."
        if plan.is_uniform
        else "The layers keep different numbers of units: the checkpoint carries `modeling_fair_moe.py` "
        "(registered through `auto_map`), so loading needs `trust_remote_code=True`.",
        "",
    ]
    if results:
        lines += ["## Evaluation", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in results.items()]
        lines.append("")
    return "\n".join(lines)


def plot_allocation(plan: PrunePlan, path: Path) -> None:
    """Bar chart of kept units per layer, with the uniform count at the same budget as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    unit = UNIT_KINDS.get(plan.unit)
    allocation, removal = chosen_method(plan)
    layers = list(plan.kept_counts)
    kept = [plan.kept_counts[i] for i in layers]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.35 * len(layers) + 2), 3.2))
    ax.bar(range(len(layers)), kept, color="#4c72b0", label=f"{allocation} + {removal}")
    ax.axhline(sum(kept) / len(kept), color="#dd8452", linestyle="--", label="uniform at the same budget")
    ax.axhline(plan.width, color="grey", linewidth=0.8, label=f"original ({plan.width})")
    ax.set_xticks(range(len(layers)), [str(i) for i in layers], fontsize=7)
    ax.set_xlabel("layer")
    ax.set_ylabel(f"{unit.noun} kept")
    title = f"{plan.model_type}: {plan.removed_total} {unit.noun} removed"
    if plan.alpha is not None:
        title += f", α* = {plan.alpha:.3f}"
    ax.set_title(title, fontsize=9)
    ax.set_ylim(0, plan.width * 1.35)
    ax.legend(fontsize=7, loc="upper right", ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


class Console:
    """What a run prints: the layout before any work, the plans, the perplexity table, where it wrote."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet

    def line(self, text: str) -> None:
        print(text)

    def plan(self, plan: PrunePlan) -> None:
        s = plan.settings
        if "candidates" in s:
            keys = sorted({k for c in s["candidates"] for k in c if k.startswith("loss")},
                          key=lambda k: (k != "loss", k))
            print("candidate plans (loss on held-out calibration windows):")
            print("  allocation removal       " + "  ".join(f"{k.replace('loss_', '+').replace('loss', 'plain'):>14s}"
                                                            for k in keys))
            for c in sorted(s["candidates"], key=lambda c: c["perplexity"]):
                print(f"  {c['allocation']:10s} {c['removal']:12s} "
                      + "  ".join(f"{c[k]:14.4f}" if k in c else " " * 14 for k in keys))
            chosen = s["selected"]
            print(f"auto chose {chosen['allocation']} + {chosen['removal']}"
                  + (f" with {chosen['compensation']}" if chosen.get("compensation", "none") != "none" else ""))
        allocation, removal = chosen_method(plan)
        print(f"plan ({allocation} + {removal}" + (f", alpha*={plan.alpha:.4f}" if plan.alpha is not None else "")
              + "):")
        print("  layer  kept  removed")
        for layer, n in plan.kept_counts.items():
            print(f"  {layer:5d}  {n:4d}  {plan.width - n:7d}")
        print(f"  total  {sum(plan.kept_counts.values()):4d}  {plan.removed_total:7d}")
        if plan.compensation is not None:
            print("  " + COMPENSATIONS.get(plan.compensation.kind).summary(plan.compensation))

    def perplexity(self, names: list[str], dense: list[float], pruned: dict[str, list[float]]) -> None:
        print("perplexity  " + "  ".join(f"{n[:14]:>14s}" for n in names))
        print("  dense     " + "  ".join(f"{v:14.3f}" for v in dense))
        for label, values in pruned.items():
            print(f"  {label[:10]:10s}" + "  ".join(f"{v:14.3f}" for v in values))
