"""The decomposer on transformers: a decoding backend with xgrammar-constrained generation.

Every generation is constrained by xgrammar, so even a random model writes well-formed JSON
with known tags, positional ids and backward-only dependencies; the pipelines that use it live
in server.engines.decomposition.pipelines and run unchanged on the other engines.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from server.engines import defaults
from server.engines.answers import YesNo
from server.engines.base import EngineError
from server.engines.decomposition.parse import Generation
from server.engines.decomposition.pipelines import (
    Choice,
    Constraint,
    Messages,
    PipelineDecomposer,
    check_options,
    render_chat,
)
from server.engines.decomposition.schema import Limits, choice_grammar
from server.engines.loading import load_error, pretrained_kwargs, torch_dtype


def load_causal_lm(model_path: str | Path, device: str, dtype: str) -> tuple[Any, Any]:
    """Tokenizer and model from a local directory (never touching the hub) or a hub id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        torch_dtype_ = torch_dtype(dtype)
    except ValueError as e:
        raise EngineError(str(e)) from e
    kw = pretrained_kwargs(model_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_path), **kw)
        model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch_dtype_, **kw)
    except (OSError, ValueError) as e:
        raise EngineError(load_error("decomposer", model_path, e)) from e
    if not getattr(tokenizer, "chat_template", None):
        raise EngineError(f"decomposer {model_path} has no chat template; an instruction-tuned model is needed")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, model.to(device).eval()


