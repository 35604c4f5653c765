"""The transformers decomposer: constrained decoding, parsing, DSG stage plumbing and failures.

A random tiny model cannot write sensible questions, so the model-backed tests assert what
the constraint guarantees (valid structure, tags, ids) or a clear EngineError, while the
pure parsing and assembly functions are tested on hand-written outputs, valid and invalid.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from dvreward_protocol.questions import QUALITY_ASPECTS, SEMANTIC_TAGS, Decomposition, DecompositionError, Kind
from server.cli import main
from server.engines.base import Decomposer, EngineError
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
    parse_tag,
    parse_tuples,
    require_finished,
)
from server.engines.decomposition.pipelines import (
    Choice,
    JsonSchema,
    dsg_dependencies_messages,
    dsg_quality_messages,
    dsg_tag_messages,
    dsg_tuples_messages,
    edit_messages,
    fast_messages,
    render_chat,
)
from server.engines.decomposition.schema import Limits, dependencies_schema, fast_schema
from server.engines.hf.decomposer import HFDecomposer
from server.engines.prompts import TEMPLATE_VERSION, template_version
from server.settings import decomposer_limits

SMALL = Limits(max_semantic=3, max_quality=2, max_text_chars=24, max_args=2, max_arg_chars=12)
PROMPTS = ["a red car next to a blue house", "two cats on a sofa"]

VALID_FAST = json.dumps({
    "semantic": [
        {"id": "s1", "text": "Is there a cat?", "tag": "Existence", "depends_on": []},
        {"id": "s2", "text": "Is the cat black?", "tag": "Attribute", "depends_on": ["s1"]},
    ],
    "quality": [{"id": "q1", "text": "Is the cat anatomically correct?", "aspect": "Anatomy"}],
})


@pytest.fixture(scope="module")
def engine(tiny_models: dict[str, Path]) -> HFDecomposer:
    return HFDecomposer(tiny_models["decomposer"], max_new_tokens=400, max_retries=3, limits=SMALL)


def _assert_valid(d: Decomposition, prompt: str, pipeline: str, engine: HFDecomposer) -> None:
    assert isinstance(d, Decomposition)
    assert d.prompt == prompt and d.pipeline == pipeline
    assert d.model == engine.model_id
    assert d.template_version == template_version()
    assert re.fullmatch(re.escape(TEMPLATE_VERSION) + r"\+[0-9a-f]{12}", d.template_version)
    assert d.semantic, "at least one semantic question"
    assert all(q.tag in SEMANTIC_TAGS and q.text.strip() for q in d.semantic)
    assert all(q.tag in QUALITY_ASPECTS and q.kind is Kind.quality for q in d.quality)
    assert len({q.id for q in d.questions}) == len(d.questions)


# --- model-backed: fast ----------------------------------------------------------------------


def test_fast_pipeline_on_tiny_model_yields_valid_decompositions(engine: HFDecomposer) -> None:
    as_protocol: Decomposer = engine  # the structural interface the worker codes against
    assert (as_protocol.pipeline, as_protocol.model_id) == ("fast", str(engine.model_id))
    out = engine.decompose(PROMPTS)
    assert len(out) == len(PROMPTS)
    for prompt, d in zip(PROMPTS, out, strict=True):
        _assert_valid(d, prompt, "fast", engine)
        # The schema fixes ids by position and allows only earlier ids as parents.
        assert [q.id for q in d.semantic] == [f"s{i}" for i in range(1, len(d.semantic) + 1)]
        assert [q.id for q in d.quality] == [f"q{i}" for i in range(1, len(d.quality) + 1)]
        assert len(d.semantic) <= SMALL.max_semantic and len(d.quality) <= SMALL.max_quality
        for q in d.semantic:
            assert all(int(p[1:]) < int(q.id[1:]) for p in q.depends_on)


def test_the_tiny_decomposer_finishes_a_fast_decomposition_in_a_few_tokens(engine: HFDecomposer) -> None:
    """The README's first run: under the service's own limits a random model's strings ran to their caps (1,024
    tokens, unfinished, then a retry: 10-50 s on a CPU). The tiny decomposer closes every string at once."""
    schema = JsonSchema(fast_schema(decomposer_limits()))
    prompts = ["a red cat on a blue sofa", "the word hello written on a wall"]
    gens = engine.backend.generate([(fast_messages(p), schema) for p in prompts], attempt=0)
    assert all(g.finished and g.n_tokens < 100 for g in gens), [(g.finished, g.n_tokens) for g in gens]
    for prompt, g in zip(prompts, gens, strict=True):
        _assert_valid(parse_fast_output(g.text, prompt, pipeline="fast", model=engine.model_id,
                                        template_version=template_version()),
                      prompt, "fast", engine)


def test_editing_instructions_use_the_editing_template_whatever_the_pipeline(engine: HFDecomposer,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    instructions = ["make the car red", "remove the dog"]
    for pipeline in ("fast", "dsg"):
        monkeypatch.setattr(engine, "pipeline", pipeline)
        out = engine.decompose(instructions, editing=True)
        for instruction, d in zip(instructions, out, strict=True):
            _assert_valid(d, instruction, "edit", engine)
    user = edit_messages("make {the} car red")[1]["content"]
    assert "make {the} car red" in user and "original" in user and "Existence" in user and "Aesthetics" in user
    assert user != fast_messages("make {the} car red")[1]["content"]


def test_lists_at_their_cap_are_reported(engine: HFDecomposer, monkeypatch: pytest.MonkeyPatch) -> None:
    # one semantic question allowed: every decomposition is at the cap, which the schema cannot tell from a
    # list that was complete, so it is said
    monkeypatch.setattr(engine, "limits", Limits(max_semantic=1, max_quality=0, max_text_chars=24))
    (d,) = engine.decompose(["a red car next to a blue house"])
    assert len(d.semantic) == 1 and not d.quality
    assert d.warnings == ("the semantic questions reached their cap of 1; the prompt may need more "
                          "(raise DVREWARD_DECOMPOSER_MAX_SEMANTIC)",)
    monkeypatch.setattr(engine, "limits", SMALL)
    assert all(not d.warnings for d in engine.decompose(PROMPTS) if len(d.semantic) < SMALL.max_semantic
               and len(d.quality) < SMALL.max_quality)


def test_truncated_output_is_reported_not_parsed(engine: HFDecomposer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine.backend, "max_new_tokens", 5)
    monkeypatch.setattr(engine, "max_retries", 1)
    with pytest.raises(EngineError) as err:
        engine.decompose(["a red car"])
    msg = str(err.value)
    assert "after 2 attempt(s)" in msg
    assert "truncated" in msg and "max_new_tokens=5" in msg
    assert "'a red car'" in msg


def test_decompose_each_reports_per_prompt(engine: HFDecomposer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Failures come back per prompt, each naming its own prompt, instead of one error for the batch."""
    monkeypatch.setattr(engine.backend, "max_new_tokens", 5)
    monkeypatch.setattr(engine, "max_retries", 0)
    out = engine.decompose_each(["a red car", "two cats"])
    assert [type(o) for o in out] == [EngineError, EngineError]
    assert "'a red car'" in str(out[0]) and "'two cats'" not in str(out[0])
    assert "'two cats'" in str(out[1]) and "truncated" in str(out[1])


