"""Which MoE model types of the installed transformers fair_moe prunes, and the tests each one passes.

    python scripts/coverage.py                          # runs the family matrix (about 5 min), prints the table
    python scripts/coverage.py --junit report.xml       # reads a pytest JUnit report of the matrix instead
    python scripts/coverage.py --readme                 # also writes the table into README.md between its markers

The universe is read from the installed sources: every model folder whose modeling file defines an experts module
(``class …Experts(nn.Module)``) or fused ``gate_up_proj`` experts beside an expert count. For each, the tiny random
config of the test zoo (``tests/zoo_configs.json``; the hand-written ones of ``tests/families.py`` for the first
families) is built from the type's real config class on the meta device and its MoE structure looked for
(``fair_moe.adapters.structure``): a type is *supported* when it is in ``fair_moe.adapters.families.SUPPORTED``
and passes every test of the matrix; otherwise the table says why (the refusal fair_moe itself prints, or that no
tiny config exists for it). The matrix per type: the masked model with nothing removed equals the model (bit for
bit), frequency and Taylor against references, exact budgets for tod / uniform / global at two budgets, tod /
uniform / very uneven round trips through save → ``from_pretrained`` with the type's own Auto class (the stock
class for uniform plans), the masked routing equal to the sliced router's own, and a multi-shard streamed rewrite
of the type's own key format equal to the masked original.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

MATRIX = ("tests/units/experts/test_families.py", "tests/units/experts/test_stream.py")
EXPERTS_CLASS = re.compile(r"^class \w+Experts\((?:nn\.Module|\w*Experts)\)", re.M)
FUSED = re.compile(r"gate_up_proj")
COUNT = re.compile(r"num_(?:local_)?experts|n_routed_experts")
START, END = "<!-- coverage:start -->", "<!-- coverage:end -->"
NOT_FUSED = "hold no fused-experts module"  # in fair_moe's refusal of a model whose experts are not fused


def fused_expert_folders() -> list[str]:
    """Model folders of the installed transformers whose modeling code holds an experts module."""
    import transformers

    found = []
    for folder in sorted((Path(transformers.__file__).parent / "models").iterdir()):
        sources = [p.read_text(encoding="utf-8") for p in folder.glob("modeling_*.py")]
        if any(EXPERTS_CLASS.search(s) or (FUSED.search(s) and COUNT.search(s)) for s in sources):
            found.append(folder.name)
    return found


def tiny_configs() -> dict[str, object]:
    """model folder → (name in the matrix, tiny config) for every folder the test zoo has a config for."""
    from families import family_configs
    from zoo import ZOO, zoo_config

    configs = {**{name: zoo_config(name) for name in ZOO}, **family_configs()}
    by_folder = {}
    for name, config in configs.items():
        folder = type(config).__module__.split(".")[2]  # transformers.models.<folder>.configuration_…
        by_folder.setdefault(folder, []).append((name, config))
    return by_folder


def run_matrix(report: Path) -> None:
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}",
                    *MATRIX], cwd=ROOT, check=False)


def results(report: Path) -> dict[str, dict[str, int]]:
    """family → {"passed": n, "failed": n, "skipped": n} from a JUnit report of the matrix."""
    counts: dict[str, dict[str, int]] = defaultdict(lambda: {"passed": 0, "failed": 0, "skipped": 0})
    for case in ET.parse(report).iter("testcase"):
        if not case.get("classname", "").endswith(("test_families", "test_stream")):
            continue
        match = re.search(r"\[([^\]-]+)", case.get("name", ""))
        if match is None:
            continue
        outcome = "failed" if case.find("failure") is not None or case.find("error") is not None else \
            "skipped" if case.find("skipped") is not None else "passed"
        counts[match.group(1)][outcome] += 1
    return counts


def status(name: str, config, outcome: dict[str, int] | None) -> tuple[str, str, str]:
    """(supported?, tests, why) of one type."""
    from fair_moe.adapters import get_adapter
    from fair_moe.adapters.families import SUPPORTED
    from fair_moe.adapters.structure import auto_class_name

    try:
        structure = get_adapter(config).structure(config)
    except Exception as err:  # noqa: BLE001 - the refusal itself is what the table reports
        return "no", "-", str(err).split(": ", 1)[-1] if "model_type" in str(err) else str(err)
    notes = [auto_class_name(config)]
    if structure.groups > 1:
        notes.append(f"{structure.groups} expert groups")
    if structure.selection_biases:
        notes.append("selection bias")
    if structure.dispatch != "top_k":
        notes.append(f"{structure.dispatch.replace('_', '-')} experts call")
    if structure.whole_layers:
        whole = ", ".join(map(str, structure.whole_layers))
        notes.append(f"layer{'s' if len(structure.whole_layers) > 1 else ''} {whole} kept whole")
    if name not in SUPPORTED:
        from zoo import ZOO  # the zoo says what is unusual about a type it cannot test yet
        unusual = ZOO.get(name, {}).get("why")
        return "no", "-", f"structure found, but not handled yet: {unusual}" if unusual else \
            "structure found, but not in the tested set"
    if outcome is None:
        return "no", "-", "no test results for it"
    total = sum(outcome.values()) - outcome["skipped"]
    tests = f"{outcome['passed']}/{total}"
    if outcome["failed"]:
        return "no", tests, f"fails {outcome['failed']} test(s) of the matrix"
    return "yes", tests, ", ".join(notes)


def table(report: Path) -> str:
    outcomes = results(report)
    configs = tiny_configs()
    rows, supported, total, unfused = [], 0, 0, 0
    for folder in sorted(set(fused_expert_folders()) | set(configs)):  # the zoo knows types whose experts class
        entries = configs.get(folder)                                     # is imported from another family
        if not entries:
            rows.append(f"| {folder} | no | - | no tiny config in the test zoo (not a routed-experts MoE, or it "
                        "cannot be built tiny from its config class) |")
            continue
        for name, config in entries:
            yes, tests, why = status(name, config, outcomes.get(name))
            total += 1
            supported += yes == "yes"
            unfused += NOT_FUSED in why
            rows.append(f"| {name} | {yes} | {tests} | {why} |")
    fused = total - unfused
    head = [f"Supported: {supported} of the {fused} model types whose experts are fused (gate_up_proj / down_proj) "
            f"modules ({100 * supported / fused:.0f} %); {supported} of all {total} MoE model types with an experts "
            f"module ({100 * supported / total:.0f} %), the {unfused} whose experts are not fused included.", "",
            "| model type | supported | tests passed | loads with / routing notes, or why not |",
            "|---|---|---|---|"]
    return "\n".join(head + rows)


def write_readme(text: str) -> None:
    readme = ROOT / "README.md"
    content = readme.read_text()
    if START not in content or END not in content:
        raise SystemExit(f"README.md has no {START} … {END} markers")
    before, rest = content.split(START, 1)
    _, after = rest.split(END, 1)
    readme.write_text(f"{before}{START}\n{text}\n{END}{after}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--junit", type=Path, help="a JUnit XML report of the matrix (default: run it now)")
    parser.add_argument("--readme", action="store_true", help="write the table into README.md")
    args = parser.parse_args(argv)
    report = args.junit
    if report is None:
        report = Path(tempfile.mkdtemp()) / "matrix.xml"
        run_matrix(report)
    text = table(report)
    print(text)
    if args.readme:
        write_readme(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
