"""The clients against a real `dvreward serve` (tiny models): grouping, chunking, input types, errors, idempotency."""

from __future__ import annotations

import base64
import io
import math

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.tolerance import assert_advantages_close, assert_rewards_close
from trainer_client import (
    AsyncDVRewardClient,
    BadRequest,
    DVRewardClient,
    ImageFailed,
    ScoreResult,
    group_advantages,
)

pytestmark = pytest.mark.float_sensitive

SIZES = (5, 2, 4, 1)  # groups of different sizes, one bigger than the small chunk size used below


def _png_b64(a: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _groups(make_images) -> list[list[np.ndarray]]:
    flat = make_images(sum(SIZES), seed=3)
    out, k = [], 0
    for n in SIZES:
        out.append(flat[k:k + n])
        k += n
    return out


def test_grouping_and_order_match_direct_score(any_service_url, make_images, questions):
    groups = _groups(make_images)
    prompts = [f"prompt {i}" for i in range(len(groups))]
    body = {"groups": [{"prompt": p, "questions": questions, "images": [_png_b64(a) for a in g]}
                       for p, g in zip(prompts, groups, strict=True)]}
    direct = httpx.post(any_service_url + "/v1/score", json=body, timeout=60)
    assert direct.status_code == 200, direct.text
    want = direct.json()["groups"]

    with DVRewardClient(any_service_url, max_retries=0, image_format="png") as client:
        got = client.score(prompts, groups, questions=[questions] * len(groups), metadata=[{"g": i} for i in range(4)])

    assert isinstance(got, ScoreResult)
    assert [len(g) for g in got.rewards] == list(SIZES)
    assert_rewards_close(got.rewards, [g["rewards"] for g in want])
    assert_advantages_close(got.advantages, [g["advantages"] for g in want], got.rewards)
    assert [g.prompt for g in got.groups] == prompts
    assert [g.metadata for g in got.groups] == [{"g": i} for i in range(4)]
    assert [[q.id for q in qs] for qs in got.questions] == [[q["id"] for q in questions]] * 4
    assert [[im.index for im in g] for g in got.images] == [list(range(n)) for n in SIZES]
    assert all(set(im.p) == {"cube", "red", "shape"} for g in got.images for im in g)
    assert got.models.verifier and got.response.template_version and got.timings.total_ms > 0
    assert len(got.request_ids) == 1 and not got.replayed and not got.failures
    assert all(0.0 < r < 1.0 for r in got.flat_rewards())


def test_chunking_gives_the_same_results(service_url, make_images, questions):
    groups = _groups(make_images)
    prompts = [f"p{i}" for i in range(len(groups))]
    qs = [questions] * len(groups)
    with DVRewardClient(service_url) as whole, DVRewardClient(service_url, chunk_images=3, max_concurrency=3) as small:
        a = whole.score(prompts, groups, questions=qs)
        b = small.score(prompts, groups, questions=qs)
        c = whole.score(prompts, groups, questions=qs, advantages_std="group", clip=1.0)
        d = small.score(prompts, groups, questions=qs, advantages_std="group", clip=1.0)
    assert len(a.request_ids) == 1 and len(b.request_ids) > 2  # the 5-image group was split by images
    assert_rewards_close(a.rewards, b.rewards)
    assert_advantages_close(a.advantages, b.advantages, a.rewards)
    assert_rewards_close(a.sc, b.sc)
    assert_rewards_close(a.pq, b.pq)
    assert [[im.index for im in g] for g in b.images] == [list(range(n)) for n in SIZES]
    # the default (global) std is over the whole step, so it must be recomputed over all chunks, not per
    # request; the per-group option must survive chunking too
    assert_advantages_close(c.advantages, d.advantages, c.rewards, std="group")
    assert max(abs(x) for x in d.flat_advantages()) <= 1.0


def test_max_request_bytes_splits_requests(service_url, make_images, questions):
    groups = _groups(make_images)
    with DVRewardClient(service_url, image_format="png") as whole, \
            DVRewardClient(service_url, image_format="png", max_request_bytes=8000) as tiny:
        a = whole.score(["p"] * 4, groups, questions=[questions] * 4)
        b = tiny.score(["p"] * 4, groups, questions=[questions] * 4)
    assert len(b.request_ids) > 4
    assert_rewards_close(a.rewards, b.rewards)
    assert_advantages_close(a.advantages, b.advantages, a.rewards)
    # the split step's advantages are the reference formula over the whole step: the four groups share
    # prompt "p", so they are one GRPO group
    assert b.advantages == group_advantages(b.rewards, keys=["p"] * 4)
    assert a.advantages == group_advantages(a.rewards, keys=["p"] * 4)  # the server's too: the same arithmetic


def test_every_input_image_type(service_url, make_images, questions):
    import torch

    a = make_images(1, seed=7)[0]
    png = io.BytesIO()
    Image.fromarray(a).save(png, "PNG")
    chw = a.transpose(2, 0, 1).astype(np.float32) / 255.0
    groups = [
        [Image.fromarray(a)],                                  # PIL
        [a],                                                   # uint8 HWC numpy
        [chw],                                                 # float CHW numpy in [0, 1]
        torch.from_numpy(chw).unsqueeze(0),                    # NCHW float torch tensor as the whole group
        [torch.from_numpy(chw)],                               # CHW float torch tensor
        np.stack([a]),                                         # NHWC uint8 numpy batch
        [png.getvalue()],                                      # encoded bytes, sent as they are
    ]
    with DVRewardClient(service_url, image_format="png") as client:  # lossless: bytes and arrays match
        got = client.score(["a red cube"] * len(groups), groups, questions=[questions] * len(groups))
    rewards = [g[0] for g in got.rewards]
    assert_rewards_close([rewards], [[rewards[0]] * len(rewards)])  # same pixels, same reward


@pytest.mark.parametrize("fmt", ["jpeg", "webp"])
def test_lossy_formats_score(service_url, make_images, questions, fmt):
    with DVRewardClient(service_url, image_format=fmt, quality=90) as client:
        got = client.score(["x"], [make_images(3)], questions=[questions])
    assert all(0.0 < r < 1.0 for r in got.flat_rewards())


def test_on_error_nan_gives_nan_never_zero(service_url, make_images, questions, truncated_png):
    images = [make_images(1)[0], truncated_png, make_images(1, seed=2)[0]]
    with DVRewardClient(service_url, on_error="nan") as client:
        got = client.score(["a red cube"], [images], questions=[questions])
    r = got.rewards[0]
    assert math.isnan(r[1]) and r[1] != 0.0
    assert math.isfinite(r[0]) and math.isfinite(r[2])
    assert math.isnan(got.advantages[0][1]) and math.isnan(got.sc[0][1])
    assert got.response.groups[0].rewards[1] is None  # the wire keeps null
    (mine,) = group_advantages(got.rewards)  # the helper takes what on_error="nan" returns
    assert math.isnan(mine[1]) and mine[0] == pytest.approx(-mine[2])
    (f,) = got.failures
    assert (f.group, f.index, f.code) == (0, 1, "bad_image") and "decoded" in f.message
    assert got.images[0][1].error is not None and got.images[0][1].error.code == "bad_image"


def test_without_details_a_failed_image_still_says_why(service_url, make_images, questions, truncated_png):
    """`details: false` dropped the per-image list and with it every reason: failures read "failed". `errors`
    carries each image's code and reason whatever `details` says (here over a group split in two requests)."""
    images = [make_images(1)[0], make_images(1, seed=2)[0], truncated_png]
    wire_images = [_png_b64(images[0]), _png_b64(images[1]), base64.b64encode(truncated_png).decode()]
    body = {"groups": [{"questions": questions, "images": wire_images}], "details": False}
    wire = httpx.post(service_url + "/v1/score", json=body, timeout=60).json()["groups"][0]
    assert wire["images"] is None and wire["errors"][:2] == [None, None]
    assert wire["errors"][2]["code"] == "bad_image" and "decoded" in wire["errors"][2]["message"]
    with DVRewardClient(service_url, on_error="nan", chunk_images=2) as client:
        got = client.score(["a red cube"], [images], questions=[questions], details=False)
    (f,) = got.failures
    assert (f.group, f.index, f.code) == (0, 2, "bad_image") and "decoded" in f.message
    assert got.images == [[]] and len(got.request_ids) == 2


def test_on_error_raise_lists_failures(service_url, make_images, questions, truncated_png):
    with DVRewardClient(service_url) as client:
        with pytest.raises(ImageFailed) as info:
            client.score(["a", "b"], [make_images(2), [truncated_png, make_images(1)[0]]],
                         questions=[questions] * 2)
        # a per-call override beats the client default
        ok = client.score(["b"], [[truncated_png, make_images(1)[0]]], questions=[questions], on_error="nan")
    err = info.value
    assert [(f.group, f.index, f.code) for f in err.failures] == [(1, 0, "bad_image")]
    assert err.request_id and "group 1 image 0" in str(err)
    assert math.isnan(err.result.rewards[1][0]) and math.isfinite(err.result.rewards[0][0])
    assert math.isnan(ok.rewards[0][0])


def test_request_level_errors_are_typed(service_url, make_images, questions):
    cycle = [{**questions[0], "depends_on": ["red"]}, *questions[1:]]  # cube -> red -> cube
    with DVRewardClient(service_url) as client:
        with pytest.raises(ValueError, match=r"questions\[0\]: dependency cycle"):  # found before sending
            client.score(["x"], [make_images(1)], questions=[cycle])
        with pytest.raises(BadRequest) as info:
            client.score(["x"], [make_images(1)], questions=[questions], tag_weights={"Smell": 1.0})
        # an image that cannot be read is not the request's fault: it fails alone
        alone = client.score(["x"], [[b"not an image at all", make_images(1)[0]]], questions=[questions],
                             on_error="nan")
    assert info.value.status == 422 and info.value.code == "bad_request" and info.value.request_id
    assert "tag_weights['Smell']" in info.value.message
    assert [(f.index, f.code) for f in alone.failures] == [(0, "bad_image")] and math.isfinite(alone.rewards[0][1])


def test_idempotent_retry_after_lost_response(any_service_url, make_images, questions, scored_count):
    """The first attempt is computed, its response 'lost'; the retry must be a replay, not a second scoring."""

    class LoseFirstResponse(httpx.BaseTransport):
        def __init__(self) -> None:
            self.inner = httpx.HTTPTransport()
            self.log: list[tuple[str | None, str | None]] = []

        def handle_request(self, request: httpx.Request) -> httpx.Response:
            response = self.inner.handle_request(request)
            if request.url.path != "/v1/score":
                return response
            response.read()
            self.log.append((request.headers.get("Idempotency-Key"), response.headers.get("Idempotent-Replayed")))
            if len(self.log) == 1:
                response.close()
                raise httpx.ReadError("connection reset before the response arrived", request=request)
            return response

        def close(self) -> None:
            self.inner.close()

    images = make_images(6, seed=11)
    transport = LoseFirstResponse()
    before = scored_count(any_service_url)
    with DVRewardClient(any_service_url, transport=transport, backoff_base=0.01) as client:
        got = client.score(["p", "q"], [images[:4], images[4:]], questions=[questions] * 2)
    after = scored_count(any_service_url)

    assert len(transport.log) == 2
    (key1, replay1), (key2, replay2) = transport.log
    assert key1 and key1 == key2  # one logical request, one key across retries
    assert replay1 is None and replay2 == "true"
    assert got.replayed
    assert after - before == 6  # scored once, not twice
    with DVRewardClient(any_service_url) as client:
        again = client.score(["p", "q"], [images[:4], images[4:]], questions=[questions] * 2)
    assert not again.replayed
    assert_rewards_close(again.rewards, got.rewards)


def test_verify_decompose_health_models(service_url, make_images, truncated_png):
    with DVRewardClient(service_url, on_error="nan", chunk_images=2) as client:
        assert client.health() == {"status": "ok"}
        assert client.ready()["status"] == "ready"
        assert client.wait_ready(timeout=5)["workers"] >= 1
        workers = client.models().workers
        assert len(workers) == 1 and workers[0].verifier
        imgs = make_images(3)
        v = client.verify([imgs[0], [imgs[1], imgs[2]], truncated_png], ["Is there a cube?", "Is it red?"])
        assert len(v.request_ids) == 2  # 3 items in chunks of 2
        assert [len(p) for p in v.p] == [2, 2, 2]
        assert all(0 < x < 1 for x in v.p[0] + v.p[1]) and all(math.isnan(x) for x in v.p[2])
        assert [(f.index, f.code) for f in v.failures] == [(2, "bad_image")]
        d = client.decompose(["a red cube on a table"])
        assert len(d.decompositions) == 1 and d.decompositions[0].questions
        got = client.score(["a red cube on a table"], [imgs])  # decomposed server-side (cached)
        assert [q.id for q in got.questions[0]] == [q.id for q in d.decompositions[0].questions]
        assert len(got.failed_questions()[0]) == 3


async def test_async_client_matches_sync(service_url, make_images, questions):
    groups = _groups(make_images)
    with DVRewardClient(service_url) as client:
        want = client.score(["a"] * 4, groups, questions=[questions] * 4)
    async with AsyncDVRewardClient(service_url, chunk_images=3) as client:
        got = await client.score(["a"] * 4, groups, questions=[questions] * 4)
        assert (await client.health()) == {"status": "ok"}
        assert (await client.models()).workers
        v = await client.verify(groups[0][:2], [["Is there a cube?"], ["Is it red?", "Is it big?"]])
    assert len(got.request_ids) > 1
    assert_rewards_close(got.rewards, want.rewards)
    assert_advantages_close(got.advantages, want.advantages, want.rewards)
    assert [len(p) for p in v.p] == [1, 2]


def test_wrong_arguments_fail_before_sending(service_url, make_images, questions):
    with DVRewardClient(service_url) as client:
        with pytest.raises(ValueError, match="2 entries"):
            client.score(["a"], [make_images(1), make_images(1)])
        with pytest.raises(TypeError, match="single"):
            client.score(["a"], [make_images(1)[0]], questions=[questions])
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            client.score(["a"], [[np.full((3, 8, 8), -0.5, np.float32)]], questions=[questions])
        with pytest.raises(ValueError, match="prompt or explicit questions"):
            client.score([None], [make_images(1)])


def test_a_mixed_step_split_over_many_requests_merges(redis_service_url, make_images, questions):
    """32 groups x 14 images, half with the dataset's questions and half decomposed, sent as >= 7 requests:
    a request of explicit groups reports no decomposer, one of decomposed groups reports it; both are one step."""
    n_groups, size = 32, 14
    flat = make_images(n_groups * size, seed=40, size=24)
    images = [flat[g * size:(g + 1) * size] for g in range(n_groups)]
    prompts = [f"a red cube number {g}" for g in range(n_groups)]
    qs = [questions if g < n_groups // 2 else None for g in range(n_groups)]  # whole requests of each kind
    with DVRewardClient(redis_service_url, chunk_images=64) as client:
        got = client.score(prompts, images, questions=qs)
    assert len(got.request_ids) >= 7
    assert all(isinstance(r, float) and math.isfinite(r) for r in got.flat_rewards())
    assert got.models.decomposer is not None and got.models.pipeline == "fast"
    assert got.advantages == group_advantages(got.rewards, keys=prompts)
    assert [[q.id for q in g] for g in got.questions[:2]] == [[q["id"] for q in questions]] * 2


def test_editing_groups_send_their_source(service_url, make_images, questions):
    """A source per group is shown before its images; the same instruction on two sources is two GRPO groups,
    also when the client splits the step and computes the advantages itself."""
    groups, (src_a, src_b) = _groups(make_images)[:2], make_images(2, seed=77)
    direct = httpx.post(service_url + "/v1/score", timeout=60, json={"groups": [
        {"prompt": "make it red", "questions": questions, "source": _png_b64(src),
         "images": [_png_b64(a) for a in g]} for src, g in ((src_a, groups[0]), (src_b, groups[1]))]})
    assert direct.status_code == 200, direct.text
    want = [g["rewards"] for g in direct.json()["groups"]]
    with DVRewardClient(service_url, image_format="png") as whole, \
            DVRewardClient(service_url, image_format="png", chunk_images=2) as split:
        a = whole.score(["make it red"] * 2, groups, questions=[questions] * 2, sources=[src_a, src_b])
        b = split.score(["make it red"] * 2, groups, questions=[questions] * 2, sources=[src_a, src_b])
        plain = whole.score(["make it red"] * 2, groups, questions=[questions] * 2)
    assert_rewards_close(a.rewards, want)
    assert_rewards_close(b.rewards, want)
    assert len(b.request_ids) > 2 and b.advantages == group_advantages(b.rewards, keys=b.keys)
    for g in a.advantages + b.advantages:
        assert abs(sum(g)) < 1e-9  # each group is its own GRPO group, though the prompts are equal
    assert plain.rewards != a.rewards, "the sources change what the verifier sees"
