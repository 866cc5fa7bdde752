"""The write-time comparison: exact tolerance in float32, a precision-relative one otherwise, and errors that say
what to change."""

import pytest
import torch

from fair_moe.checkpoint.verify import compare_outputs
from fair_moe.core.errors import FairMoeError


def test_float32_uses_the_exact_tolerance_and_half_precision_two_percent_of_the_largest_output():
    reference = torch.tensor([[10.0, -2.0]])
    assert compare_outputs(reference + 5e-4, reference, True, 1e-3, "x") == pytest.approx(5e-4, rel=1e-3)
    with pytest.raises(FairMoeError) as err:
        compare_outputs(reference + 2e-3, reference, True, 1e-3, "x")
    assert "max |Δ| = 0.002 > 0.001" in str(err.value)
    assert compare_outputs(reference + 0.19, reference, False, 1e-3, "x") == pytest.approx(0.19, rel=1e-5)  # 2 % of 10


def test_a_half_precision_mismatch_names_the_flags_that_verify_or_skip_it():
    reference = torch.tensor([[10.0, -2.0]])
    with pytest.raises(FairMoeError, match=r"--dtype float32 to verify, or pass --no-verify") as err:
        compare_outputs(reference + torch.tensor([[0.0, 0.3]]), reference, False, 1e-3, "the masked original")
    assert "tie exactly at the top-k boundary" in str(err.value)
    with pytest.raises(FairMoeError) as err:
        compare_outputs(reference + 2e-3, reference, True, 1e-3, "the masked original")
    assert "--dtype" not in str(err.value)  # in float32 a mismatch is a real one
