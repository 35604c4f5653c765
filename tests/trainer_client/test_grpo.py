"""GRPO helpers: group advantages (group / global std, eps, clip, None) and FPR, by hand."""

from __future__ import annotations

import math

import pytest

import trainer_client
from dvreward_protocol.grpo import false_positive_rectification, group_advantages, lone_groups, neutral_rewards

pytestmark = pytest.mark.float_sensitive

EPS = 1e-4


def test_exported_from_package():
    assert trainer_client.group_advantages is group_advantages
    assert trainer_client.false_positive_rectification is false_positive_rectification


# --- group_advantages ------------------------------------------------------------------------


def test_defaults_are_the_references():
    # groups [0, 1] and [0, .5, 1]: population std over all five rewards [0, 1, 0, .5, 1]:
    # mean .5, var (.25 + .25 + .25 + 0 + .25) / 5 = .2 -> std sqrt(.2); advantage = (r - group mean) / (std + 1e-4)
    out = group_advantages([[0.0, 1.0], [0.0, 0.5, 1.0]])
    s = math.sqrt(0.2)
    assert out == [[pytest.approx(-0.5 / (s + EPS)), pytest.approx(0.5 / (s + EPS))],
                   [pytest.approx(-0.5 / (s + EPS)), 0.0, pytest.approx(0.5 / (s + EPS))]]
    # and clipped to ±5: [0 x 99, 1] has mean .01, std sqrt(.0099) ~ .0995, so the 1 would get 9.95
    (adv,) = group_advantages([[0.0] * 99 + [1.0]])
    assert adv[-1] == 5.0 and adv[0] == pytest.approx(-0.01 / (math.sqrt(0.0099) + EPS))


def test_groups_with_the_same_key_pool_into_one():
    # the reference keys GRPO groups by prompt: [0, 1] and [.5] of prompt "a" are one group of mean .5,
    # [.2, .4] of "b" another of mean .3; global std over [0, 1, .5, .2, .4]: mean .42,
    # var (.1764 + .3364 + .0064 + .0484 + .0004) / 5 = .1136
    out = group_advantages([[0.0, 1.0], [0.5], [0.2, 0.4]], keys=["a", "a", "b"])
    s = math.sqrt(0.1136)
    assert out == [[pytest.approx(-0.5 / (s + EPS)), pytest.approx(0.5 / (s + EPS))], [0.0],
                   [pytest.approx(-0.1 / (s + EPS)), pytest.approx(0.1 / (s + EPS))]]
    # None keys stand alone: the lone .5 is its own group again
    assert group_advantages([[0.0, 1.0], [0.5]], keys=["a", None])[1] == [0.0]
    with pytest.raises(ValueError, match="2 keys for 3 groups"):
        group_advantages([[0.0], [1.0], [0.5]], keys=["a", "b"])


def test_lone_groups_are_those_alone_with_their_prompt():
    rewards = [[0.3], [0.5], [0.1, 0.2], [None, 0.4], [None]]
    assert lone_groups(rewards) == [0, 1, 3]
    # group 1 shares prompt "a" with group 2: not alone; a group with no valid image is not reported
    assert lone_groups(rewards, keys=["x", "a", "a", "y", "z"]) == [0, 3]


def test_two_rewards_exact_value():
    # mean .5, population std sqrt(((0-.5)^2 + (1-.5)^2) / 2) = .5 -> adv = ±.5 / (.5 + 1e-4)
    (adv,) = group_advantages([[0.0, 1.0]])
    assert adv[0] == pytest.approx(-0.5 / 0.5001, rel=1e-12)
    assert adv[1] == pytest.approx(0.5 / 0.5001, rel=1e-12)
    assert adv[1] < 1.0  # eps is in the denominator


def test_eps_default_is_1e_minus_4_and_overridable():
    (adv,) = group_advantages([[0.0, 1.0]], eps=0.5)
    assert adv == [pytest.approx(-0.5), pytest.approx(0.5)]  # .5 / (.5 + .5)
    (adv,) = group_advantages([[0.0, 1.0]], eps=0.0)
    assert adv == [pytest.approx(-1.0), pytest.approx(1.0)]


