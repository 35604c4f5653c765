"""How the clients send images, against real servers: binary multipart parts where the server offers them (Accept-Post
of GET /v1/models), base64 JSON where it does not (an older server), the same results either way, and requests cut by
the bytes they really carry. What was sent is read off the wire by a transport that records each request and sends
it on to the server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.tolerance import assert_advantages_close, assert_p_close, assert_rewards_close
from tests.trainer_client.conftest import serve
from trainer_client import AsyncDVRewardClient, DVRewardClient

pytestmark = pytest.mark.float_sensitive
MULTIPART = "multipart/form-data"


class Recorded(httpx.HTTPTransport):
    """A real HTTP transport that notes (method, path, media type, body bytes) of each request it sends."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[tuple[str, str, str, int]] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        media = request.headers.get("content-type", "").split(";")[0]
        self.sent.append((request.method, request.url.path, media, len(request.content)))
        return super().handle_request(request)

    def posts(self) -> list[tuple[str, int]]:
        return [(media, size) for method, _, media, size in self.sent if method == "POST"]


class AsyncRecorded(httpx.AsyncHTTPTransport):
    def __init__(self) -> None:
        super().__init__()
        self.media: list[str] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            self.media.append(request.headers["content-type"].split(";")[0])
        return await super().handle_async_request(request)


@pytest.fixture(scope="module")
def json_only_url(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A server as they were before the multipart form: it neither takes nor advertises it."""
    with serve(tiny_models, tmp_path_factory.mktemp("serve-json"), "--multipart-requests", "false") as url:
        yield url


def _step(make_images) -> tuple[list[str], list[list]]:
    images = make_images(7, seed=21)
    return ["a red cube", "two cubes"], [images[:4], images[4:]]


def test_the_client_sends_binary_parts_where_the_server_offers_them(any_service_url, make_images, questions):
    prompts, groups = _step(make_images)
    wire = Recorded()
    with DVRewardClient(any_service_url, transport=wire, image_format="png") as auto, \
            DVRewardClient(any_service_url, request_format="json", image_format="png") as plain:
        got = auto.score(prompts, groups, questions=[questions] * 2)
        again = auto.verify([groups[0][0]], ["Is there a cube?"])
        want = plain.score(prompts, groups, questions=[questions] * 2)
        want_p = plain.verify([groups[0][0]], ["Is there a cube?"])
    assert wire.sent[0][:2] == ("GET", "/v1/models"), "asked once, before the first request with images"
    assert [m for m, _, _, _ in wire.sent].count("GET") == 1
    assert [media for media, _ in wire.posts()] == [MULTIPART, MULTIPART]
    assert_rewards_close(got.rewards, want.rewards)
    assert_advantages_close(got.advantages, want.advantages, got.rewards)
    assert_p_close(again.p[0], want_p.p[0])
    assert not got.failures and all(0 < r < 1 for r in got.flat_rewards())


def test_an_older_server_gets_json(json_only_url, service_url, make_images, questions):
    prompts, groups = _step(make_images)
    wire = Recorded()
    with DVRewardClient(json_only_url, transport=wire) as old, DVRewardClient(service_url) as new:
        got = old.score(prompts, groups, questions=[questions] * 2)
        want = new.score(prompts, groups, questions=[questions] * 2)
    assert [media for media, _ in wire.posts()] == ["application/json"]
    assert_rewards_close(got.rewards, want.rewards)
    assert_advantages_close(got.advantages, want.advantages, got.rewards)


async def test_the_async_client_chooses_as_the_sync_one(json_only_url, service_url, make_images, questions):
    prompts, groups = _step(make_images)
    media = {}
    for name, url in (("new", service_url), ("old", json_only_url)):
        wire = AsyncRecorded()
        async with AsyncDVRewardClient(url, transport=wire) as client:
            result = await client.score(prompts, groups, questions=[questions] * 2)
        assert not result.failures
        media[name] = wire.media
    assert media == {"new": [MULTIPART], "old": ["application/json"]}


def test_requests_are_cut_by_the_bytes_each_form_carries(service_url, make_images, questions):
    """The same limit holds more images per request as parts than as base64, and no body passes it."""
    prompts, groups = _step(make_images)
    limit = 12_000  # PNGs of ~3.4 KB: three a request as parts, two as base64
    sent = {}
    for form in ("multipart", "json"):
        wire = Recorded()
        with DVRewardClient(service_url, transport=wire, request_format=form, image_format="png",
                            max_request_bytes=limit) as client:
            result = client.score(prompts, groups, questions=[questions] * 2)
        assert not result.failures
        sent[form] = wire.posts()
        assert all(size <= limit for _, size in sent[form]), sent[form]
    assert len(sent["multipart"]) < len(sent["json"]), sent


def test_request_format_is_checked():
    with pytest.raises(ValueError, match="request_format"):
        DVRewardClient("http://127.0.0.1:9", request_format="msgpack")  # type: ignore[arg-type]
