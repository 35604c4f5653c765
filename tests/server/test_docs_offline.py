"""/docs and /redoc work on an air-gapped cluster: every asset they load is served by the API itself."""

from __future__ import annotations

import re

import httpx
import pytest


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_reference_no_external_host(embedded_server: str, page: str) -> None:
    r = httpx.get(embedded_server + page, timeout=10)
    assert r.status_code == 200, r.text
    html = r.text
    external = re.findall(r"(?:https?:)?//[A-Za-z0-9.-]+\.[A-Za-z]{2,}[^\s\"']*", html)
    assert not external, f"{page} loads from other hosts: {external}"
    assets = re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']""", html)
    assert any(a.endswith(".js") for a in assets), f"{page} loads no script: {html[:500]}"
    for asset in assets:
        got = httpx.get(embedded_server + asset, timeout=10)
        assert got.status_code == 200 and len(got.content) > 100, (asset, got.status_code)
    spec = re.search(r"""(?:url|spec-url)\s*[:=]\s*["'](/[^"']+\.json)["']""", html)
    assert spec and httpx.get(embedded_server + spec.group(1), timeout=10).json()["info"]["title"] == "DVReward"
