"""The decomposer on an OpenAI-compatible chat endpoint (GPT-4.1 as the reference used, or a local vLLM).

JSON stages ask for a JSON-schema response format (non-strict, so servers that support only part of
JSON Schema still accept it); every output is validated and retried by the shared pipelines
either way. The DSG validity stage reads p like the remote verifier (exact, top-k or text).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from server.engines import defaults
from server.engines.base import EngineError
from server.engines.decomposition.parse import Generation
from server.engines.decomposition.pipelines import (
    Choice,
    Constraint,
    Messages,
    PipelineDecomposer,
    check_options,
)
from server.engines.decomposition.schema import Limits
from server.engines.remote.answer import YesNoIds, answer_body, read_each
from server.engines.remote.client import ChatClient, RemoteOptions
from server.engines.remote.tokens import remote_yes_no_ids


class OpenAIBackend:
    """DecodingBackend over chat completions. `json_schema=False` sends no response format at all."""

    def __init__(self, client: ChatClient, ids: YesNoIds | None, *, max_new_tokens: int, seed: int = 0,
                 retry_temperature: float = 0.7, json_schema: bool = True) -> None:
        self.client = client
        self.model_id = client.model
        self.ids = ids
        self.max_new_tokens = max_new_tokens
        self.seed = seed
        self.retry_temperature = retry_temperature
        self.json_schema = json_schema

    def _body(self, messages: Messages, constraint: Constraint, attempt: int) -> dict[str, Any]:
        body: dict[str, Any] = {"messages": messages, "max_tokens": self.max_new_tokens,
                                "temperature": 0.0 if attempt == 0 else self.retry_temperature}
        if attempt:
            body["seed"] = self.seed + attempt
        if self.json_schema and not isinstance(constraint, Choice):
            body["response_format"] = {"type": "json_schema", "json_schema": {
                "name": "decomposition", "schema": constraint.schema, "strict": False}}
        return body

    def generate(self, requests: Sequence[tuple[Messages, Constraint]], attempt: int) -> list[Generation]:
        responses = self.client.chat_each([self._body(m, c, attempt) for m, c in requests])
        out: list[Generation] = []
        for r in responses:
            if isinstance(r, EngineError):
                out.append(Generation("", False, 0, error=str(r)))
                continue
            try:
                choice = r["choices"][0]
                text = choice["message"].get("content") or ""
                finished = choice.get("finish_reason") == "stop"
                n = int((r.get("usage") or {}).get("completion_tokens") or 0)
            except (KeyError, IndexError, TypeError, AttributeError, ValueError) as exc:
                out.append(Generation("", False, 0, error=f"the answer is not a chat completion ({exc!r})"))
                continue
            out.append(Generation(text, finished, n))
        return out

    def p_yes(self, conversations: Sequence[Messages]) -> list[float | EngineError]:
        answers = read_each(self.client.chat_each([answer_body(m, self.ids) for m in conversations]), self.ids)
        return [a if isinstance(a, EngineError) else a[0] for a in answers]


class OpenAIDecomposer(PipelineDecomposer):
    """The Decomposer protocol on an OpenAI-compatible server."""

    backend: OpenAIBackend

    def __init__(self, url: str, model: str, pipeline: str = defaults.PIPELINE, *,
                 options: RemoteOptions = RemoteOptions(), tokenizer: str | None = None, max_retries: int = 2,
                 limits: Limits, max_new_tokens: int, json_schema: bool = True) -> None:
        check_options(pipeline, max_retries)
        client = ChatClient(url, model, options)
        ids = remote_yes_no_ids(model, tokenizer) if pipeline == "dsg" else None
        super().__init__(OpenAIBackend(client, ids, max_new_tokens=max_new_tokens, json_schema=json_schema),
                         pipeline, max_retries=max_retries, limits=limits)
