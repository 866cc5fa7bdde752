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


def test_each_candidate_shows_the_windows_it_was_judged_on():
    """After a second look the extended plans cover more windows than the rest: the table says how many."""
    rows = [{**_row("uniform", "ean", 0.41, 0.0, False, 0, 0), "windows": 32},
            {**_row("uniform", "reap", 0.32, 0.09, False, 25, 7), "windows": 32},
            {**_row("tod", "ean", 0.45, -0.02, False, 6, 10), "windows": 16}]
    settings = {"candidates": rows, "selected": {"allocation": "uniform", "removal": "reap"},
                "selection": {"windows": 32, "first_look": 16, "second_look": 16, "tokens": 16352, "rule": "r",
                              "looks": "first look on half"}}
    lines = candidate_table(settings)
    assert "in two looks of 16 + 16" in lines[0]
    by_name = {" ".join(line.split()[:2]): line.split() for line in lines}
    assert by_name["uniform reap"][-4:] == ["25", "/", "7", "32"] and by_name["tod ean"][-1] == "16"
    assert "looks: first look on half" in lines
