"""How an answer reads: where a question's p came from, and when p counts as yes.

Pure Python, so the engines, the service, the protocol's aggregation and the eval summary all import the
one rule (the engines without pydantic).
"""

from __future__ import annotations

from typing import Literal

# logits: the full next-token distribution; top_k: a server's top-k logprobs; text: the generated word.
PSource = Literal["logits", "top_k", "text"]


def answered_yes(p: float) -> bool:
    """The binary reading of p: yes outweighs no (the reference's `dvreward_binary`; a tie is no).

    The one threshold: `answer="binary"`, the `failed` list, hard gating and the eval's pass rate all read p by it.
    """
    return p > 0.5
