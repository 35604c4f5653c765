"""How an answer reads: where a question's p came from, and when p counts as yes.

Pure Python, so the engines, the service, the protocol's aggregation and the eval summary all import the
one rule (the engines without pydantic).
"""

from __future__ import annotations

from typing import Literal

# logits: the full next-token distribution; top_k: a server's top-k logprobs; text: the generated word.
PSource = Literal["logits", "top_k", "text"]


def answered_yes(p: float) -> bool:
    """Whether p reads as yes: yes outweighs no (a tie is no).

    The one threshold: the `failed` list, hard gating and the eval's pass rate all read p by it.
    """
    return p > 0.5


def greedy_yes(answer: str) -> bool:
    """The binary reward's reading of a greedy answer, the reference's `dvreward_binary`: lower-cased, stripped of
    surrounding whitespace, every `.,?!` removed, it is exactly "yes". "Yes." is yes; "yes, it is" and a yes
    followed by more words are not, whatever p says."""
    text = answer.lower().strip()
    for mark in ".,?!":
        text = text.replace(mark, "")
    return text == "yes"
