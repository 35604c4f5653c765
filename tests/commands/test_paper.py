"""A service says, once at start, how its reward differs from AlphaGRPO's (model, dtype, system prompt)."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import pytest

from server import paper
from tests.service_stack import wait_for


def test_what_differs_from_the_papers_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    # the paper's prompt is the user's to paste: stand a known text in for it by its digest
    monkeypatch.setattr(paper, "PAPER_SYSTEM_PROMPT_SHA256", hashlib.sha256(b"Judge. Say yes or no.").hexdigest())
    assert paper.differences(paper.PAPER_VERIFIER, "bfloat16", "  Judge. Say yes or no.\n") == []
    found = paper.differences("Qwen/Qwen2.5-VL-7B-Instruct", "float32", "Another prompt.")
    assert len(found) == 3 and "Qwen/Qwen3-VL-30B-A3B-Instruct" in found[0] and "bfloat16" in found[1]
    assert "--verifier-system-prompt-file" in found[2]
    assert paper.differences(paper.PAPER_VERIFIER, None, "Judge. Say yes or no.") == []  # a remote server's dtype


def test_the_line_is_information_once(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="dvreward"):
        paper.log_comparison("my-vl", "float32", "ours")
    (record,) = caplog.records
    assert record.levelno == logging.INFO and "differs from AlphaGRPO's reward in: verifier my-vl" in record.message


def test_serve_logs_it_at_start(services, tiny_models: dict[str, Path]) -> None:
    from tests.service_stack import service_env

    serve = services("serve", "serve", service_env(), "--verifier", str(tiny_models["verifier"]), "--decomposer", "",
                     http=True)
    serve.wait_http("/readyz")
    wait_for(lambda: "differs from AlphaGRPO" in serve.log_tail(20000), 10, "the comparison line")
    line = next(x for x in serve.log_tail(20000).splitlines() if "differs from AlphaGRPO" in x)
    assert "dtype float32" in line and "system prompt" in line and "INFO" in line
