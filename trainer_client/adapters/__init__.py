"""Reward functions with the exact signatures trainers call, backed by a DVRewardClient (one module each)."""

from trainer_client.adapters.alphagrpo import make_alphagrpo_reward_fn, make_alphagrpo_score_fn
from trainer_client.adapters.flow_grpo import make_flow_grpo_reward_fn
from trainer_client.adapters.samples import group_indices
from trainer_client.adapters.trl import make_trl_reward_func, make_trl_reward_funcs

__all__ = [
    "group_indices",
    "make_alphagrpo_reward_fn",
    "make_alphagrpo_score_fn",
    "make_flow_grpo_reward_fn",
    "make_trl_reward_func",
    "make_trl_reward_funcs",
]
