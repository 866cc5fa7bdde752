"""What goes beside the weights for people: the model card (README.md) and allocation.png; and the console."""

from __future__ import annotations

from dataclasses import dataclass, field
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
    if plan.whole:
        removed += f" ({keep_all(plan, unit.noun)}: they cannot be made unreachable there, so none is removed)"
    if plan.compensation is None:
        return removed + (" and nothing else was changed, so this model equals the base model "
                          f"with {unit.removal_means}.")
    untouched = f" ({layers_phrase(plan.whole)}: unchanged)" if plan.whole else ""
    return removed + "; besides, " + COMPENSATIONS.get(plan.compensation.kind).changes + untouched + "."


def layers_phrase(layers) -> str:
    """``layer 0`` / ``layers 0, 1``, for sentences."""
    indices = sorted(layers)
    return ("layer " if len(indices) == 1 else "layers ") + ", ".join(str(i) for i in indices)


def keep_all(plan: PrunePlan, noun: str) -> str:
    """``layer 0 keeps all 8 routed experts`` for the layers a plan keeps whole."""
    verb = "keeps" if len(plan.whole) == 1 else "keep"
    return f"{layers_phrase(plan.whole)} {verb} all {plan.width} {noun}"


def _counts_line(plan: PrunePlan) -> str:
    return ", ".join(f"{layer}: {n}" + (" (kept whole)" if layer in plan.whole else "")
                     for layer, n in plan.layer_counts.items())


@dataclass
class CardFacts:
    """What the card says beyond the plan: the base model's Hub id (None for a local folder nobody named), its
    licence (inherited from the base model's card), Hub datasets calibrated on, where to load the model from, and
    evaluation results ({"task/metric": value}, from ``fair_moe.eval``)."""

    base_model_id: str | None = None
    license: str | None = None
    datasets: tuple[str, ...] = ()
    load_path: str = "PATH_OR_REPO"
    results: dict = field(default_factory=dict)


def base_card_facts(source: str, base_model_id: str | None = None, folder: Path | None = None) -> CardFacts:
    """What a card inherits from the base model: its Hub id (a Hub id given as --model, or --base-model) and the
    licence its own card declares (read from ``folder``, where the model was loaded from)."""
    local = Path(source).expanduser()
    hub_id = base_model_id or (None if local.exists() else source)
    license_ = None
    folder = folder if folder is not None else (local if local.is_dir() else None)
    card_file = folder / "README.md" if folder is not None else None
    if card_file is not None and card_file.is_file():
        try:
            from huggingface_hub import ModelCard

            license_ = ModelCard.load(card_file).data.to_dict().get("license")
        except Exception:  # a README that is not a Hub card: no licence to inherit
            license_ = None
    return CardFacts(base_model_id=hub_id, license=license_)


