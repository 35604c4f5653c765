"""Flow-GRPO-style reward function: `reward_fn(images, prompts, metadata) -> (dict[str, list[float]], info)`.

Flow-GRPO's trainer submits its reward function to a thread pool with one prompt per image and trains on
the `avg` column of the returned dict (its weighted sum of rewards), converting every column with
`torch.as_tensor`: a failed image must not be None, and one NaN would turn the step's std into NaN.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from trainer_client.adapters.samples import AdapterOnError, check_policy, score_samples
from trainer_client.client import DVRewardClient

FlowGRPOFn = Callable[..., tuple[dict[str, list[Any]], dict[str, Any]]]


def make_flow_grpo_reward_fn(
    client: DVRewardClient,
    *,
    name: str = "dvreward",
    weight: float = 1.0,
    questions_key: str | None = "questions",
    on_error: AdapterOnError = "neutral",
    **score_kwargs: Any,
) -> FlowGRPOFn:
    """A Flow-GRPO `reward_fn(images, prompts, metadata, **_)`: images are an NCHW float tensor in [0, 1], an
    NHWC uint8 array, or a list; one prompt per image; samples with equal prompts form a group.

    Returns ({name: rewards, name_sc: ..., name_pq: ..., "avg": weight * rewards}, info); info holds per-sample
    `advantages`, the `questions` per prompt, `failed` sample indices, `failures` (index, code, message) and
    `request_ids`. A failed image gets its group's mean (advantage 0) by default, never 0.
    metadata[i]'s `semantic_questions` / `quality_questions` (the AlphaGRPO data format) or, failing those,
    metadata[i][questions_key] are that prompt's questions instead of decomposing it.
    """
    policy = check_policy(on_error)

    def reward_fn(images: Any, prompts: Sequence[Any], metadata: Sequence[Mapping[str, Any]] | None = None,
                  **_: Any) -> tuple[dict[str, list[Any]], dict[str, Any]]:
        samples = score_samples(client, prompts, images, metadata=metadata, questions_key=questions_key,
                                on_error=policy, score_kwargs=score_kwargs)
        rewards = samples.rewards
        scores = {name: rewards, f"{name}_sc": samples.sc, f"{name}_pq": samples.pq,
                  "avg": [None if r is None else weight * r for r in rewards]}
        failures = samples.failures()
        info = {
            "advantages": samples.advantages,
            "questions": {gr.prompt: [q.text for q in gr.questions] for gr in samples.result.groups},
            "failed": [f["index"] for f in failures],
            "failures": failures,
            "request_ids": samples.result.request_ids,
        }
        return scores, info

    reward_fn.__name__ = name
    return reward_fn
