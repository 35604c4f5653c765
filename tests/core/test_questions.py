"""Question model and decomposition validation: tags, dependencies, cycles, ordering."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from dvreward_protocol.questions import (
    QUALITY_ASPECTS,
    SEMANTIC_TAGS,
    Decomposition,
    DecompositionError,
    Kind,
    Question,
    find_cycle,
    topological_order,
    validate_questions,
)


def sem(qid, deps=(), tag="Existence", text=None):
    return Question(id=qid, text=text or f"Is there {qid}?", tag=tag, depends_on=tuple(deps))


def qual(qid, tag="Anatomy"):
    return Question(id=qid, text=f"Is {qid} rendered well?", kind=Kind.quality, tag=tag)


# --- single-question validation -------------------------------------------------------------


def test_tag_lists_match_design():
    assert SEMANTIC_TAGS == (
        "Style", "Environment", "Viewpoint", "Existence", "Count",
        "Attribute", "Action", "Spatial", "Text", "Negative",
    )
    assert QUALITY_ASPECTS == (
        "Geometry", "Anatomy", "Texture", "Coherence", "Lighting", "Physics", "Legibility", "Aesthetics",
    )


@pytest.mark.parametrize("tag", SEMANTIC_TAGS)
def test_every_semantic_tag_accepted(tag):
    assert Question(id="q", text="Is it?", tag=tag).tag == tag


@pytest.mark.parametrize("tag", QUALITY_ASPECTS)
def test_every_quality_aspect_accepted(tag):
    q = Question(id="q", text="Is it good?", kind="quality", tag=tag)
    assert q.kind is Kind.quality
    assert q.tag == tag


def test_default_kind_is_semantic():
    assert Question(id="q", text="Is it?", tag="Count").kind is Kind.semantic


def test_unknown_tag_rejected_with_id_in_message():
    with pytest.raises(ValidationError) as ei:
        Question(id="cat_1", text="Is there a cat?", tag="Banana")
    msg = str(ei.value)
    assert "'cat_1'" in msg
    assert "'Banana'" in msg
    assert "not a semantic tag" in msg
    assert "Existence" in msg  # the allowed tags are listed


def test_quality_aspect_on_semantic_question_rejected():
    with pytest.raises(ValidationError) as ei:
        Question(id="s1", text="Is the hand well formed?", kind="semantic", tag="Anatomy")
    msg = str(ei.value)
    assert "'s1'" in msg and "'Anatomy'" in msg and "not a semantic tag" in msg


def test_semantic_tag_on_quality_question_rejected():
    with pytest.raises(ValidationError) as ei:
        Question(id="q7", text="Is the cat count right?", kind="quality", tag="Count")
    msg = str(ei.value)
    assert "'q7'" in msg and "'Count'" in msg and "not a quality tag" in msg
    assert "Geometry" in msg


def test_tag_is_case_sensitive():
    with pytest.raises(ValidationError, match="not a semantic tag"):
        Question(id="q", text="Is it?", tag="existence")


def test_quality_question_with_dependencies_rejected():
    with pytest.raises(ValidationError) as ei:
        Question(id="qa", text="Is the cat's fur detailed?", kind="quality", tag="Texture", depends_on=("c",))
    msg = str(ei.value)
    assert "'qa'" in msg
    assert "quality questions cannot have dependencies" in msg


def test_empty_text_rejected():
    with pytest.raises(ValidationError) as ei:
        Question(id="q", text="", tag="Existence")
    assert ei.value.errors()[0]["loc"] == ("text",)


@pytest.mark.parametrize("text", [" ", "   ", "\t\n "])
def test_blank_text_rejected(text):
    with pytest.raises(ValidationError, match="question text is empty"):
        Question(id="q", text=text, tag="Existence")


def test_text_is_stripped():
    assert Question(id="q", text="  Is there a dog?\n", tag="Existence").text == "Is there a dog?"


def test_empty_id_rejected():
    with pytest.raises(ValidationError):
        Question(id="", text="Is it?", tag="Existence")


def test_unknown_field_rejected():
    with pytest.raises(ValidationError):
        Question(id="q", text="Is it?", tag="Existence", weight=2.0)


def test_unknown_kind_rejected():
    with pytest.raises(ValidationError):
        Question(id="q", text="Is it?", kind="style", tag="Style")


def test_question_is_frozen():
    q = sem("a")
    with pytest.raises(ValidationError):
        q.text = "changed"


# --- cross-question validation ---------------------------------------------------------------


def test_valid_list_returned_unchanged():
    qs = [sem("a"), sem("b", ["a"], tag="Attribute"), qual("q")]
    assert validate_questions(qs) is qs


def test_empty_list_rejected():
    with pytest.raises(DecompositionError, match="at least one question"):
        validate_questions([])


def test_duplicate_ids_rejected():
    with pytest.raises(DecompositionError, match=r"duplicate question id 'a'"):
        validate_questions([sem("a"), sem("b"), sem("a", tag="Count")])


def test_duplicate_id_across_kinds_rejected():
    with pytest.raises(DecompositionError, match=r"duplicate question id 'x'"):
        validate_questions([sem("x"), qual("x")])


def test_dependency_on_missing_id_rejected():
    with pytest.raises(DecompositionError) as ei:
        validate_questions([sem("a"), sem("b", ["ghost"])])
    assert str(ei.value) == "question 'b' depends on unknown id 'ghost'"


def test_dependency_on_later_question_is_fine():
    # Order in the list does not matter: b depends on a which comes later.
    qs = [sem("b", ["a"], tag="Attribute"), sem("a")]
    assert validate_questions(qs) == qs


def test_self_dependency_rejected():
    with pytest.raises(DecompositionError) as ei:
        validate_questions([sem("a", ["a"])])
    assert str(ei.value) == "question 'a' depends on itself"


def test_two_cycle_rejected():
    with pytest.raises(DecompositionError) as ei:
        validate_questions([sem("a", ["b"]), sem("b", ["a"])])
    msg = str(ei.value)
    assert msg.startswith("dependency cycle: ")
    assert msg in ("dependency cycle: a -> b -> a", "dependency cycle: b -> a -> b")


def test_three_cycle_rejected():
    # a -> b -> c -> a ("->" meaning "depends on")
    with pytest.raises(DecompositionError) as ei:
        validate_questions([sem("a", ["b"]), sem("b", ["c"]), sem("c", ["a"]), sem("d")])
    msg = str(ei.value)
    assert msg == "dependency cycle: a -> b -> c -> a"
    assert "d" not in msg.split(": ", 1)[1].split(" -> ")


def test_cycle_hanging_off_a_valid_root_rejected():
    # root is fine; x <-> y is a cycle reached through x depending on root too.
    with pytest.raises(DecompositionError, match="dependency cycle"):
        validate_questions([sem("root"), sem("x", ["root", "y"]), sem("y", ["x"])])


def test_diamond_is_not_a_cycle():
    qs = [sem("a"), sem("b", ["a"]), sem("c", ["a"]), sem("d", ["b", "c"])]
    assert validate_questions(qs) == qs


def test_decomposition_model_validates_and_splits():
    d = Decomposition(prompt="a cat", questions=(sem("a"), qual("q1"), sem("b", ["a"]), qual("q2")))
    assert [q.id for q in d.semantic] == ["a", "b"]
    assert [q.id for q in d.quality] == ["q1", "q2"]
    assert d.pipeline == "explicit"


def test_decomposition_model_rejects_cycle():
    with pytest.raises(ValidationError, match="dependency cycle"):
        Decomposition(prompt="p", questions=(sem("a", ["b"]), sem("b", ["a"])))


def test_decomposition_model_rejects_empty():
    with pytest.raises(ValidationError, match="at least one question"):
        Decomposition(prompt="p", questions=())


def test_decomposition_error_is_value_error():
    assert issubclass(DecompositionError, ValueError)


# --- find_cycle ------------------------------------------------------------------------------


def test_find_cycle_none_for_dag():
    assert find_cycle({"a": (), "b": ("a",), "c": ("a", "b")}) is None


def test_find_cycle_empty_graph():
    assert find_cycle({}) is None


def test_find_cycle_returns_closed_two_cycle():
    cyc = find_cycle({"a": ("b",), "b": ("a",)})
    assert cyc == ["a", "b", "a"]
    assert cyc[0] == cyc[-1]


def test_find_cycle_returns_closed_three_cycle_without_prefix():
    # entry -> a -> b -> c -> a: the returned path starts at the cycle, not at the entry.
    graph = {"entry": ("a",), "a": ("b",), "b": ("c",), "c": ("a",)}
    cyc = find_cycle(graph)
    assert cyc == ["a", "b", "c", "a"]
    # every step of the closed path is an edge of the graph
    for u, v in zip(cyc, cyc[1:], strict=False):
        assert v in graph[u]


def test_find_cycle_self_loop():
    assert find_cycle({"a": ("a",)}) == ["a", "a"]


def test_find_cycle_ignores_unknown_targets():
    assert find_cycle({"a": ("missing",)}) is None


def test_find_cycle_deep_chain_does_not_overflow():
    n = 5000  # far beyond the default recursion limit
    graph = {f"n{i}": (f"n{i + 1}",) for i in range(n)}
    graph[f"n{n}"] = ()
    assert find_cycle(graph) is None
    graph[f"n{n}"] = ("n0",)
    cyc = find_cycle(graph)
    assert cyc is not None and len(cyc) == n + 2 and cyc[0] == cyc[-1] == "n0"


# --- topological_order -----------------------------------------------------------------------


def ids(qs):
    return [q.id for q in qs]


def test_topological_order_parents_first():
    # c depends on b depends on a, given in reverse order.
    qs = [sem("c", ["b"]), sem("b", ["a"]), sem("a")]
    assert ids(topological_order(qs)) == ["a", "b", "c"]


def test_topological_order_keeps_given_order_when_independent():
    qs = [sem("z"), qual("m"), sem("a")]
    assert ids(topological_order(qs)) == ["z", "m", "a"]


def test_topological_order_stable_otherwise():
    # x is independent; c needs a, which is listed last.
    qs = [sem("x"), sem("c", ["a"]), sem("y"), sem("a")]
    assert ids(topological_order(qs)) == ["x", "a", "c", "y"]


def test_topological_order_diamond():
    qs = [sem("d", ["b", "c"]), sem("c", ["a"]), sem("b", ["a"]), sem("a")]
    out = ids(topological_order(qs))
    assert sorted(out) == ["a", "b", "c", "d"]  # each exactly once
    pos = {q: i for i, q in enumerate(out)}
    assert pos["a"] < pos["b"] < pos["d"] and pos["a"] < pos["c"] < pos["d"]
    assert out == ["a", "b", "c", "d"]


def test_topological_order_every_parent_before_child():
    qs = [sem("e", ["d"]), sem("d", ["b", "c"]), sem("c", ["a"]), sem("b"), sem("a"), sem("f", ["e", "a"])]
    out = ids(topological_order(qs))
    pos = {q: i for i, q in enumerate(out)}
    assert len(out) == len(qs)
    for q in qs:
        for parent in q.depends_on:
            assert pos[parent] < pos[q.id], (parent, q.id)


def test_topological_order_deep_chain():
    n = 3000
    qs = [sem(f"n{i}", [f"n{i - 1}"] if i else []) for i in range(n)][::-1]
    assert ids(topological_order(qs)) == [f"n{i}" for i in range(n)]
