"""Method names live in one place: the command line's choices, help and auto's candidates come from the
registries, and listing them does not import torch."""

import subprocess
import sys

from fair_moe.cli.prune import build_parser
from fair_moe.strategies import ALLOCATIONS, AUTO, COMPENSATIONS, PROTECTION_SIGNALS, REMOVAL_SIGNALS
from fair_moe.units import UNIT_KINDS


def _choices(flag: str) -> list[str]:
    action = next(a for a in build_parser()._actions if flag in a.option_strings)
    return list(action.choices)


def test_cli_choices_are_the_registries():
    assert _choices("--allocation") == [AUTO, *ALLOCATIONS.names()] == [AUTO, "tod", "uniform", "global"]
    assert _choices("--removal") == REMOVAL_SIGNALS.names() == ["reap", "frequency", "ean", "wasserstein", "consensus",
                                                                  "random"]
    assert _choices("--compensate") == [AUTO, *COMPENSATIONS.names()]
    assert _choices("--protection") == PROTECTION_SIGNALS.names() == ["taylor"]
    assert _choices("--units") == UNIT_KINDS.names() == ["experts", "neurons", "heads"]


def test_help_describes_every_strategy():
    text = build_parser().format_help()
    for registry in (ALLOCATIONS, COMPENSATIONS, REMOVAL_SIGNALS, UNIT_KINDS):
        for item in registry:
            assert item.name in text
    assert "Tolerance of Difference" in " ".join(text.split())


def test_help_does_not_import_torch():
    code = ("import sys; from fair_moe.cli.prune import build_parser; build_parser().format_help(); "
            "print(type(sys.modules.get('torch')).__name__)")  # reading no attribute: that would load it
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out in ("NoneType", "_LazyModule")


def test_auto_candidates_follow_the_registry_facts():
    assert ALLOCATIONS.names(lambda r: r.auto_candidate) == ["tod", "uniform", "global"]
    assert REMOVAL_SIGNALS.names(lambda s: s.auto_candidate) == ["reap", "frequency", "ean", "wasserstein"]
    assert COMPENSATIONS.names(lambda c: c.auto_candidate) == ["layer-scale", "router-kd"]
    assert ALLOCATIONS.names(lambda r: r.supports_tolerance) == ["tod"]


def test_every_flag_of_every_command_is_documented():
    from fair_moe.cli.eval import build_parser as eval_parser
    from fair_moe.cli.push import build_parser as push_parser

    for parser in (build_parser(), eval_parser(), push_parser()):
        assert [a.dest for a in parser._actions if not a.help] == []
    text = " ".join(build_parser().format_help().split())
    assert "(default: 128)" in text and "(default: 512)" in text  # defaults are shown
