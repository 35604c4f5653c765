"""The yes/no reading of a model's next-token distribution, shared by the verifier and the DSG validity stage.

p = P(yes) / (P(yes) + P(no)) with the case and leading-space variants of each word summed
(server.core.scoring holds the same rule in pure Python for top-k logprobs).
"""

from __future__ import annotations

import math
from typing import Any

from server.core.scoring import NO_WORDS, YES_WORDS, answer_variants
from server.engines.base import EngineError


def single_token_ids(tokenizer: Any, words: list[str]) -> list[int]:
    """Ids of the variants the tokenizer writes as one token (the only ones a next token can be)."""
    ids: set[int] = set()
    for w in words:
        toks = tokenizer.encode(w, add_special_tokens=False)
        if len(toks) == 1:
            ids.add(toks[0])
    return sorted(ids)


class YesNo:
    """Token ids of "yes" and "no" for one tokenizer, and p from logits over the full vocabulary."""

    def __init__(self, tokenizer: Any, model_id: str) -> None:
        self.yes_ids = single_token_ids(tokenizer, answer_variants(YES_WORDS))
        self.no_ids = single_token_ids(tokenizer, answer_variants(NO_WORDS))
        if not self.yes_ids or not self.no_ids:
            raise EngineError(f"the tokenizer of {model_id!r} has no single-token 'yes' or 'no'")

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
