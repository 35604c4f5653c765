"""The yes/no token ids of a remotely served model, so a remote p can be exact.

They come from the model's tokenizer loaded here (a local directory or a hub id: the tokenizer
setting, else the served model's name) by the same answer rule as the local engines. A server's
/tokenize cannot list a vocabulary, so without a tokenizer p comes from the top-k log-probabilities.
"""

from __future__ import annotations

import logging

from server.engines.base import EngineError
from server.engines.remote.answer import TOP_LOGPROBS, YesNoIds

log = logging.getLogger("dvreward.remote")


def tokenizer_yes_no_ids(ref: str) -> YesNoIds:
    """Ids by the answer rule over a tokenizer loaded from `ref`; EngineError if it cannot be loaded."""
    from transformers import AutoTokenizer

    from server.engines.answers import YesNo
    from server.engines.loading import pretrained_kwargs

    try:
        tokenizer = AutoTokenizer.from_pretrained(ref, **pretrained_kwargs(ref))
    except (OSError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EngineError(f"cannot load the tokenizer {ref!r}: {reason}") from exc
    yn = YesNo(tokenizer, ref)
    return YesNoIds(tuple(yn.yes_ids), tuple(yn.no_ids))


def remote_yes_no_ids(model: str, tokenizer: str | None) -> YesNoIds | None:
    """The ids for exact p, or None (with a warning) when the served model's tokenizer is not at hand.

    An explicitly configured tokenizer that cannot be loaded is a configuration error.
    """
    if tokenizer:
        return tokenizer_yes_no_ids(tokenizer)
    try:
        return tokenizer_yes_no_ids(model)
    except EngineError as exc:
        log.warning("%s; p from %s comes from the top-%d log-probabilities. Set the tokenizer setting to a local "
                    "copy of the served model's tokenizer for exact p", exc, model, TOP_LOGPROBS)
        return None
