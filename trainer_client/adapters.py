"""Reward functions with the exact signatures trainers call, backed by a DVRewardClient.

- TRL-style: `reward_func(prompts, completions, **kwargs) -> list[float | None]` (None = failed image, which
  TRL treats as a missing reward rather than 0).
- Flow-GRPO-style: `reward_fn(images, prompts, metadata) -> (dict[str, list[float]], dict)`.

Both form GRPO groups from equal prompts, score the whole batch in one client call, and map the
results back to the trainer's sample order.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

from dvreward_protocol.alphagrpo import QUALITY_KEY, SEMANTIC_KEY, has_reference_questions, reference_questions
from trainer_client.client import DVRewardClient, ScoreResult
from trainer_client.encoding import split_group

GroupBy = Literal["consecutive", "all"]


def _prompt_text(p: Any) -> str:
    """A prompt as text: plain strings, or TRL conversational prompts (the last user message's text)."""
    if isinstance(p, str):
        return p
    if isinstance(p, Sequence) and p and all(isinstance(m, Mapping) for m in p):
        users = [m for m in p if m.get("role") == "user"] or list(p)
        content = users[-1].get("content", "")
        if isinstance(content, str):
            return content
        if isinstance(content, Sequence):
            parts = [c for c in content if isinstance(c, Mapping) and c.get("type") == "text"]
            return " ".join(str(c.get("text", "")) for c in parts)
    raise TypeError(f"cannot read a text prompt from {type(p).__name__}: give strings or chat messages")


def group_indices(prompts: Sequence[str], group_by: GroupBy = "consecutive") -> list[list[int]]:
    """Sample indices per GRPO group: runs of equal consecutive prompts, or all samples sharing a prompt."""
    if group_by not in ("consecutive", "all"):
        raise ValueError(f"group_by must be 'consecutive' or 'all', got {group_by!r}")
    groups: list[list[int]] = []
    if group_by == "consecutive":
        for i, p in enumerate(prompts):
            if groups and prompts[groups[-1][0]] == p:
                groups[-1].append(i)
            else:
                groups.append([i])
        return groups
    by_prompt: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        by_prompt.setdefault(p, []).append(i)
    return list(by_prompt.values())


def _sample_questions(metas: Sequence[Mapping[str, Any] | None], questions_key: str | None) -> list[Any] | None:
    """Per sample: the reference's precomputed questions (`semantic_questions` / `quality_questions`) when
    present, else `questions_key`'s explicit questions, else None (the prompt is decomposed)."""
    out: list[Any] = []
    for m in metas:
        m = m or {}
        if has_reference_questions(m):
            out.append(reference_questions(m)[0])
        else:
            out.append(m.get(questions_key) if questions_key else None)
    return out if any(q is not None for q in out) else None


def _score_samples(
    client: DVRewardClient, prompts: list[str], images: list[Any], groups: list[list[int]],
    questions: list[Any] | None, score_kwargs: Mapping[str, Any],
) -> tuple[ScoreResult, list[tuple[int, int]]]:
    """Score per-sample images grouped by `groups`; returns the result and each sample's (group, index)."""
    where: list[tuple[int, int]] = [(-1, -1)] * len(prompts)
    for g, idx in enumerate(groups):
        for k, i in enumerate(idx):
            where[i] = (g, k)
    qs = [questions[idx[0]] for idx in groups] if questions is not None else None
    result = client.score([prompts[idx[0]] for idx in groups], [[images[i] for i in idx] for idx in groups],
                          questions=qs, on_error="nan", **score_kwargs)
    return result, where


def make_trl_reward_func(
    client: DVRewardClient,
    *,
    image_key: str = "images",
    questions_key: str | None = None,
    group_by: GroupBy = "consecutive",
    name: str = "dvreward",
    **score_kwargs: Any,
) -> Callable[..., list[float | None]]:
    """A TRL `reward_func(prompts, completions, **kwargs)`; one image per completion from kwargs[image_key].

    TRL repeats each prompt num_generations times consecutively, hence group_by="consecutive"; use "all"
    when equal prompts are scattered. Dataset columns `semantic_questions` / `quality_questions` (the
    AlphaGRPO data format) are used as each sample's questions; `questions_key` names a column with
    explicit questions in our format.
    Extra keyword arguments (aggregation, gating, clip, ...) go to client.score.
    """

    def reward_func(prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float | None]:
        images = kwargs.get(image_key)
        if images is None:
            images = completions  # image-generating trainers may hand the images over as the completions
        images = split_group(images, image_key)
        texts = [_prompt_text(p) for p in prompts]
        if not len(texts) == len(images) == len(completions):
            raise ValueError(f"{len(texts)} prompts, {len(completions)} completions and {len(images)} images: "
                             "expected one image per completion")
        columns = {k: kwargs[k] for k in (SEMANTIC_KEY, QUALITY_KEY) if kwargs.get(k) is not None}
        if questions_key and kwargs.get(questions_key) is not None:
            columns[questions_key] = kwargs[questions_key]
        metas = [{k: col[i] for k, col in columns.items()} for i in range(len(texts))]
        questions = _sample_questions(metas, questions_key)
        result, where = _score_samples(client, texts, images, group_indices(texts, group_by), questions, score_kwargs)
        rewards = result.rewards
        return [None if math.isnan(r := rewards[g][k]) else r for g, k in where]

    reward_func.__name__ = name  # TRL logs each reward function under its __name__
    reward_func.__qualname__ = name
    return reward_func


def make_flow_grpo_reward_fn(
    client: DVRewardClient,
    *,
    name: str = "dvreward",
    questions_key: str | None = "questions",
    **score_kwargs: Any,
) -> Callable[..., tuple[dict[str, list[float]], dict[str, Any]]]:
    """A Flow-GRPO `reward_fn(images, prompts, metadata)`: images are an NCHW float tensor in [0, 1], an NHWC
    uint8 array, or a list; one prompt per image; samples with equal prompts form a group.

    Returns ({name: rewards, "sc": [...], "pq": [...]}, info) with NaN (never 0) for failed images; info holds
    per-sample `advantages`, the `questions` per prompt, `failed` sample indices and `request_ids`.
    metadata[i]'s `semantic_questions` / `quality_questions` (the AlphaGRPO data format) or, failing those,
    metadata[i][questions_key] are used as that prompt's questions instead of decomposing it.
    """

    def reward_fn(images: Any, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]] | None = None,
                  **_: Any) -> tuple[dict[str, list[float]], dict[str, Any]]:
        imgs = split_group(images, "images")
        texts = [_prompt_text(p) for p in prompts]
        if len(imgs) != len(texts):
            raise ValueError(f"{len(imgs)} images but {len(texts)} prompts: expected one prompt per image")
        questions = _sample_questions(metadata, questions_key) if metadata is not None else None
        result, where = _score_samples(client, texts, imgs, group_indices(texts, "all"), questions, score_kwargs)
        rewards, adv, sc, pq = result.rewards, result.advantages, result.sc, result.pq
        scores = {
            name: [rewards[g][k] for g, k in where],
            "sc": [sc[g][k] if sc[g] else math.nan for g, k in where],
            "pq": [pq[g][k] if pq[g] else math.nan for g, k in where],
        }
        info = {
            "advantages": [adv[g][k] for g, k in where],
            "questions": {gr.prompt: [q.text for q in gr.questions] for gr in result.groups},
            "failed": [i for i, (g, k) in enumerate(where) if math.isnan(rewards[g][k])],
            "request_ids": result.request_ids,
        }
        return scores, info

    reward_fn.__name__ = name
    return reward_fn
