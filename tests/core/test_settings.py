"""The one source of ranges, lock modes and paper gates (perfusion_ops/settings.py)."""
import math

import pytest

from perfusion_ops.settings import BETA, EDIT_LOCKS, LOCKS, PAPER_GATES, STRENGTH, TAU, Range


@pytest.mark.parametrize("value, inside", [(0.0, False), (1e-6, True), (10.0, True), (10.01, False),
                                           (math.nan, False), (math.inf, False)])
def test_tau_is_open_at_zero_and_refuses_non_finite_values(value, inside):
    assert (value in TAU) is inside


def test_closed_ranges_and_how_messages_show_them():
    assert -1.0 in BETA and 2.0 in BETA and -1.01 not in BETA and -math.inf not in BETA
    assert 0.0 in STRENGTH and 2.0 in STRENGTH and 2.05 not in STRENGTH
    assert (str(BETA), str(TAU), str(STRENGTH)) == ("[-1, 2]", "(0, 10]", "[0, 2]")


def test_a_widget_never_offers_a_value_its_range_refuses():
    for r in (BETA, TAU, STRENGTH, Range(0.5, 1.0, low_open=True, step=0.1)):
        kind, spec = r.widget(r.high, "tip")
        assert kind == "FLOAT" and spec["min"] in r and spec["max"] in r and spec["tooltip"] == "tip"
    assert TAU.widget(0.15, "")[1]["min"] == 0.001  # ComfyUI's τ widget once allowed 0, which the core refuses
    assert TAU.widget(0.15, "")[1]["round"] == 0.001  # a measured τ such as 0.045 is not rounded to 0.05


def test_paper_gates_lie_in_their_ranges_and_the_edit_locks_are_user_locks():
    assert all(beta in BETA and tau in TAU for beta, tau in PAPER_GATES.values())
    assert PAPER_GATES == {"train": (0.75, 0.1), "local": (0.7, 0.15), "global": (0.5, 0.15)}  # paper Sec. 4.4
    assert set(EDIT_LOCKS) < set(LOCKS) and "global" not in EDIT_LOCKS