class HFBackend:
    """DecodingBackend on a chat-templated causal LM: batched, KV-cached, grammar-constrained decoding."""

    def __init__(
        self,
        model_path: str | Path,
        *,
        device: str = defaults.DEVICE,
        dtype: str = defaults.DTYPE,
        max_new_tokens: int,
        seed: int = 0,
        retry_temperature: float = 0.7,
        batch_size: int = 8,
    ) -> None:
        if max_new_tokens < 1 or batch_size < 1:
            raise EngineError("max_new_tokens and batch_size must be positive")
        local = Path(model_path).expanduser()
        self.model_id = str(local.resolve()) if local.is_dir() else str(model_path)
        self.device = device
        self.max_new_tokens = max_new_tokens
        self.seed = seed
        self.retry_temperature = retry_temperature
        self.batch_size = batch_size
        self.tokenizer, self.model = load_causal_lm(model_path, device, dtype)
        self._init_decoding()

    def _init_decoding(self) -> None:
        import inspect

        import xgrammar as xgr

        # transformers renamed `past_key_values` to `cache` (argument and output field) during 5.x.
        self._cache_kw = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"

        # The bitmask spans the model's logits, which may be wider than the tokenizer (padded vocab).
        self._vocab_size = int(self.model.get_output_embeddings().weight.shape[0])
        stops = {self.tokenizer.eos_token_id, *_as_list(getattr(self.model.generation_config, "eos_token_id", None))}
        self._stop_ids = sorted(s for s in stops if s is not None)
        info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self._vocab_size,
                                                  stop_token_ids=self._stop_ids)
        self._compiler = xgr.GrammarCompiler(info)
        self._banned = self._banned_tokens(info)
        self._answers: YesNo | None = None  # built on first use: only the dsg validity stage needs it

    def _banned_tokens(self, info: Any) -> Any:
        """Tokens no output may contain, whatever the grammar says.

        xgrammar 0.2 lets raw control bytes into length-bounded JSON strings and treats added
        special tokens (<|im_start|>, vision pads) as plain text; stop tokens stay allowed.
        """
        import torch

        control = [any(b < 0x20 for b in piece) for piece in info.decoded_vocab[: self._vocab_size]]
        banned = torch.zeros(self._vocab_size, dtype=torch.bool)
        banned[: len(control)] = torch.tensor(control, dtype=torch.bool)
        special = set(self.tokenizer.all_special_ids) | {
            i for i, t in self.tokenizer.added_tokens_decoder.items() if t.special}
        banned[[i for i in special - set(self._stop_ids) if i < self._vocab_size]] = True
        return banned.to(self.device)

    def _grammar(self, constraint: Constraint) -> Any:
        if isinstance(constraint, Choice):
            return self._compiler.compile_grammar(choice_grammar(constraint.options))
        # Compact separators, no free whitespace: a random model cannot pad forever.
        return self._compiler.compile_json_schema(json.dumps(constraint.schema), any_whitespace=False)

    # -- DecodingBackend ---------------------------------------------------------------------

    def generate(self, requests: Sequence[tuple[Messages, Constraint]], attempt: int) -> list[Generation]:
        texts = [render_chat(self.tokenizer, messages) for messages, _ in requests]
        return self._generate(texts, [self._grammar(c) for _, c in requests], attempt)

    def p_yes(self, conversations: Sequence[Messages]) -> list[float | EngineError]:
        return list(self._p_yes([render_chat(self.tokenizer, m) for m in conversations]))

    # -- model calls ---------------------------------------------------------------------

    def _encode(self, texts: Sequence[str]) -> tuple[Any, Any, Any]:
        """Left-padded batch with positions counted from each row's first real token."""
        enc = self.tokenizer(list(texts), return_tensors="pt", padding=True, padding_side="left",
                             add_special_tokens=False)
        ids, attn = enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)
        return ids, attn, (attn.cumsum(-1) - 1).clamp(min=0)

    def _p_yes(self, texts: Sequence[str]) -> list[float]:
        """p = P(yes) / (P(yes) + P(no)) of the next token, over every token that reads yes or no."""
        import torch

        if self._answers is None:
            self._answers = YesNo(self.tokenizer, self.model_id)
        out: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            ids, attn, pos = self._encode(texts[start:start + self.batch_size])
            with torch.inference_mode():
                logits = self.model(input_ids=ids, attention_mask=attn, position_ids=pos, logits_to_keep=1).logits
            out += self._answers.p_yes(logits[:, -1, :])
        return out

    def _generate(self, texts: Sequence[str], grammars: Sequence[Any], attempt: int) -> list[Generation]:
        out: list[Generation] = []
        for start in range(0, len(texts), self.batch_size):
            end = start + self.batch_size
            out += self._generate_batch(texts[start:end], grammars[start:end], attempt)
        return out

    def _generate_batch(self, texts: Sequence[str], grammars: Sequence[Any], attempt: int) -> list[Generation]:
        """Constrained decoding with a KV cache: greedy on the first attempt, sampled on retries."""
        import torch

        with torch.inference_mode():
            return self._decode(texts, grammars, attempt)

    def _decode(self, texts: Sequence[str], grammars: Sequence[Any], attempt: int) -> list[Generation]:
        import torch
        import xgrammar as xgr

        if not texts:
            return []
        ids, attn, pos = self._encode(texts)
        matchers = [xgr.GrammarMatcher(g) for g in grammars]
        bitmask = xgr.allocate_token_bitmask(len(texts), self._vocab_size)
        rng = torch.Generator(device=self.device).manual_seed(self.seed + attempt) if attempt else None
        tokens: list[list[int]] = [[] for _ in texts]
        done = [False] * len(texts)
        cache = None
        for _ in range(self.max_new_tokens):
            out = self.model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True, logits_to_keep=1,
                             **{self._cache_kw: cache})
            cache = getattr(out, self._cache_kw)
            nxt = self._pick(out.logits[:, -1, :], matchers, bitmask, done, rng)
            for i, tok in enumerate(nxt):
                if done[i]:
                    continue
                if not matchers[i].accept_token(tok):
                    raise EngineError(f"grammar rejected token {tok} it allowed; xgrammar/tokenizer mismatch")
                done[i] = matchers[i].is_terminated()
                if not done[i]:
                    tokens[i].append(tok)
            if all(done):
                break
            ids = torch.tensor([[t] for t in nxt], device=self.device)
            attn = torch.cat([attn, attn.new_ones((len(texts), 1))], dim=1)
            pos = pos[:, -1:] + 1
        return [Generation(self.tokenizer.decode(t), d or m.is_completed(), len(t))
                for t, d, m in zip(tokens, done, matchers, strict=True)]

    def _pick(self, logits: Any, matchers: list[Any], bitmask: Any, done: list[bool], rng: Any) -> list[int]:
        """Mask each live row to what its grammar allows, then take argmax or sample."""
        import torch
        import xgrammar as xgr

        logits = logits.float().clone()  # masked in place; the model's output stays untouched
        for i, m in enumerate(matchers):
            if not done[i]:
                m.fill_next_token_bitmask(bitmask, i)
        xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device))
        logits[:, self._banned] = float("-inf")
        logits[torch.tensor(done, device=logits.device)] = 0.0  # finished rows: any token, ignored
        if rng is None:
            return logits.argmax(-1).tolist()
        probs = (logits / max(self.retry_temperature, 1e-5)).softmax(-1)
        return torch.multinomial(probs, 1, generator=rng).squeeze(-1).tolist()


class HFDecomposer(PipelineDecomposer):
    """The Decomposer protocol on transformers: a pipeline over an HFBackend."""

    backend: HFBackend

    def __init__(
        self,
        model_path: str | Path,
        pipeline: str = defaults.PIPELINE,
        *,
        max_retries: int = 2,
        limits: Limits,
        **backend_options: Any,
    ) -> None:
        check_options(pipeline, max_retries)  # bad arguments fail before the model loads
        super().__init__(HFBackend(model_path, **backend_options), pipeline, max_retries=max_retries, limits=limits)


def _as_list(x: Any) -> list[Any]:
    if x is None:
        return []
    return list(x) if isinstance(x, list | tuple) else [x]

