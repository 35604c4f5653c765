"""The reflection round's pure helpers, with the arithmetic written out."""

from __future__ import annotations

import math
import random

import pytest

from dvreward_protocol.grpo import group_advantages
from dvreward_protocol.reflection import feedback, rectify, select_for_refinement


def test_the_lowest_reward_is_refined_by_default():
    nan = float("nan")
    # group 0: .2 is lowest; group 1: a tie at .1 takes the first; group 2: nothing scored
    assert select_for_refinement([[0.5, 0.2, 0.9], [nan, 0.1, 0.1], [None, nan]]) == [1, 1, None]


def test_softmax_sampling_follows_one_minus_reward():
    # rewards [0, 1] at temperature 1: weights e^(1-0) and e^(1-1) -> P(index 0) = e / (e + 1) ~ .731
    rng = random.Random(0)
    picks = [select_for_refinement([[0.0, 1.0]], "softmax", rng=rng)[0] for _ in range(4000)]
    assert picks.count(0) / 4000 == pytest.approx(math.e / (math.e + 1), abs=0.03)
    # a low temperature is nearly the lowest reward: weights e^(1/.05) vs e^0 -> P(0) = 1 - 2e-9
    assert set(select_for_refinement([[0.0, 1.0]] * 50, "softmax", temperature=0.05, rng=rng)) == {0}
    with pytest.raises(ValueError, match="temperature"):
        select_for_refinement([[0.5]], "softmax", temperature=0)


def test_feedback_lists_the_failed_questions_in_order():
    assert feedback(["Is there a cat?", " Is it red? "]) == "Not yet right: Is there a cat?; Is it red?"
    assert feedback(["Is there a cat?"], template="Fix: {failed}.") == "Fix: Is there a cat?."
    assert feedback([]) == ""


def test_rectify_is_false_positive_rectification_with_flags():
    # starts .4 and .3 (group min .3): .5 beats .4 -> kept, improved; .2 does not beat .3 -> floor .3
    # group 1: start .6 for both; .6 == .6 is not higher -> floor .6; NaN stays failed
    nan = float("nan")
    out = rectify([[0.5, 0.2], [0.6, nan]], [[0.4, 0.3], [0.6, 0.6]], keys=["a", "b"])
    assert out.rewards[0] == [0.5, 0.3] and out.rewards[1][0] == 0.6 and math.isnan(out.rewards[1][1])
    assert out.improved == [[True, False], [False, False]] and out.any_improved
    assert out.advantages == group_advantages(out.rewards, keys=["a", "b"])
    assert not rectify([[0.1]], [[0.4]]).any_improved  # the reference skips such a step
