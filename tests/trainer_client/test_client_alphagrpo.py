"""The AlphaGRPO reference trainer's reward call against a real service over Redis: its shapes, its tensor
conversion and advantages, failed images that neither crash the step nor train as 0, and its thread pool."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from server.engines.base import EngineError
from tests.tolerance import SUM_ORDER, advantage_tol, assert_rewards_close
from trainer_client import DVRewardClient, make_alphagrpo_reward_fn, make_alphagrpo_score_fn, make_trl_reward_funcs

pytestmark = pytest.mark.float_sensitive

REFERENCE_META = {  # the AlphaGRPO data format: questions as strings or objects, tags optional
    "semantic_questions": ["Is there a cube?", {"question": "Is the cube red?", "tag": "Attribute"}],
    "quality_questions": [{"question": "Is the cube well-formed?", "tag": "Geometry"}, "Is it sharp?"],
}
META_KEYS = {"semantic_score", "semantic_scores", "quality_score", "quality_scores", "overall_score", "p", "failed",
             "p_source", "request_id", "error", "neutral"}


@pytest.fixture
def client(redis_service_url):
    with DVRewardClient(redis_service_url) as c:
        yield c


def _pil(images) -> list:
    return [Image.fromarray(a) for a in images]  # the reference trainer hands its reward function PIL images


def reference_advantages(prompts, rewards) -> np.ndarray:
    """The reference trainer's stat tracker with its default global std: per-prompt mean, std of the whole
    batch + 1e-4 (float64 numpy, as it computes them)."""
    prompts, rewards = np.array(prompts), np.array(rewards, dtype=np.float64)
    out = np.empty_like(rewards)
    std = np.std(rewards) + 1e-4
    for p in np.unique(prompts):
        out[prompts == p] = (rewards[prompts == p] - np.mean(rewards[prompts == p])) / std
    return out


def test_the_trainer_level_call_and_its_tensors(client, make_images):
    import torch

    reward_fn = make_alphagrpo_reward_fn(client, weight=0.7)
    prompts = ["a red cube"] * 3 + ["a blue ball"] * 3
    details, metas = reward_fn({"images": _pil(make_images(6, seed=31)), "prompts": prompts,
                                "metadata": [REFERENCE_META] * 6})
    assert set(details) == {"dvreward", "dvreward_sc", "dvreward_pq", "avg"}
    tensors = {k: torch.as_tensor(v).float() for k, v in details.items()}  # the trainer's own conversion
    assert all(t.shape == (6,) and torch.isfinite(t).all() for t in tensors.values())
    assert details["avg"] == [0.7 * r for r in details["dvreward"]]
    assert set(metas) == META_KEYS and all(len(v) == 6 for v in metas.values())
    assert metas["overall_score"] == details["dvreward"] and metas["semantic_score"] == details["dvreward_sc"]
    assert all(len(s) == 2 for s in metas["semantic_scores"]) and all(len(q) == 2 for q in metas["quality_scores"])
    assert all(set(p) == {"s1", "s2", "q1", "q2"} for p in metas["p"]) and metas["error"] == [None] * 6
    assert all(set(src.values()) == {"logits"} for src in metas["p_source"]) and all(metas["request_id"])
    for sem, qual, sc, pq in zip(metas["semantic_scores"], metas["quality_scores"], metas["semantic_score"],
                                 metas["quality_score"], strict=True):
        assert sc == pytest.approx(sum(sem) / 2, abs=SUM_ORDER) and pq == pytest.approx(sum(qual) / 2, abs=SUM_ORDER)
    assert np.isfinite(reference_advantages(prompts, details["avg"])).all()


def test_a_mixed_dataset_scores_every_sample(client, make_images):
    # half the samples carry the dataset's questions, half are decomposed; two requests of each kind
    score = make_alphagrpo_score_fn(client)
    prompts = [f"a red cube {g}" for g in range(4) for _ in range(3)]
    metadata = [REFERENCE_META if g % 2 else {"id": g} for g in range(4) for _ in range(3)]
    client.chunk_images = 3
    scores, metas = score(_pil(make_images(12, seed=32)), prompts, metadata)
    assert all(isinstance(s, float) and 0 < s < 1 for s in scores)
    assert len({m["request_id"] for m in metas}) == 4
    assert all(set(m["p"]) == {"s1", "s2", "q1", "q2"} for i, m in enumerate(metas) if (i // 3) % 2)


def test_a_failed_image_neither_kills_the_step_nor_trains_as_zero(client, make_images, truncated_png):
    import torch

    reward_fn = make_alphagrpo_reward_fn(client)
    images = _pil(make_images(9, seed=33))
    images[1] = truncated_png                      # fails to decode in the worker: one image of group 0
    images[6:9] = [truncated_png] * 3              # every image of group 2
    prompts = ["a red cube"] * 3 + ["a blue ball"] * 3 + ["a green cone"] * 3
    details, metas = reward_fn({"images": images, "prompts": prompts, "metadata": [REFERENCE_META] * 9})
    avg = torch.as_tensor(details["avg"]).float()  # no None, no NaN
    assert torch.isfinite(avg).all()
    advantages = reference_advantages(prompts, details["avg"])
    assert np.isfinite(advantages).all()
    failed = [1, 6, 7, 8]
    for i in failed:  # exactly their group's mean: no gradient, up to the float order of the trainer's own mean
        assert abs(advantages[i]) <= advantage_tol([details["avg"]], 0.0, reward_noise=SUM_ORDER), advantages[i]
        assert metas["neutral"][i] and metas["error"][i]["code"] == "bad_image" and metas["error"][i]["message"]
    assert details["dvreward"][1] == (details["dvreward"][0] + details["dvreward"][2]) / 2 != 0.0
    assert len(set(details["dvreward"][6:9])) == 1, "a group with no scored image gets one constant"
    assert not any(metas["neutral"][i] for i in range(9) if i not in failed)
    assert any(abs(a) > 1e-3 for a in advantages[:6]), "the scored images still train"
    scores, _ = make_alphagrpo_score_fn(client, on_error="none")(images, prompts, [REFERENCE_META] * 9)
    assert [i for i, s in enumerate(scores) if s is None] == failed


def test_the_trainers_thread_pool_can_share_one_client(client, make_images):
    reward_fn = make_alphagrpo_reward_fn(client)
    batches = [{"images": _pil(make_images(4, seed=40 + b)), "prompts": [f"prompt {b}"] * 4,
                "metadata": [REFERENCE_META] * 4} for b in range(8)]
    alone = [reward_fn(b)[0]["dvreward"] for b in batches]
    with ThreadPoolExecutor(8) as pool:  # as the reference trainer submits its reward function
        together = [f.result()[0]["dvreward"] for f in [pool.submit(reward_fn, b) for b in batches]]
    assert_rewards_close(together, alone)


def test_editing_input_images_are_each_samples_source(client, make_images):
    score = make_alphagrpo_score_fn(client)
    edited, (src_a, src_b) = _pil(make_images(4, seed=50)), _pil(make_images(2, seed=51))
    scores, metas = score(edited, ["make it red"] * 4, [REFERENCE_META] * 4, input_images=[src_a, src_a, src_b, src_b])
    plain, _ = score(edited, ["make it red"] * 4, [REFERENCE_META] * 4)
    assert scores != plain, "the verifier sees the input image"
    want = client.score(["make it red"] * 2, [edited[:2], edited[2:]], questions=[metas_questions()] * 2,
                        sources=[src_a, src_b])
    assert_rewards_close([scores], [want.flat_rewards()])


def metas_questions() -> list[dict]:
    from dvreward_protocol.alphagrpo import reference_questions

    return [q.model_dump() for q in reference_questions(REFERENCE_META)[0]]


def test_trl_components_are_one_scoring_call(client, make_images, scored_count, redis_service_url):
    funcs = make_trl_reward_funcs(client)
    assert [f.__name__ for f in funcs] == ["dvreward", "dvreward_sc", "dvreward_pq"]
    prompts, images = ["a red cube"] * 4, make_images(4, seed=60)
    before = scored_count(redis_service_url)
    columns = {"semantic_questions": [REFERENCE_META["semantic_questions"]] * 4,
               "quality_questions": [REFERENCE_META["quality_questions"]] * 4}
    reward, sc, pq = (f(prompts, [""] * 4, images=images, **columns) for f in funcs)  # as TRL calls them
    assert scored_count(redis_service_url) - before == 4, "TRL calls each function: the step is scored once"
    for r, s, q in zip(reward, sc, pq, strict=True):
        assert r == pytest.approx(math.sqrt(s * q), abs=SUM_ORDER)


class FailsDark:
    """The real verifier, failing every item whose image is dark: an engine that cannot score some images."""

    def __init__(self, inner) -> None:
        self.inner, self.model_id, self.system_prompt = inner, inner.model_id, inner.system_prompt

    def verify_each(self, items, greedy=False):
        out = self.inner.verify_each(items, greedy=greedy)
        return [EngineError("the engine cannot score this image") if max(it.images[-1].convert("L").getextrema()) < 40
                else o for it, o in zip(items, out, strict=True)]


def test_images_the_verifier_fails_train_as_nothing(tiny_models, redis_url, make_images, monkeypatch, caplog):
    import torch

    from server.runtime import build_app, load_verifier
    from server.settings import Settings
    from tests.service_stack import drop_service_settings, serve_in_thread

    drop_service_settings(monkeypatch)
    settings = Settings(redis_url=redis_url, verifier=str(tiny_models["verifier"]), decomposer="")
    engine = FailsDark(load_verifier(settings))
    images = _pil(make_images(6, seed=34))
    images[2] = Image.new("RGB", (40, 40), "black")
    prompts = ["a red cube"] * 3 + ["a blue ball"] * 3
    with (serve_in_thread(build_app(settings, (engine, None))) as url, DVRewardClient(url) as client,
          caplog.at_level("WARNING", logger="trainer_client")):
        details, metas = make_alphagrpo_reward_fn(client)({"images": images, "prompts": prompts,
                                                           "metadata": [REFERENCE_META] * 6})
    said = [r.getMessage() for r in caplog.records if r.name == "trainer_client"]
    assert len(said) == 1 and "1 of 6 samples could not be scored (first: sample 2, verification_failed" in said[0]
    assert torch.isfinite(torch.as_tensor(details["avg"]).float()).all()
    advantages = reference_advantages(prompts, details["avg"])
    assert abs(advantages[2]) <= advantage_tol([details["avg"]], 0.0, reward_noise=SUM_ORDER)
    assert metas["error"][2]["code"] == "verification_failed" and metas["neutral"][2]
    assert [i for i, e in enumerate(metas["error"]) if e] == [2]
