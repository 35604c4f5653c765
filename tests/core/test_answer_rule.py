"""p = P(yes) / (P(yes) + P(no)) from logits and from OpenAI-style top-k logprobs."""

from __future__ import annotations

import math

import pytest

from dvreward_protocol.answers import answered_yes, greedy_yes
from server.core.answer_rule import (
    UnscorableError,
    answer_word,
    p_yes_from_logits,
    p_yes_from_top_logprobs,
)

# --- answer_word: lower-cased, stripped of whitespace and . , ? ! -------------------------------


@pytest.mark.parametrize("text", ["yes", "Yes", "YES", " yes", " Yes", "yes.", "Yes!", "yes?", ",yes", "\nYES ",
                                  "\tyes,", ".yes.", " YES!?"])
def test_reads_yes(text):
    assert answer_word(text) == "yes"


@pytest.mark.parametrize("text", ["no", "No", " NO", "no.", "No!", "\nno", " no?"])
def test_reads_no(text):
    assert answer_word(text) == "no"


@pytest.mark.parametrize("text", ["nope", "yes:", "y", "yeah", "no'", "not", "Yes;", "-no", "ye s", ""])
def test_other_tokens_read_neither(text):
    assert answer_word(text) not in ("yes", "no")


@pytest.mark.parametrize(("answer", "yes"), [
    ("yes", True), ("Yes.", True), (" YES! ", True), ("y.e,s", True), ("yes, it is", False), ("Yes Yes", False),
    ("no", False), ("Yes\n\nThe cat", False), ("", False), ("yes .", False),
])
def test_the_binary_reward_reads_the_greedy_answer_as_the_reference(answer, yes):
    # lower-cased, stripped of surrounding whitespace, then every . , ? ! removed: exactly "yes"
    # ("yes ." keeps its inner space: the reference strips before it removes the dot)
    assert greedy_yes(answer) is yes


def test_binary_reading_is_strict_majority():
    # yes must outweigh no: .5 is a tie, read as no (the reference's dvreward_binary)
    assert answered_yes(0.5000001) and not answered_yes(0.5) and not answered_yes(0.1)


# --- p_yes_from_logits -----------------------------------------------------------------------


def test_equal_logits_give_half():
    assert p_yes_from_logits([3.0], [3.0]) == pytest.approx(0.5, abs=1e-15)


def test_single_variants():
    # P(yes)/P(no) = e^(ln 3 - 0) = 3 -> p = 3/4
    assert p_yes_from_logits([math.log(3)], [0.0]) == pytest.approx(0.75, rel=1e-12)
    # reversed: 1/4
    assert p_yes_from_logits([0.0], [math.log(3)]) == pytest.approx(0.25, rel=1e-12)


def test_several_variants_summed():
    # yes mass ∝ e^0 + e^ln3 = 1 + 3 = 4; no mass ∝ e^ln2 = 2 -> p = 4 / (4 + 2) = 4/6
    assert p_yes_from_logits([0.0, math.log(3)], [math.log(2)]) == pytest.approx(4 / 6, rel=1e-12)


def test_several_variants_on_both_sides():
    # yes ∝ 1 + 1 = 2; no ∝ 2 + 4 = 6 -> p = 2/8 = 0.25
    p = p_yes_from_logits([0.0, 0.0], [math.log(2), math.log(4)])
    assert p == pytest.approx(0.25, rel=1e-12)


def test_shift_invariance():
    # adding a constant to every logit (the softmax normaliser) changes nothing
    base = p_yes_from_logits([0.0, math.log(3)], [math.log(2)])
    shifted = p_yes_from_logits([500.0, 500.0 + math.log(3)], [500.0 + math.log(2)])
    assert shifted == pytest.approx(base, rel=1e-12)


def test_huge_opposite_logits_are_stable():
    # e^-2000 underflows: p is 1 within float precision, and 0 the other way round.
    assert p_yes_from_logits([1000.0], [-1000.0]) == 1.0
    p = p_yes_from_logits([-1000.0], [1000.0])
    assert math.isfinite(p)
    assert 0.0 <= p < 1e-300


def test_huge_equal_logits_summed():
    # yes ∝ e^1000 + e^1000, no ∝ e^1000 -> 2/3, without overflow
    assert p_yes_from_logits([1000.0, 1000.0], [1000.0]) == pytest.approx(2 / 3, rel=1e-12)
    assert p_yes_from_logits([-1000.0, -1000.0], [-1000.0]) == pytest.approx(2 / 3, rel=1e-12)


