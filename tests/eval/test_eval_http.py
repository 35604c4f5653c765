"""`dvreward eval --server`: against a real `dvreward serve`, and the retry policy on a mock transport."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from PIL import Image

from server.cli import main
from server.eval.importers import import_dsg_csv, write_jsonl
from server.eval.run import EvalOptions, run_eval
from server.eval.scoring import (
    MAX_IMAGE_PIXELS,
    HTTPBackend,
    ImageLoadError,
    ScoreInput,
    ServiceUnavailableError,
    load_image_file,
)
from tests.service_stack import service_env
from tests.tolerance import P_TOL, assert_rewards_close

pytestmark = pytest.mark.float_sensitive

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def two_items_two_images(tmp_path: Path, size: tuple[int, int]) -> tuple[list, Path, Path]:
    """The first two DSG items as a questions file, and two plain images of each named by convention."""
    records, _ = import_dsg_csv(FIXTURES / "dsg_tifa160_dev.csv")
    questions = tmp_path / "q.jsonl"
    write_jsonl(records[:2], questions)
    images = tmp_path / "images"
    images.mkdir()
    for i, r in enumerate(records[:2]):
        for k in range(2):
            Image.new("RGB", size, (60 * i + 20 * k, 90, 160)).save(images / f"{r.item_id}_{k}.png")
    return records, questions, images


def test_eval_through_a_running_service_matches_in_process(tmp_path, tiny_models, services):
    records, questions, images = two_items_two_images(tmp_path, (80, 64))
    Image.new("RGB", (64, 64), (10, 200, 10)).save(images / f"{records[0].item_id}_2.bmp")  # re-encoded as PNG
    (images / f"{records[1].item_id}_3.jpg").write_bytes(b"\xff\xd8\xff garbage")  # corrupt

    key = "test-key-123"
    serve = services("serve", "serve", service_env(), "--verifier", str(tiny_models["verifier"]), "--decomposer", "",
                     "--api-keys", key, http=True)
    serve.wait_http("/readyz")
    url = serve.url
    assert main(["eval", "--images", str(images), "--questions", str(questions), "--server", url,
                 "--api-key", "wrong", "-o", str(tmp_path / "denied"), "--no-progress"]) == 1
    assert main(["eval", "--images", str(images), "--questions", str(questions), "--server", url,
                 "--api-key", key, "-o", str(tmp_path / "http"), "--batch-size", "2", "--no-progress",
                 "--gating", "hard"]) == 0
    serve.stop()
    denied = json.loads((tmp_path / "denied" / "summary.json").read_text())
    assert denied["complete"] is False and denied["counts"]["pending"] == 6  # stopped, nothing marked failed

    assert main(["eval", "--images", str(images), "--questions", str(questions), "--verifier",
                 str(tiny_models["verifier"]), "-o", str(tmp_path / "local"), "--no-progress", "--gating", "hard"]) == 0
    http = [json.loads(x) for x in (tmp_path / "http" / "results.jsonl").read_text().splitlines()]
    local = [json.loads(x) for x in (tmp_path / "local" / "results.jsonl").read_text().splitlines()]
    assert [r["image"] for r in http] == [r["image"] for r in local] and len(http) == 6
    for h, lo in zip(http, local, strict=True):
        if lo["error"] is not None:
            assert h["error"] is not None and h["reward"] is None
            continue
        assert h["error"] is None and h["model"].startswith("verifier@sha256:")
        assert_rewards_close([[h["reward"]]], [[lo["reward"]]])
        for qh, ql in zip(h["questions"], lo["questions"], strict=True):
            assert qh["p"] == pytest.approx(ql["p"], abs=P_TOL)
    summary = json.loads((tmp_path / "http" / "summary.json").read_text())
    assert summary["counts"]["scored"] == 5 and summary["counts"]["errors"] == 1


# ---- retry and isolation policy (mock transport) -----------------------------------------------


def _inputs(tmp_path: Path, n: int) -> list[ScoreInput]:
    out = []
    for i in range(n):
        path = tmp_path / f"{i}.png"
        Image.new("RGB", (32, 32), (i * 40, 0, 0)).save(path)
        out.append(ScoreInput(path, ("Is there a cat?", "Is it red?")))
    return out


def _service(handler: Callable[[httpx.Request], httpx.Response]) -> httpx.MockTransport:
    """A scripted service without the multipart form: it answers the client's question about it (GET /v1/models)
    as such a server does, and `handler` everything else."""
    def handle(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"workers": []}) if request.url.path == "/v1/models" else handler(request)

    return httpx.MockTransport(handle)


def _ok(request: httpx.Request) -> httpx.Response:
    items = json.loads(request.content)["items"]
    return httpx.Response(200, json={
        "request_id": "r", "model": "m", "template_version": "t", "verifier_system_prompt": "s",
        "results": [{"p": [0.25] * len(it["questions"]), "error": None} for it in items],
        "timings": {"verify_ms": 1.0, "total_ms": 1.0},
    })


def test_retries_429_and_503_honouring_retry_after_with_one_idempotency_key(tmp_path):
    seen: list[httpx.Request] = []
    answers = [httpx.Response(429, headers={"Retry-After": "3"}, json={"error": {"code": "rate_limited",
                                                                               "message": "queue full"}}),
               httpx.Response(503, headers={"Retry-After": "1.5"}, json={"error": {"message": "no worker"}})]

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return answers.pop(0) if answers else _ok(request)

    sleeps: list[float] = []
    backend = HTTPBackend("http://svc", "k", transport=_service(handler))
    backend.client._sleep = sleeps.append  # record instead of waiting
    outcomes = backend.score(_inputs(tmp_path, 2))
    assert [o.p for o in outcomes] == [[0.25, 0.25], [0.25, 0.25]] and backend.model_id == "m"
    assert sleeps == [3.0, 1.5]
    assert len({r.headers["Idempotency-Key"] for r in seen}) == 1  # a retry never double-scores
    assert all(r.headers["Authorization"] == "Bearer k" for r in seen)


def test_gives_up_after_retries_and_isolates_refused_images(tmp_path):
    sleeps: list[float] = []
    busy = HTTPBackend("http://svc", transport=_service(lambda r: httpx.Response(503)), max_retries=2)
    busy.client._sleep = sleeps.append
    with pytest.raises(ServiceUnavailableError, match=r"after 3 attempts: .*HTTP 503"):
        busy.score(_inputs(tmp_path, 1))
    assert len(sleeps) == 2

    inputs = _inputs(tmp_path, 4)
    bad_b64 = base64.b64encode(inputs[2].path.read_bytes()).decode()

    def handler(request: httpx.Request) -> httpx.Response:
        items = json.loads(request.content)["items"]
        if any(it["images"][0] == bad_b64 for it in items):
            return httpx.Response(422, json={"error": {"code": "bad_image", "message": "items[0].images[0]: nope"}})
        return _ok(request)

    backend = HTTPBackend("http://svc", transport=_service(handler), max_questions=1)
    outcomes = backend.score(inputs)
    assert [o.error is None for o in outcomes] == [True, True, False, True]
    assert "HTTP 422" in outcomes[2].error and "nope" in outcomes[2].error and outcomes[2].p is None
    assert outcomes[0].p == [0.25, 0.25]  # questions split across items (max_questions=1) and joined back


def test_transport_errors_are_retried_then_stop_the_run(tmp_path):
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.headers["Idempotency-Key"])
        if len(calls) < 3:
            raise httpx.ConnectError("connection refused", request=request)
        return _ok(request)

    backend = HTTPBackend("http://svc", transport=_service(handler), max_retries=2)
    backend.client._sleep = lambda s: None
    assert [o.p for o in backend.score(_inputs(tmp_path, 1))] == [[0.25, 0.25]]
    assert len(calls) == 3 and len(set(calls)) == 1

    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    backend = HTTPBackend("http://svc", transport=_service(down), max_retries=1)
    backend.client._sleep = lambda s: None
    with pytest.raises(ServiceUnavailableError, match="after 2 attempts: transport"):
        backend.score(_inputs(tmp_path, 1))


@pytest.mark.parametrize(("status", "code", "sent"), [
    (500, "internal", 1), (502, "verification_failed", 1), (504, "timeout", 1), (503, "unavailable", 3),
    (401, "unauthorized", 1), (404, "not_found", 1),
])
def test_service_failures_stop_the_run_and_are_never_split(tmp_path, status, code, sent):
    seen: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(len(json.loads(request.content)["items"]))
        return httpx.Response(status, json={"error": {"code": code, "message": "boom"}})

    backend = HTTPBackend("http://svc", transport=_service(handler), max_retries=2)
    backend.client._sleep = lambda s: None
    with pytest.raises(ServiceUnavailableError, match=f"{code}: boom") as info:
        backend.score(_inputs(tmp_path, 4))
    assert seen == [4] * sent  # retried whole (503) or not at all; never bisected into per-image errors
    if status == 401:
        assert "--api-key" in str(info.value)


def test_payload_too_large_isolates_the_image_and_item_errors_stay_per_image(tmp_path):
    inputs = _inputs(tmp_path, 3)
    big = inputs[1].path.read_bytes()

    def handler(request: httpx.Request) -> httpx.Response:
        items = json.loads(request.content)["items"]
        if any(base64.b64decode(it["images"][0]) == big for it in items):
            return httpx.Response(413, json={"error": {"code": "too_large", "message": "image too large"}})
        body = json.loads(_ok(request).content)
        body["results"][-1] = {"p": None, "error": {"code": "bad_image", "message": "undecodable"}}
        return httpx.Response(200, json=body)

    backend = HTTPBackend("http://svc", transport=_service(handler))
    outcomes = backend.score(inputs)
    assert outcomes[1].p is None and "HTTP 413" in outcomes[1].error and "image too large" in outcomes[1].error
    assert outcomes[0].error == "bad_image: undecodable" and outcomes[2].error == "bad_image: undecodable"


def test_a_5xx_mid_run_exits_1_without_error_lines_and_resumes(tmp_path):
    records, questions, images = two_items_two_images(tmp_path, (32, 32))
    state = {"n": 0, "fail": True}

    def handler(request: httpx.Request) -> httpx.Response:
        state["n"] += 1
        if state["fail"] and state["n"] > 1:
            return httpx.Response(502, json={"error": {"code": "verification_failed", "message": "worker died"}})
        return _ok(request)

    opts = EvalOptions(images=images, questions=questions, out=tmp_path / "out", server="http://svc", batch_size=2,
                       progress=False)
    first = run_eval(opts, HTTPBackend("http://svc", transport=_service(handler)), err=io.StringIO())
    assert first.exit_code == 1
    lines = [json.loads(x) for x in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all(r["error"] is None for r in lines)  # the failed batch is pending, not failed
    assert first.summary["counts"]["pending"] == 2 and first.summary["counts"]["errors"] == 0

    state["fail"] = False
    again = run_eval(opts, HTTPBackend("http://svc", transport=_service(handler)), err=io.StringIO())
    assert again.exit_code == 0 and again.summary["complete"] is True
    assert again.summary["counts"]["scored"] == 4 and again.summary["counts"]["errors"] == 0


def test_image_files_share_the_service_image_policy(tmp_path):
    png, bmp, gif = tmp_path / "a.png", tmp_path / "b.bmp", tmp_path / "c.gif"
    Image.new("RGB", (40, 30), (200, 10, 10)).save(png)
    Image.new("RGB", (40, 30), (10, 200, 10)).save(bmp)
    Image.new("P", (40, 30)).save(gif)
    image, data, fmt = load_image_file(png)
    assert (fmt, image.size, image.mode, data) == ("PNG", (40, 30), "RGB", png.read_bytes())
    for path, want in ((bmp, "BMP"), (gif, "GIF")):
        image, _, fmt = load_image_file(path)
        assert (fmt, image.size, image.mode) == (want, (40, 30), "RGB")
    for path in (png, bmp, gif):  # one pixel limit (the service's) for every format, checked on the header
        with pytest.raises(ImageLoadError, match="40x30 = 1200 pixels, the limit is 1000"):
            load_image_file(path, max_pixels=1000)
    assert MAX_IMAGE_PIXELS == 4096 * 4096  # the service's default --max-image-pixels

    truncated = tmp_path / "t.png"
    truncated.write_bytes(png.read_bytes()[:60])
    with pytest.raises(ImageLoadError):
        load_image_file(truncated)

    sent: list[bytes] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.extend(base64.b64decode(it["images"][0]) for it in json.loads(request.content)["items"])
        return _ok(request)

    backend = HTTPBackend("http://svc", transport=_service(handler))
    outcomes = backend.score([ScoreInput(p, ("Is it red?",)) for p in (png, bmp, truncated)])
    assert [o.error is None for o in outcomes] == [True, True, False]
    assert sent[0] == png.read_bytes() and sent[1].startswith(b"\x89PNG")  # BMP re-encoded as PNG


def test_editing_items_show_their_source_in_process_and_through_the_service(tmp_path, tiny_models, services):
    records, questions, images = two_items_two_images(tmp_path, (80, 64))
    Image.new("RGB", (72, 56), (200, 120, 40)).save(images / "before.png")
    edited = sorted(p.name for p in images.glob("*_*.png"))
    mapping = images / "edits.jsonl"
    mapping.write_text("".join(json.dumps({"image": name, "item_id": name.rsplit("_", 1)[0], "source": "before.png"})
                               + "\n" for name in edited))
    serve = services("serve", "serve", service_env(), "--verifier", str(tiny_models["verifier"]), "--decomposer", "",
                     http=True)
    serve.wait_http("/readyz")
    common = ["eval", "--questions", str(questions), "--no-progress"]
    assert main([*common, "--images", str(mapping), "--server", serve.url, "-o", str(tmp_path / "http")]) == 0
    assert main([*common, "--images", str(mapping), "--verifier", str(tiny_models["verifier"]),
                 "-o", str(tmp_path / "local")]) == 0
    assert main([*common, "--images", str(images), "--verifier", str(tiny_models["verifier"]),
                 "-o", str(tmp_path / "plain")]) == 0
    http, local, plain = ([json.loads(x) for x in (tmp_path / d / "results.jsonl").read_text().splitlines()]
                          for d in ("http", "local", "plain"))
    assert [r["image"] for r in http] == [r["image"] for r in local] and sorted(r["image"] for r in http) == edited
    assert all(r["source_image"] == str((images / "before.png").resolve()) and r["error"] is None for r in http)
    for h, lo in zip(http, local, strict=True):
        assert [q["p"] for q in h["questions"]] == pytest.approx([q["p"] for q in lo["questions"]], abs=P_TOL)
    by_image = {r["image"]: r for r in plain}
    assert all([q["p"] for q in r["questions"]] != [q["p"] for q in by_image[r["image"]]["questions"]]
               for r in local), "the source is shown to the verifier"


def test_a_server_url_without_a_scheme_is_one_line_and_exit_2(tmp_path, capsys):
    """`--server localhost:8000` was retried until the run gave up; it can never work, so it is refused at once."""
    _, questions, images = two_items_two_images(tmp_path, (32, 32))
    code = main(["eval", "--images", str(images), "--questions", str(questions), "-o", str(tmp_path / "out"),
                 "--server", "localhost:8000", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "did you mean 'http://localhost:8000'" in err[0]
