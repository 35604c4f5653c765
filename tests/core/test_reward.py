"""SC / PQ / reward aggregation, dependency gating and tag weights, computed by hand."""

from __future__ import annotations

import math

import pytest

from dvreward_protocol.answers import answered_yes
from dvreward_protocol.questions import Kind, Question
from dvreward_protocol.reward import Aggregation, Gating, RewardBreakdown, aggregate, gate, score_image


def sem(qid, deps=(), tag="Existence"):
    return Question(id=qid, text=f"Is there {qid}?", tag=tag, depends_on=tuple(deps))


def qual(qid, tag="Anatomy"):
    return Question(id=qid, text=f"Is {qid} good?", kind=Kind.quality, tag=tag)


# Three semantic (p .8, 1.0, .9) and two quality (p .2, .6) questions.
#   SC = (.8 + 1.0 + .9) / 3 = 2.7 / 3 = .9
#   PQ = (.2 + .6) / 2 = .4
QS = [sem("s1"), sem("s2", tag="Count"), qual("q1"), sem("s3", tag="Attribute"), qual("q2", tag="Texture")]
P = {"s1": 0.8, "s2": 1.0, "s3": 0.9, "q1": 0.2, "q2": 0.6}


def test_geometric_default():
    out = aggregate(QS, P)
    assert isinstance(out, RewardBreakdown)
    assert out.sc == pytest.approx(0.9)
    assert out.pq == pytest.approx(0.4)
    # sqrt(.9 * .4) = sqrt(.36) = .6
    assert out.reward == pytest.approx(0.6)
    assert out.gated_p == P


def test_mean_aggregation():
    # (.9 + .4) / 2 = .65
    out = aggregate(QS, P, aggregation=Aggregation.mean)
    assert out.reward == pytest.approx(0.65)
    assert (out.sc, out.pq) == (pytest.approx(0.9), pytest.approx(0.4))


def test_flat_aggregation():
    # (.8 + 1.0 + .9 + .2 + .6) / 5 = 3.5 / 5 = .7 (differs from mean .65: 3 vs 2 questions per half)
    out = aggregate(QS, P, aggregation=Aggregation.flat)
    assert out.reward == pytest.approx(0.7)
    assert out.sc == pytest.approx(0.9)  # SC / PQ are still reported
    assert out.pq == pytest.approx(0.4)


def test_aggregation_accepts_plain_strings():
    # a str must select the same mode as the enum member, not fall through to "flat"
    assert aggregate(QS, P, aggregation="geometric").reward == pytest.approx(0.6)
    assert aggregate(QS, P, aggregation="mean").reward == pytest.approx(0.65)
    assert aggregate(QS, P, aggregation="flat").reward == pytest.approx(0.7)


def test_unknown_aggregation_rejected():
    with pytest.raises(ValueError, match="median"):
        aggregate(QS, P, aggregation="median")


def test_geometric_zero_half_sinks_reward():
    # SC = (0 + 0) / 2 = 0 -> sqrt(0 * 1) = 0, while mean = (0 + 1) / 2 = .5
    qs = [sem("a"), sem("b"), qual("q")]
    p = {"a": 0.0, "b": 0.0, "q": 1.0}
    assert aggregate(qs, p).reward == 0.0
    assert aggregate(qs, p, aggregation="mean").reward == pytest.approx(0.5)


def test_empty_semantic_counts_as_one():
    qs = [qual("q1"), qual("q2", tag="Lighting")]
    p = {"q1": 0.2, "q2": 0.6}
    # SC = 1.0 (empty), PQ = .4
    geo = aggregate(qs, p)
    assert geo.sc == 1.0
    assert geo.pq == pytest.approx(0.4)
    assert geo.reward == pytest.approx(math.sqrt(0.4))  # sqrt(1 * .4)
    assert aggregate(qs, p, aggregation="mean").reward == pytest.approx(0.7)  # (1 + .4) / 2
    assert aggregate(qs, p, aggregation="flat").reward == pytest.approx(0.4)  # (.2 + .6) / 2


