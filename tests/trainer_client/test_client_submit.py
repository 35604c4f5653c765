"""Rewards while the step generates: groups submitted one by one against a real service over Redis, coalesced
into requests, and a step whose result is the one `score()` call on the same groups would give."""

from __future__ import annotations

import asyncio
import math
import time

import pytest

from tests.tolerance import assert_advantages_close, assert_rewards_close
from trainer_client import AsyncDVRewardClient, DVRewardClient, GroupScore, group_advantages

pytestmark = pytest.mark.float_sensitive

PROMPTS = ["a red cube", "a blue ball", "a red cube", "a green cone"]  # the red cube twice: one GRPO group


def _groups(make_images) -> list[list]:
    return [make_images(3, seed=70 + g) for g in range(len(PROMPTS))]


def test_a_step_submitted_group_by_group_equals_one_score_call(redis_service_url, make_images, questions):
    groups = _groups(make_images)
    with DVRewardClient(redis_service_url, submit_window_s=0.05) as client:
        want = client.score(PROMPTS, groups, questions=[questions] * 4)
        with client.step() as step:
            futures = []
            for prompt, images in zip(PROMPTS, groups, strict=True):
                futures.append(step.submit(prompt, images, questions))
                time.sleep(0.15)  # "generating" the next group: longer than the window, so each goes alone
            first = futures[0].result(timeout=60)  # a group's rewards arrive before the step ends
            got = step.result(timeout=60)
    assert isinstance(first, GroupScore) and len(first.rewards) == 3 and not first.failures
    assert len(got.request_ids) == 4 and [g.prompt for g in got.groups] == PROMPTS
    assert_rewards_close(got.rewards, want.rewards)
    assert got.advantages == group_advantages(got.rewards, keys=PROMPTS)  # over the whole step, pooled by prompt
    assert_advantages_close(got.advantages, want.advantages, want.rewards)
    assert got.models == want.models and got.response.template_version == want.response.template_version


def test_groups_submitted_within_the_window_share_a_request(redis_service_url, make_images, questions):
    groups = _groups(make_images)
    with DVRewardClient(redis_service_url, submit_window_s=0.5, chunk_images=6) as client:
        futures = [client.submit(p, g, questions) for p, g in zip(PROMPTS, groups, strict=True)]
        scores = [f.result(timeout=60) for f in futures]
    # 3 + 3 images filled a request at once; the other two waited out the window together
    assert [s.request_ids for s in scores[:2]] == [scores[0].request_ids] * 2
    assert scores[2].request_ids == scores[3].request_ids != scores[0].request_ids


def test_a_failed_image_and_a_bad_group(redis_service_url, make_images, questions, truncated_png):
    with DVRewardClient(redis_service_url) as client:
        step = client.step(on_error="neutral")
        step.submit("a red cube", [truncated_png, *make_images(2, seed=80)], questions)
        step.submit("a blue ball", make_images(2, seed=81), questions)
        with pytest.raises(ValueError, match="empty group"):  # refused in the caller, not in a future
            step.submit("a green cone", [], questions)
        result = step.result(timeout=60)
    (failure,) = result.failures
    assert (failure.group, failure.index, failure.code) == (0, 0, "bad_image")
    assert result.rewards[0][0] == (result.rewards[0][1] + result.rewards[0][2]) / 2 and result.advantages[0][0] == 0.0
    assert all(math.isfinite(r) for g in result.rewards for r in g)


async def test_the_async_client_submits_and_steps(redis_service_url, make_images, questions):
    groups = _groups(make_images)
    async with AsyncDVRewardClient(redis_service_url, submit_window_s=0.05) as client:
        want = await client.score(PROMPTS, groups, questions=[questions] * 4)
        step = client.step()
        for prompt, images in zip(PROMPTS, groups, strict=True):
            step.submit(prompt, images, questions)
            await asyncio.sleep(0.1)
        got = await step.result()
        alone = await client.submit("a red cube", groups[0], questions)
    assert len(got.request_ids) >= 2
    assert_rewards_close(got.rewards, want.rewards)
    assert_advantages_close(got.advantages, want.advantages, want.rewards)
    assert_rewards_close([alone.rewards], [want.rewards[0]])
