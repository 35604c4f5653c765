"""The packed verifier must equal one-sequence-per-pair scoring, on a tiny real Qwen2.5-VL."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from server.engines.base import EngineError, VerifyItem
from server.engines.hf.verifier import HFVerifier
from server.engines.hf.vision_attention import _batched_window_attention, enable_batched_vision_attention
from server.engines.tiny import write_tiny_verifier
from tests.tolerance import P_TOL

pytestmark = pytest.mark.float_sensitive


def _image(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def items() -> list[VerifyItem]:
    """Mixed image sizes, K from 1 to 5, question lengths from 1 to 25 words, a two-image item."""
    rng = np.random.default_rng(0)
    return [
        VerifyItem((_image(rng, 100, 60),), ("Is there a cat?", "Is the dog red?", "Does it look sharp?")),
        VerifyItem((_image(rng, 56, 56),), ("Are there exactly two apples on the wooden kitchen table?",)),
        VerifyItem(
            (_image(rng, 224, 140),),
            ("Red?", "Is the car next to a blue house under a cloudy sky in watercolor style, "
             "seen from above with soft light and long shadows on the ground?", "Is it night?",
             "Is the text legible?", "Is the cat anatomically correct?"),
        ),
        VerifyItem((_image(rng, 120, 200), _image(rng, 64, 64)), ("Is the background unchanged?", "Is it blue?")),
    ]


@pytest.fixture(scope="module")
def tiny_verifier(tiny_models: dict[str, Path]) -> HFVerifier:
    return HFVerifier.load(str(tiny_models["verifier"]))


def _flat(scores: list[list[float]]) -> np.ndarray:
    return np.concatenate([np.asarray(s, dtype=np.float64) for s in scores])


def _reference(tiny_verifier: HFVerifier, items: list[VerifyItem]) -> np.ndarray:
    tiny_verifier.mode = "per_pair"
    try:
        return _flat(tiny_verifier.verify(items))
    finally:
        tiny_verifier.mode = "packed"


@pytest.mark.parametrize("arch", ["qwen2-vl", "qwen3-vl"])
def test_packed_equals_per_pair_on_other_architectures(
    arch: str, items: list[VerifyItem], tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Qwen2-VL (no windowed vision) and Qwen3-VL (patch 16, deepstack, interleaved M-RoPE) too."""
    verifier = HFVerifier.load(str(write_tiny_verifier(tmp_path_factory.mktemp(arch), arch=arch)))
    assert type(verifier.model).__name__.lower().startswith(arch.replace("-", "").replace(".", "_"))
    packed = _flat(verifier.verify(items))
    assert np.abs(packed - _reference(verifier, items)).max() <= P_TOL
    verifier.attn_mask_mode = "causal"
    assert np.abs(_flat(verifier.verify(items)) - _reference(verifier, items)).max() > 100 * P_TOL


