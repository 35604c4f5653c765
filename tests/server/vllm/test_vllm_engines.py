"""The vLLM and remote engines against real vLLM, with the tiny head_dim-64 models.

Loading a tiny model into vLLM takes ~30 s on two cores, so each engine is loaded once for the
module: `dvreward serve` with vLLM verifier and decomposer, a vLLM OpenAI-compatible server on
loopback for the remote engines, and one in-process vLLM decomposer for the pipelines.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.engines.base import EngineError, ItemScores, VerifyItem
from server.engines.decomposition.schema import Limits
from server.images import load_image

# A test's time includes loading its module's vLLM engine (seconds on a quiet machine, minutes on a busy one).
pytestmark = pytest.mark.timeout(1800)

# Engines agree to float32 noise on the same checkpoint: 1e-3 leaves room for summation order only.
AGREE = 1e-3
LOAD_S = 900.0  # bound on loading a tiny model into vLLM on a busy 2-core machine
SMALL = Limits(max_semantic=3, max_quality=2, max_text_chars=24, max_args=2, max_arg_chars=12)
QUESTIONS = ["Is there a cat?", "Is the cat red?", "Does the image look sharp?"]
PROMPTS = ["a red car next to a blue house", "two cats on a sofa"]
# Sizes the processors keep and sizes they must resize (up, down, to a multiple of 28).
SIZES = [(56, 56), (112, 84), (40, 30), (200, 150)]


def kill_group(pid: int) -> None:
    """vLLM's engine processes outlive a server killed before it shut them down: end its whole session."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def _images(kit: types.SimpleNamespace) -> list[bytes]:
    return [kit.png_bytes(20 + n, size) for n, size in enumerate(SIZES)]


def _items(blobs: list[bytes]) -> list[VerifyItem]:
    images = [load_image(b, 10**8) for b in blobs]
    return [VerifyItem((im,), tuple(QUESTIONS)) for im in images] + [VerifyItem(tuple(images[:2]), (QUESTIONS[0],))]


def _max_diff(a: list[list[float]], b: list[list[float]]) -> float:
    assert [len(x) for x in a] == [len(x) for x in b]
    return max(abs(x - y) for xs, ys in zip(a, b, strict=True) for x, y in zip(xs, ys, strict=True))


