"""What a run prints about auto's candidates must not put numbers over different windows side by side."""

from fair_moe.workflow.report import candidate_table


def _row(allocation: str, removal: str, kl: float, gain: float, screened: bool, wins: int, losses: int) -> dict:
    return {"allocation": allocation, "removal": removal, "kl_mean": kl, "kl_se": 0.01, "kl_median": kl,
            "gain_vs_default": gain, "gain_se": 0.01, "wins": wins, "losses": losses, "screened_out": screened}


def test_screened_out_candidates_are_listed_apart_with_their_windows():
    settings = {
        "candidates": [_row("global", "ean", 0.29, -0.03, True, 0, 4), _row("uniform", "ean", 0.41, 0.0, False, 0, 0),
                       _row("uniform", "reap", 0.32, 0.09, False, 10, 6)],
        "selection": {"windows": 16, "tokens": 8176, "rule": "keep uniform+ean unless …",
                      "screening": "on 4 windows first; dropped when worse than the default by more than 2 paired "
                                   "standard errors"},
        "selected": {"allocation": "uniform", "removal": "ean"},
    }
    lines = candidate_table(settings)
    names = [" ".join(line.split()[:2]) for line in lines]
    cut = next(i for i, line in enumerate(lines) if "dropped at screening" in line)
    assert names.index("uniform reap") < names.index("uniform ean") < cut < names.index("global ean")
    assert "on 4 windows first" in lines[cut] and "those windows only" in lines[cut]
    assert lines[names.index("global ean")].split()[-3:] == ["0", "/", "4"]
    assert lines[-1] == "auto chose uniform + ean"


def test_no_screening_line_when_every_candidate_was_judged():
    settings = {"candidates": [_row("uniform", "ean", 0.41, 0.0, False, 0, 0)],
                "selection": {"windows": 6, "tokens": 3000, "rule": "r"},
                "selected": {"allocation": "uniform", "removal": "ean"}}
    assert not any("dropped at screening" in line for line in candidate_table(settings))
