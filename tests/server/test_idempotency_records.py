"""Idempotency records are bounded in bytes, not only in number: a record keeps what a replay needs (not the group
metadata a response echoes: the retry brings it again), a response whose record would pass
DVREWARD_IDEMPOTENCY_MAX_BYTES is answered but not kept (its retry is scored again), and the in-process cache drops
its oldest entries past DVREWARD_CACHE_MAX_BYTES. Twelve 30 MB requests with fresh keys grew an API by 550 MB."""

from __future__ import annotations

import time
import types
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from dvreward_protocol.reward import Aggregation, Gating
from dvreward_protocol.schemas import GroupResult, ModelIds, ScoreGroup, ScoreRequest, ScoreResponse, Timings
from server.api.parts import digest
from server.errors import ErrorCode, ServiceError
from server.idempotency import Idempotency, Keeping, Replay
from server.queue.base import singleflight
from server.queue.memory import MemoryBroker
from server.runtime import build_broker
from server.settings import Settings
from tests.service_stack import drop_service_settings
from tests.tolerance import assert_rewards_close

BIG = "x" * 300_000  # metadata a client attaches to each group (a trajectory id, a prompt's provenance, ...)


def request(metadata: str, n_images: int = 2) -> ScoreRequest:
    return ScoreRequest(groups=[ScoreGroup(prompt="a red cat", images=["png"] * n_images, metadata={"m": metadata})])


class Scorer:
    """The scoring a request runs: counts its runs, and echoes each group's metadata as the service does."""

    def __init__(self, body: ScoreRequest) -> None:
        self.body = body
        self.runs = 0

    async def run(self) -> ScoreResponse:
        self.runs += 1
        n = len(self.body.groups[0].images)
        groups = [GroupResult(prompt=g.prompt, questions=[], rewards=[0.25] * n, errors=[None] * n,
                              advantages=[0.0] * n,
                              metadata=g.metadata) for g in self.body.groups]
        return ScoreResponse(request_id=f"run-{self.runs}", models=ModelIds(verifier="v", decomposer=None),
                             template_version="t", verifier_system_prompt="", aggregation=Aggregation.geometric,
                             gating=Gating.none,
                             groups=groups, timings=Timings())