def test_schema_forbids_bad_structure(engine: HFDecomposer) -> None:
    """What the constraint guarantees, checked directly on the compiled grammar."""
    import xgrammar as xgr

    grammar = engine.backend._grammar(JsonSchema(fast_schema(SMALL)))

    def accepts(text: str) -> bool:
        m = xgr.GrammarMatcher(grammar)
        return m.accept_string(text) and m.is_completed()

    ok = '{"semantic": [{"id": "s1", "text": "Is there a cat?", "tag": "Existence", "depends_on": []}, ' \
         '{"id": "s2", "text": "Is it black?", "tag": "Attribute", "depends_on": ["s1"]}], ' \
         '"quality": [{"id": "q1", "text": "Is it sharp?", "aspect": "Texture"}]}'
    assert accepts(ok)
    for bad in (
        ok.replace('"Existence"', '"Animal"'),  # tag outside the enum
        ok.replace('"Texture"', '"Existence"'),  # semantic tag as an aspect
        ok.replace('"id": "s2"', '"id": "s1"'),  # duplicate / out-of-order id
        ok.replace('"depends_on": []', '"depends_on": ["s2"]'),  # forward reference (cycle risk)
        ok.replace('"depends_on": ["s1"]', '"depends_on": ["s2"]'),  # self-reference
        ok.replace("Is there a cat?", "x" * (SMALL.max_text_chars + 1)),  # over-long text
        ok.replace('"text": "Is it sharp?"', '"text": ""'),  # empty text
        '{"semantic": [], "quality": []}',  # no semantic question
        ok.replace('{"semantic": [', '{"semantic":  ['),  # free whitespace
    ):
        assert not accepts(bad), bad


