"""Tiny random models of the real architectures, for development, tests and benchmarks.

They are written to a directory exactly as a hub checkpoint would be (config, safetensors,
tokenizer, image processor, chat template) so the engines load them through their real
loading code, offline.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

VISION_SPECIALS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
CHAT_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

# Qwen-style chat template: an image entry in a user message becomes the vision block.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Enough English, JSON and answer words that byte-level BPE learns whole-word tokens for them.
_CORPUS = [
    "yes", "Yes", "YES", "no", "No", "NO",
    "Yes yes YES No no NO",
    " Yes yes YES No no NO",
    # answers glued to punctuation: ".yes" reads yes under the answer rule, ":no" does not
    "?Yes .yes !No ,no :no :yes \nYes \nno",
    "Is there a cat? Is the dog red? Are there two apples on the table? Does the image look sharp?",
    "a photo of a red car next to a blue house under a cloudy sky, in watercolor style",
    '{"semantic": [{"id": "1", "text": "Is there a cat?", "tag": "Existence", "depends_on": []}],'
    ' "quality": [{"id": "q1", "text": "Is the cat anatomically correct?", "aspect": "Anatomy"}]}',
    "Style Environment Viewpoint Existence Count Attribute Action Spatial Text Negative",
    "Geometry Anatomy Texture Coherence Lighting Physics Legibility Aesthetics",
    "entity attribute relation global whole part color count spatial action",
    "You are a careful visual verifier. Answer only yes or no.",
]


# Qwen2's pre-tokenizer split: letters keep one leading non-letter (" Is", "?Is"), digits stand alone,
# punctuation runs keep one leading space. The tiny tokenizer splits the same way, so token-boundary
# effects of the real models (a question tokenized apart from its context) show up in tests too.
QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)


def build_tokenizer(vocab_size: int = 1000) -> Any:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(CHAT_SPECIALS + VISION_SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 50, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=list(VISION_SPECIALS),
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


VERIFIER_SIZES: dict[str, dict[str, Any]] = {
    # head_dim 64 (128 / 2): the smallest that vLLM's CPU attention accepts, so every engine runs these.
    "tiny": dict(h=128, inter=256, layers=2, heads=2, kv=1, vdepth=2, vh=32, vinter=64, vheads=2, full=[1]),
    "small": dict(h=256, inter=512, layers=4, heads=4, kv=2, vdepth=4, vh=128, vinter=256, vheads=4, full=[1, 3]),
    # The real Qwen2.5-VL-7B-Instruct shapes (8.29B parameters), for GPU benchmarks with random weights.
    "qwen2.5-vl-7b": dict(h=3584, inter=18944, layers=28, heads=28, kv=4, vdepth=32, vh=1280, vinter=3420,
                          vheads=16, full=[7, 15, 23, 31], vocab=152064),
}


VERIFIER_ARCHS = ("qwen2.5-vl", "qwen2-vl", "qwen3-vl")
# The reference's verifier family (Qwen3-VL-30B-A3B): a mixture-of-experts text model on Qwen3-VL's vision.
EXTRA_ARCHS = ("qwen3-vl-moe",)


def _special_ids(tokenizer: Any) -> dict[str, int]:
    ids = tokenizer.convert_tokens_to_ids
    return dict(
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
    )


def _text_ids(tokenizer: Any) -> dict[str, int]:
    ids = tokenizer.convert_tokens_to_ids
    return dict(bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>"))


def verifier_config(tokenizer: Any, size: str, arch: str = "qwen2.5-vl") -> Any:
    """A Qwen-VL-family config of the given size whose special token ids match `tokenizer`."""
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig, Qwen3VLConfig, Qwen3VLMoeConfig

    d = VERIFIER_SIZES[size]
    # M-RoPE splits head_dim / 2 rotary pairs over (time, height, width), in Qwen's 1:1.5:1.5 ratio.
    half = d["h"] // d["heads"] // 2
    mrope = [half // 4, half * 3 // 8, half - half // 4 - half * 3 // 8]
    text = dict(
        hidden_size=d["h"], intermediate_size=d["inter"], num_hidden_layers=d["layers"],
        num_attention_heads=d["heads"], num_key_value_heads=d["kv"], vocab_size=max(len(tokenizer), d.get("vocab", 0)),
        max_position_embeddings=4096,
        initializer_range=0.2,  # sharper random outputs, so scores differ visibly between inputs
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": mrope},
        **_text_ids(tokenizer),
    )
    common = dict(**_special_ids(tokenizer), **_text_ids(tokenizer), tie_word_embeddings=False)
    if arch == "qwen2.5-vl":
        vision = dict(depth=d["vdepth"], hidden_size=d["vh"], intermediate_size=d["vinter"], num_heads=d["vheads"],
                      out_hidden_size=d["h"], fullatt_block_indexes=d["full"], window_size=112, patch_size=14,
                      initializer_range=0.2, spatial_merge_size=2, temporal_patch_size=2)
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **common)
    if arch == "qwen2-vl":
        vision = dict(depth=d["vdepth"], embed_dim=d["vh"], num_heads=d["vheads"], mlp_ratio=2, hidden_size=d["h"],
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2, initializer_range=0.2)
        return Qwen2VLConfig(text_config=text, vision_config=vision, **common)
    if arch in ("qwen3-vl", "qwen3-vl-moe"):
        text["rope_parameters"] = {**text["rope_parameters"], "mrope_interleaved": True}
        text["head_dim"] = d["h"] // d["heads"]
        vision = dict(depth=d["vdepth"], hidden_size=d["vh"], intermediate_size=d["vinter"], num_heads=d["vheads"],
                      out_hidden_size=d["h"], patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                      deepstack_visual_indexes=[0], num_position_embeddings=256, initializer_range=0.2)
        if arch == "qwen3-vl":
            return Qwen3VLConfig(text_config=text, vision_config=vision, **common)
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=d["inter"] // 2)
        return Qwen3VLMoeConfig(text_config=text, vision_config=vision, **common)
    raise ValueError(f"unknown verifier architecture {arch!r}; expected one of "
                     f"{', '.join(VERIFIER_ARCHS + EXTRA_ARCHS)}")


# Qwen2-VL / Qwen2.5-VL checkpoints ship this image-processor range; the engines use a checkpoint's own.
QWEN_MAX_PIXELS = 12845056


def write_tiny_verifier(
    path: Path, size: str = "tiny", seed: int = 0, max_pixels: int = QWEN_MAX_PIXELS, arch: str = "qwen2.5-vl"
) -> Path:
    """A random Qwen-VL-family verifier with tokenizer, image processor and chat template."""
    import torch
    from transformers import AutoModelForImageTextToText, Qwen2VLImageProcessorPil

    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    config = verifier_config(tokenizer, size, arch)
    AutoModelForImageTextToText.from_config(config, dtype=torch.float32).save_pretrained(path)
    tokenizer.save_pretrained(path)
    patch = config.vision_config.patch_size
    Qwen2VLImageProcessorPil(
        min_pixels=(patch * 2) ** 2 * 4, max_pixels=max_pixels, patch_size=patch, merge_size=2, temporal_patch_size=2
    ).save_pretrained(path)
    (path / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return path


def write_tiny_decomposer(path: Path, seed: int = 0) -> Path:
    """A random Qwen2-style causal LM with a chat template."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    cfg = Qwen2Config(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=len(tokenizer), max_position_embeddings=8192,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        tie_word_embeddings=True,
    )
    model = Qwen2ForCausalLM._from_config(cfg, dtype=torch.float32)
    _quote_closes_strings(model, tokenizer.convert_tokens_to_ids('"'))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return path


def _quote_closes_strings(model: Any, quote: int) -> None:
    """Make `"` the likeliest next token wherever it may come, so that every JSON string the decomposer writes
    ends after its first token. Left random, the strings ran to their length caps and a first decomposition
    spent 10-50 s on a CPU (README "Try it"); now under a second.

    Hidden channel 0 is a constant: every token embeds 0.1 there and no layer writes to it, so after the final
    norm it is positive at every position; the quote embeds 2.0 in it, and as the embeddings are tied its logit
    leads all others by ~8 everywhere. Every other channel, and so everything else, stays random.
    """
    import torch

    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb[:, 0] = 0.1
        emb[quote, 0] = 2.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[0, :] = 0
            layer.mlp.down_proj.weight[0, :] = 0


def write_tiny_models(root: Path, seed: int = 0, arch: str = "qwen2.5-vl") -> dict[str, str]:
    root = Path(root)
    out = {
        "verifier": str(write_tiny_verifier(root / "verifier", seed=seed, arch=arch)),
        "decomposer": str(write_tiny_decomposer(root / "decomposer", seed=seed)),
    }
    (root / "README.json").write_text(json.dumps({"what": "tiny random DVReward models", **out}, indent=2))
    return out
