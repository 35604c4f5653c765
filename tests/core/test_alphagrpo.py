"""The AlphaGRPO data format's precomputed questions, read into ours."""

from __future__ import annotations

import pytest

from dvreward_protocol.alphagrpo import has_reference_questions, reference_questions
from dvreward_protocol.questions import Kind


def test_strings_and_objects_with_and_without_tags():
    questions, notes = reference_questions({
        "semantic_questions": ["Is there a dog?", {"question": "Are there two dogs?", "tag": "count"},
                               {"text": "Is it sunny?", "tag": "Weather"}],
        "quality_questions": [{"question": "Are the dogs' legs correct?", "aspect": "Anatomy"}, "Is it sharp?"],
    })
    assert [(q.id, q.kind, q.tag, q.text) for q in questions] == [
        ("s1", Kind.semantic, "Attribute", "Is there a dog?"),
        ("s2", Kind.semantic, "Count", "Are there two dogs?"),       # tags are matched case-insensitively
        ("s3", Kind.semantic, "Attribute", "Is it sunny?"),          # not one of ours: the default
        ("q1", Kind.quality, "Anatomy", "Are the dogs' legs correct?"),
        ("q2", Kind.quality, "Aesthetics", "Is it sharp?"),
    ]
    assert [q.metadata for q in questions] == [{"tag_source": "default"}, {}, {"tag_source": "default"}, {},
                                               {"tag_source": "default"}]
    assert notes == ["semantic_questions[0]: no tag; tagged Attribute",
                     "semantic_questions[2]: tag 'Weather' is not a semantic tag; tagged Attribute",
                     "quality_questions[1]: no tag; tagged Aesthetics"]


def test_blank_entries_are_skipped_and_an_empty_sample_is_an_error():
    questions, notes = reference_questions({"semantic_questions": ["  ", {"tag": "Count"}, "Is there a cat?"]})
    assert [q.id for q in questions] == ["s3"] and notes[:2] == [
        "semantic_questions[0]: no question text; skipped", "semantic_questions[1]: no question text; skipped"]
    with pytest.raises(ValueError, match="no questions"):
        reference_questions({"semantic_questions": [], "quality_questions": ["  "]})
    with pytest.raises(ValueError, match="must be a list"):
        reference_questions({"semantic_questions": "Is there a cat?"})


def test_presence():
    assert has_reference_questions({"quality_questions": ["Is it sharp?"]})
    assert not has_reference_questions({"semantic_questions": []})
    assert not has_reference_questions(None) and not has_reference_questions({"questions": ["x"]})