def test_batched_decoding_equals_one_prompt_at_a_time(engine: HFDecomposer) -> None:
    """Left padding, positions and the KV cache must not change a greedy output."""
    grammar = engine.backend._grammar(JsonSchema(fast_schema(SMALL)))
    tok = engine.backend.tokenizer
    short, long = render_chat(tok, fast_messages("a cat")), render_chat(tok, fast_messages("a cat " * 40))
    alone = engine.backend._generate([short], [grammar], attempt=0)[0]
    batched = engine.backend._generate([long, short], [grammar, grammar], attempt=0)[1]
    assert alone == batched
    assert alone.finished and alone.text.startswith('{"semantic": [{"id": "s1"')


def test_sampled_retry_is_seeded(engine: HFDecomposer) -> None:
    grammar = engine.backend._grammar(JsonSchema(fast_schema(SMALL)))
    text = [render_chat(engine.backend.tokenizer, fast_messages("a cat"))]
    first, again = (engine.backend._generate(text, [grammar], attempt=1)[0] for _ in range(2))
    assert first == again
    assert engine.backend._generate(text, [grammar], attempt=2)[0] != first


# --- model-backed: dsg -----------------------------------------------------------------------


def test_dsg_pipeline_on_tiny_model_yields_valid_decompositions(engine: HFDecomposer,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Seeded and greedy, so the outcome is fixed: the tiny model's constrained stages pass validation."""
    monkeypatch.setattr(engine, "pipeline", "dsg")
    out = engine.decompose(PROMPTS)
    for prompt, d in zip(PROMPTS, out, strict=True):
        _assert_valid(d, prompt, "dsg", engine)
        assert all(q.id.startswith("t") and q.metadata["dsg_tuple"].startswith(q.id + " | ") for q in d.semantic)
    assert engine.decompose(PROMPTS) == out


def test_dsg_rejection_gives_the_models_reason(engine: HFDecomposer, monkeypatch: pytest.MonkeyPatch) -> None:
    # stage 4 on questions judged not required (p(yes) = .2 for t2): the prompt is rejected, and the error
    # quotes the reason the model wrote for t2 (and only t2)
    monkeypatch.setattr(engine.backend, "p_yes", lambda conversations: [0.9, 0.2][: len(conversations)])
    errors: dict[int, str] = {}
    verdicts = engine._validity(["a red car"], {0: {"t1": "Is there a car?", "t2": "Is the car red?"}}, 0, errors)
    assert verdicts == {}
    assert re.fullmatch(r"DSG validity: question\(s\) judged not strictly required by the prompt: "
                        r"t2 \('Is the car red\?': [^)]+\)", errors[0]), errors[0]


def test_dsg_examples_are_valid_in_the_pipelines_own_format() -> None:
    from server.engines import prompts as P

    def answers(block: str) -> list[str]:
        return [line[len("Answer: "):] for line in block.format().splitlines() if line.startswith("Answer: ")]

    tuples = [parse_tuples(a) for a in answers(P.DSG_TUPLES_EXAMPLES)]
    assert [len(t) for t in tuples] == [6, 5]
    for ts, deps, qs in zip(tuples, answers(P.DSG_DEPENDENCIES_EXAMPLES), answers(P.DSG_QUESTIONS_EXAMPLES),
                            strict=True):
        ids = [t.id for t in ts]
        parse_dependencies(deps, ids)
        parse_dsg_questions(qs, ids)
        assert all(t.render() in P.DSG_QUESTIONS_EXAMPLES for t in ts)  # shown as the pipeline shows tuples
    assert P.DSG_TUPLES_EXAMPLES.format() in dsg_tuples_messages("a cat")[1]["content"]


def test_dsg_validity_stage_reads_yes_against_no(engine: HFDecomposer) -> None:
    p = engine.backend.p_yes([[{"role": "user", "content": f"Is there a {w}? Answer yes or no."}]
                              for w in ("cat", "dog")])
    assert all(0.0 < x < 1.0 for x in p) and p[0] != p[1]
    assert is_required(0.51) and not is_required(0.5)


def test_tag_grammar_only_allows_tag_names(engine: HFDecomposer) -> None:
    import xgrammar as xgr

    grammar = engine.backend._grammar(Choice(SEMANTIC_TAGS))
    for tag in SEMANTIC_TAGS:
        m = xgr.GrammarMatcher(grammar)
        assert m.accept_string(tag) and m.is_completed()
    assert not xgr.GrammarMatcher(grammar).accept_string("Anatomy")


# --- loading and arguments -------------------------------------------------------------------


def test_unreachable_hub_id_points_to_local_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(EngineError) as err:
        HFDecomposer("no-such-org/no-such-model", max_new_tokens=400, limits=SMALL)
    msg = str(err.value)
    assert "'no-such-org/no-such-model'" in msg and "hub" in msg
    assert "--decomposer PATH" in msg and "dvreward dev tiny-models DIR" in msg


def test_bad_arguments_fail_before_loading(tiny_models: dict[str, Path]) -> None:
    with pytest.raises(EngineError, match="unknown decomposer pipeline 'slow'"):
        HFDecomposer(tiny_models["decomposer"], pipeline="slow", max_new_tokens=400, limits=SMALL)
    with pytest.raises(EngineError, match="dtype must be one of .*float8"):
        HFDecomposer(tiny_models["decomposer"], dtype="float8", max_new_tokens=400, limits=SMALL)


def test_empty_prompt_is_refused(engine: HFDecomposer) -> None:
    with pytest.raises(EngineError, match="prompt 1 is empty"):
        engine.decompose(["a cat", "  "])


def test_cli_prints_one_json_object_per_prompt(tiny_models: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    rc = main(["decompose", "--decomposer", str(tiny_models["decomposer"]), "--max-new-tokens", "1024",
               "--max-retries", "3", "a red car", "two cats"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    lines = captured.out.strip().splitlines()
    assert len(lines) == 2
    decs = [Decomposition.model_validate(json.loads(line)) for line in lines]
    assert [d.prompt for d in decs] == ["a red car", "two cats"]
    assert all(d.pipeline == "fast" and d.template_version == template_version() for d in decs)


def test_cli_reports_engine_errors(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["decompose", "--decomposer", "no-such-org/no-such-model", "a cat"]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("error: ") and "--decomposer PATH" in captured.err


# --- pure: fast output parsing ---------------------------------------------------------------


def test_parse_fast_output_valid() -> None:
    d = parse_fast_output(VALID_FAST, "a black cat", model="m", template_version="v")
    assert (d.prompt, d.pipeline, d.model, d.template_version) == ("a black cat", "fast", "m", "v")
    assert [(q.id, q.kind, q.tag, q.depends_on) for q in d.questions] == [
        ("s1", Kind.semantic, "Existence", ()),
        ("s2", Kind.semantic, "Attribute", ("s1",)),
        ("q1", Kind.quality, "Anatomy", ()),
    ]


def test_parse_fast_output_tolerates_fences_int_ids_and_missing_depends_on() -> None:
    text = '```json\n{"semantic": [{"id": 1, "text": " Is there a dog? ", "tag": "Existence"}], "quality": []}\n```'
    d = parse_fast_output(text)
    assert [(q.id, q.text, q.depends_on) for q in d.questions] == [("1", "Is there a dog?", ())]


def _fast(semantic: list[dict], quality: list[dict] | None = None) -> str:
    return json.dumps({"semantic": semantic, "quality": quality or []})


S1 = {"id": "s1", "text": "Is there a cat?", "tag": "Existence", "depends_on": []}


@pytest.mark.parametrize(("text", "message"), [
    ('{"semantic": [', "malformed JSON in decomposition output"),
    ("Sure! Here are the questions.", "malformed JSON"),
    ("[1, 2]", "must be a JSON object, got list"),
    ('{"quality": []}', "missing field 'semantic'"),
    ('{"semantic": [' + json.dumps(S1) + "]}", "missing field 'quality'"),
    ('{"semantic": {"id": "s1"}, "quality": []}', "field 'semantic' has the wrong type"),
    ('{"semantic": ["Is there a cat?"], "quality": []}', r"semantic\[0\] must be an object"),
    (_fast([]), "no semantic questions"),
    (_fast([{"id": "s1", "tag": "Existence"}]), r"semantic\[0\]: missing field 'text'"),
    (_fast([{**S1, "tag": "Animal"}]), "tag 'Animal' is not a semantic tag"),
    (_fast([S1], [{"id": "q1", "text": "Sharp?", "aspect": "Existence"}]), "tag 'Existence' is not a quality tag"),
    (_fast([S1], [{"id": "q1", "text": "Sharp?"}]), r"quality\[0\]: missing field 'aspect'"),
    (_fast([{**S1, "text": "   "}]), "question text is empty"),
    (_fast([{**S1, "depends_on": ["s9"]}]), "depends on unknown id 's9'"),
    (_fast([{**S1, "depends_on": "s0"}]), "expected a list of ids"),
    (_fast([S1, {**S1, "text": "Is it black?"}]), "duplicate question id 's1'"),
    (_fast([{**S1, "depends_on": ["s2"]}, {**S1, "id": "s2", "depends_on": ["s1"]}]), "dependency cycle"),
])
def test_parse_fast_output_rejects_malformed_output(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_fast_output(text, "a cat")


def test_require_finished() -> None:
    assert require_finished(Generation('{"a": 1}', True, 4), "x", 10) == '{"a": 1}'
    with pytest.raises(ValueError, match=r"x output truncated.*max_new_tokens=10 \(10 tokens generated\)"):
        require_finished(Generation('{"a": ', False, 10), "x", 10)


# --- pure: DSG stages ------------------------------------------------------------------------

TUPLES = json.dumps({"tuples": [
    {"id": "t1", "category": "entity", "type": "whole", "args": ["cat"]},
    {"id": "t2", "category": "attribute", "type": "color", "args": ["cat", "black"]},
    {"id": "t3", "category": "global", "type": "style", "args": ["watercolor"]},
]})
IDS = ["t1", "t2", "t3"]
DEPS = json.dumps({"dependencies": [{"id": "t1", "parents": []}, {"id": "t2", "parents": ["t1"]},
                                    {"id": "t3", "parents": []}]})
QUESTIONS = json.dumps({"questions": [{"id": "t1", "text": "Is there a cat?"},
                                      {"id": "t2", "text": "Is the cat black?"},
                                      {"id": "t3", "text": "Is it a watercolor painting?"}]})
QUALITY = json.dumps({"quality": [{"id": "q1", "text": "Is the cat anatomically correct?", "aspect": "Anatomy"}]})


def test_dsg_stages_assemble_into_a_decomposition() -> None:
    """The scripted path: hand-written outputs of all six stages through the real parsers."""
    tuples = parse_tuples(TUPLES)
    assert tuples[1] == DSGTuple("t2", "attribute", "color", ("cat", "black"))
    assert tuples[1].render() == "t2 | attribute - color (cat, black)"
    deps = parse_dependencies(DEPS, IDS)
    questions = parse_dsg_questions(QUESTIONS, IDS)
    tags = {qid: parse_tag(out) for qid, out in zip(IDS, ["Existence", '"attribute".', " Style\n"], strict=True)}
    verdicts = dict.fromkeys(IDS, True)
    d = assemble_dsg("a black cat, watercolor", tuples, deps, questions, verdicts, tags, parse_quality(QUALITY),
                     model="m", template_version="v")
    assert (d.pipeline, d.model, d.template_version) == ("dsg", "m", "v")
    assert [(q.id, q.tag, q.depends_on) for q in d.semantic] == [
        ("t1", "Existence", ()), ("t2", "Attribute", ("t1",)), ("t3", "Style", ())]
    assert d.semantic[1].text == "Is the cat black?"
    assert d.semantic[1].metadata == {"dsg_tuple": "t2 | attribute - color (cat, black)"}
    assert [(q.id, q.kind, q.tag) for q in d.quality] == [("q1", Kind.quality, "Anatomy")]


def test_dsg_invalid_question_rejects_the_whole_prompt() -> None:
    tuples = parse_tuples(TUPLES)
    verdicts = {"t1": True, "t2": False, "t3": True}
    tags = {"t1": "Existence", "t2": "Attribute", "t3": "Style"}
    with pytest.raises(DecompositionError, match=r"not strictly required by the prompt: t2 \('Is the cat black\?'\)"):
        assemble_dsg("a cat", tuples, parse_dependencies(DEPS, IDS), parse_dsg_questions(QUESTIONS, IDS),
                     verdicts, tags, [])
    with pytest.raises(DecompositionError, match=r"t2 \('Is the cat black\?': the prompt names no colour\)"):
        check_validity(parse_dsg_questions(QUESTIONS, IDS), verdicts, {"t2": "the prompt names no colour"})


@pytest.mark.parametrize(("text", "message"), [
    ('{"tuples": []}', "no tuples"),
    ('{"tuples": [{"id": "t1", "category": "thing", "type": "x", "args": ["a"]}]}', "unknown category 'thing'"),
    ('{"tuples": [{"id": "t1", "category": "entity", "type": "whole", "args": []}]}', "args must be a non-empty"),
    ('{"tuples": [{"id": "t1", "category": "entity", "type": "whole"}]}', "missing field 'args'"),
    ('{"tuples": [{"id": "t1", "category": "entity", "type": "w", "args": ["a"]}, '
     '{"id": "t1", "category": "entity", "type": "w", "args": ["b"]}]}', "duplicate tuple id 't1'"),
    ("tuples: t1 | entity - whole (cat)", "malformed JSON in DSG tuples output"),
])
def test_parse_tuples_rejects(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_tuples(text)


def _deps(*items: tuple[str, list[str]]) -> str:
    return json.dumps({"dependencies": [{"id": i, "parents": p} for i, p in items]})


@pytest.mark.parametrize(("text", "message"), [
    (_deps(("t1", []), ("t2", ["t1"])), r"no entry for tuple\(s\) t3"),
    (_deps(("t1", []), ("t2", ["t1"]), ("t3", []), ("t4", [])), "unknown tuple id 't4'"),
    (_deps(("t1", []), ("t1", []), ("t2", []), ("t3", [])), "tuple id 't1' given twice"),
    (_deps(("t1", []), ("t2", ["t9"]), ("t3", [])), r"t2 has invalid parent\(s\) t9"),
    (_deps(("t1", ["t1"]), ("t2", []), ("t3", [])), r"t1 has invalid parent\(s\) t1"),
    (_deps(("t1", ["t2"]), ("t2", ["t1"]), ("t3", [])), "dependency cycle"),
])
def test_parse_dependencies_rejects(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_dependencies(text, IDS)


def test_parse_dsg_questions_and_tags_reject() -> None:
    blank = json.dumps({"questions": [{"id": t, "text": " " if t == "t2" else "Q?"} for t in IDS]})
    with pytest.raises(ValueError, match="t2 has an empty question"):
        parse_dsg_questions(blank, IDS)
    with pytest.raises(ValueError, match="tag 'Animal' is not one of Style, "):
        parse_tag("Animal")
    assert parse_tag("Anatomy", Kind.quality) == "Anatomy"
    with pytest.raises(ValueError, match=r"quality\[0\]: question 'q1': tag 'Count' is not a quality tag"):
        parse_quality('{"quality": [{"id": "q1", "text": "Sharp?", "aspect": "Count"}]}')
    assert parse_quality('{"quality": []}') == []


def test_dependency_schema_allows_only_earlier_parents(engine: HFDecomposer) -> None:
    import xgrammar as xgr

    grammar = engine.backend._grammar(JsonSchema(dependencies_schema(IDS, SMALL)))

    def accepts(text: str) -> bool:
        m = xgr.GrammarMatcher(grammar)
        return m.accept_string(text) and m.is_completed()

    good = '{"dependencies": [{"id": "t1", "parents": []}, {"id": "t2", "parents": ["t1"]}, ' \
           '{"id": "t3", "parents": ["t1", "t2"]}]}'
    assert accepts(good)
    assert not accepts(good.replace('"parents": ["t1"]', '"parents": ["t3"]'))
    assert not accepts('{"dependencies": [{"id": "t1", "parents": []}, {"id": "t2", "parents": ["t1"]}]}')


def test_templates_carry_prompt_and_context_verbatim() -> None:
    prompt = 'a sign saying "{hello}"'
    user = fast_messages(prompt)[1]["content"]
    assert prompt in user and "Existence" in user and "Aesthetics" in user
    tuples = parse_tuples(TUPLES)
    assert "t2 | attribute - color (cat, black)" in dsg_dependencies_messages(prompt, tuples)[1]["content"]
    assert "t1: Is there a cat?" in dsg_quality_messages(prompt, {"t1": "Is there a cat?"})[1]["content"]
    assert "Is it red?" in dsg_tag_messages(prompt, "Is it red?")[1]["content"]