def test_empty_quality_counts_as_one():
    qs = [sem("s1"), sem("s2"), sem("s3")]
    p = {"s1": 0.8, "s2": 1.0, "s3": 0.9}
    geo = aggregate(qs, p)
    assert geo.pq == 1.0
    assert geo.sc == pytest.approx(0.9)
    assert geo.reward == pytest.approx(math.sqrt(0.9))  # sqrt(.9 * 1)
    assert aggregate(qs, p, aggregation="mean").reward == pytest.approx(0.95)  # (.9 + 1) / 2
    assert aggregate(qs, p, aggregation="flat").reward == pytest.approx(0.9)


def test_no_questions_at_all():
    for agg in Aggregation:
        out = aggregate([], {}, aggregation=agg)
        assert (out.reward, out.sc, out.pq, out.gated_p) == (1.0, 1.0, 1.0, {})


def test_extra_p_keys_ignored_in_reward():
    out = aggregate([sem("a")], {"a": 0.25, "unused": 0.9})
    assert out.sc == 0.25
    assert out.reward == pytest.approx(0.5)  # sqrt(.25 * 1)
    assert out.gated_p == {"a": 0.25}


# --- gating on a chain a -> b -> c (c depends on b, b on a) -----------------------------------

CHAIN = [sem("a"), sem("b", ["a"], tag="Attribute"), sem("c", ["b"], tag="Action"), qual("q")]


def test_gating_none_leaves_p():
    p = {"a": 0.4, "b": 0.9, "c": 0.8, "q": 1.0}
    out = aggregate(CHAIN, p, gating=Gating.none)
    assert out.gated_p == p
    assert out.sc == pytest.approx(0.7)  # (.4 + .9 + .8) / 3 = 2.1 / 3


def test_hard_gating_zeroes_child_and_grandchild():
    p = {"a": 0.4, "b": 0.9, "c": 0.8, "q": 1.0}
    out = aggregate(CHAIN, p, gating=Gating.hard)
    # a = .4 < .5 is a "no": b -> 0; b's gated 0 < .5: c -> 0
    assert out.gated_p == {"a": 0.4, "b": 0.0, "c": 0.0, "q": 1.0}
    assert out.sc == pytest.approx(0.4 / 3)  # (.4 + 0 + 0) / 3
    assert out.reward == pytest.approx(math.sqrt(0.4 / 3))


def test_hard_gating_passing_parent_keeps_raw_p():
    p = {"a": 0.6, "b": 0.9, "c": 0.8, "q": 1.0}
    out = aggregate(CHAIN, p, gating="hard")
    # every parent is a "yes": nothing changes (no multiplication under hard gating)
    assert out.gated_p == p
    assert out.sc == pytest.approx(2.3 / 3)  # (.6 + .9 + .8) / 3


def test_hard_gating_middle_no_only_zeroes_below():
    p = {"a": 0.6, "b": 0.3, "c": 0.8, "q": 1.0}
    out = gate(CHAIN, p, Gating.hard)
    # a passes, b keeps its own .3, c is zeroed by b = .3 < .5
    assert out == {"a": 0.6, "b": 0.3, "c": 0.0, "q": 1.0}


def test_hard_gating_uses_the_one_yes_threshold():
    """A parent at p = .5 is a "no" (a tie: yes does not outweigh no), as in `failed` and `answer="binary"`; it
    gated nothing while `failed` listed it (the gate was p < .5)."""
    p = {"a": 0.5, "b": 0.9, "c": 0.8, "q": 1.0}
    assert gate(CHAIN, p, Gating.hard)["b"] == 0.0
    p["a"] = 0.5000001
    assert gate(CHAIN, p, Gating.hard)["b"] == 0.9


@pytest.mark.parametrize("parent", [0.0, 0.4999, 0.5, 0.5000001, 0.75, 1.0])
def test_a_parent_gates_its_children_exactly_when_it_is_answered_no(parent: float) -> None:
    zeroed = gate(CHAIN, {"a": parent, "b": 0.9, "c": 0.8, "q": 1.0}, Gating.hard)["b"] == 0.0
    assert zeroed is not answered_yes(parent)


