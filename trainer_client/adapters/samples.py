"""What every adapter shares: a trainer's flat batch of samples scored as GRPO groups, mapped back in order.

Trainers hand over one prompt (and maybe metadata and an input image) per sample; samples with equal
prompts (and equal input images, for editing) form a group. The batch is scored in one client call and
each column comes back in sample order, a failed sample as the adapter's `on_error` says.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

from dvreward_protocol.alphagrpo import has_reference_questions, reference_questions
from dvreward_protocol.schemas import ImageResult
from trainer_client.client import DVRewardClient
from trainer_client.encoding import EncodeOptions, encode_image, split_group
from trainer_client.results import ScoreResult

log = logging.getLogger("trainer_client")

GroupBy = Literal["consecutive", "all"]
# "neutral": the failed sample gets its group's mean (advantage 0, no gradient); "nan": NaN; "none": None (TRL
# reads None as a missing reward); "raise": ImageFailed. Never 0, which would train against the sample.
AdapterOnError = Literal["neutral", "nan", "none", "raise"]
POLICIES: tuple[str, ...] = ("neutral", "nan", "none", "raise")


def check_policy(on_error: str) -> AdapterOnError:
    if on_error not in POLICIES:
        raise ValueError(f"on_error must be one of {', '.join(POLICIES)}, got {on_error!r}")
    return cast(AdapterOnError, on_error)


def prompt_text(p: Any) -> str:
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


def group_indices(keys: Sequence[Any], group_by: GroupBy = "consecutive") -> list[list[int]]:
    """Sample indices per GRPO group: runs of equal consecutive keys, or all samples sharing a key."""
    if group_by not in ("consecutive", "all"):
        raise ValueError(f"group_by must be 'consecutive' or 'all', got {group_by!r}")
    groups: list[list[int]] = []
    if group_by == "consecutive":
        for i, k in enumerate(keys):
            if groups and keys[groups[-1][0]] == k:
                groups[-1].append(i)
            else:
                groups.append([i])
        return groups
    by_key: dict[Any, list[int]] = {}
    for i, k in enumerate(keys):
        by_key.setdefault(k, []).append(i)
    return list(by_key.values())


def sample_questions(metas: Sequence[Mapping[str, Any] | None], questions_key: str | None) -> list[Any] | None:
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


def _fingerprint(image: Any) -> str:
    """Equal input images, equal fingerprints: samples edited from the same image are one group."""
    return hashlib.sha256(encode_image(image, EncodeOptions("png", png_compress_level=0))).hexdigest()


@dataclass
class Samples:
    """A scored batch in the trainer's sample order."""

    result: ScoreResult
    where: list[tuple[int, int]]  # sample -> (group, index in group)
    on_error: AdapterOnError

    def __len__(self) -> int:
        return len(self.where)

    def column(self, per_group: list[list[float]]) -> list[float | None]:
        """One value per sample; NaN becomes None under on_error="none"."""
        values = [per_group[g][k] for g, k in self.where]
        return [None if math.isnan(v) else v for v in values] if self.on_error == "none" else list(values)

    @property
    def rewards(self) -> list[float | None]:
        return self.column(self.result.rewards)

    @property
    def sc(self) -> list[float | None]:
        return self.column(self.result.sc)

    @property
    def pq(self) -> list[float | None]:
        return self.column(self.result.pq)

    @property
    def advantages(self) -> list[float | None]:
        return self.column(self.result.advantages)

    def image(self, i: int) -> ImageResult | None:
        g, k = self.where[i]
        images = self.result.groups[g].images
        return images[k] if images else None

    def request_id(self, i: int) -> str:
        g, k = self.where[i]
        ids = self.result.image_request_ids
        return ids[g][k] if ids else self.result.request_id

    def failures(self) -> list[dict[str, Any]]:
        """(index, code, message) of every sample that could not be scored, in sample order."""
        at = {(f.group, f.index): f for f in self.result.failures}
        return [{"index": i, "code": at[w].code, "message": at[w].message}
                for i, w in enumerate(self.where) if w in at]


def score_samples(client: DVRewardClient, prompts: Sequence[Any], images: Any, *,
                  metadata: Sequence[Mapping[str, Any] | None] | None = None, questions_key: str | None = None,
                  sources: Sequence[Any] | None = None, group_by: GroupBy = "all",
                  on_error: AdapterOnError = "neutral", score_kwargs: Mapping[str, Any] | None = None) -> Samples:
    """Group the samples, score them in one client call, and log failed samples once."""
    texts = [prompt_text(p) for p in prompts]
    imgs = split_group(images, "images")
    if len(imgs) != len(texts):
        raise ValueError(f"{len(imgs)} images but {len(texts)} prompts: expected one prompt per image")
    if metadata is not None and len(metadata) != len(texts):
        raise ValueError(f"{len(metadata)} metadata entries but {len(texts)} prompts")
    srcs = split_group(sources, "input_images") if sources is not None else None
    if srcs is not None and len(srcs) != len(texts):
        raise ValueError(f"{len(srcs)} input images but {len(texts)} prompts: expected one per sample")
    keys: list[Any] = texts if srcs is None else [(t, _fingerprint(s)) for t, s in zip(texts, srcs, strict=True)]
    groups = group_indices(keys, group_by)
    where: list[tuple[int, int]] = [(-1, -1)] * len(texts)
    for g, idx in enumerate(groups):
        for k, i in enumerate(idx):
            where[i] = (g, k)
    questions = sample_questions(metadata, questions_key) if metadata is not None else None
    policy = check_policy(on_error)
    result = client.score(
        [texts[idx[0]] for idx in groups], [[imgs[i] for i in idx] for idx in groups],
        questions=[questions[idx[0]] for idx in groups] if questions is not None else None,
        sources=[srcs[idx[0]] for idx in groups] if srcs is not None else None,
        on_error="nan" if policy == "none" else policy, **(score_kwargs or {}))
    samples = Samples(result, where, policy)
    failed = samples.failures()
    if failed:
        first = failed[0]
        log.warning("dvreward: %d of %d samples could not be scored (first: sample %d, %s: %s); %s", len(failed),
                    len(samples), first["index"], first["code"], first["message"],
                    {"neutral": "each gets its group's mean reward (advantage 0)", "nan": "their rewards are NaN",
                     "none": "their rewards are None"}.get(policy, ""))
    return samples
