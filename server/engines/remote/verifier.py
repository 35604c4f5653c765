"""The verifier on an OpenAI-compatible server (vLLM, SGLang or a hosted API): one request per question.

Each request carries the verifier conversation with the item's images as PNG data URLs and asks
for one greedy token with log-probabilities; remote.answer reads p and says how (`logits`,
`top_k` or `text`). The yes/no token ids come from the model's tokenizer (a local path or hub
id); without one, p comes from the top-k. A question that fails after retries fails its
item with the reason; other items are unaffected.
"""

from __future__ import annotations

import base64
import io
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from server.core.answer_rule import GREEDY_TOKENS
from server.engines.base import EngineError, ItemScores, PSource, VerifyItem, scores_or_raise
from server.engines.conversation import verifier_messages
from server.engines.remote.answer import YesNoIds, answer_body, read_each
from server.engines.remote.client import ChatClient, RemoteOptions, RequestError
from server.engines.remote.tokens import remote_yes_no_ids
from server.engines.resize import Resizer

if TYPE_CHECKING:
    from PIL.Image import Image

log = logging.getLogger("dvreward.remote")


def data_url(image: Image) -> str:
    """A lossless PNG data URL: the server decodes exactly the pixels the worker decoded."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def remote_messages(system_prompt: str, urls: Sequence[str], question: str) -> list[dict[str, Any]]:
    """The verifier conversation with the item's images, in order, as `image_url` parts."""
    return verifier_messages(system_prompt, question, [{"type": "image_url", "image_url": {"url": u}} for u in urls])


class OpenAIVerifier:
    """Verifier protocol over HTTP. `exact=False` never asks for `logprob_token_ids` (p from the top-k)."""

    def __init__(self, client: ChatClient, system_prompt: str, ids: YesNoIds | None, *, exact: bool = True,
                 resize: Resizer | None = None) -> None:
        self.client = client
        self.model_id = client.model
        self.system_prompt = system_prompt
        self.ids = ids if exact else None
        self.resize = resize

    @classmethod
    def connect(cls, url: str, model: str, system_prompt: str, options: RemoteOptions = RemoteOptions(), *,
                tokenizer: str | None = None, exact: bool = True, min_pixels: int | None = None,
                max_pixels: int | None = None) -> OpenAIVerifier:
        """With the served model's files at hand (`tokenizer`, else the model name), p can be exact and images
        are resized here as the transformers engine resizes them; without them, the server decides both."""
        client = ChatClient(url, model, options)
        ids = remote_yes_no_ids(model, tokenizer) if exact else None
        try:
            resize: Resizer | None = Resizer.from_pretrained(tokenizer or model, "verifier", min_pixels, max_pixels)
        except EngineError as exc:
            log.warning("images go to %s unresized (the server's processor resizes them): %s", url, exc)
            resize = None
        return cls(client, system_prompt, ids, exact=exact, resize=resize)

    def close(self) -> None:
        self.client.close()

    def verify(self, items: Sequence[VerifyItem]) -> list[list[float]]:
        return scores_or_raise(self.verify_each(items))

    def verify_each(self, items: Sequence[VerifyItem], *, greedy: bool = False) -> list[ItemScores | EngineError]:
        """One request per question; with `greedy`, each asks for the greedy answer (GREEDY_TOKENS tokens)."""
        for it in items:
            if not it.images or not it.questions:
                raise ValueError("a verification item needs at least one image and one question")
        conversations: list[list[dict[str, Any]]] = []
        for it in items:
            urls = [data_url(self.resize(im) if self.resize else im) for im in it.images]
            conversations += [remote_messages(self.system_prompt, urls, q) for q in it.questions]
        answers = iter(self._answers(conversations, GREEDY_TOKENS if greedy else 1))  # item by item, in order
        out: list[ItemScores | EngineError] = []
        for it in items:
            mine = [next(answers) for _ in it.questions]
            errors = [f"question {k} ({it.questions[k][:60]!r}): {a}" for k, a in enumerate(mine)
                      if isinstance(a, EngineError)]
            ok = [a for a in mine if not isinstance(a, EngineError)]
            out.append(EngineError("; ".join(errors)) if errors else
                       ItemScores(tuple(p for p, _, _ in ok), tuple(s for _, s, _ in ok),
                                  tuple(t for _, _, t in ok) if greedy else None))
        return out

    def _answers(self, conversations: list[list[dict[str, Any]]],
                 max_tokens: int) -> list[tuple[float, PSource, str] | EngineError]:
        ids = self.ids
        responses = self.client.chat_each([answer_body(m, ids, max_tokens) for m in conversations])
        if ids is not None and any(_refused_exact(r) for r in responses):
            log.warning("%s does not accept logprob_token_ids: p now comes from the top-k log-probabilities",
                        self.client.base_url)
            self.ids = None
            return self._answers(conversations, max_tokens)
        return read_each(responses, ids)


def _refused_exact(r: dict[str, Any] | RequestError) -> bool:
    """A 400/422 naming the exact-logprob parameters: the server does not support them."""
    return (isinstance(r, RequestError) and r.status in (400, 422)
            and ("logprob_token_ids" in r.body or "return_tokens_as_token_ids" in r.body))