def model_card(plan: PrunePlan, facts: CardFacts | None = None) -> str:
    """The Hub model card (huggingface_hub's ModelCard): metadata, exactly what was done to the weights, the
    method that made the plan, and how to load it. Nothing of the base model's own documentation."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    if facts is None:
        facts = base_card_facts(plan.base_model) if plan.base_model else CardFacts()
    unit = UNIT_KINDS.get(plan.unit)
    s = plan.settings
    calib = s.get("calibration") or {}
    allocation, removal = chosen_method(plan)
    base = facts.base_model_id or (f"a local checkpoint ({Path(plan.base_model).name})" if plan.base_model
                                   else "an unnamed base model")
    results = [EvalResult(task_type=unit.pipeline_tag, dataset_type=key.split("/")[0], dataset_name=key.split("/")[0],
                          metric_type=key.split("/", 1)[-1], metric_value=float(value))
               for key, value in facts.results.items() if isinstance(value, (int, float))]
    data = ModelCardData(
        base_model=facts.base_model_id, license=facts.license, datasets=list(facts.datasets) or None,
        library_name="transformers", pipeline_tag=unit.pipeline_tag,
        tags=[*unit.card_tags, "pruned", "fair-moe"],
        model_name=f"{plan.model_type} pruned by fair_moe" if results else None, eval_results=results or None,
    )
    load_kw = "" if plan.is_uniform else ", trust_remote_code=True"
    auto_class = s.get("auto_class", unit.auto_class)
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
        *([f"- weights: the base checkpoint is quantized ({s['source_quantization']}); calibrated on its dequantised "
           f"weights; this checkpoint is written {s['written']}"
           + (" (kept experts' quantized payloads are the source's bytes; a compensation changes scales or router "
              "rows only)" if "source's" in s["written"] else "")]
          if s.get("source_quantization") else []),
        f"- {unit.noun} kept per layer: {_counts_line(plan)}",
    ]
    body = [
        f"# {plan.model_type} with {plan.removed_total} {unit.noun} pruned by fair_moe",
        "",
        f"Base model: {f'`{base}`' if facts.base_model_id else base}. " + weights_sentence(plan),
        "",
        "## How it was pruned",
        "",
        *how,
        "",
        "The kept ids of every layer are in `fair_moe_plan.json`; every unit's scores are in "
        "`fair_moe_scores.safetensors` (re-prune at another budget with `--scores`); the settings that reproduce "
        "this checkpoint are in `fair_moe_recipe.yaml`.",
        "",
        "## How to load it",
        "",
        "```python",
        f"from transformers import {auto_class}",
        f'model = {auto_class}.from_pretrained("{facts.load_path}"{load_kw})',
        "```",
        "",
        "Every layer keeps the same number of units, so this is the stock architecture: it loads without remote "
        "code, and in serving engines such as vLLM." if plan.is_uniform
        else "The layers keep different numbers of units: the checkpoint carries `modeling_fair_moe.py` "
        "(registered through `auto_map`, `architectures` names `" + unit.uneven_class + "`), so loading needs "
        "`trust_remote_code=True`; serving engines that do not run remote code (vLLM, "
        "SGLang, TGI) need a plan with one count per layer"
        + (f": {keep_all(plan, unit.noun)} (they cannot be made unreachable there), so no pruned checkpoint of "
           "this model has that." if plan.whole else " (`--layout stock`)."),
        "",
    ]
    if facts.results:
        body += ["## Evaluation", "", "| metric | value |", "|---|---|"]
        body += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in facts.results.items()]
        body.append("")
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body)))


def plot_allocation(plan: PrunePlan, path: Path) -> None:
    """Bar chart of kept units per layer, with the uniform count at the same budget as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    unit = UNIT_KINDS.get(plan.unit)
    allocation, removal = chosen_method(plan)
    layers = list(plan.layer_counts)
    kept = list(plan.layer_counts.values())
    fig, ax = plt.subplots(figsize=(max(4.5, 0.35 * len(layers) + 2), 3.8))
    pruned = [n for n, i in enumerate(layers) if i not in plan.whole]
    ax.bar(pruned, [kept[n] for n in pruned], color="#4c72b0", label=f"{allocation} + {removal}")
    if plan.whole:
        whole = [n for n, i in enumerate(layers) if i in plan.whole]
        ax.bar(whole, [kept[n] for n in whole], color="#bbbbbb", label="kept whole (not units)")
    planned = list(plan.kept_counts.values())
    ax.axhline(sum(planned) / len(planned), color="#dd8452", linestyle="--", label="uniform at the same budget")
    ax.axhline(plan.width, color="grey", linewidth=0.8, label=f"original ({plan.width})")
    ax.set_xticks(range(len(layers)), [str(i) for i in layers], fontsize=7)
    ax.set_xlabel("layer")
    ax.set_ylabel(f"{unit.noun} kept")
    title = f"{plan.model_type}: {plan.removed_total} {unit.noun} removed"
    if plan.alpha is not None:
        title += f", α* = {plan.alpha:.3f}"
    ax.set_title(title, fontsize=9)
    ax.set_ylim(0, plan.width * 1.05)
    handles, labels = ax.get_legend_handles_labels()
    factors = plan.compensation.per_layer if plan.compensation else {}
    if factors and all(isinstance(v, (int, float)) for v in factors.values()):  # layer scales, temperatures
        twin = ax.twinx()
        twin.plot(range(len(layers)), [float(factors.get(i, 1.0)) for i in layers], "D", color="#55a868",
                  label=plan.compensation.kind)
        twin.set_ylabel(plan.compensation.kind, fontsize=7)
        twin.tick_params(labelsize=7)
        more = twin.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    # below the axes: it never covers a bar or a marker
    ax.legend(handles, labels, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=2, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _kl_columns(row: dict) -> str:
    """A candidate's mean KL ± se, median KL, paired gain ± se and window wins / losses, in fixed columns."""
    return (f"{row['kl_mean']:8.4f} ± {row['kl_se']:<7.4f} {row.get('kl_median', float('nan')):8.4f}  "
            f"{row['gain_vs_default']:+8.4f} ± {row['gain_se']:<7.4f} "
            f"{row.get('wins', 0):3d} / {row.get('losses', 0):<3d}"
            + (f" {row['windows']:5d}" if "windows" in row else ""))


def candidate_table(settings: dict) -> list[str]:
    """The lines that show auto's candidates: the judged ones by mean KL, then those dropped at screening, whose
    numbers cover only the screening windows (so their mean KL is not comparable with the judged ones')."""
    selection = settings.get("selection", {})
    screening = selection.get("screening", "")
    judged = sorted((c for c in settings["candidates"] if not c.get("screened_out")), key=lambda c: c["kl_mean"])
    dropped = sorted((c for c in settings["candidates"] if c.get("screened_out")), key=lambda c: c["kl_mean"])
    looks = (f" in two looks of {selection['first_look']} + {selection['second_look']}"
             if selection.get("second_look") else "")
    lines = [f"candidate plans (KL from the dense model on {selection.get('windows')} held-out windows{looks}, "
             f"{selection.get('tokens')} tokens; gain = the default's KL minus the candidate's, paired over the "
             "windows both were judged on):",
             f"  {'allocation':10s} {'removal':12s} {'mean KL ± se':<19s}{'median KL':>8s}  {'gain ± se':<19s}"
             "lower / higher  windows"]
    lines += [f"  {c['allocation']:10s} {c['removal']:12s} " + _kl_columns(c) for c in judged]
    if dropped:
        lines.append(f"  dropped at screening ({screening.split(';')[0]}; numbers over those windows only):")
        lines += [f"  {c['allocation']:10s} {c['removal']:12s} " + _kl_columns(c) for c in dropped]
    chosen = settings["selected"]
    lines += [f"rule: {selection.get('rule')}"] + ([f"looks: {selection['looks']}"] if "looks" in selection else [])
    lines += [f"auto chose {chosen['allocation']} + {chosen['removal']}"]
    return lines


class Console:
    """What a run prints: the layout before any work, the plans, the perplexity table, the time each phase took,
    where it wrote. ``quiet`` keeps only the last (errors go to stderr regardless)."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet

    def line(self, text: str) -> None:
        if not self.quiet:
            print(text)

    def final(self, text: str) -> None:
        print(text)

    def timings(self, phases: dict[str, float]) -> None:
        self.line("time: " + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in phases.items())
                  + f" (total {sum(phases.values()):.1f} s)")

    def plan(self, plan: PrunePlan) -> None:
        if self.quiet:
            return
        s = plan.settings
        if "candidates" in s:
            print("\n".join(candidate_table(s)))
        decision = s.get("compensation_decision")
        if decision:
            print("compensations (KL on the same windows):")
            for c in decision["candidates"]:
                print(f"  {c['compensation']:20s} " + _kl_columns(c))
            print(f"rule: {decision['rule']}")
        allocation, removal = chosen_method(plan)
        print(f"plan ({allocation} + {removal}" + (f", alpha*={plan.alpha:.4f}" if plan.alpha is not None else "")
              + "):")
        print("  layer  kept  removed")
        for layer, n in plan.layer_counts.items():
            print(f"  {layer:5d}  {n:4d}  {plan.width - n:7d}" + ("  (kept whole)" if layer in plan.whole else ""))
        print(f"  total  {sum(plan.kept_counts.values()):4d}  {plan.removed_total:7d}")
        if plan.compensation is not None:
            print("  " + COMPENSATIONS.get(plan.compensation.kind).summary(plan.compensation))

    def perplexity(self, names: list[str], dense: list[float], pruned: dict[str, list[float]]) -> None:
        if self.quiet:
            return
        print("perplexity  " + "  ".join(f"{n[:14]:>14s}" for n in names))
        print("  dense     " + "  ".join(f"{v:14.3f}" for v in dense))
        for label, values in pruned.items():
            print(f"  {label[:10]:10s}" + "  ".join(f"{v:14.3f}" for v in values))
