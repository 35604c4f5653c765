"""The decomposition cache key follows what writes the questions, and nothing the verifier alone uses."""

from __future__ import annotations

from typing import Any

from server.runtime import build_broker, build_service
from server.settings import Settings


def key(**settings: Any) -> str:
    s = Settings(**{"redis_url": None, "verifier": "v", "decomposer": "d", **settings})
    return build_service(s, build_broker(s)).cache_key("a red cat")


def test_a_new_verifier_system_prompt_keeps_the_cached_decompositions() -> None:
    assert key(verifier_system_prompt="Answer yes or no.") == key(verifier_system_prompt="Only yes or no.")


def test_the_decomposer_and_its_pipeline_are_in_the_key() -> None:
    base = key()
    assert key(pipeline="dsg") != base
    assert key(decomposer="other-decomposer") != base
