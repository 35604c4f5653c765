"""Defects adversarial testing found at the API edge, each against a real app on a real uvicorn server.

Auth before the body, idempotency per principal, errors without heap addresses, 405/415/413/408 in the
service's format with a request id, every response counted in /metrics, and server faults that are 5xx.
"""

from __future__ import annotations

import os
import re
import socket
import time
import types
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.engines.base import VerifyItem

Q = [{"id": "a", "text": "Is there a cat?", "tag": "Existence"},
     {"id": "b", "text": "Is the cat red?", "tag": "Attribute"}]


class DropsOneP:
    """A verifier whose results are one p short: the kind of server-side fault a broken worker makes."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.model_id = inner, inner.model_id

    def verify(self, items: Sequence[VerifyItem]) -> list[list[float]]:
        return [ps[:-1] for ps in self.inner.verify(items)]


@pytest.fixture
def serve(kit: types.SimpleNamespace, tiny_models: dict[str, Path], tiny_verifier: Any,
          monkeypatch: pytest.MonkeyPatch) -> Callable[..., Any]:
    """serve(verifier=..., **settings): the embedded app with a worker, in a real uvicorn server."""
    from server.runtime import build_app
    from server.settings import Settings

    for name in [k for k in os.environ if k.startswith("DVREWARD_")]:
        monkeypatch.delenv(name)

    @contextmanager
    def make(verifier: Any = tiny_verifier, **settings: Any) -> Iterator[str]:
        s = Settings(verifier=str(tiny_models["verifier"]), decomposer="", **settings)
        with kit.serve_in_thread(build_app(s, (verifier, None))) as url:
            yield url

    return make


def body(kit: types.SimpleNamespace, seeds: Sequence[int] = (1,), **extra: Any) -> dict[str, Any]:
    return {"groups": [{"questions": Q, "images": [kit.png_b64(s) for s in seeds]}], **extra}


# ---- item 2: a fault after validation is the server's, not the client's -------------------------
def test_a_worker_result_that_cannot_be_aggregated_is_a_5xx_not_the_clients_fault(
    serve: Callable[..., Any], kit: types.SimpleNamespace, tiny_verifier: Any,
) -> None:
    with serve(DropsOneP(tiny_verifier)) as url:
        r = httpx.post(url + "/v1/score", json=body(kit), timeout=60)
    assert r.status_code == 500, r.text
    err = r.json()["error"]
    assert err["code"] == "aggregation_failed", err
    assert "groups[0].images[0]" in err["message"]
    assert r.json()["request_id"] == r.headers["X-Request-Id"]


def test_weights_that_zero_a_half_are_refused_before_any_image_is_verified(
    serve: Callable[..., Any], kit: types.SimpleNamespace, tiny_verifier: Any,
) -> None:
    """Still the client's 422, even with a worker whose results could not be aggregated: nothing was verified."""
    with serve(DropsOneP(tiny_verifier)) as url:
        r = httpx.post(url + "/v1/score", json=body(kit, tag_weights={"Existence": 0, "Attribute": 0}), timeout=60)
        metrics = httpx.get(url + "/metrics").text
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "bad_request" and "groups[0]" in r.json()["error"]["message"]
    assert 'dvreward_images_total{outcome="ok"}' not in metrics
