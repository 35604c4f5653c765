"""The transformers verifier: p(yes) for K questions about an image from full next-token logits.

Every (item, question) is the method's conversation (`conversation.py`) rendered by the checkpoint's
chat template and tokenized whole, so its ids are exactly `apply_chat_template`'s. `packed` (default)
puts the ids the K questions share (the image block) once and the K remainders after it in one
sequence: each block attends only to the shared prefix and to itself, and its positions restart where
the prefix ends, so every block sees exactly what it would see alone. `per_pair` runs one ordinary
sequence per (image, question): the reference packed must equal.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

from server.core.answer_rule import GREEDY_TOKENS
from server.engines import defaults
from server.engines.answers import YesNo
from server.engines.base import EngineError, ItemScores, VerifyItem
from server.engines.conversation import IMAGE_PART, verifier_messages
from server.engines.hf.vision_attention import enable_batched_vision_attention
from server.engines.loading import load_error, pretrained_kwargs, torch_dtype
from server.engines.prompts import VERIFIER_SYSTEM_PROMPT

Mode = Literal["packed", "per_pair"]


@dataclass
class _Prepared:
    """Questions of one item sharing a token prefix: ids, vision inputs and prefix positions."""

    slots: list[int]  # the item's question indices, one per block
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
        system_prompt: str = VERIFIER_SYSTEM_PROMPT,
        mode: Mode = defaults.VERIFIER_MODE,
        max_batch_tokens: int = defaults.MAX_BATCH_TOKENS,
        attn_mask_mode: Literal["block", "causal"] = "block",
    ) -> None:
        if mode not in ("packed", "per_pair"):
            raise ValueError(f"mode must be 'packed' or 'per_pair', got {mode!r}")
        self.model, self.tokenizer, self.image_processor = model, tokenizer, image_processor
        self.model_id = model_id
        self.system_prompt = system_prompt
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
        device: str = defaults.DEVICE,
        dtype: str = defaults.DTYPE,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        batched_vision: bool = defaults.BATCHED_VISION,
        **options: Any,
    ) -> HFVerifier:
        """Load tokenizer, image processor and model from a local directory or hub id.

        Images are resized within the checkpoint's own pixel range unless `min_pixels` / `max_pixels`
        override it. `batched_vision` runs the vision tower's window attention as one call (same result).
        """
        from transformers import AutoModelForImageTextToText, AutoTokenizer, Qwen2VLImageProcessorPil

        kw = pretrained_kwargs(ref)
        try:
            tokenizer = AutoTokenizer.from_pretrained(ref, **kw)
            processor = Qwen2VLImageProcessorPil.from_pretrained(ref, **kw)
        except (OSError, ValueError) as exc:
            raise EngineError(load_error("verifier", ref, exc)) from exc
        if min_pixels is not None or max_pixels is not None:
            try:  # a bound that contradicts the checkpoint's other one is the caller's setting, not a load failure
                size = pixel_range(processor.size, min_pixels, max_pixels)
            except ValueError as exc:
                own = dict(processor.size)
                raise EngineError(f"verifier pixel range: {exc} (the checkpoint's own is {own})") from exc
            processor = Qwen2VLImageProcessorPil.from_pretrained(ref, size=size, **kw)
        try:
            model = AutoModelForImageTextToText.from_pretrained(
                ref, dtype=torch_dtype(dtype), attn_implementation="sdpa", **kw
            )
        except (OSError, ValueError) as exc:
            raise EngineError(load_error("verifier", ref, exc)) from exc
        if batched_vision:
            enable_batched_vision_attention(model)
        return cls(model.to(device).eval(), tokenizer, processor, model_id=ref, **options)

    # ---- preparation -------------------------------------------------------------------
    def token_ids(self, n_images: int, question: str) -> list[int]:
        """The chat template's ids for one question about `n_images` images (one placeholder per image)."""
        messages = verifier_messages(self.system_prompt, question, [IMAGE_PART] * n_images)
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _expand(self, ids: list[int], counts: list[int]) -> list[int]:
        """Each image placeholder repeated as many times as its image has merged patches."""
        placeholders = sum(1 for t in ids if t == self.image_token_id)
        if placeholders != len(counts):
            raise EngineError(f"the chat template wrote {placeholders} image placeholders for {len(counts)} images")
        out: list[int] = []
        pieces = iter(counts)
        for tok in ids:
            out.extend([tok] * next(pieces) if tok == self.image_token_id else [tok])
        return out

    def _prepare(self, item: VerifyItem) -> list[_Prepared]:
        """The item's questions split at the longest token prefix they share.

        Normally one group: the image block and everything before it is common. A question whose
        tokens would change the shared prefix around the images gets a prefix of its own, so the
        ids are always exactly the chat template's.
        """
        if not item.images:
            raise ValueError("a verification item needs at least one image")
        if not item.questions:
            raise ValueError("a verification item needs at least one question")
        vis = self.image_processor(images=[im.convert("RGB") for im in item.images], return_tensors="pt")
        grid = vis["image_grid_thw"]
        counts = [int(t * h * w) // self.merge**2 for t, h, w in grid.tolist()]
        seqs = [self._expand(self.token_ids(len(item.images), q), counts) for q in item.questions]
        n = _shared_prefix(seqs)
        if n > _last_index(seqs[0], self.image_token_id):
            return [self._prepared(list(range(len(seqs))), seqs, n, vis)]
        return [self._prepared([k], [s], len(s) - 1, vis) for k, s in enumerate(seqs)]

    def _prepared(self, slots: list[int], seqs: list[list[int]], n: int, vis: Any) -> _Prepared:
        import torch

        prefix = seqs[0][:n]
        ids = torch.tensor([seqs[0][: n + 1]])
        grid = vis["image_grid_thw"]
        pos, _ = self.model.model.get_rope_index(ids, (ids == self.image_token_id).int(), image_grid_thw=grid)
        return _Prepared(slots, prefix, [s[n:] for s in seqs], vis["pixel_values"], grid, pos[:, 0, :-1],
                         int(pos[0, 0, -1]))

    # ---- batching ------------------------------------------------------------------------
    def _batches(self, lengths: list[int]) -> Iterator[list[int]]:
        """Indices grouped longest first so that B * max_len stays within the token budget.

        An item longer than the budget is refused (the worker then fails it alone): its L x L attention
        would exceed every memory bound the budget is meant to give.
        """
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        if order and lengths[order[0]] > self.max_batch_tokens:
            raise EngineError(f"an item of {lengths[order[0]]} tokens exceeds the token budget of one forward pass "
                              f"({self.max_batch_tokens}, DVREWARD_MAX_BATCH_TOKENS)")
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
        hidden = self._run(ids, pos, self._packed_mask(block)[:, None], preps)
        bi = torch.tensor([b for b, _ in last], device=hidden.device)
        ti = torch.tensor([t for _, t in last], device=hidden.device)
        flat = iter(self._p_from_hidden(hidden[bi, ti]))
        return [[next(flat) for _ in p.blocks] for p in preps]

    def _packed_mask(self, block: Any) -> Any:
        """(B, L, L) booleans, built in place: one B*L*L allocation (B*L <= the token budget), no temporaries."""
        import torch

        L = block.shape[1]
        qb, kb = block[:, :, None], block[:, None, :]
        if self.attn_mask_mode == "block":
            allowed = kb == qb
            allowed |= kb == -1
        else:  # plain causal over the packed sequence: only for showing the block mask matters
            allowed = (kb != -2).expand(-1, L, -1).clone()
        allowed &= kb != -2
        allowed &= torch.ones(L, L, dtype=torch.bool).tril_()
        allowed |= torch.eye(L, dtype=torch.bool)  # padded rows attend to themselves, never NaN
        return allowed

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
        return self._verify(items, [self._prepare(it) for it in items])

    def verify_each(self, items: Sequence[VerifyItem], *, greedy: bool = False) -> list[ItemScores | EngineError]:
        """Exact p from the full logits for every item (and the greedy answers); a failure raises for the batch.
        Each item is prepared (image processor, chat template) once for both."""
        groups = [self._prepare(it) for it in items]
        ps = self._verify(items, groups)
        answers = self._greedy_answers(items, groups) if greedy else [None] * len(items)
        return [ItemScores.exact(p, a) for p, a in zip(ps, answers, strict=True)]

    def greedy_answers(self, items: Sequence[VerifyItem]) -> list[list[str]]:
        """Each (item, question) conversation continued greedily for up to GREEDY_TOKENS tokens, as text: what a
        chat call at temperature 0 answers. One ordinary sequence per pair, left-padded batches."""
        return self._greedy_answers(items, [self._prepare(it) for it in items])

    def _verify(self, items: Sequence[VerifyItem], groups: list[list[_Prepared]]) -> list[list[float]]:
        import torch

        preps = [p for g in groups for p in g]
        with torch.inference_mode(), _float32_convolutions():
            scores = self._verify_packed(preps) if self.mode == "packed" else self._verify_per_pair(preps)
        out: list[list[float]] = []
        flat = iter(scores)
        for item, g in zip(items, groups, strict=True):
            by_slot = {k: p for prep in g for k, p in zip(prep.slots, next(flat), strict=True)}
            out.append([by_slot[k] for k in range(len(item.questions))])  # a missing p is a KeyError, never 0
        return out

    def _greedy_answers(self, items: Sequence[VerifyItem], groups: list[list[_Prepared]]) -> list[list[str]]:
        import torch

        pairs = [(i, k, prep.prefix + blk, prep) for i, g in enumerate(groups) for prep in g
                 for k, blk in zip(prep.slots, prep.blocks, strict=True)]
        eos = self.model.generation_config.eos_token_id
        stop = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        texts: dict[tuple[int, int], str] = {}
        with torch.inference_mode(), _float32_convolutions():
            for idx in self._batches([len(seq) + GREEDY_TOKENS for _, _, seq, _ in pairs]):
                batch = [pairs[j] for j in idx]
                L = max(len(seq) for _, _, seq, _ in batch)
                ids = torch.full((len(batch), L), self.pad_id, dtype=torch.long)
                mask = torch.zeros((len(batch), L), dtype=torch.long)
                for b, (_, _, seq, _) in enumerate(batch):
                    ids[b, L - len(seq):] = torch.tensor(seq)
                    mask[b, L - len(seq):] = 1
                dev = self.device
                out = self.model.generate(
                    input_ids=ids.to(dev), attention_mask=mask.to(dev),
                    pixel_values=torch.cat([p.pixel_values for *_, p in batch]).to(dev, self.model.dtype),
                    image_grid_thw=torch.cat([p.grid_thw for *_, p in batch]).to(dev),
                    mm_token_type_ids=(ids == self.image_token_id).int().to(dev),
                    max_new_tokens=GREEDY_TOKENS, do_sample=False)
                for b, (i, k, _, _) in enumerate(batch):
                    new = out[b, L:].tolist()
                    end = next((n for n, t in enumerate(new) if t in stop), len(new))
                    texts[(i, k)] = self.tokenizer.decode(new[:end], skip_special_tokens=True)
        return [[texts[(i, k)] for k in range(len(it.questions))] for i, it in enumerate(items)]

    def _verify_packed(self, preps: list[_Prepared]) -> list[list[float]]:
        out: list[list[float]] = [[] for _ in preps]
        lengths = [len(p.prefix) + sum(len(b) for b in p.blocks) for p in preps]
        for idx in self._batches(lengths):
            for i, ps in zip(idx, self._forward_packed([preps[i] for i in idx]), strict=True):
                out[i] = ps
        return out

    def _verify_per_pair(self, preps: list[_Prepared]) -> list[list[float]]:
        pairs = [
            _Prepared([k], p.prefix, [blk], p.pixel_values, p.grid_thw, p.prefix_pos, p.block_start)
            for p in preps for k, blk in zip(p.slots, p.blocks, strict=True)
        ]
        owner = [(i, k) for i, p in enumerate(preps) for k in range(len(p.blocks))]
        flat: dict[int, float] = {}
        for idx in self._batches([len(p.prefix) + len(p.blocks[0]) for p in pairs]):
            flat.update(zip(idx, self._forward_per_pair([pairs[i] for i in idx]), strict=True))
        out: list[list[float]] = [[] for _ in preps]
        for n, (i, _k) in enumerate(owner):
            out[i].append(flat[n])  # a pair that was never scored is a KeyError, never a silent 0
        return out


@contextmanager
def _float32_convolutions() -> Iterator[None]:
    """cuDNN's TF32 off while scoring. PyTorch lets cuDNN compute float32 convolutions (the vision tower's patch
    embedding) in TF32 by default, at an algorithm chosen by the batch's shape: on a GPU p then moved by up to 0.04
    with the batch's composition (a random small verifier, float32, H200), against 7e-6 with it off."""
    import torch

    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = before


def pixel_range(size: dict[str, int], min_pixels: int | None, max_pixels: int | None) -> dict[str, int]:
    """The image processor's size with explicit overrides; unset bounds keep the checkpoint's own."""
    lo = size["shortest_edge"] if min_pixels is None else min_pixels
    hi = size["longest_edge"] if max_pixels is None else max_pixels
    if not 0 < lo <= hi:
        raise ValueError(f"need 0 < min_pixels <= max_pixels, got {lo} and {hi}")
    return {"shortest_edge": lo, "longest_edge": hi}


def _shared_prefix(seqs: list[list[int]]) -> int:
    """Length of the longest common prefix, leaving every sequence at least one token of its own."""
    n = min(len(s) for s in seqs) - 1
    first = seqs[0]
    for s in seqs[1:]:
        i = 0
        while i < n and s[i] == first[i]:
            i += 1
        n = i
    return n


def _last_index(seq: list[int], token: int) -> int:
    return max(i for i, t in enumerate(seq) if t == token)
