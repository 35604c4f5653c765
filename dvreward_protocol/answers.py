"""Where a question's p came from; pure typing, so the engines import it without pydantic."""

from __future__ import annotations

from typing import Literal

# logits: the full next-token distribution; top_k: a server's top-k logprobs; text: the generated word.
PSource = Literal["logits", "top_k", "text"]
