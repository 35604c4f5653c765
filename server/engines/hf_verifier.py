"""The transformers verifier: p(yes) for K questions about an image from full next-token logits.

`packed` (default) puts the image prefix once and all K question blocks in one sequence:
each block attends only to the prefix and to itself, and its positions restart where the
prefix ends, so every block sees exactly what it would see alone (see ../shared/bench).
`per_pair` runs one ordinary sequence per (image, question): the reference packed must equal.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from server.engines.answers import YesNo
from server.engines.base import EngineError, ItemScores, VerifyItem
from server.engines.loading import load_error, pretrained_kwargs, torch_dtype
from server.engines.prompts import VERIFIER_PREAMBLE, VERIFIER_SYSTEM
from server.engines.vision_attention import enable_batched_vision_attention

Mode = Literal["packed", "per_pair"]
_SENTINEL = "\u2063DVREWARD_QUESTION\u2063"


@dataclass
class _Prepared:
    """One item turned into token ids, vision inputs and prefix positions."""

    prefix: list[int]
    blocks: list[list[int]]
    pixel_values: Any
    grid_thw: Any
    prefix_pos: Any  # (3, len(prefix)) M-RoPE positions
    block_start: int  # text position of the first token after the prefix


class HFVerifier:
    """Qwen2-VL family verifier on transformers (CPU or GPU)."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        image_processor: Any,
        *,
        model_id: str,
        mode: Mode = "packed",
        max_batch_tokens: int = 32768,
        attn_mask_mode: Literal["block", "causal"] = "block",
    ) -> None:
        if mode not in ("packed", "per_pair"):
            raise ValueError(f"mode must be 'packed' or 'per_pair', got {mode!r}")
        self.model, self.tokenizer, self.image_processor = model, tokenizer, image_processor
        self.model_id = model_id
        self.mode: Mode = mode
        self.device = model.device
        self.max_batch_tokens = max_batch_tokens
        self.attn_mask_mode = attn_mask_mode
        self.image_token_id: int = model.config.image_token_id
        self.merge: int = image_processor.merge_size
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.answers = YesNo(tokenizer, model_id)

    @classmethod
    def load(
        cls,
        ref: str,
        *,
        device: str = "cpu",
        dtype: str = "float32",
        min_pixels: int = 28 * 28 * 4,
        max_pixels: int = 448 * 448,
        batched_vision: bool = True,
        **options: Any,
    ) -> HFVerifier:
        """Load tokenizer, image processor and model from a local directory or hub id.

        `batched_vision` runs the vision tower's window attention as one call (same result, faster).
        """
        from transformers import AutoModelForImageTextToText, AutoTokenizer, Qwen2VLImageProcessorPil

        if not 0 < min_pixels <= max_pixels:
            raise ValueError(f"need 0 < min_pixels <= max_pixels, got {min_pixels} and {max_pixels}")
        kw = pretrained_kwargs(ref)
        try:
            tokenizer = AutoTokenizer.from_pretrained(ref, **kw)
            processor = Qwen2VLImageProcessorPil.from_pretrained(
                ref, size={"shortest_edge": min_pixels, "longest_edge": max_pixels}, **kw
            )
            model = AutoModelForImageTextToText.from_pretrained(
                ref, dtype=torch_dtype(dtype), attn_implementation="sdpa", **kw
            )
        except (OSError, ValueError) as exc:
            raise EngineError(load_error("verifier", ref, exc)) from exc
        if batched_vision:
            enable_batched_vision_attention(model)
        return cls(model.to(device).eval(), tokenizer, processor, model_id=ref, **options)

    # ---- preparation -------------------------------------------------------------------
    def _template(self, n_images: int) -> tuple[str, str]:
        """Chat-rendered text before and after the question, split at a sentinel."""
        content: list[dict[str, str]] = [{"type": "image"} for _ in range(n_images)]
        content.append({"type": "text", "text": VERIFIER_PREAMBLE + _SENTINEL})
        messages = [{"role": "system", "content": VERIFIER_SYSTEM}, {"role": "user", "content": content}]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        before, sep, after = text.partition(_SENTINEL)
        if not sep:
            raise EngineError("the verifier's chat template dropped the question text")
        return before, after

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _prepare(self, item: VerifyItem) -> _Prepared:
        import torch

        if not item.images:
            raise ValueError("a verification item needs at least one image")
        if not item.questions:
            raise ValueError("a verification item needs at least one question")
        before, after = self._template(len(item.images))
        vis = self.image_processor(images=[im.convert("RGB") for im in item.images], return_tensors="pt")
        grid = vis["image_grid_thw"]
        counts = [int(t * h * w) // self.merge**2 for t, h, w in grid.tolist()]
        tokens = self._encode(before)
        placeholders = sum(1 for t in tokens if t == self.image_token_id)
        if placeholders != len(counts):
            raise EngineError(f"the chat template wrote {placeholders} image placeholders for {len(counts)} images")
        prefix: list[int] = []
        pieces = iter(counts)
        for tok in tokens:
            prefix.extend([tok] * next(pieces) if tok == self.image_token_id else [tok])
        blocks = [self._encode(q + after) for q in item.questions]
        ids = torch.tensor([prefix + blocks[0][:1]])
        pos, _ = self.model.model.get_rope_index(
            ids, (ids == self.image_token_id).int(), image_grid_thw=grid
        )
        return _Prepared(prefix, blocks, vis["pixel_values"], grid, pos[:, 0, :-1], int(pos[0, 0, -1]))

    # ---- batching ------------------------------------------------------------------------
    def _batches(self, lengths: list[int]) -> Iterator[list[int]]:
        """Indices grouped longest first so that B * max_len stays within the token budget."""
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        batch: list[int] = []
        for i in order:
            if batch and (len(batch) + 1) * lengths[batch[0]] > self.max_batch_tokens:
                yield batch
                batch = []
            batch.append(i)
        if batch:
            yield batch

    def _p_from_hidden(self, hidden: Any) -> list[float]:
        """p from the full next-token logits at the given hidden states."""
        return self.answers.p_yes(self.model.get_output_embeddings()(hidden))

    # ---- forward passes ---------------------------------------------------------------
    def _forward_packed(self, preps: list[_Prepared]) -> list[list[float]]:
        import torch

        lengths = [len(p.prefix) + sum(len(b) for b in p.blocks) for p in preps]
        B, L = len(preps), max(lengths)
        ids = torch.full((B, L), self.pad_id, dtype=torch.long)
        pos = torch.zeros((3, B, L), dtype=torch.long)
        block = torch.full((B, L), -2, dtype=torch.long)  # -1 prefix, k question block, -2 padding
        last: list[tuple[int, int]] = []
        for b, p in enumerate(preps):
            n = len(p.prefix)
            ids[b, :n] = torch.tensor(p.prefix)
            pos[:, b, :n] = p.prefix_pos
            block[b, :n] = -1
            at = n
            for k, blk in enumerate(p.blocks):
                m = len(blk)
                ids[b, at:at + m] = torch.tensor(blk)
                pos[:, b, at:at + m] = p.block_start + torch.arange(m)
                block[b, at:at + m] = k
                at += m
                last.append((b, at - 1))
        causal = torch.ones(L, L, dtype=torch.bool).tril()
        qb, kb = block[:, :, None], block[:, None, :]
        if self.attn_mask_mode == "block":
            allowed = causal & ((kb == -1) | (kb == qb)) & (kb != -2)
        else:  # plain causal over the packed sequence: only for showing the block mask matters
            allowed = causal & (kb != -2)
        allowed |= torch.eye(L, dtype=torch.bool)  # padded rows attend to themselves, never NaN
        hidden = self._run(ids, pos, allowed[:, None], preps)
        bi = torch.tensor([b for b, _ in last], device=hidden.device)
        ti = torch.tensor([t for _, t in last], device=hidden.device)
        flat = iter(self._p_from_hidden(hidden[bi, ti]))
        return [[next(flat) for _ in p.blocks] for p in preps]

    def _forward_per_pair(self, preps: list[_Prepared]) -> list[float]:
        """One ordinary causal sequence per (prefix, block); positions computed by the model."""
        import torch

        seqs = [p.prefix + p.blocks[0] for p in preps]
        B, L = len(seqs), max(len(s) for s in seqs)
        ids = torch.full((B, L), self.pad_id, dtype=torch.long)
        mask = torch.zeros((B, L), dtype=torch.long)
        for b, s in enumerate(seqs):
            ids[b, : len(s)] = torch.tensor(s)
            mask[b, : len(s)] = 1
        hidden = self._run(ids, None, mask, preps)
        ends = torch.tensor([len(s) - 1 for s in seqs], device=hidden.device)
        return self._p_from_hidden(hidden[torch.arange(B, device=hidden.device), ends])

    def _run(self, ids: Any, pos: Any, mask: Any, preps: list[_Prepared]) -> Any:
        import torch

        dev = self.device
        out = self.model.model(
            input_ids=ids.to(dev),
            attention_mask=mask.to(dev),
            position_ids=None if pos is None else pos.to(dev),
            pixel_values=torch.cat([p.pixel_values for p in preps]).to(dev, self.model.dtype),
            image_grid_thw=torch.cat([p.grid_thw for p in preps]).to(dev),
            mm_token_type_ids=(ids == self.image_token_id).int().to(dev),
            use_cache=False,
        )
        return out.last_hidden_state

    # ---- public ---------------------------------------------------------------------------
    def verify(self, items: Sequence[VerifyItem]) -> list[list[float]]:
        import torch

        preps = [self._prepare(it) for it in items]
        with torch.inference_mode():
            if self.mode == "packed":
                return self._verify_packed(preps)
            return self._verify_per_pair(preps)

    def verify_each(self, items: Sequence[VerifyItem]) -> list[ItemScores | EngineError]:
        """Exact p from the full logits for every item; a failure raises for the whole batch."""
        return [ItemScores(tuple(p), ("logits",) * len(p)) for p in self.verify(items)]

    def _verify_packed(self, preps: list[_Prepared]) -> list[list[float]]:
        out: list[list[float]] = [[] for _ in preps]
        lengths = [len(p.prefix) + sum(len(b) for b in p.blocks) for p in preps]
        for idx in self._batches(lengths):
            for i, ps in zip(idx, self._forward_packed([preps[i] for i in idx]), strict=True):
                out[i] = ps
        return out

    def _verify_per_pair(self, preps: list[_Prepared]) -> list[list[float]]:
        pairs = [
            _Prepared(p.prefix, [blk], p.pixel_values, p.grid_thw, p.prefix_pos, p.block_start)
            for p in preps for blk in p.blocks
        ]
        owner = [(i, k) for i, p in enumerate(preps) for k in range(len(p.blocks))]
        flat: dict[int, float] = {}
        for idx in self._batches([len(p.prefix) + len(p.blocks[0]) for p in pairs]):
            flat.update(zip(idx, self._forward_per_pair([pairs[i] for i in idx]), strict=True))
        out: list[list[float]] = [[] for _ in preps]
        for n, (i, _k) in enumerate(owner):
            out[i].append(flat[n])  # a pair that was never scored is a KeyError, never a silent 0
        return out