def test_soft_gating_multiplies_through_chain():
    p = {"a": 0.4, "b": 0.9, "c": 0.8, "q": 1.0}
    out = aggregate(CHAIN, p, gating=Gating.soft)
    # b = .9 * .4 = .36 ; c = .8 * .36 = .288
    assert out.gated_p["a"] == pytest.approx(0.4)
    assert out.gated_p["b"] == pytest.approx(0.36)
    assert out.gated_p["c"] == pytest.approx(0.288)
    assert out.gated_p["q"] == 1.0
    # SC = (.4 + .36 + .288) / 3 = 1.048 / 3
    assert out.sc == pytest.approx(1.048 / 3)
    assert out.reward == pytest.approx(math.sqrt(1.048 / 3))


def test_gating_independent_of_question_order():
    p = {"a": 0.4, "b": 0.9, "c": 0.8, "q": 1.0}
    reordered = [CHAIN[2], CHAIN[3], CHAIN[1], CHAIN[0]]  # c, q, b, a: children before parents
    soft = gate(reordered, p, Gating.soft)
    assert list(soft) == ["c", "q", "b", "a"]  # result keeps the caller's order
    assert soft["c"] == pytest.approx(0.288)
    hard = gate(reordered, p, Gating.hard)
    assert hard == {"c": 0.0, "q": 1.0, "b": 0.0, "a": 0.4}


def test_gating_with_two_parents():
    qs = [sem("a"), sem("b"), sem("d", ["a", "b"], tag="Spatial")]
    p = {"a": 0.6, "b": 0.8, "d": 0.9}
    # soft: d = .9 * .6 * .8 = .432
    assert gate(qs, p, Gating.soft)["d"] == pytest.approx(0.432)
    # hard: both parents answered yes -> d keeps .9
    assert gate(qs, p, Gating.hard)["d"] == 0.9
    # hard: one parent a "no" is enough
    assert gate(qs, {**p, "b": 0.1}, Gating.hard)["d"] == 0.0


def test_gating_accepts_plain_strings_and_rejects_unknown():
    p = {"a": 0.4, "b": 0.9, "c": 0.8, "q": 1.0}
    assert gate(CHAIN, p, "hard")["b"] == 0.0
    assert gate(CHAIN, p, "soft")["b"] == pytest.approx(0.36)
    assert gate(CHAIN, p, "none")["b"] == 0.9
    with pytest.raises(ValueError, match="strict"):
        aggregate(CHAIN, p, gating="strict")


def test_gating_does_not_mutate_input():
    p = {"a": 0.4, "b": 0.9, "c": 0.8, "q": 1.0}
    before = dict(p)
    aggregate(CHAIN, p, gating=Gating.soft)
    assert p == before


# --- tag weights -----------------------------------------------------------------------------


def test_tag_weights_semantic():
    qs = [sem("a", tag="Existence"), sem("b", tag="Attribute"), qual("q")]
    p = {"a": 1.0, "b": 0.5, "q": 1.0}
    out = aggregate(qs, p, tag_weights={"Existence": 3.0})
    # SC = (3 * 1.0 + 1 * .5) / (3 + 1) = 3.5 / 4 = .875 (unlisted tags weigh 1)
    assert out.sc == pytest.approx(0.875)
    assert out.reward == pytest.approx(math.sqrt(0.875))


def test_tag_weights_quality_zero_weight_drops_aspect():
    qs = [sem("a"), qual("q1", tag="Anatomy"), qual("q2", tag="Texture")]
    p = {"a": 1.0, "q1": 0.0, "q2": 0.8}
    out = aggregate(qs, p, tag_weights={"Anatomy": 0.0})
    # PQ = (0 * 0 + 1 * .8) / (0 + 1) = .8
    assert out.pq == pytest.approx(0.8)


def test_tag_weights_apply_to_flat():
    qs = [sem("a", tag="Existence"), sem("b", tag="Count"), qual("q", tag="Lighting")]
    p = {"a": 1.0, "b": 0.0, "q": 0.5}
    out = aggregate(qs, p, aggregation="flat", tag_weights={"Count": 2.0, "Lighting": 2.0})
    # (1 * 1 + 2 * 0 + 2 * .5) / (1 + 2 + 2) = 2 / 5 = .4
    assert out.reward == pytest.approx(0.4)
    # SC = (1 * 1 + 2 * 0) / 3 = 1/3 ; PQ = .5
    assert out.sc == pytest.approx(1 / 3)
    assert out.pq == pytest.approx(0.5)


