"""The decomposer on transformers: prompts become validated semantic and quality questions.

Two pipelines share one constrained decoder:
- ``fast``: one generation per prompt writes every question as one JSON object;
- ``dsg``: the published multi-stage pipeline (DSG tuples -> dependencies -> questions, one
  validity and one tagging call per question, one call for the quality questions).

Every generation is constrained by xgrammar, so even a random model writes well-formed JSON
with known tags, positional ids and backward-only dependencies. What a grammar cannot promise
(a finished output, non-blank text, the model's own validity verdicts) is checked, the prompt is
retried with sampling, and exhausted retries raise EngineError: never a partial decomposition.

Schemas live in decomposition_schema, pure parsing and assembly in decomposition_parse.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from dvreward_protocol.questions import (
    QUALITY_ASPECTS,
    SEMANTIC_TAGS,
    Decomposition,
)
from server.engines import prompts as P
from server.engines.answers import YesNo
from server.engines.base import EngineError
from server.engines.decomposition_parse import (
    DSGTuple,
    Generation,
    assemble_dsg,
    check_validity,
    is_required,
    parse_dependencies,
    parse_dsg_questions,
    parse_fast_output,
    parse_quality,
    parse_reason,
    parse_tag,
    parse_tuples,
    require_finished,
)
from server.engines.decomposition_schema import (
    Limits,
    dependencies_schema,
    fast_schema,
    quality_schema,
    questions_schema,
    reason_schema,
    tag_grammar,
    tuples_schema,
)
from server.engines.loading import load_error, pretrained_kwargs, torch_dtype

PIPELINES: tuple[str, ...] = ("fast", "dsg")

T = TypeVar("T")

# --- Messages (templates live in prompts.py) ------------------------------------------------

Messages = list[dict[str, str]]


def _messages(user: str) -> Messages:
    return [{"role": "system", "content": P.DECOMPOSER_SYSTEM}, {"role": "user", "content": user}]


def fast_messages(prompt: str) -> Messages:
    return _messages(P.DECOMPOSER_FAST.format(prompt=prompt, tags=", ".join(SEMANTIC_TAGS),
                                              aspects=", ".join(QUALITY_ASPECTS)))


def dsg_tuples_messages(prompt: str) -> Messages:
    return _messages(P.DSG_TUPLES.format(prompt=prompt))


def dsg_dependencies_messages(prompt: str, tuples: Sequence[DSGTuple]) -> Messages:
    return _messages(P.DSG_DEPENDENCIES.format(prompt=prompt, tuples="\n".join(t.render() for t in tuples)))


def dsg_questions_messages(prompt: str, tuples: Sequence[DSGTuple]) -> Messages:
    return _messages(P.DSG_QUESTIONS.format(prompt=prompt, tuples="\n".join(t.render() for t in tuples)))


def dsg_validity_messages(prompt: str, question: str) -> Messages:
    return _messages(P.DSG_VALIDITY.format(prompt=prompt, question=question))


def dsg_validity_reason_messages(prompt: str, question: str) -> Messages:
    return _messages(P.DSG_VALIDITY_REASON.format(prompt=prompt, question=question))


def dsg_tag_messages(prompt: str, question: str) -> Messages:
    return _messages(P.DSG_TAG.format(prompt=prompt, question=question, tags=", ".join(SEMANTIC_TAGS)))


def dsg_quality_messages(prompt: str, questions: Mapping[str, str]) -> Messages:
    listing = "\n".join(f"{qid}: {text}" for qid, text in questions.items())
    return _messages(P.DSG_QUALITY.format(prompt=prompt, questions=listing, aspects=", ".join(QUALITY_ASPECTS)))


# --- The engine -----------------------------------------------------------------------------


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


class HFDecomposer:
    """Decomposer protocol on a chat-templated causal LM with grammar-constrained decoding."""

    def __init__(
        self,
        model_path: str | Path,
        pipeline: str = "fast",
        *,
        device: str = "cpu",
        dtype: str = "float32",
        max_new_tokens: int,
        limits: Limits,
        max_retries: int = 2,
        seed: int = 0,
        retry_temperature: float = 0.7,
        batch_size: int = 8,
    ) -> None:
        if pipeline not in PIPELINES:
            raise EngineError(f"unknown decomposer pipeline {pipeline!r}; expected one of {', '.join(PIPELINES)}")
        if max_new_tokens < 1 or max_retries < 0 or batch_size < 1:
            raise EngineError("max_new_tokens and batch_size must be positive and max_retries non-negative")
        local = Path(model_path).expanduser()
        self.model_id = str(local.resolve()) if local.is_dir() else str(model_path)
        self.pipeline = pipeline
        self.device = device
        self.max_new_tokens = max_new_tokens
        self.max_retries = max_retries
        self.seed = seed
        self.retry_temperature = retry_temperature
        self.batch_size = batch_size
        self.limits = limits
        self.template_version = P.template_version()
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

    def _json_grammar(self, schema: dict[str, Any]) -> Any:
        # Compact separators, no free whitespace: a random model cannot pad forever.
        return self._compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)

    # -- public API ----------------------------------------------------------------------

    def decompose(self, prompts: Sequence[str]) -> list[Decomposition]:
        """One validated decomposition per prompt; a prompt that fails every attempt raises EngineError."""
        results = self.decompose_each(prompts)
        errors = {i: str(r) for i, r in enumerate(results) if isinstance(r, EngineError)}
        if errors:
            raise EngineError(_failure_message(list(prompts), errors, self.max_retries + 1, self.pipeline))
        return [r for r in results if isinstance(r, Decomposition)]

    def decompose_each(self, prompts: Sequence[str]) -> list[Decomposition | EngineError]:
        """Per prompt, a decomposition or the error of its last attempt: one bad prompt fails alone."""
        prompts = list(prompts)
        for n, p in enumerate(prompts):
            if not isinstance(p, str) or not p.strip():
                raise EngineError(f"prompt {n} is empty")
        done: dict[int, Decomposition] = {}
        errors: dict[int, str] = {}
        attempt = self._fast_attempt if self.pipeline == "fast" else self._dsg_attempt
        for n in range(self.max_retries + 1):
            todo = [i for i in range(len(prompts)) if i not in done]
            if not todo:
                break
            for i, result in zip(todo, attempt([prompts[i] for i in todo], n), strict=True):
                if isinstance(result, Decomposition):
                    done[i] = self._cap_warnings(result)
                    errors.pop(i, None)
                else:
                    errors[i] = result
        return [done[i] if i in done else EngineError(
                    _failure_message(prompts[i:i + 1], {0: errors[i]}, self.max_retries + 1, self.pipeline))
                for i in range(len(prompts))]

    def _cap_warnings(self, dec: Decomposition) -> Decomposition:
        """Say when a list stopped at its cap: the schema cannot tell a full list from a cut one."""
        caps = (("semantic", len(dec.semantic), self.limits.max_semantic, "DVREWARD_DECOMPOSER_MAX_SEMANTIC"),
                ("quality", len(dec.quality), self.limits.max_quality, "DVREWARD_DECOMPOSER_MAX_QUALITY"))
        warnings = tuple(f"the {kind} questions reached their cap of {cap}; the prompt may need more "
                         f"(raise {setting})" for kind, n, cap, setting in caps if cap and n >= cap)
        return dec.model_copy(update={"warnings": warnings}) if warnings else dec

    # -- pipelines -----------------------------------------------------------------------

    def _meta(self) -> dict[str, Any]:
        return {"pipeline": self.pipeline, "model": self.model_id, "template_version": self.template_version}

    def _fast_attempt(self, prompts: list[str], attempt: int) -> list[Decomposition | str]:
        grammar = self._json_grammar(fast_schema(self.limits))
        gens = self._generate([self._chat(fast_messages(p)) for p in prompts], [grammar] * len(prompts), attempt)
        out: list[Decomposition | str] = []
        for prompt, gen in zip(prompts, gens, strict=True):
            try:
                text = require_finished(gen, "fast decomposition", self.max_new_tokens)
                out.append(parse_fast_output(text, prompt, **self._meta()))
            except ValueError as e:
                out.append(str(e))
        return out

    def _dsg_attempt(self, prompts: list[str], attempt: int) -> list[Decomposition | str]:
        """Stages 1-6 for every prompt, batched per stage; a prompt drops out at its first failure."""
        errors: dict[int, str] = {}
        tuples, deps, questions = self._dsg_graph(prompts, attempt, errors)
        verdicts = self._validity(prompts, questions, attempt, errors)
        g_tag = self._compiler.compile_grammar(tag_grammar())
        tags = self._stage("DSG tagging", {
            (i, qid): (dsg_tag_messages(prompts[i], q), g_tag, parse_tag)
            for i in verdicts for qid, q in questions[i].items()}, attempt, errors)
        tagged = [i for i in verdicts if all((i, qid) in tags for qid in questions[i])]
        g_quality = self._json_grammar(quality_schema(self.limits))
        quality = self._stage("DSG quality", {
            i: (dsg_quality_messages(prompts[i], questions[i]), g_quality, parse_quality) for i in tagged},
            attempt, errors)
        out: list[Decomposition | str] = []
        for i, prompt in enumerate(prompts):
            if i not in quality:
                out.append(errors.get(i, "no result (internal error)"))
                continue
            try:
                out.append(assemble_dsg(prompt, tuples[i], deps[i], questions[i], verdicts[i],
                                        {qid: tags[(i, qid)] for qid in questions[i]}, quality[i], **self._meta()))
            except ValueError as e:
                out.append(str(e))
        return out

    def _dsg_graph(self, prompts: list[str], attempt: int, errors: dict[int, str]) -> tuple[
            dict[int, list[DSGTuple]], dict[int, dict[str, tuple[str, ...]]], dict[int, dict[str, str]]]:
        """Stages 1-3: tuples, then their dependencies and questions (schemas built from the tuple ids)."""
        g_tuples = self._json_grammar(tuples_schema(self.limits))
        tuples = self._stage("DSG tuples", {
            i: (dsg_tuples_messages(p), g_tuples, parse_tuples) for i, p in enumerate(prompts)}, attempt, errors)
        ids = {i: _tids(ts) for i, ts in tuples.items()}
        deps = self._stage("DSG dependencies", {
            i: (dsg_dependencies_messages(prompts[i], tuples[i]),
                self._json_grammar(dependencies_schema(ids[i], self.limits)),
                _bind(parse_dependencies, ids[i])) for i in tuples}, attempt, errors)
        questions = self._stage("DSG questions", {
            i: (dsg_questions_messages(prompts[i], tuples[i]),
                self._json_grammar(questions_schema(ids[i], self.limits)),
                _bind(parse_dsg_questions, ids[i])) for i in deps}, attempt, errors)
        return tuples, deps, questions

    def _validity(self, prompts: list[str], questions: dict[int, dict[str, str]], attempt: int,
                  errors: dict[int, str]) -> dict[int, dict[str, bool]]:
        """Stage 4: P(yes) vs P(no) per question; prompts with a rejected question drop out here, with the
        model's reason for each rejection."""
        keys = [(i, qid) for i in questions for qid in questions[i]]
        texts = [self._chat(dsg_validity_messages(prompts[i], questions[i][qid])) for i, qid in keys]
        probs = dict(zip(keys, self._p_yes(texts), strict=True))
        g_reason = self._json_grammar(reason_schema(self.limits))
        reasons = self._stage("DSG validity reason", {
            k: (dsg_validity_reason_messages(prompts[k[0]], questions[k[0]][k[1]]), g_reason, parse_reason)
            for k in keys if not is_required(probs[k])}, attempt, {})  # no reason still rejects, just unexplained
        verdicts: dict[int, dict[str, bool]] = {}
        for i, qs in questions.items():
            v = {qid: is_required(probs[(i, qid)]) for qid in qs}
            try:
                check_validity(qs, v, {qid: r for (j, qid), r in reasons.items() if j == i})
                verdicts[i] = v
            except ValueError as e:
                errors[i] = f"DSG validity: {e}"
        return verdicts

    def _stage(self, what: str, jobs: dict[Any, tuple[Messages, Any, Callable[[str], T]]], attempt: int,
               errors: dict[int, str]) -> dict[Any, T]:
        """One constrained generation per job (key: prompt index or (index, question id)).

        A parse failure or truncation is recorded against the job's prompt in ``errors``.
        """
        keys = list(jobs)
        gens = self._generate([self._chat(jobs[k][0]) for k in keys], [jobs[k][1] for k in keys], attempt)
        out: dict[Any, T] = {}
        for k, gen in zip(keys, gens, strict=True):
            try:
                out[k] = jobs[k][2](require_finished(gen, what, self.max_new_tokens))
            except ValueError as e:
                msg = str(e)
                errors[k[0] if isinstance(k, tuple) else k] = msg if msg.startswith(what) else f"{what}: {msg}"
        return out

    # -- model calls ---------------------------------------------------------------------

    def _chat(self, messages: Messages) -> str:
        from jinja2.exceptions import TemplateError

        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except TemplateError:  # some templates reject a system turn: fold it into the user turn
            merged = [{"role": "user", "content": messages[0]["content"] + "\n\n" + messages[1]["content"]}]
            return self.tokenizer.apply_chat_template(merged, tokenize=False, add_generation_prompt=True)

    def _encode(self, texts: Sequence[str]) -> tuple[Any, Any, Any]:
        """Left-padded batch with positions counted from each row's first real token."""
        enc = self.tokenizer(list(texts), return_tensors="pt", padding=True, padding_side="left",
                             add_special_tokens=False)
        ids, attn = enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)
        return ids, attn, (attn.cumsum(-1) - 1).clamp(min=0)

    def _p_yes(self, texts: Sequence[str]) -> list[float]:
        """p = P(yes) / (P(yes) + P(no)) of the next token, variants summed."""
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


def _as_list(x: Any) -> list[Any]:
    if x is None:
        return []
    return list(x) if isinstance(x, list | tuple) else [x]


def _tids(tuples: Sequence[DSGTuple]) -> list[str]:
    return [t.id for t in tuples]


def _bind(parse: Callable[[str, Sequence[str]], T], ids: Sequence[str]) -> Callable[[str], T]:
    return lambda text: parse(text, ids)


def _failure_message(prompts: Sequence[str], errors: Mapping[int, str], attempts: int, pipeline: str) -> str:
    parts = [f"prompt {i} ({prompts[i][:60]!r}): {msg}" for i, msg in sorted(errors.items())]
    return (f"{pipeline} decomposition failed after {attempts} attempt(s) for {len(errors)} of {len(prompts)} "
            "prompt(s); last error: " + " | ".join(parts))