def test_moderately_large_gap_accurate():
    # p = 1 / (1 + e^40) ≈ e^-40 (relative error e^-40)
    assert p_yes_from_logits([0.0], [40.0]) == pytest.approx(math.exp(-40), rel=1e-12)
    assert p_yes_from_logits([40.0], [0.0]) == pytest.approx(1 - math.exp(-40), rel=1e-15)


def test_minus_inf_on_one_side_gives_exact_bound():
    # P(no) = 0 -> p = 1 exactly; P(yes) = 0 -> p = 0 exactly
    assert p_yes_from_logits([0.0], [-math.inf]) == 1.0
    assert p_yes_from_logits([-math.inf], [0.0]) == 0.0


def test_minus_inf_variant_ignored_in_sum():
    # yes ∝ 1 + 0 = 1; no ∝ 1 -> 0.5
    assert p_yes_from_logits([0.0, -math.inf], [0.0]) == pytest.approx(0.5)


def test_both_zero_probability_unscorable():
    with pytest.raises(UnscorableError, match="both yes and no have zero probability"):
        p_yes_from_logits([-math.inf], [-math.inf, -math.inf])


@pytest.mark.parametrize(("yes", "no"), [([], [0.0]), ([0.0], []), ([], [])])
def test_missing_variant_list_unscorable(yes, no):
    with pytest.raises(UnscorableError, match="no token reads yes or no"):
        p_yes_from_logits(yes, no)


def test_unscorable_is_value_error():
    assert issubclass(UnscorableError, ValueError)


# --- p_yes_from_top_logprobs -----------------------------------------------------------------


def test_top_logprobs_basic():
    # P(yes) = 0.6, P(no) = 0.2 -> 0.6 / 0.8 = 0.75
    top = {"Yes": math.log(0.6), "No": math.log(0.2), "Maybe": math.log(0.1)}
    assert p_yes_from_top_logprobs(top) == pytest.approx(0.75, rel=1e-12)


def test_top_logprobs_case_and_space_variants_summed():
    # yes: "yes" .3 + " Yes" .2 + "YES" .1 = .6; no: " no" .1 + "No" .1 = .2 -> .6 / .8 = .75
    top = {
        "yes": math.log(0.3),
        " Yes": math.log(0.2),
        "YES": math.log(0.1),
        " no": math.log(0.1),
        "No": math.log(0.1),
        "The": math.log(0.15),
    }
    assert p_yes_from_top_logprobs(top) == pytest.approx(0.75, rel=1e-12)


def test_top_logprobs_reads_punctuated_answers():
    # "Yes." (.1) and "yes " (.05) read yes under the rule, "nope" (.05) and "no:" (.05) do not:
    # yes = .5 + .1 + .05 = .65, no = .25 -> .65 / .9
    top = {"yes": math.log(0.5), "no": math.log(0.25), "Yes.": math.log(0.1),
           "yes ": math.log(0.05), "nope": math.log(0.05), "no:": math.log(0.05)}
    assert p_yes_from_top_logprobs(top) == pytest.approx(0.65 / 0.9, rel=1e-12)


def test_top_logprobs_only_yes_present():
    # Docstring: words missing from the top-k count as 0 -> P(no) = 0 -> p = .9 / (.9 + 0) = 1.0
    assert p_yes_from_top_logprobs({" Yes": math.log(0.9), "Sure": math.log(0.05)}) == 1.0


def test_top_logprobs_only_no_present():
    # P(yes) counts as 0 -> p = 0 / (0 + .7) = 0.0 exactly
    assert p_yes_from_top_logprobs({"NO": math.log(0.7), "Never": math.log(0.1)}) == 0.0


def test_top_logprobs_neither_present_unscorable():
    top = {"The": -0.5, "A": -1.5, "It": -2.0}
    with pytest.raises(UnscorableError) as ei:
        p_yes_from_top_logprobs(top)
    msg = str(ei.value)
    assert "neither yes nor no" in msg
    assert "top-3" in msg
    assert "'The'" in msg and "'A'" in msg and "'It'" in msg


def test_top_logprobs_unscorable_message_shows_at_most_five_tokens():
    top = {f"t{i}": -float(i) for i in range(8)}
    with pytest.raises(UnscorableError) as ei:
        p_yes_from_top_logprobs(top)
    msg = str(ei.value)
    assert "top-8" in msg
    assert "'t4'" in msg and "'t5'" not in msg


def test_top_logprobs_empty_unscorable():
    with pytest.raises(UnscorableError, match="top-0"):
        p_yes_from_top_logprobs({})


def test_top_logprobs_zero_probability_both_unscorable():
    with pytest.raises(UnscorableError, match="zero probability"):
        p_yes_from_top_logprobs({"yes": -math.inf, "no": -math.inf})
