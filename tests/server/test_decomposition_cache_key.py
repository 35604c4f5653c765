"""The decomposition cache key follows what writes the questions, and nothing the verifier alone uses."""

from __future__ import annotations

from typing import Any

import pytest

from server.cli import build_parser
from server.runtime import build_broker, build_service
from server.settings import Settings

# Each changes the questions a decomposer writes: changed, the cache must not serve the old ones (for up to the
# cache TTL of 7 days, it did for all but the first two).
QUESTION_SETTINGS = {"pipeline": "dsg", "decomposer": "other-decomposer", "decomposer_max_semantic": 4,
                     "decomposer_max_quality": 2, "decomposer_max_new_tokens": 256,
                     "decomposer_engine": "vllm"}


def key(**settings: Any) -> str:
    s = Settings(**{"redis_url": None, "verifier": "v", "decomposer": "d", **settings})
    return build_service(s, build_broker(s)).cache_key("a red cat")


def test_a_new_verifier_system_prompt_keeps_the_cached_decompositions() -> None:
    assert key(verifier_system_prompt="Answer yes or no.") == key(verifier_system_prompt="Only yes or no.")


@pytest.mark.parametrize(("name", "value"), QUESTION_SETTINGS.items())
def test_every_setting_that_changes_the_questions_is_in_the_key(name: str, value: Any) -> None:
    assert key(**{name: value}) != key()


@pytest.mark.parametrize("name", QUESTION_SETTINGS)
def test_the_api_offers_every_setting_of_the_key(name: str) -> None:
    """`dvreward api` computes the key: a setting of it that only `worker` offered would key on the default."""
    for command in ("api", "worker"):
        assert name in vars(build_parser().parse_args([command])), (command, name)