def test_tag_weights_all_zero_rejected():
    qs = [sem("a", tag="Existence"), qual("q")]
    with pytest.raises(ValueError, match="sum to zero"):
        aggregate(qs, {"a": 1.0, "q": 1.0}, tag_weights={"Existence": 0.0})


def test_huge_tag_weights_do_not_overflow():
    """1e308 + 1e308 is inf: the reward was 0.0 (finite / inf) with two tags, NaN (inf / inf) with eight."""
    qs = [sem("a", tag="Existence"), sem("b", tag="Attribute"), qual("q")]
    p = {"a": 0.24, "b": 0.28, "q": 0.5}
    huge = aggregate(qs, p, tag_weights={"Existence": 1e308, "Attribute": 1e308})
    # equal weights, however large: SC = (.24 + .28) / 2 = .26
    assert huge.sc == pytest.approx(0.26, abs=1e-15)
    assert huge.reward == pytest.approx(math.sqrt(0.26 * 0.5), abs=1e-15)
    eight = [sem(f"e{i}") for i in range(8)] + [qual("q")]
    pe = {**{f"e{i}": 0.1 * (i + 1) for i in range(8)}, "q": 0.5}
    out = aggregate(eight, pe, tag_weights={"Existence": 1e308})
    assert out.sc == pytest.approx(sum(0.1 * (i + 1) for i in range(8)) / 8, abs=1e-15)
    assert math.isfinite(out.reward) and out.reward > 0


def test_tag_weights_of_very_different_magnitudes():
    qs = [sem("a", tag="Existence"), sem("b", tag="Attribute")]
    out = aggregate(qs, {"a": 1.0, "b": 0.0}, aggregation="flat", tag_weights={"Existence": 1e300, "Attribute": 1e-300})
    assert out.reward == pytest.approx(1.0, abs=1e-15), "a weight 1e600 times smaller counts for nothing"


@pytest.mark.parametrize("w", [-1.0, float("nan"), float("inf")])
def test_tag_weights_negative_or_nan_rejected(w):
    with pytest.raises(ValueError, match="'Existence'"):
        aggregate([sem("a")], {"a": 1.0}, tag_weights={"Existence": w})


# --- input validation ------------------------------------------------------------------------


def test_missing_p_rejected_naming_ids():
    with pytest.raises(ValueError) as ei:
        aggregate(CHAIN, {"a": 0.5, "c": 0.5})
    msg = str(ei.value)
    assert "'b'" in msg and "'q'" in msg
    assert "'a'" not in msg


@pytest.mark.parametrize("bad", [-0.1, 1.1, -1e-9, 1.0000001, float("nan"), float("inf"), float("-inf")])
def test_p_outside_unit_interval_rejected(bad):
    with pytest.raises(ValueError) as ei:
        aggregate([sem("a"), sem("b")], {"a": 0.5, "b": bad})
    msg = str(ei.value)
    assert "'b'" in msg
    assert "not a probability" in msg


def test_p_bounds_inclusive():
    out = aggregate([sem("a"), qual("q")], {"a": 0.0, "q": 1.0})
    assert out.reward == 0.0
    out = aggregate([sem("a"), qual("q")], {"a": 1.0, "q": 1.0})
    assert out.reward == 1.0


def test_score_image_reads_p_or_the_greedy_answers():
    ps = [P[q.id] for q in QS]  # in question order: s1 .8, s2 1.0, q1 .2, s3 .9, q2 .6
    by_p = score_image(QS, ps)
    assert by_p.breakdown == aggregate(QS, P) and by_p.failed == ["q1"]  # only .2 is not above .5
    # binary: s1 "Yes." and q2 "yes" read yes; s2 "yes, it is" (p 1.0), q1 "no" and s3 "no" (p .9) do not
    #   SC = (1 + 0 + 0) / 3 = 1/3 ; PQ = (0 + 1) / 2 = .5 ; reward = sqrt(1/6)
    binary = score_image(QS, ps, answers=["Yes.", "yes, it is", "no", "no", "yes"])
    assert binary.breakdown.sc == pytest.approx(1 / 3) and binary.breakdown.pq == pytest.approx(0.5)
    assert binary.breakdown.reward == pytest.approx(math.sqrt(1 / 6)) and binary.failed == ["s2", "q1", "s3"]