@pytest.fixture(params=["memory", "redis"])
async def broker(request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    url = None if request.param == "memory" else request.getfixturevalue("redis_url")
    b = build_broker(Settings(redis_url=url))
    yield b
    await b.close()


async def kept_bytes(broker: Any) -> int:
    """Bytes of every idempotency record the broker holds (a white-box probe)."""
    if isinstance(broker, MemoryBroker):
        return sum(len(v) for k, (v, _) in broker._values.items() if k.startswith("idem:"))
    keys = [k async for k in broker.redis.scan_iter(match=broker.keys.value("idem:*"))]
    return sum([await broker.redis.strlen(k) for k in keys])


async def call(broker: Any, body: ScoreRequest, scorer: Scorer, max_bytes: int,
               key: str = "k1") -> tuple[dict[str, Any], bool]:
    """What a route does: (response JSON, replayed)."""
    got = await Idempotency(broker, Keeping(60, max_bytes), 30).claim("principal", "score", key, body,
                                                                      lambda: digest(body, None, {}))
    if isinstance(got, Replay):
        return got.response, True
    async with got:
        resp = await scorer.run()
        await got.keep(resp)
    return resp.model_dump(mode="json"), False


async def test_a_record_leaves_out_the_echoed_metadata_and_a_replay_restores_it(broker: Any) -> None:
    body = request(BIG)
    scorer = Scorer(body)
    first, replayed = await call(broker, body, scorer, 4096)
    assert not replayed and first["groups"][0]["metadata"] == {"m": BIG}
    assert 0 < await kept_bytes(broker) < 4096, "the record kept the metadata the request brings again"
    again, replayed = await call(broker, request(BIG), scorer, 4096)
    assert replayed and scorer.runs == 1
    assert again == first, "the replay is the first response, metadata included"


async def test_a_response_past_the_bound_is_answered_not_kept_and_its_retry_scores_again(broker: Any) -> None:
    body = request("small", n_images=200)  # 200 rewards and advantages: a record of about 3 KB
    scorer = Scorer(body)
    first, replayed = await call(broker, body, scorer, 1024)
    assert not replayed and len(first["groups"][0]["rewards"]) == 200
    assert await kept_bytes(broker) < 200, "only a note that the response was not kept"
    again, replayed = await call(broker, body, scorer, 1024)
    assert not replayed and scorer.runs == 2 and again["request_id"] == "run-2"
    with pytest.raises(ServiceError) as err:  # the key still belongs to that body
        await call(broker, request("other", n_images=200), Scorer(request("other")), 1024)
    assert err.value.code is ErrorCode.bad_request and "different body" in err.value.message


async def test_the_in_process_cache_keeps_its_byte_budget_dropping_the_oldest() -> None:
    broker = build_broker(Settings(redis_url=None, cache_max_bytes=1024**2, idempotency_max_bytes=1024))
    assert isinstance(broker, MemoryBroker)
    value = b"v" * 200_000

    def compute(data: bytes) -> Callable[[], Awaitable[bytes]]:
        async def run() -> bytes:
            return data
        return run

    deadline = time.time() + 30
    for i in range(12):  # 2.4 MB into a 1 MiB budget
        assert await singleflight(broker, f"k{i}", compute(value), 60, deadline) == (value, False)
        assert broker._cached_bytes <= 1024**2
    assert sum(len(k) + len(v) for k, (v, _) in broker._values.items()) <= broker._cached_bytes
    assert await singleflight(broker, "k11", compute(b"new"), 60, deadline) == (value, True), "the newest stays"
    assert await singleflight(broker, "k0", compute(b"new"), 60, deadline) == (b"new", False), "the oldest went"
    huge = b"h" * (1024**2 + 1)
    assert await singleflight(broker, "huge", compute(huge), 60, deadline) == (huge, False)
    assert await singleflight(broker, "huge", compute(b"again"), 60, deadline) == (b"again", False), \
        "a value larger than the whole budget is not kept"


def test_over_http_a_replay_carries_its_metadata_and_redis_keeps_kilobytes(
    redis_url: str, tiny_verifier: Any, tiny_models: dict[str, Path], kit: types.SimpleNamespace,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from server.runtime import build_app

    drop_service_settings(monkeypatch)
    s = Settings(verifier=str(tiny_models["verifier"]), decomposer="", redis_url=redis_url,
                 idempotency_max_bytes=2048)
    group = {"questions": kit.explicit_questions(), "images": [kit.png_b64(1), kit.png_b64(2)],
             "metadata": {"trajectory": "t" * 2_000_000}}
    admin = redis.Redis.from_url(redis_url)
    with kit.serve_in_thread(build_app(s, (tiny_verifier, None))) as url, httpx.Client(base_url=url, timeout=60) as c:
        plain = {"groups": [group], "details": False}
        first = c.post("/v1/score", json=plain, headers={"Idempotency-Key": "meta"})
        assert first.status_code == 200 and "Idempotent-Replayed" not in first.headers, first.text
        records = [admin.strlen(k) for k in admin.scan_iter("dvr:sf:value:idem:*")]
        assert len(records) == 1 and records[0] < 2048, records
        again = c.post("/v1/score", json=plain, headers={"Idempotency-Key": "meta"})
        assert again.headers.get("Idempotent-Replayed") == "true" and again.json() == first.json()

        many = [kit.png_b64(i) for i in range(16)]
        detailed = {"groups": [{**group, "images": many}], "details": True}  # per-image p and evidence: past 2 KB
        big = c.post("/v1/score", json=detailed, headers={"Idempotency-Key": "detailed"})
        assert big.status_code == 200, big.text
        retry = c.post("/v1/score", json=detailed, headers={"Idempotency-Key": "detailed"})
        assert retry.status_code == 200 and "Idempotent-Replayed" not in retry.headers, "not kept: scored again"
        assert retry.json()["request_id"] != big.json()["request_id"]
        assert_rewards_close([retry.json()["groups"][0]["rewards"]], [big.json()["groups"][0]["rewards"]])
        assert max(admin.strlen(k) for k in admin.scan_iter("dvr:sf:value:idem:*")) < 2048
    admin.close()
