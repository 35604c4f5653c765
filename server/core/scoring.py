"""Turning a verifier's next-token distribution into p = P(yes) / (P(yes) + P(no))."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

YES_WORDS = ("yes",)
NO_WORDS = ("no",)


def answer_variants(words: Iterable[str]) -> list[str]:
    """Case and leading-space variants whose probabilities are summed ("yes", " Yes", "YES", ...)."""
    out: list[str] = []
    for w in words:
        for cased in (w.lower(), w.capitalize(), w.upper()):
            for s in (cased, " " + cased):
                if s not in out:
                    out.append(s)
    return out


class UnscorableError(ValueError):
    """The answer distribution holds neither yes nor no: there is no honest p to report."""


def _logsumexp(xs: list[float]) -> float:
    m = max(xs)
    if m == -math.inf:
        return -math.inf
    return m + math.log(sum(math.exp(x - m) for x in xs))


def p_yes_from_logits(yes_logits: list[float], no_logits: list[float]) -> float:
    """p from the logits of every yes/no variant; the softmax normaliser cancels out."""
    if not yes_logits or not no_logits:
        raise UnscorableError("the tokenizer has no single-token yes or no variant")
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
    """p from an OpenAI-style top-k {token: logprob}: words missing from the top-k count as 0.

    If neither word is in the top-k, the answer is unscorable rather than 0 or 1.
    """
    yes = {v for v in answer_variants(YES_WORDS)}
    no = {v for v in answer_variants(NO_WORDS)}
    ly = [lp for tok, lp in top.items() if tok in yes]
    ln = [lp for tok, lp in top.items() if tok in no]
    if not ly and not ln:
        shown = ", ".join(repr(t) for t in list(top)[:5])
        raise UnscorableError(f"neither yes nor no is among the top-{len(top)} tokens ({shown})")
    return p_yes_from_logits(ly or [-math.inf], ln or [-math.inf])
