"""The decomposition pipelines, written once against a small decoding backend.

- ``fast``: one generation per prompt writes every question as one JSON object;
- ``dsg``: the published multi-stage pipeline (DSG tuples -> dependencies -> questions, one
  validity and one tagging call per question, one call for the quality questions).

A backend (transformers, vLLM, an OpenAI-compatible server) only has to "generate text for these
conversations under these constraints" and "read p(yes) after these conversations"; the pipelines,
their validation and their retries are the same on every engine. What a constraint cannot promise
(a finished output, non-blank text, the model's own validity verdicts) is checked here, a failed
prompt is retried with sampling, and exhausted retries are an EngineError: never a partial
decomposition.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from dvreward_protocol.questions import QUALITY_ASPECTS, SEMANTIC_TAGS, Decomposition
from server.engines import defaults
from server.engines import prompts as P
from server.engines.base import EngineError
from server.engines.decomposition.parse import (
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
from server.engines.decomposition.schema import (
    Limits,
    dependencies_schema,
    fast_schema,
    quality_schema,
    questions_schema,
    reason_schema,
    tuples_schema,
)

PIPELINES: tuple[str, ...] = ("fast", "dsg")
# Editing instructions are decomposed by the editing template in one generation, whatever the pipeline: the
# DSG stages describe a scene to draw, not a change to make.
EDIT_PIPELINE = "edit"

T = TypeVar("T")
Messages = list[dict[str, str]]


# --- What a backend is asked to do ------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class JsonSchema:
    """The output must be one JSON document valid under ``schema`` (compact: no free whitespace)."""

    schema: dict[str, Any]


@dataclass(frozen=True)
class Choice:
    """The output must be exactly one of ``options``."""

    options: tuple[str, ...]


Constraint = JsonSchema | Choice


class DecodingBackend(Protocol):
    """One model behind the pipelines. ``max_new_tokens`` bounds every generation."""

    model_id: str
    max_new_tokens: int

    def generate(self, requests: Sequence[tuple[Messages, Constraint]], attempt: int) -> list[Generation]:
        """One constrained generation per (conversation, constraint), in order.

        Greedy on attempt 0; later attempts sample, seeded by the attempt number.
        """
        ...

    def p_yes(self, conversations: Sequence[Messages]) -> list[float | EngineError]:
        """P(yes) / (P(yes) + P(no)) of the answer to each conversation, or why it has none."""
        ...


def render_chat(tokenizer: Any, messages: Messages) -> str:
    """The prompt text of a chat, generation prompt included, for backends that tokenize locally."""
    from jinja2.exceptions import TemplateError

    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except TemplateError:  # some templates reject a system turn: fold it into the user turn
        merged = [{"role": "user", "content": messages[0]["content"] + "\n\n" + messages[1]["content"]}]
        return tokenizer.apply_chat_template(merged, tokenize=False, add_generation_prompt=True)


# --- Messages (templates live in prompts.py) ------------------------------------------------


def _messages(user: str) -> Messages:
    return [{"role": "system", "content": P.DECOMPOSER_SYSTEM}, {"role": "user", "content": user}]


def fast_messages(prompt: str) -> Messages:
    return _messages(P.DECOMPOSER_FAST.format(prompt=prompt, tags=", ".join(SEMANTIC_TAGS),
                                              aspects=", ".join(QUALITY_ASPECTS)))


def edit_messages(instruction: str) -> Messages:
    return _messages(P.DECOMPOSER_EDIT.format(prompt=instruction, tags=", ".join(SEMANTIC_TAGS),
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


# --- The pipelines ----------------------------------------------------------------------------


def check_options(pipeline: str, max_retries: int) -> None:
    """Refuse bad pipeline options (before any model is loaded)."""
    if pipeline not in PIPELINES:
        raise EngineError(f"unknown decomposer pipeline {pipeline!r}; expected one of {', '.join(PIPELINES)}")
    if max_retries < 0:
        raise EngineError("max_retries must be non-negative")


class PipelineDecomposer:
    """The Decomposer protocol: a pipeline (fast or dsg) run on any decoding backend."""

    def __init__(self, backend: DecodingBackend, pipeline: str = defaults.PIPELINE, *, max_retries: int = 2,
                 limits: Limits) -> None:
        check_options(pipeline, max_retries)
        self.backend = backend
        self.model_id = backend.model_id
        self.pipeline = pipeline
        self.max_retries = max_retries
        self.limits = limits
        self.template_version = P.template_version()

    def decompose(self, prompts: Sequence[str], *, editing: bool = False) -> list[Decomposition]:
        """One validated decomposition per prompt; a prompt that fails every attempt raises EngineError."""
        results = self.decompose_each(prompts, editing=editing)
        errors = {i: str(r) for i, r in enumerate(results) if isinstance(r, EngineError)}
        if errors:
            raise EngineError(_failure_message(list(prompts), errors, self.max_retries + 1, self._label(editing)))
        return [r for r in results if isinstance(r, Decomposition)]

    def _label(self, editing: bool) -> str:
        return EDIT_PIPELINE if editing else self.pipeline

    def decompose_each(self, prompts: Sequence[str], *, editing: bool = False) -> list[Decomposition | EngineError]:
        """Per prompt, a decomposition or the error of its last attempt: one bad prompt fails alone."""
        prompts = list(prompts)
        for n, p in enumerate(prompts):
            if not isinstance(p, str) or not p.strip():
                raise EngineError(f"prompt {n} is empty")
        done: dict[int, Decomposition] = {}
        errors: dict[int, str] = {}
        attempt = (self._edit_attempt if editing else self._fast_attempt if self.pipeline == "fast"
                   else self._dsg_attempt)
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
                    _failure_message(prompts[i:i + 1], {0: errors[i]}, self.max_retries + 1, self._label(editing)))
                for i in range(len(prompts))]

    def _cap_warnings(self, dec: Decomposition) -> Decomposition:
        """Say when a list stopped at its cap: the schema cannot tell a full list from a cut one."""
        caps = (("semantic", len(dec.semantic), self.limits.max_semantic, "DVREWARD_DECOMPOSER_MAX_SEMANTIC"),
                ("quality", len(dec.quality), self.limits.max_quality, "DVREWARD_DECOMPOSER_MAX_QUALITY"))
        warnings = tuple(f"the {kind} questions reached their cap of {cap}; the prompt may need more "
                         f"(raise {setting})" for kind, n, cap, setting in caps if cap and n >= cap)
        return dec.model_copy(update={"warnings": warnings}) if warnings else dec

    def _meta(self, pipeline: str | None = None) -> dict[str, Any]:
        return {"pipeline": pipeline or self.pipeline, "model": self.model_id,
                "template_version": self.template_version}

    def _fast_attempt(self, prompts: list[str], attempt: int) -> list[Decomposition | str]:
        return self._one_generation(prompts, attempt, fast_messages, self.pipeline)

    def _edit_attempt(self, prompts: list[str], attempt: int) -> list[Decomposition | str]:
        return self._one_generation(prompts, attempt, edit_messages, EDIT_PIPELINE)

    def _one_generation(self, prompts: list[str], attempt: int, messages: Callable[[str], Messages],
                        pipeline: str) -> list[Decomposition | str]:
        """Every question of a prompt in one JSON object (the fast pipeline, and editing instructions)."""
        schema = JsonSchema(fast_schema(self.limits))
        gens = self.backend.generate([(messages(p), schema) for p in prompts], attempt)
        out: list[Decomposition | str] = []
        for prompt, gen in zip(prompts, gens, strict=True):
            try:
                text = require_finished(gen, f"{pipeline} decomposition", self.backend.max_new_tokens)
                out.append(parse_fast_output(text, prompt, **self._meta(pipeline)))
            except ValueError as e:
                out.append(str(e))
        return out

    def _dsg_attempt(self, prompts: list[str], attempt: int) -> list[Decomposition | str]:
        """Stages 1-6 for every prompt, batched per stage; a prompt drops out at its first failure."""
        errors: dict[int, str] = {}
        tuples, deps, questions = self._dsg_graph(prompts, attempt, errors)
        verdicts = self._validity(prompts, questions, attempt, errors)
        tag = Choice(SEMANTIC_TAGS)
        tags = self._stage("DSG tagging", {
            (i, qid): (dsg_tag_messages(prompts[i], q), tag, parse_tag)
            for i in verdicts for qid, q in questions[i].items()}, attempt, errors)
        tagged = [i for i in verdicts if all((i, qid) in tags for qid in questions[i])]
        quality_constraint = JsonSchema(quality_schema(self.limits))
        quality = self._stage("DSG quality", {
            i: (dsg_quality_messages(prompts[i], questions[i]), quality_constraint, parse_quality) for i in tagged},
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
        tuples_constraint = JsonSchema(tuples_schema(self.limits))
        tuples = self._stage("DSG tuples", {
            i: (dsg_tuples_messages(p), tuples_constraint, parse_tuples) for i, p in enumerate(prompts)},
            attempt, errors)
        ids = {i: _tids(ts) for i, ts in tuples.items()}
        deps = self._stage("DSG dependencies", {
            i: (dsg_dependencies_messages(prompts[i], tuples[i]),
                JsonSchema(dependencies_schema(ids[i], self.limits)),
                _bind(parse_dependencies, ids[i])) for i in tuples}, attempt, errors)
        questions = self._stage("DSG questions", {
            i: (dsg_questions_messages(prompts[i], tuples[i]),
                JsonSchema(questions_schema(ids[i], self.limits)),
                _bind(parse_dsg_questions, ids[i])) for i in deps}, attempt, errors)
        return tuples, deps, questions

    def _validity(self, prompts: list[str], questions: dict[int, dict[str, str]], attempt: int,
                  errors: dict[int, str]) -> dict[int, dict[str, bool]]:
        """Stage 4: P(yes) vs P(no) per question; prompts with a rejected or unreadable question drop out here,
        with the model's reason for each rejection."""
        keys = [(i, qid) for i in questions for qid in questions[i]]
        probs = dict(zip(keys, self.backend.p_yes(
            [dsg_validity_messages(prompts[i], questions[i][qid]) for i, qid in keys]), strict=True))
        reasons = self._stage("DSG validity reason", {
            k: (dsg_validity_reason_messages(prompts[k[0]], questions[k[0]][k[1]]),
                JsonSchema(reason_schema(self.limits)), parse_reason)
            for k in keys if _rejected(probs[k])}, attempt, {})  # no reason still rejects, just unexplained
        verdicts: dict[int, dict[str, bool]] = {}
        for i, qs in questions.items():
            read = {qid: probs[(i, qid)] for qid in qs}
            unread = [f"{qid}: {p}" for qid, p in read.items() if isinstance(p, EngineError)]
            if unread:
                errors[i] = "DSG validity: no yes/no answer for " + "; ".join(unread)
                continue
            v = {qid: is_required(p) for qid, p in read.items() if not isinstance(p, EngineError)}
            try:
                check_validity(qs, v, {qid: r for (j, qid), r in reasons.items() if j == i})
                verdicts[i] = v
            except ValueError as e:
                errors[i] = f"DSG validity: {e}"
        return verdicts

    def _stage(self, what: str, jobs: dict[Any, tuple[Messages, Constraint, Callable[[str], T]]], attempt: int,
               errors: dict[int, str]) -> dict[Any, T]:
        """One constrained generation per job (key: prompt index or (index, question id)).

        A parse failure or truncation is recorded against the job's prompt in ``errors``.
        """
        keys = list(jobs)
        gens = self.backend.generate([(jobs[k][0], jobs[k][1]) for k in keys], attempt)
        out: dict[Any, T] = {}
        for k, gen in zip(keys, gens, strict=True):
            try:
                out[k] = jobs[k][2](require_finished(gen, what, self.backend.max_new_tokens))
            except ValueError as e:
                msg = str(e)
                errors[k[0] if isinstance(k, tuple) else k] = msg if msg.startswith(what) else f"{what}: {msg}"
        return out


def _rejected(p: float | EngineError) -> bool:
    return not isinstance(p, EngineError) and not is_required(p)


def _tids(tuples: Sequence[DSGTuple]) -> list[str]:
    return [t.id for t in tuples]


def _bind(parse: Callable[[str, Sequence[str]], T], ids: Sequence[str]) -> Callable[[str], T]:
    return lambda text: parse(text, ids)


def _failure_message(prompts: Sequence[str], errors: Mapping[int, str], attempts: int, pipeline: str) -> str:
    parts = [f"prompt {i} ({prompts[i][:60]!r}): {msg}" for i, msg in sorted(errors.items())]
    return (f"{pipeline} decomposition failed after {attempts} attempt(s) for {len(errors)} of {len(prompts)} "
            "prompt(s); last error: " + " | ".join(parts))
