"""Lightweight DVReward trainer client: depends on httpx and pydantic only."""

from trainer_client.grpo import false_positive_rectification, group_advantages

__all__ = ["false_positive_rectification", "group_advantages"]