@pytest.mark.parametrize("arch", ["qwen2.5-vl", "qwen2-vl", "qwen3-vl", "qwen3-vl-moe"])
def test_batched_vision_attention_equals_the_window_loop(
    arch: str, items: list[VerifyItem], tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The one-call window attention is an optimisation only: same scores as transformers' own loop."""
    path = str(write_tiny_verifier(tmp_path_factory.mktemp(f"vision-{arch}"), arch=arch))
    looped = HFVerifier.load(path, batched_vision=False)
    batched = HFVerifier.load(path)
    assert batched.model.model.visual.blocks[0].attn.forward.__func__ is _batched_window_attention
    assert looped.model.model.visual.blocks[0].attn.forward.__func__ is not _batched_window_attention
    assert np.abs(_flat(batched.verify(items)) - _flat(looped.verify(items))).max() <= P_TOL


def test_a_model_without_known_vision_attention_is_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    import torch

    with caplog.at_level("WARNING", logger="dvreward.engines"):
        assert enable_batched_vision_attention(torch.nn.Sequential(torch.nn.Linear(2, 2))) == 0
    assert "batched vision attention is off" in caplog.text


def test_packed_equals_per_pair(tiny_verifier: HFVerifier, items: list[VerifyItem]) -> None:
    packed = tiny_verifier.verify(items)
    assert [len(s) for s in packed] == [len(it.questions) for it in items]
    ref = _reference(tiny_verifier, items)
    got = _flat(packed)
    assert np.all((got > 0) & (got < 1))
    assert np.abs(got - ref).max() <= P_TOL
    assert got.std() > 0.01, "scores should differ between questions, or the comparison proves little"


def test_block_mask_is_what_makes_it_exact(tiny_verifier: HFVerifier, items: list[VerifyItem]) -> None:
    """A plain causal mask over the packed sequence lets blocks see each other: far beyond P_TOL."""
    ref = _reference(tiny_verifier, items)
    tiny_verifier.attn_mask_mode = "causal"
    try:
        leaky = _flat(tiny_verifier.verify(items))
    finally:
        tiny_verifier.attn_mask_mode = "block"
    assert np.abs(leaky - ref).max() > 100 * P_TOL


def test_micro_batching_and_order_do_not_change_scores(
    tiny_verifier: HFVerifier, items: list[VerifyItem]
) -> None:
    whole = _flat(tiny_verifier.verify(items))
    preps = [p for it in items for p in tiny_verifier._prepare(it)]
    longest = max(len(p.prefix) + sum(len(b) for b in p.blocks) for p in preps)
    tiny_verifier.max_batch_tokens = longest  # the budget of the longest item alone: (nearly) one per pass
    try:
        reversed_scores = tiny_verifier.verify(items[::-1])[::-1]
    finally:
        tiny_verifier.max_batch_tokens = 32768
    assert np.abs(_flat(reversed_scores) - whole).max() <= P_TOL


def test_an_item_longer_than_the_token_budget_is_refused_not_run(
    tiny_verifier: HFVerifier, items: list[VerifyItem]
) -> None:
    """One item is one sequence with an L x L mask: past the budget it is an error, never an unbounded pass."""
    many = VerifyItem(tuple(items[0].images) * 8, items[0].questions)
    tiny_verifier.max_batch_tokens = 200
    try:
        with pytest.raises(EngineError, match=r"exceeds the token budget of one forward pass \(200"):
            tiny_verifier.verify([many])
    finally:
        tiny_verifier.max_batch_tokens = 32768


def test_empty_item_is_rejected(tiny_verifier: HFVerifier) -> None:
    img = Image.new("RGB", (32, 32))
    with pytest.raises(ValueError, match="at least one question"):
        tiny_verifier.verify([VerifyItem((img,), ())])
    with pytest.raises(ValueError, match="at least one image"):
        tiny_verifier.verify([VerifyItem((), ("Is it red?",))])


def test_unknown_model_points_to_offline_options(tmp_path: Path) -> None:
    with pytest.raises(EngineError, match="tiny-models"):
        HFVerifier.load("no-such-org/no-such-verifier")
    with pytest.raises(EngineError, match="local directory"):
        HFVerifier.load(str(tmp_path))


def test_scoring_runs_convolutions_in_full_float32_and_restores_the_setting(
    tiny_verifier: HFVerifier, items: list[VerifyItem]
) -> None:
    """On a GPU cuDNN's TF32 made p move with the batch's composition (0.04 against 7e-6 without, bench/verifier.py
    on an H200): the patch embedding must see TF32 off, and the process's own setting must come back after."""
    import torch

    seen: list[bool] = []
    hook = tiny_verifier.model.model.visual.patch_embed.register_forward_pre_hook(
        lambda *_: seen.append(torch.backends.cudnn.allow_tf32))
    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = True
    try:
        tiny_verifier.verify(items[:1])
        tiny_verifier.greedy_answers(items[:1])
        assert torch.backends.cudnn.allow_tf32 is True
    finally:
        hook.remove()
        torch.backends.cudnn.allow_tf32 = before
    assert seen and not any(seen)
