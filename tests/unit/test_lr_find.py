"""The learning-rate range test's arithmetic: rates, smoothing and the proposal."""

import math

import pytest

from tunelab.train.lr_find import propose, rates, smooth


def test_rates_are_geometric_from_start_to_end():
    r = rates(1e-7, 1e-1, 7)
    assert r[0] == pytest.approx(1e-7) and r[-1] == pytest.approx(1e-1)
    assert all(b / a == pytest.approx(10.0) for a, b in zip(r, r[1:], strict=False))


def test_smoothing_is_bias_corrected():
    assert smooth([5.0, 5.0, 5.0]) == pytest.approx([5.0, 5.0, 5.0])


def _valley(lrs, best=1e-3):
    """A loss that falls as the lr grows towards ``best``, then blows up."""
    return [2.0 - 0.5 * math.tanh(math.log10(lr / 1e-6)) + max(0.0, math.log10(lr / best)) ** 2 * 3
            for lr in lrs]  # fmt: skip


def test_the_proposal_is_a_decade_below_the_minimum():
    lrs = rates(1e-7, 1e-1, 60)
    losses = _valley(lrs)
    low = min(range(len(losses)), key=losses.__getitem__)
    proposed, steepest, reason = propose(lrs, losses)
    assert proposed == pytest.approx(lrs[low] / 10)
    assert steepest is not None and steepest < lrs[low]
    assert "one decade" in reason


@pytest.mark.parametrize("losses, why", [
    ([3.0] * 5, "too few"),
    ([3.0 + 0.01 * i for i in range(30)], "never fell"),
])  # fmt: skip
def test_no_proposal_when_the_curve_says_nothing(losses, why):
    proposed, steepest, reason = propose(rates(1e-7, 1e-1, len(losses)), losses)
    assert proposed is None and why in reason
