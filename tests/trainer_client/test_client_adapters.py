"""TRL- and Flow-GRPO-style reward functions against a real service: signatures, shapes, grouping, failures."""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest

from tests.tolerance import assert_rewards_close
from trainer_client import DVRewardClient, make_flow_grpo_reward_fn, make_trl_reward_func
from trainer_client.adapters import group_indices

pytestmark = pytest.mark.float_sensitive


@pytest.fixture
def client(redis_service_url):
    with DVRewardClient(redis_service_url) as c:
        yield c


def test_group_indices():
    prompts = ["a", "a", "b", "b", "a"]
    assert group_indices(prompts, "consecutive") == [[0, 1], [2, 3], [4]]
    assert group_indices(prompts, "all") == [[0, 1, 4], [2, 3]]


def test_trl_reward_func(client, make_images, questions, truncated_png):
    fn = make_trl_reward_func(client, questions_key="questions")
    assert fn.__name__ == "dvreward"
    assert list(inspect.signature(fn).parameters) == ["prompts", "completions", "kwargs"]
    images = make_images(6, seed=5)
    images[4] = truncated_png
    prompts = ["a red cube"] * 3 + ["a blue ball"] * 3
    rewards = fn(prompts=prompts, completions=[""] * 6, images=images, questions=[questions] * 6)
    assert len(rewards) == 6 and rewards[4] is None
    assert all(isinstance(r, float) and 0 < r < 1 for i, r in enumerate(rewards) if i != 4)
    want = client.score(["a red cube", "a blue ball"], [images[:3], images[3:]], questions=[questions] * 2,
                        on_error="nan").flat_rewards()
    assert_rewards_close([rewards], [want])

    # scattered equal prompts with group_by="all", conversational prompts: same rewards per sample
    order = [0, 3, 1, 4, 2, 5]
    chat = [[{"role": "system", "content": "draw"}, {"role": "user", "content": [{"type": "text", "text": p}]}]
            for p in prompts]
    fn_all = make_trl_reward_func(client, group_by="all", questions_key="questions")
    shuffled = fn_all([chat[i] for i in order], [""] * 6, images=[images[i] for i in order],
                      questions=[questions] * 6)
    assert_rewards_close([shuffled], [[rewards[i] for i in order]])


def test_trl_reward_func_decomposes_prompts(client, make_images):
    fn = make_trl_reward_func(client, name="dv")
    rewards = fn(["a green cone"] * 2, ["", ""], images=make_images(2, seed=9))
    assert fn.__name__ == "dv" and len(rewards) == 2 and all(0 < r < 1 for r in rewards)
    with pytest.raises(ValueError, match="one image per completion"):
        fn(["a"] * 2, [""] * 2, images=make_images(3))


def test_flow_grpo_reward_fn(client, make_images, questions):
    import torch

    fn = make_flow_grpo_reward_fn(client, weight=0.5)
    images = np.stack(make_images(6, seed=13))                       # NHWC uint8
    tensor = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255  # NCHW float in [0, 1]
    prompts = ["a red cube", "a blue ball"] * 3                       # groups formed from equal prompts
    metadata = [{"questions": questions, "tag": i} for i in range(6)]
    scores, info = fn(tensor, prompts, metadata, only_strict=True)   # Flow-GRPO's own call
    assert set(scores) == {"dvreward", "dvreward_sc", "dvreward_pq", "avg"}
    assert scores["avg"] == [0.5 * r for r in scores["dvreward"]]
    assert all(len(v) == 6 and all(isinstance(x, float) for x in v) for v in scores.values())
    assert all(0 < r < 1 for r in scores["dvreward"])
    assert len(info["advantages"]) == 6 and info["failed"] == []
    assert set(info["questions"]) == {"a red cube", "a blue ball"}
    assert info["questions"]["a red cube"] == [q["text"] for q in questions]
    group = [scores["dvreward"][i] for i in (0, 2, 4)]
    adv = [info["advantages"][i] for i in (0, 2, 4)]
    assert abs(sum(adv)) < 1e-6 and (np.argsort(group) == np.argsort(adv)).all()

    scores_np, _ = fn(images, prompts, metadata)
    assert_rewards_close([scores["dvreward"]], [scores_np["dvreward"]])


def test_flow_grpo_reward_fn_failed_image(client, make_images, questions, truncated_png):
    imgs = make_images(3) + [truncated_png]
    neutral, info = make_flow_grpo_reward_fn(client, name="reward")(imgs, ["x"] * 4, [{"questions": questions}] * 4)
    scored = neutral["reward"][:3]
    # the default stands in the group's mean for it: advantage 0, and the lists convert to tensors
    assert neutral["reward"][3] == sum(scored) / 3 and neutral["reward"][3] != 0.0
    assert neutral["reward_sc"][3] == sum(neutral["reward_sc"][:3]) / 3 and info["advantages"][3] == 0.0
    assert info["failed"] == [3] and info["failures"][0]["index"] == 3 and info["failures"][0]["code"] == "bad_image"
    nan, info = make_flow_grpo_reward_fn(client, name="reward", on_error="nan")(imgs, ["x"] * 4,
                                                                               [{"questions": questions}] * 4)
    assert math.isnan(nan["reward"][3]) and info["failed"] == [3] and math.isnan(info["advantages"][3])
    assert all(math.isfinite(r) for r in nan["reward"][:3])
    assert_rewards_close([nan["reward"][:3]], [scored])


# The AlphaGRPO data format: precomputed questions in each sample's metadata, strings or objects.
REFERENCE_META = {
    "semantic_questions": ["Is there a cube?", {"question": "Is the cube red?", "tag": "Attribute"}],
    "quality_questions": [{"question": "Is the cube well-formed?", "tag": "Geometry"}, "Is it sharp?"],
}
REFERENCE_AS_OURS = [
    {"id": "s1", "text": "Is there a cube?", "tag": "Attribute", "metadata": {"tag_source": "default"}},
    {"id": "s2", "text": "Is the cube red?", "tag": "Attribute"},
    {"id": "q1", "text": "Is the cube well-formed?", "kind": "quality", "tag": "Geometry"},
    {"id": "q2", "text": "Is it sharp?", "kind": "quality", "tag": "Aesthetics", "metadata": {"tag_source": "default"}},
]


def test_flow_grpo_uses_the_references_precomputed_questions(client, make_images):
    fn = make_flow_grpo_reward_fn(client)
    images = make_images(4, seed=21)
    scores, info = fn(images, ["a red cube"] * 4, [REFERENCE_META] * 4)
    assert info["questions"] == {"a red cube": ["Is there a cube?", "Is the cube red?", "Is the cube well-formed?",
                                                "Is it sharp?"]}
    want = client.score(["a red cube"], [images], questions=[REFERENCE_AS_OURS]).flat_rewards()
    assert_rewards_close([scores["dvreward"]], [want])


def test_trl_reads_the_references_question_columns(client, make_images):
    fn = make_trl_reward_func(client)
    images = make_images(2, seed=22)
    rewards = fn(["a red cube"] * 2, ["", ""], images=images,
                 semantic_questions=[REFERENCE_META["semantic_questions"]] * 2,
                 quality_questions=[REFERENCE_META["quality_questions"]] * 2)
    want = client.score(["a red cube"], [images], questions=[REFERENCE_AS_OURS]).flat_rewards()
    assert_rewards_close([rewards], [want])
