"""TRL-style reward functions: `reward_func(prompts, completions, **kwargs) -> list[float | None]`.

TRL logs and weights each reward function by its `__name__` (`reward_weights`), so the reward and its SC
and PQ components can be separate functions; they share one scoring call per step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

from dvreward_protocol.alphagrpo import QUALITY_KEY, SEMANTIC_KEY
from trainer_client.adapters.samples import AdapterOnError, GroupBy, Samples, check_policy, score_samples
from trainer_client.client import DVRewardClient
from trainer_client.encoding import split_group

Component = Literal["reward", "sc", "pq"]
RewardFunc = Callable[..., list[float | None]]


class _Shared:
    """The last step's scores, so the component functions of one TRL step score it once.

    TRL calls every reward function with the same prompts and image objects; holding them keeps their ids
    from being reused by the next step's objects.
    """

    def __init__(self) -> None:
        self.held: tuple[list[Any], tuple[Any, ...], Samples] | None = None

    def get(self, inputs: list[Any], key: tuple[Any, ...], score: Callable[[], Samples]) -> Samples:
        if self.held is None or self.held[1] != key:
            self.held = (inputs, key, score())
        return self.held[2]


def _reward_func(client: DVRewardClient, component: Component, name: str, shared: _Shared, image_key: str,
                 questions_key: str | None, group_by: GroupBy, on_error: AdapterOnError,
                 score_kwargs: dict[str, Any]) -> RewardFunc:
    def reward_func(prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float | None]:
        images = kwargs.get(image_key)
        images = split_group(completions if images is None else images, image_key)  # the images may be completions
        if not len(prompts) == len(images) == len(completions):
            raise ValueError(f"{len(prompts)} prompts, {len(completions)} completions and {len(images)} images: "
                             "expected one image per completion")
        columns = {k: kwargs[k] for k in (SEMANTIC_KEY, QUALITY_KEY, questions_key) if k and kwargs.get(k) is not None}
        metas = [{k: col[i] for k, col in columns.items()} for i in range(len(prompts))] if columns else None
        key = (tuple(map(id, prompts)), tuple(map(id, images)), tuple(map(id, columns.values())))
        samples = shared.get([prompts, images, columns], key, lambda: score_samples(
            client, prompts, images, metadata=metas, questions_key=questions_key, group_by=group_by,
            on_error=on_error, score_kwargs=score_kwargs))
        return {"reward": samples.rewards, "sc": samples.sc, "pq": samples.pq}[component]

    reward_func.__name__ = reward_func.__qualname__ = name  # TRL logs each reward function under its __name__
    return reward_func


def make_trl_reward_funcs(
    client: DVRewardClient,
    components: Sequence[Component] = ("reward", "sc", "pq"),
    *,
    name: str = "dvreward",
    image_key: str = "images",
    questions_key: str | None = None,
    group_by: GroupBy = "consecutive",
    on_error: AdapterOnError = "none",
    **score_kwargs: Any,
) -> list[RewardFunc]:
    """One TRL reward function per component (`name`, `name_sc`, `name_pq`), scoring each step once.

    Pass them as `reward_funcs` and weight them with TRL's own `reward_weights`. One image per completion
    comes from kwargs[image_key] (or the completions themselves). TRL repeats each prompt num_generations
    times consecutively, hence group_by="consecutive"; use "all" when equal prompts are scattered. Dataset
    columns `semantic_questions` / `quality_questions` (the AlphaGRPO data format) are each sample's
    questions; `questions_key` names a column with questions in our format. A failed image is None by
    default, which TRL treats as a missing reward. Other keyword arguments go to client.score.
    """
    policy = check_policy(on_error)
    unknown = set(components) - {"reward", "sc", "pq"}
    if unknown or not components:
        raise ValueError(f"components must be a non-empty selection of reward, sc and pq, got {list(components)}")
    shared = _Shared()
    return [_reward_func(client, c, name if c == "reward" else f"{name}_{c}", shared, image_key, questions_key,
                         group_by, policy, score_kwargs) for c in components]


def make_trl_reward_func(client: DVRewardClient, *, name: str = "dvreward", **kwargs: Any) -> RewardFunc:
    """The reward alone as one TRL `reward_func(prompts, completions, **kwargs)`; see make_trl_reward_funcs."""
    (func,) = make_trl_reward_funcs(client, ("reward",), name=name, **kwargs)
    return func