def test_per_group_statistics():
    # group 1: [1, 2, 3] -> mean 2, std sqrt((1 + 0 + 1) / 3) = sqrt(2/3)
    # group 2: [10, 30]  -> mean 20, std 10
    out = group_advantages([[1.0, 2.0, 3.0], [10.0, 30.0]], std="group")
    s1 = math.sqrt(2 / 3)
    assert out[0] == [pytest.approx(-1 / (s1 + EPS)), 0.0, pytest.approx(1 / (s1 + EPS))]
    assert out[1] == [pytest.approx(-10 / (10 + EPS)), pytest.approx(10 / (10 + EPS))]


def test_global_std():
    # groups [0, 2] and [4, 6]; group means 1 and 5
    # global: all = [0, 2, 4, 6], mean 3, var (9 + 1 + 1 + 9) / 4 = 5 -> std sqrt(5)
    out = group_advantages([[0.0, 2.0], [4.0, 6.0]], std="global")
    s = math.sqrt(5)
    assert out == [
        [pytest.approx(-1 / (s + EPS)), pytest.approx(1 / (s + EPS))],
        [pytest.approx(-1 / (s + EPS)), pytest.approx(1 / (s + EPS))],
    ]
    # per group the std is 1 in both: ±1 / 1.0001
    per = group_advantages([[0.0, 2.0], [4.0, 6.0]], std="group")
    assert per[0][1] == pytest.approx(1 / (1 + EPS))
    assert per[0][1] != pytest.approx(out[0][1])


def test_all_equal_group_gives_zeros_not_nan():
    out = group_advantages([[0.7, 0.7, 0.7], [0.0, 1.0]], std="group")
    assert out[0] == [0.0, 0.0, 0.0]
    assert all(not math.isnan(a) for a in out[0])
    assert out[1][1] == pytest.approx(0.5 / 0.5001)


def test_all_equal_group_zero_even_with_global_std():
    # global std > 0 (from group 2), but group 1 has no spread -> 0
    out = group_advantages([[0.3, 0.3], [0.0, 1.0]], std="global")
    assert out[0] == [0.0, 0.0]
    # global: all = [.3, .3, 0, 1], mean .4, var (.01 + .01 + .16 + .36) / 4 = .135
    s = math.sqrt(0.135)
    assert out[1] == [pytest.approx(-0.5 / (s + EPS)), pytest.approx(0.5 / (s + EPS))]


def test_all_equal_with_eps_zero_still_no_nan():
    out = group_advantages([[1.0, 1.0]], eps=0.0)
    assert out == [[0.0, 0.0]]
    out = group_advantages([[1.0, 1.0]], eps=0.0, std="global")
    assert out == [[0.0, 0.0]]


def test_single_image_group_gets_zero():
    out = group_advantages([[0.42], [0.0, 1.0]])
    assert out[0] == [0.0]
    out = group_advantages([[0.42], [0.0, 1.0]], std="global")
    assert out[0] == [0.0]


def test_none_rewards_excluded_from_stats():
    # valid [0, 1]: mean .5, std .5, the None stays None
    (adv,) = group_advantages([[None, 0.0, None, 1.0]])
    assert adv[0] is None and adv[2] is None
    assert adv[1] == pytest.approx(-0.5 / 0.5001)
    assert adv[3] == pytest.approx(0.5 / 0.5001)


def test_none_not_treated_as_zero():
    # if None counted as 0, mean of [None, 1, 1] would be 2/3 and advantages nonzero
    (adv,) = group_advantages([[None, 1.0, 1.0]])
    assert adv == [None, 0.0, 0.0]


def test_none_excluded_from_global_std():
    # valid: [0, 2] and [4, 6] as in test_global_std -> same numbers with Nones sprinkled in
    out = group_advantages([[0.0, None, 2.0], [None, 4.0, 6.0]], std="global")
    s = math.sqrt(5)
    assert out[0] == [pytest.approx(-1 / (s + EPS)), None, pytest.approx(1 / (s + EPS))]
    assert out[1] == [None, pytest.approx(-1 / (s + EPS)), pytest.approx(1 / (s + EPS))]


def test_all_none_group():
    out = group_advantages([[None, None], [0.0, 1.0]])
    assert out[0] == [None, None]
    assert out[1][0] == pytest.approx(-0.5 / 0.5001)
    assert group_advantages([[None]], std="global") == [[None]]


