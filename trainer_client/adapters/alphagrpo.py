"""The AlphaGRPO reference trainer's reward contract, at both of its levels.

- The single reward it registers in its reward table: `fn(images, prompts, metadata) -> (scores, per-sample
  dicts)`; the dicts carry what its own DVReward returns (`semantic_score`, `semantic_scores`,
  `quality_score`, `quality_scores`, `overall_score`) plus our evidence.
- The trainer-level function it submits to its thread pool: `reward_fn({"images", "prompts", "metadata"})
  -> (score_details, score_metas)`, `score_details` one per-sample list per reward plus `avg` (the
  weighted sum it trains on, through `torch.as_tensor`), `score_metas` a dict of per-sample lists.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from dvreward_protocol.questions import Kind
from trainer_client.adapters.samples import AdapterOnError, Samples, check_policy, score_samples
from trainer_client.client import DVRewardClient

ScoreFn = Callable[..., tuple[list[Any], list[dict[str, Any]]]]
RewardFn = Callable[[Mapping[str, Any]], tuple[dict[str, list[Any]], dict[str, list[Any]]]]


def _sample_meta(samples: Samples, i: int, reward: float | None, sc: float | None, pq: float | None,
                 failure: Mapping[str, Any] | None) -> dict[str, Any]:
    g, _ = samples.where[i]
    im = samples.image(i)
    p = dict(im.p or {}) if im else {}
    kinds = {q.id: q.kind for q in samples.result.groups[g].questions}
    return {
        "semantic_score": sc, "semantic_scores": [v for q, v in p.items() if kinds[q] is Kind.semantic],
        "quality_score": pq, "quality_scores": [v for q, v in p.items() if kinds[q] is Kind.quality],
        "overall_score": reward, "p": p, "failed": list(im.failed) if im else [],
        "p_source": dict(im.p_source or {}) if im else {}, "request_id": samples.request_id(i),
        "error": None if failure is None else {"code": failure["code"], "message": failure["message"]},
        "neutral": failure is not None and samples.on_error == "neutral",
    }


def make_alphagrpo_score_fn(
    client: DVRewardClient,
    *,
    questions_key: str | None = None,
    on_error: AdapterOnError = "neutral",
    **score_kwargs: Any,
) -> ScoreFn:
    """The single reward: `fn(images, prompts, metadata, input_images=None) -> (scores, per-sample dicts)`.

    Images: a list of PIL images (as the reference trainer passes them), arrays, or an NCHW tensor in [0, 1].
    Questions come from each sample's `semantic_questions` / `quality_questions` metadata (else
    metadata[questions_key], else the prompt is decomposed). `input_images` (editing) are each sample's source,
    shown before its image; samples with the same prompt and input image form a group. A failed image gets its
    group's mean reward, SC and PQ by default (advantage 0, flagged `neutral` with its `error`), never 0.
    """
    policy = check_policy(on_error)

    def score_fn(images: Any, prompts: Sequence[Any], metadata: Sequence[Mapping[str, Any] | None] | None = None,
                 input_images: Sequence[Any] | None = None, **_: Any) -> tuple[list[Any], list[dict[str, Any]]]:
        samples = score_samples(client, prompts, images, metadata=metadata, questions_key=questions_key,
                                sources=input_images, on_error=policy, score_kwargs=score_kwargs)
        failures = {f["index"]: f for f in samples.failures()}
        rewards, sc, pq = samples.rewards, samples.sc, samples.pq
        metas = [_sample_meta(samples, i, rewards[i], sc[i], pq[i], failures.get(i)) for i in range(len(samples))]
        return rewards, metas

    return score_fn


def make_alphagrpo_reward_fn(
    client: DVRewardClient,
    *,
    weight: float = 1.0,
    name: str = "dvreward",
    **kwargs: Any,
) -> RewardFn:
    """The trainer-level `reward_fn(input_data) -> (score_details, score_metas)` with DVReward as its one reward.

    `score_details`: {name: rewards, name_sc: SC, name_pq: PQ, "avg": weight * rewards}; `score_metas`: the
    per-sample dicts of make_alphagrpo_score_fn as a dict of per-sample lists. `input_data` holds images,
    prompts, metadata and, for editing, input_images. Safe to call from several threads at once.
    """
    score = make_alphagrpo_score_fn(client, **kwargs)

    def reward_fn(input_data: Mapping[str, Any]) -> tuple[dict[str, list[Any]], dict[str, list[Any]]]:
        scores, metas = score(**input_data)
        details = {name: scores, f"{name}_sc": [m["semantic_score"] for m in metas],
                   f"{name}_pq": [m["quality_score"] for m in metas],
                   "avg": [None if s is None else weight * s for s in scores]}
        return details, {k: [m[k] for m in metas] for k in metas[0]} if metas else {}

    return reward_fn
