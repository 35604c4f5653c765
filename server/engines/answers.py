"""The yes/no reading of a model's next-token distribution, shared by the verifier and the DSG validity stage.

p = P(yes) / (P(yes) + P(no)) over the full vocabulary, where yes / no are every token that reads
"yes" / "no" under `server.core.answer_rule.answer_word` (the same rule the top-k reading applies).
"""

from __future__ import annotations

import math
from typing import Any

from server.core.answer_rule import answer_word
from server.engines.base import EngineError


def answer_token_ids(tokenizer: Any) -> tuple[list[int], list[int]]:
    """(yes ids, no ids): every vocabulary entry whose decoded text reads "yes" / "no"."""
    n = len(tokenizer)
    texts = tokenizer.batch_decode([[i] for i in range(n)], skip_special_tokens=False,
                                   clean_up_tokenization_spaces=False)
    words = [answer_word(t) for t in texts]
    return [i for i, w in enumerate(words) if w == "yes"], [i for i, w in enumerate(words) if w == "no"]


class YesNo:
    """Token ids of "yes" and "no" for one tokenizer, and p from logits over the full vocabulary."""

    def __init__(self, tokenizer: Any, model_id: str) -> None:
        self.yes_ids, self.no_ids = answer_token_ids(tokenizer)
        if not self.yes_ids or not self.no_ids:
            raise EngineError(f"the tokenizer of {model_id!r} has no token that reads 'yes' or 'no'")

    def p_yes(self, logits: Any) -> list[float]:
        """p per row of (N, vocab) logits; the log-softmax normaliser cancels, kept for numerical range."""
        import torch

        logp = torch.log_softmax(logits.float(), dim=-1)
        ly = torch.logsumexp(logp[:, self.yes_ids], dim=-1)
        ln = torch.logsumexp(logp[:, self.no_ids], dim=-1)
        p = torch.sigmoid(ly - ln).tolist()
        bad = sum(1 for x in p if not math.isfinite(x))
        if bad:
            raise EngineError(f"the model produced non-finite yes/no scores ({bad} of {len(p)})")
        return p