def test_empty_input_and_empty_group():
    assert group_advantages([]) == []
    assert group_advantages([[]]) == [[]]
    assert group_advantages([[], [0.0, 1.0]])[0] == []


def test_ragged_groups():
    # sizes 1, 3, 2: each keeps its own shape and statistics
    # [5, 6, 7]: mean 6, std sqrt(2/3); [2, 4]: mean 3, std 1
    out = group_advantages([[0.1], [5.0, 6.0, 7.0], [2.0, 4.0]], std="group")
    assert [len(g) for g in out] == [1, 3, 2]
    s = math.sqrt(2 / 3)
    assert out[0] == [0.0]
    assert out[1] == [pytest.approx(-1 / (s + EPS)), 0.0, pytest.approx(1 / (s + EPS))]
    assert out[2] == [pytest.approx(-1 / (1 + EPS)), pytest.approx(1 / (1 + EPS))]


def test_clip():
    # [0 x 9, 1]: mean .1, var (9 * .01 + .81) / 10 = .09, std .3
    #   adv(1) = .9 / .3001 ≈ 2.999 ; adv(0) = -.1 / .3001 ≈ -.3332
    rewards = [[0.0] * 9 + [1.0]]
    (raw,) = group_advantages(rewards)
    assert raw[-1] == pytest.approx(0.9 / 0.3001)
    (clipped,) = group_advantages(rewards, clip=2.0)
    assert clipped[-1] == 2.0
    assert clipped[0] == pytest.approx(-0.1 / 0.3001)  # inside the clip range: unchanged
    # symmetric: the lone low reward is clipped at -2
    (neg,) = group_advantages([[1.0] * 9 + [0.0]], clip=2.0)
    assert neg[-1] == -2.0
    assert neg[0] == pytest.approx(0.1 / 0.3001)


def test_clip_keeps_none():
    (adv,) = group_advantages([[None, 0.0, 1.0]], clip=0.1)
    assert adv == [None, -0.1, 0.1]


@pytest.mark.parametrize("clip", [0.0, -1.0])
def test_non_positive_clip_rejected(clip):
    with pytest.raises(ValueError, match="clip must be positive"):
        group_advantages([[0.0, 1.0]], clip=clip)


@pytest.mark.parametrize("mode", ["batch", "Group", "", None])
def test_invalid_std_mode_rejected(mode):
    with pytest.raises(ValueError, match="std must be 'group' or 'global'"):
        group_advantages([[0.0, 1.0]], std=mode)


def test_nan_marks_a_failed_image_like_none():
    """`on_error="nan"` rewards go straight in: NaN is left out of the statistics and stays NaN."""
    nan = float("nan")
    (adv,) = group_advantages([[nan, 0.0, nan, 1.0]])
    assert math.isnan(adv[0]) and math.isnan(adv[2])
    assert adv[1] == pytest.approx(-0.5 / 0.5001) and adv[3] == pytest.approx(0.5 / 0.5001)
    out = group_advantages([[0.0, nan, 2.0], [None, 4.0, 6.0]], std="global")
    s = math.sqrt(5)
    assert out[0][0] == pytest.approx(-1 / (s + EPS)) and math.isnan(out[0][1]) and out[1][0] is None


@pytest.mark.parametrize("bad", [float("inf"), float("-inf")])
def test_non_finite_reward_rejected(bad):
    with pytest.raises(ValueError) as ei:
        group_advantages([[0.0, 1.0], [0.5, bad]])
    msg = str(ei.value)
    assert "not finite" in msg
    assert "None" in msg  # tells the caller how to report a failed image


def test_input_not_mutated():
    rewards = [[0.0, None, 1.0]]
    group_advantages(rewards)
    assert rewards == [[0.0, None, 1.0]]


# --- false_positive_rectification ------------------------------------------------------------


def test_fpr_basic():
    start = [[0.4, 0.3, 0.9]]
    refined = [[0.5, 0.2, 0.9]]
    # min start = .3
    #   .5 > .4 -> keep .5 ; .2 <= .3 -> .3 ; .9 == .9 is "not higher" -> .3
    assert false_positive_rectification(refined, start) == [[0.5, 0.3, 0.3]]


