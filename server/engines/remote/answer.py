"""Reading p(yes) from one chat completion of an OpenAI-compatible server, and saying how it was read.

The request asks for one greedy token with its top-20 log-probabilities. With the yes/no token
ids known and a server that accepts `logprob_token_ids` (vLLM's does), the server returns the
full-vocabulary log-probability of exactly those ids: p is exact (source "logits"). Otherwise p
comes from the top-k by the answer rule (source "top_k"); when neither answer is in the top-k,
the generated word decides, 1.0 or 0.0 (source "text"), as the reference does, visibly. Anything
else is an EngineError: no answer is ever made up.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from server.core.answer_rule import UnscorableError, answer_word, p_yes_from_logits, p_yes_from_top_logprobs
from server.engines.base import EngineError, PSource

TOP_LOGPROBS = 20  # the most OpenAI's API returns
_TOKEN_ID = "token_id:"  # how vLLM names a token when asked to return tokens as ids


@dataclass(frozen=True)
class YesNoIds:
    """The token ids whose probabilities are summed for "yes" and for "no"."""

    yes: tuple[int, ...]
    no: tuple[int, ...]


def answer_body(messages: list[dict[str, Any]], ids: YesNoIds | None, max_tokens: int = 1) -> dict[str, Any]:
    """A greedy completion (one token, or the greedy answer's GREEDY_TOKENS) with log-probabilities (and the
    exact yes/no ids when known); p is read at the first token."""
    body: dict[str, Any] = {"messages": messages, "max_tokens": max_tokens, "temperature": 0.0, "logprobs": True,
                            "top_logprobs": TOP_LOGPROBS}
    if ids is not None:
        body["logprob_token_ids"] = [*ids.yes, *ids.no]
        body["return_tokens_as_token_ids"] = True
    return body


def answer_text(response: dict[str, Any]) -> str:
    """The generated text of a chat completion (the greedy answer when asked for GREEDY_TOKENS)."""
    try:
        return response["choices"][0]["message"].get("content") or ""
    except (KeyError, IndexError, TypeError, AttributeError) as exc:
        raise EngineError(f"the server's answer is not a chat completion: {type(exc).__name__}: {exc}") from None


def read_answer(response: dict[str, Any], ids: YesNoIds | None) -> tuple[float, PSource]:
    """p and its source from a chat completion made from `answer_body`."""
    try:
        choice = response["choices"][0]
        text = choice["message"].get("content") or ""
        logprobs = choice.get("logprobs") or {}
        first = (logprobs.get("content") or [None])[0]
    except (KeyError, IndexError, TypeError, AttributeError) as exc:
        raise EngineError(f"the server's answer is not a chat completion: {type(exc).__name__}: {exc}") from None
    top = _top(first) if first else {}
    if ids is not None:
        by_id = _by_id(top)
        if by_id is not None and all(i in by_id for i in (*ids.yes, *ids.no)):
            try:
                return p_yes_from_logits([by_id[i] for i in ids.yes], [by_id[i] for i in ids.no]), "logits"
            except UnscorableError as exc:
                raise EngineError(str(exc)) from None
        if by_id is not None:  # tokens came back as ids but not the ones asked for: nothing to read
            raise EngineError("the server returned token ids other than the requested yes/no ids")
    if top:
        try:
            return p_yes_from_top_logprobs(top), "top_k"
        except UnscorableError:
            pass  # neither answer in the top-k: the generated word decides, reported as such
    word = answer_word(text)
    if word in ("yes", "no"):
        return (1.0 if word == "yes" else 0.0), "text"
    raise EngineError(f"no yes/no answer: neither word is among the top-{len(top)} tokens and the model "
                      f"answered {text[:40]!r}")


def read_each(responses: Sequence[dict[str, Any] | EngineError],
              ids: YesNoIds | None) -> list[tuple[float, PSource, str] | EngineError]:
    """`read_answer` and the generated text of each response; a failed request or an unreadable answer is that
    one's error."""
    out: list[tuple[float, PSource, str] | EngineError] = []
    for r in responses:
        try:
            out.append(r if isinstance(r, EngineError) else (*read_answer(r, ids), answer_text(r)))
        except EngineError as exc:
            out.append(exc)
    return out


def _top(entry: dict[str, Any]) -> dict[str, float]:
    """{token: logprob} of the first generated position (the chosen token included)."""
    out: dict[str, float] = {}
    for item in [*(entry.get("top_logprobs") or []), entry]:
        tok, lp = item.get("token"), item.get("logprob")
        if isinstance(tok, str) and isinstance(lp, int | float) and tok not in out:
            out[tok] = float(lp)
    return out


def _by_id(top: dict[str, float]) -> dict[int, float] | None:
    """The same log-probabilities keyed by token id, when the server named tokens by id."""
    if not top or not all(t.startswith(_TOKEN_ID) for t in top):
        return None
    try:
        return {int(t[len(_TOKEN_ID):]): lp for t, lp in top.items()}
    except ValueError:
        return None