@pytest.fixture(scope="module")
def vllm_serve(kit: types.SimpleNamespace, tiny_models: dict[str, Path],
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`dvreward serve` with the verifier and the decomposer on in-process vLLM."""
    port = kit.free_port()
    env = kit.service_env(verifier_engine="vllm", decomposer_engine="vllm", verifier=tiny_models["verifier"],
                          decomposer=tiny_models["decomposer"], vllm_gpu_memory_utilization=0.1,
                          decomposer_max_new_tokens=400, request_timeout_s=600)
    proc = kit.ServiceProcess("serve-vllm", ["serve", "--host", kit.HOST, "--port", str(port)], env,
                              tmp_path_factory.mktemp("serve-vllm"), port)
    proc.start()
    try:
        proc.wait_http("/readyz", timeout=LOAD_S)
        yield proc.url
        assert proc.alive(), f"the vLLM server died during the tests:\n{proc.log_tail()}"
    finally:
        if proc.alive():  # SIGTERM: vLLM shuts its engines down and frees their shared memory
            proc.signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                assert proc.proc is not None
                proc.proc.wait(timeout=120)
        kill_group(proc.pid)


@pytest.fixture(scope="module")
def vllm_api_server(kit: types.SimpleNamespace, tiny_models: dict[str, Path],
                    tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """vLLM's own OpenAI-compatible server for the tiny verifier, on loopback; yields its /v1 URL."""
    port = kit.free_port()
    log_path = tmp_path_factory.mktemp("vllm-api") / "vllm.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny_models["verifier"]),
             "--host", kit.HOST, "--port", str(port), "--dtype", "float32", "--enforce-eager",
             "--gpu-memory-utilization", "0.1", "--max-model-len", "4096", "--enable-prefix-caching",
             "--limit-mm-per-prompt", '{"image": 2}',
             "--structured-outputs-config", '{"backend": "xgrammar", "disable_any_whitespace": true}'],
            env=kit.service_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    url = f"http://{kit.HOST}:{port}"

    def up() -> bool:
        if proc.poll() is not None:
            pytest.fail(f"the vLLM server exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
        try:
            return httpx.get(url + "/health", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    try:
        kit.wait_for(up, LOAD_S, "the vLLM OpenAI-compatible server", interval=0.5)
        yield url + "/v1"
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=120)
        kill_group(proc.pid)
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def transformers_p(kit: types.SimpleNamespace, tiny_verifier: Any) -> list[list[float]]:
    """The transformers engine's p for the test items: the reference every engine must agree with."""
    return tiny_verifier.verify(_items(_images(kit)))


# ---- vLLM in the worker, through dvreward serve ---------------------------------------------------
def test_vllm_verifier_agrees_with_transformers(vllm_serve: str, kit: types.SimpleNamespace,
                                                transformers_p: list[list[float]]) -> None:
    blobs = _images(kit)
    items = [{"images": [kit.b64(b)], "questions": QUESTIONS} for b in blobs]
    items.append({"images": [kit.b64(blobs[0]), kit.b64(blobs[1])], "questions": QUESTIONS[:1]})
    r = httpx.post(vllm_serve + "/v1/verify", json={"items": items}, timeout=600)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert all(res["error"] is None for res in results), results
    diff = _max_diff([res["p"] for res in results], transformers_p)
    print(f"max |p(vLLM) - p(transformers)| = {diff:.2e}")
    assert diff <= AGREE


def test_vllm_decomposer_and_verifier_score_a_prompt(vllm_serve: str, kit: types.SimpleNamespace) -> None:
    body = {"groups": [{"prompt": PROMPTS[0], "images": [kit.png_b64(1), kit.png_b64(2)]}]}
    r = httpx.post(vllm_serve + "/v1/score", json=body, timeout=600)
    assert r.status_code == 200, r.text
    group = r.json()["groups"][0]
    if group["questions"]:  # a random model's decomposition is valid or an explicit error, never partial
        assert all(isinstance(x, float) and 0 <= x <= 1 for x in group["rewards"])
        assert all(set(im["p_source"].values()) == {"logits"} for im in group["images"])
    else:
        assert group["rewards"] == [None, None]
        assert all(im["error"]["code"] == "decomposition_failed" for im in group["images"])


def test_vllm_binary_reads_the_greedy_answer(vllm_serve: str, kit: types.SimpleNamespace) -> None:
    from dvreward_protocol.answers import greedy_yes

    questions = [{"id": f"q{i}", "text": q, "tag": "Existence"} for i, q in enumerate(QUESTIONS)]
    body = {"groups": [{"prompt": "p", "questions": questions, "images": [kit.png_b64(3)]}], "answer": "binary"}
    r = httpx.post(vllm_serve + "/v1/score", json=body, timeout=600)
    assert r.status_code == 200, r.text
    (image,) = r.json()["groups"][0]["images"]
    assert set(image["answers"]) == {q["id"] for q in questions}
    assert image["sc"] == sum(greedy_yes(a) for a in image["answers"].values()) / len(questions)


# ---- vLLM decomposer in this process: both pipelines ------------------------------------------------
@pytest.fixture(scope="module")
def vllm_decomposer(tiny_models: dict[str, Path]) -> Iterator[Any]:
    from server.engines.vllm.common import VLLMOptions
    from server.engines.vllm.decomposer import VLLMDecomposer

    d = VLLMDecomposer(str(tiny_models["decomposer"]), max_retries=3, limits=SMALL, max_new_tokens=400,
                       options=VLLMOptions(dtype="float32", gpu_memory_utilization=0.1))
    yield d
    d.backend.close()


@pytest.mark.parametrize("pipeline", ["fast", "dsg"])
def test_vllm_decomposer_pipelines(vllm_decomposer: Any, pipeline: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vllm_decomposer, "pipeline", pipeline)
    for prompt, out in zip(PROMPTS, vllm_decomposer.decompose_each(PROMPTS), strict=True):
        if isinstance(out, EngineError):
            assert f"{pipeline} decomposition failed after 4 attempt(s)" in str(out)
            continue
        assert (out.prompt, out.pipeline, out.model) == (prompt, pipeline, vllm_decomposer.model_id)
        assert out.semantic and len(out.semantic) <= SMALL.max_semantic


# ---- the remote engines against vLLM's server --------------------------------------------------------
def test_remote_verifier_is_exact_with_logprob_token_ids(vllm_api_server: str, kit: types.SimpleNamespace,
                                                         tiny_models: dict[str, Path],
                                                         transformers_p: list[list[float]]) -> None:
    from server.engines.prompts import VERIFIER_SYSTEM_PROMPT
    from server.engines.remote.verifier import OpenAIVerifier

    v = OpenAIVerifier.connect(vllm_api_server, str(tiny_models["verifier"]), VERIFIER_SYSTEM_PROMPT)
    try:
        out = v.verify_each(_items(_images(kit)))
    finally:
        v.close()
    assert all(isinstance(o, ItemScores) and set(o.source) == {"logits"} for o in out), out
    diff = _max_diff([list(o.p) for o in out if isinstance(o, ItemScores)], transformers_p)
    print(f"max |p(remote vLLM) - p(transformers)| = {diff:.2e}")
    assert diff <= AGREE


def test_remote_verifier_without_exact_ids_reads_the_top_k(vllm_api_server: str, kit: types.SimpleNamespace,
                                                           tiny_models: dict[str, Path],
                                                           transformers_p: list[list[float]]) -> None:
    from server.engines.prompts import VERIFIER_SYSTEM_PROMPT
    from server.engines.remote.verifier import OpenAIVerifier

    v = OpenAIVerifier.connect(vllm_api_server, str(tiny_models["verifier"]), VERIFIER_SYSTEM_PROMPT, exact=False)
    try:
        out = v.verify_each(_items(_images(kit)))
    finally:
        v.close()
    assert v.ids is None and len(out) == len(transformers_p)
    for o in out:
        # a random model may rank neither answer in its top-20 and emit another token: that item is an
        # error saying so, never a made-up p; otherwise p is the top-k approximation, reported as such
        if isinstance(o, EngineError):
            assert "no yes/no answer: neither word is among the top-" in str(o)
            continue
        assert set(o.source) <= {"top_k", "text"}
        assert all(p in (0.0, 1.0) if source == "text" else 0.0 <= p <= 1.0
                   for p, source in zip(o.p, o.source, strict=True))


@pytest.mark.parametrize("pipeline", ["fast", "dsg"])
def test_remote_decomposer_pipelines(vllm_api_server: str, tiny_models: dict[str, Path], pipeline: str) -> None:
    from server.engines.remote.decomposer import OpenAIDecomposer

    d = OpenAIDecomposer(vllm_api_server, str(tiny_models["verifier"]), pipeline, max_retries=3, limits=SMALL,
                         max_new_tokens=400)
    try:
        out = d.decompose_each(PROMPTS)
    finally:
        d.backend.client.close()
    for prompt, dec in zip(PROMPTS, out, strict=True):
        if isinstance(dec, EngineError):
            assert f"{pipeline} decomposition failed after 4 attempt(s)" in str(dec)
            assert "request failed" not in str(dec) and "no output" not in str(dec), dec
            continue
        assert (dec.prompt, dec.pipeline) == (prompt, pipeline) and dec.semantic
