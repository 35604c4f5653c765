"""The reflection round through a real service: stage 1, the selection, refinements scored against the same
questions, false positive rectification, feedback text."""

from __future__ import annotations

import math

import pytest

from dvreward_protocol.grpo import false_positive_rectification, group_advantages
from tests.tolerance import assert_rewards_close
from trainer_client import DVRewardClient, select_for_refinement

pytestmark = pytest.mark.float_sensitive


def test_a_reflection_round(redis_service_url, make_images):
    prompts = ["a red cube on a table", "two green balls"]
    with DVRewardClient(redis_service_url, image_format="png") as client:
        stage1 = client.score(prompts, [make_images(4, seed=90), make_images(4, seed=91)])  # decomposed
        chosen = select_for_refinement(stage1.rewards)
        refined = [make_images(3, seed=92), make_images(3, seed=93)]
        out = client.score_refined(stage1, refined, chosen)
        raw = client.score(prompts, refined, questions=stage1.questions)  # the same questions, scored plainly
        with pytest.raises(ValueError, match="starts"):
            client.score_refined(stage1, refined, [[0, 1], 0])
    assert chosen == [min(range(4), key=lambda i: stage1.rewards[g][i]) for g in range(2)]
    assert [g.questions for g in out.result.groups] == [g.questions for g in stage1.groups]
    assert_rewards_close(out.result.rewards, raw.rewards)
    start = [[stage1.rewards[g][chosen[g]]] * 3 for g in range(2)]
    assert out.start == start
    assert out.rewards == false_positive_rectification(out.result.rewards, start)
    assert out.improved == [[r > s for r, s in zip(rg, sg, strict=True)]
                            for rg, sg in zip(out.result.rewards, start, strict=True)]
    assert out.any_improved == any(i for g in out.improved for i in g)
    assert out.advantages == group_advantages(out.rewards, keys=prompts)
    texts = stage1.feedback()
    failed = stage1.failed_questions()
    for g in range(2):
        for text, qs in zip(texts[g], failed[g], strict=True):
            assert (text == "") == (not qs) and all(q in text for q in qs)
    assert all(math.isfinite(r) for g in out.rewards for r in g)


def test_an_editing_round_refines_against_each_groups_source(redis_service_url, make_images):
    """Refinements of an edit are verified with the image they were edited from, and stay in its GRPO group, whether
    stage 1 was one score() call or a step of submitted groups."""
    prompts = ["make the cube red"] * 2  # one instruction, two sources: two GRPO groups
    sources = make_images(2, seed=94)
    stage1_images = [make_images(3, seed=95), make_images(3, seed=96)]
    refined = [make_images(2, seed=97), make_images(2, seed=98)]
    with DVRewardClient(redis_service_url, image_format="png") as client:
        called = client.score(prompts, stage1_images, sources=sources)
        with client.step() as step:
            for p, imgs, src in zip(prompts, stage1_images, sources, strict=True):
                step.submit(p, imgs, source=src)
            stepped = step.result(timeout=60)
        raw = client.score(prompts, refined, questions=called.questions, sources=sources)
        outs = [client.score_refined(stage1, refined, [0, 1]) for stage1 in (called, stepped)]
    assert len(set(called.keys)) == 2 and stepped.keys == called.keys
    for out in outs:
        assert out.result.keys == called.keys
        assert_rewards_close(out.result.rewards, raw.rewards)