def test_fpr_equal_counts_as_not_higher():
    assert false_positive_rectification([[0.6, 0.8]], [[0.6, 0.2]]) == [[0.2, 0.8]]


def test_fpr_floor_is_the_group_minimum_not_the_own_start():
    # refined .5 < own start .7 -> group min start .1 (not .7)
    assert false_positive_rectification([[0.5, 0.9]], [[0.7, 0.1]]) == [[0.1, 0.9]]


def test_fpr_floor_per_group():
    refined = [[0.1, 0.9], [0.2, 0.2]]
    start = [[0.5, 0.4], [0.6, 0.0]]
    # group 0: min start .4 ; .1 <= .5 -> .4 ; .9 > .4 keep
    # group 1: min start 0  ; .2 <= .6 -> 0 ; .2 > 0 keep
    assert false_positive_rectification(refined, start) == [[0.4, 0.9], [0.0, 0.2]]


def test_fpr_all_improved_unchanged():
    assert false_positive_rectification([[0.5, 0.6]], [[0.1, 0.2]]) == [[0.5, 0.6]]


def test_fpr_none_handling():
    refined = [[None, 0.1, 0.2, 0.9]]
    start = [[0.5, None, 0.4, 0.3]]
    # floor = min of valid starts {.5, .4, .3} = .3
    #   refined None -> None ; start None -> cannot compare, keep .1 ;
    #   .2 <= .4 -> .3 ; .9 > .3 keep
    assert false_positive_rectification(refined, start) == [[None, 0.1, 0.3, 0.9]]


def test_fpr_nan_marks_a_failed_image_like_none():
    nan = float("nan")
    # floor = min of the valid starts {.2, .3} = .2 (a NaN start is no reward, not a floor):
    #   start NaN -> cannot compare, keep .5 ; .9 > .2 keep ; .1 <= .3 -> .2 ; refined NaN stays NaN
    out = false_positive_rectification([[0.5, 0.9, 0.1, nan]], [[nan, 0.2, 0.3, 0.4]])
    assert out[0][:3] == [0.5, 0.9, 0.2] and math.isnan(out[0][3])


def test_fpr_all_start_none_keeps_refined():
    assert false_positive_rectification([[0.1, None]], [[None, None]]) == [[0.1, None]]


def test_fpr_empty():
    assert false_positive_rectification([], []) == []
    assert false_positive_rectification([[]], [[]]) == [[]]


def test_fpr_mismatched_group_count_rejected():
    with pytest.raises(ValueError, match="2 refined groups but 1 start groups"):
        false_positive_rectification([[0.1], [0.2]], [[0.1]])


def test_fpr_mismatched_group_size_rejected():
    with pytest.raises(ValueError, match="group 1: 1 refined images but 2 start images"):
        false_positive_rectification([[0.1], [0.2]], [[0.1], [0.2, 0.3]])


# --- neutral_rewards ---------------------------------------------------------------------------


def test_neutral_rewards_give_a_failed_image_its_groups_mean():
    nan = float("nan")
    # group 0: [.2, None, .6] -> mean of the scored .4; group 1: all failed -> the step's mean (.2 + .6 + .1) / 3
    out = neutral_rewards([[0.2, None, 0.6], [nan, None], [0.1]])
    assert out[0] == [0.2, pytest.approx(0.4), 0.6] and out[1] == [pytest.approx(0.3)] * 2 and out[2] == [0.1]
    # pooled by key, as group_advantages pools: groups 0 and 2 share prompt "a": mean (.2 + .6 + .1) / 3
    pooled = neutral_rewards([[0.2, None, 0.6], [None], [0.1]], keys=["a", "b", "a"])
    assert pooled[0][1] == pytest.approx(0.3) and pooled[1] == [pytest.approx(0.3)]
    # the neutral value's advantage is 0 under the group's own mean, and nothing else moves
    (adv,) = group_advantages([out[0]], std="group")
    assert adv[1] == pytest.approx(0.0, abs=1e-12) and adv[0] == pytest.approx(-adv[2])


def test_neutral_rewards_need_one_scored_image():
    with pytest.raises(ValueError, match="no image of the step was scored"):
        neutral_rewards([[None, float("nan")], [None]])
    with pytest.raises(ValueError, match="2 keys for 1 groups"):
        neutral_rewards([[0.5]], keys=["a", "b"])
