"""The ceiling script's judgement and interval (no sampling here)."""

from __future__ import annotations

import pytest

from mcpl.toyworld.ceiling import judge, rate, wilson
from mcpl.toyworld.checker import OFF_PALETTE, UNCLEAR, Found


def found(colour: str, shape: str) -> Found:
    return Found(colour, shape, 100, [0, 0, 10, 10], 1.0)


def test_judge_needs_exactly_one_object_of_the_right_shape_and_for_coloured_prompts_colour() -> None:
    assert judge([found("yellow", "square")], "yellow", "square", coloured=True)
    assert judge([found(OFF_PALETTE, "square")], "yellow", "square", coloured=False)
    assert not judge([found(OFF_PALETTE, "square")], "yellow", "square", coloured=True)
    assert not judge([found("yellow", UNCLEAR)], "yellow", "square", coloured=False)
    assert not judge([found("yellow", "square")] * 2, "yellow", "square", coloured=False)
    assert not judge([], "yellow", "square", coloured=False)


def test_wilson_interval() -> None:
    lo, hi = wilson(30, 32)
    assert lo == pytest.approx(0.7985, abs=1e-4) and hi == pytest.approx(0.9827, abs=1e-4)
    assert wilson(0, 0) == [0.0, 1.0]
    assert rate(32, 32)["ci95"][1] == 1.0 and rate(32, 32)["rate"] == 1.0
