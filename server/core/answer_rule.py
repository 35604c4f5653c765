"""The yes/no answer rule: which token reads yes or no, and p = P(yes) / (P(yes) + P(no)) from a distribution."""

from __future__ import annotations

import math
import string
from collections.abc import Mapping

_STRIP = string.whitespace + ".,?!"


def answer_word(token_text: str) -> str:
    """The word a token reads as under the method's rule: lower-cased, stripped of whitespace and `.,?!`.

    " Yes", "yes.", "YES!" and "\nno" read as "yes", "yes", "yes" and "no"; "nope" and "yes:" do not.
    """
    return token_text.lower().strip(_STRIP)


GREEDY_TOKENS = 10  # the longest greedy answer the binary reward reads (`greedy_yes`), as the reference's


class UnscorableError(ValueError):
    """The answer distribution holds neither yes nor no: there is no honest p to report."""


def _logsumexp(xs: list[float]) -> float:
    m = max(xs)
    if m == -math.inf:
        return -math.inf
    return m + math.log(sum(math.exp(x - m) for x in xs))


def p_yes_from_logits(yes_logits: list[float], no_logits: list[float]) -> float:
    """p from the logits of every token that reads yes or no (`answer_word`); the softmax normaliser cancels."""
    if not yes_logits or not no_logits:
        raise UnscorableError("no token reads yes or no")
    ly, ln = _logsumexp(yes_logits), _logsumexp(no_logits)
    if ly == -math.inf and ln == -math.inf:
        raise UnscorableError("both yes and no have zero probability")
    # Numerically stable sigmoid(ly - ln): exact 0 / 1 when one side has zero probability.
    d = ly - ln
    if d >= 0:
        return 1.0 / (1.0 + math.exp(-d))
    e = math.exp(d)
    return e / (1.0 + e)


def p_yes_from_top_logprobs(top: Mapping[str, float]) -> float:
    """p from an OpenAI-style top-k {token: logprob} under `answer_word`: words missing from the top-k count as 0.

    An approximation of the full-vocabulary p (the reference reads its top-5 this way); if neither
    word is in the top-k, the answer is unscorable rather than 0 or 1.
    """
    ly = [lp for tok, lp in top.items() if answer_word(tok) == "yes"]
    ln = [lp for tok, lp in top.items() if answer_word(tok) == "no"]
    if not ly and not ln:
        shown = ", ".join(repr(t) for t in list(top)[:5])
        raise UnscorableError(f"neither yes nor no is among the top-{len(top)} tokens ({shown})")
    return p_yes_from_logits(ly or [-math.inf], ln or [-math.inf])
