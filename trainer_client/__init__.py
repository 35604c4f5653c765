"""Lightweight DVReward trainer client: depends on httpx and pydantic only.

torch, numpy and PIL are imported only when an image of theirs is passed in.
"""

from dvreward_protocol.grpo import false_positive_rectification, group_advantages, neutral_rewards
from dvreward_protocol.questions import Question
from dvreward_protocol.reflection import feedback, select_for_refinement
from dvreward_protocol.schemas import ScoreResponse, VerifyResponse
from trainer_client.adapters import (
    make_alphagrpo_reward_fn,
    make_alphagrpo_score_fn,
    make_flow_grpo_reward_fn,
    make_trl_reward_func,
    make_trl_reward_funcs,
)
from trainer_client.client import DEFAULT_TIMEOUT, AsyncDVRewardClient, DVRewardClient
from trainer_client.errors import (
    BadRequest,
    ConfigurationError,
    ConnectionFailed,
    DeadlineExceeded,
    DVRewardError,
    ImageFailed,
    ImageFailure,
    PayloadTooLarge,
    RateLimited,
    ScoringError,
    ServerError,
    TransportTimeout,
    Unauthorized,
    Unavailable,
)
from trainer_client.results import RefinedResult, ScoreResult, VerifyResult
from trainer_client.submit import GroupScore

__all__ = [
    "DEFAULT_TIMEOUT",
    "AsyncDVRewardClient",
    "BadRequest",
    "ConfigurationError",
    "ConnectionFailed",
    "DVRewardClient",
    "DVRewardError",
    "DeadlineExceeded",
    "GroupScore",
    "ImageFailed",
    "ImageFailure",
    "PayloadTooLarge",
    "Question",
    "RateLimited",
    "RefinedResult",
    "ScoreResponse",
    "ScoreResult",
    "ScoringError",
    "ServerError",
    "TransportTimeout",
    "Unauthorized",
    "Unavailable",
    "VerifyResponse",
    "VerifyResult",
    "false_positive_rectification",
    "feedback",
    "group_advantages",
    "make_alphagrpo_reward_fn",
    "make_alphagrpo_score_fn",
    "make_flow_grpo_reward_fn",
    "make_trl_reward_func",
    "make_trl_reward_funcs",
    "neutral_rewards",
    "select_for_refinement",
]
