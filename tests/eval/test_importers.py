"""Benchmark importers: real files give the documented counts, messy files are repaired loudly."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import pytest

from dvreward_protocol.questions import SEMANTIC_TAGS, Question, validate_questions
from server.cli import main
from server.eval.importers import (
    IMPORTERS,
    ImporterError,
    import_dsg_csv,
    import_geneval,
    import_tifa,
    write_jsonl,
)
from server.eval.importers.dsg import dsg_tag
from server.eval.importers.geneval import plural, with_article

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
DSG = FIXTURES / "dsg_tifa160_dev.csv"
GENEVAL = FIXTURES / "geneval_evaluation_metadata.jsonl"


def _dsg_file_counts() -> tuple[int, int, int]:
    """(prompts, rows with question text, rows without) of the DSG CSV, read straight from the file."""
    with DSG.open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    asked = sum(1 for r in rows if r["question_natural_language"].strip())
    return len({r["item_id"] for r in rows}), asked, len(rows) - asked


DSG_PROMPTS, DSG_QUESTIONS, DSG_SKIPPED = _dsg_file_counts()
GENEVAL_PROMPTS = sum(1 for line in GENEVAL.read_text(encoding="utf-8").splitlines() if line.strip())


def _deps(record) -> dict[str, tuple[str, ...]]:
    return {q.id: q.depends_on for q in record.questions}


def _issue_lines(issues, kind: str) -> list[int]:
    return [i.line for i in issues if i.kind == kind]


# --- DSG CSV -------------------------------------------------------------------------------


def test_dsg_real_file_counts():
    records, issues = import_dsg_csv(DSG)
    assert len(records) == DSG_PROMPTS
    assert sum(len(r.questions) for r in records) == DSG_QUESTIONS
    skips = [i for i in issues if i.kind == "skip"]
    assert len(skips) == DSG_SKIPPED
    assert all(i.reason.startswith("no question text") for i in skips)
    # 79 dependencies name a row without question text, 1 names a missing id, 1 duplicate id.
    assert sum(1 for i in issues if i.kind == "repair") == 81
    assert sum(1 for i in issues if "that row has no usable question" in i.reason) == 79
    assert sum(1 for i in issues if "no proposition 3 in item coco_602469" in i.reason) == 1
    assert sum(1 for i in issues if "renamed to 5_2" in i.reason) == 1
    for r in records:
        validate_questions(list(r.questions))
        assert all(q.tag in SEMANTIC_TAGS for q in r.questions)


def test_dsg_real_file_keeps_every_valid_dependency():
    """Recompute from the raw CSV: each dependency naming another question of the prompt survives."""
    records, _ = import_dsg_csv(DSG)
    rows: dict[str, list[dict[str, str]]] = {}
    with DSG.open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if row["question_natural_language"].strip():
                rows.setdefault(row["item_id"], []).append(row)
    assert [r.item_id for r in records] == list(rows)
    kept = 0
    for record in records:
        by_id = {q.id: q for q in record.questions}
        with_question = {row["proposition_id"] for row in rows[record.item_id]}
        first_seen: set[str] = set()
        for q, row in zip(record.questions, rows[record.item_id], strict=True):
            pid = row["proposition_id"]
            assert q.metadata["proposition_id"] == pid and q.text == row["question_natural_language"].strip()
            named = {d.strip() for d in row["dependency"].split(",")} & with_question
            if pid not in first_seen:
                named.discard(pid)  # only a repeated id may (and does) refer to its first holder
            first_seen.add(pid)
            assert {by_id[p].metadata["proposition_id"] for p in q.depends_on} == named
            kept += len(q.depends_on)
    assert kept > 500


def test_dsg_real_file_tags_and_metadata():
    records, _ = import_dsg_csv(DSG)
    q = records[0].questions[0]
    assert q.id == "1" and q.text == "Is there a light?" and q.tag == "Existence"
    assert q.metadata == {
        "proposition_id": "1", "category_broad": "entity", "category_detailed": "whole",
        "tuple": "entity - whole (traffic light)", "keywords": "traffic light",
    }
    tags = Counter(q.tag for r in records for q in r.questions)
    assert set(tags) == {"Existence", "Attribute", "Spatial", "Action", "Style", "Count", "Text"}
    assert records[0].source == "dsg-csv:dsg_tifa160_dev.csv"


@pytest.mark.parametrize(("broad", "detailed", "tag"), [
    ("entity", "whole", "Existence"), ("entity", "part", "Existence"), ("entity", " ", "Existence"),
    ("attribute", "color", "Attribute"), ("attribute", "texture", "Attribute"),
    ("entity", "scale", "Attribute"), ("other", "count", "Count"), ("relation", "spatial", "Spatial"),
    ("action", " ", "Action"), ("relation", "non-spatial", "Action"), ("global", " ", "Style"),
    ("other", "text rendering", "Text"), ("weird", "thing", None),
])
def test_dsg_tag(broad, detailed, tag):
    assert dsg_tag(broad, detailed) == tag


def test_dsg_malformed_file_is_repaired_and_reported():
    path = FIXTURES / "dsg_malformed.csv"
    records, issues = import_dsg_csv(path)
    assert [r.item_id for r in records] == ["m1", "m2", "m3"]
    m1, m2, m3 = records
    assert _deps(m1) == {
        "1": (), "3": ("1",), "4": ("1",), "3_2": ("1",), "5": ("3",), "6": (), "7": (),
    }
    assert _deps(m2) == {"1": (), "2": ("1",), "3": ("1", "2"), "4": ("3",), "5": ("3",)}
    assert _deps(m3) == {"L19": ()}
    assert m2.prompt == "A dog chasing a ball."
    assert m2.questions[3].tag == "Attribute"  # unknown category falls back, reported
    assert m2.questions[4].text == "Is the dog\nrunning?"  # a multi-line cell is one row
    assert _issue_lines(issues, "skip") == [3, 16, 17, 18, 20]
    assert _issue_lines(issues, "repair") == [5, 6, 7, 8, 9, 10, 13, 13, 14, 14, 19]
    assert all(i.file == str(path) for i in issues)
    text = "\n".join(str(i) for i in issues)
    for expected in (
        ":3: skip: no question text", ":6: repair: duplicate proposition_id 3",
        ":7: repair: malformed dependency '3, right'; kept 3", ":8: repair: proposition 6 depends on itself",
        ":9: repair: dependency on 9 dropped", ":10: repair: dependency cycle 1 -> 2 -> 1",
        ":13: repair: malformed dependency '0,3'", ":14: repair: proposition_id '5.0' read as 5",
        ":17: skip: row has 11 fields", ":19: repair: no proposition_id",
    ):
        assert expected in text


def test_dsg_breaks_longer_cycles_one_edge_each(tmp_path):
    path = tmp_path / "cycles.csv"
    header = "item_id,text,proposition_id,dependency,question_natural_language\n"
    rows = ["a,P,1,3,Q1?", "a,P,2,1,Q2?", "a,P,3,2,Q3?", "a,P,4,5,Q4?", "a,P,5,4,Q5?"]
    path.write_text(header + "\n".join(rows) + "\n")
    (record,), issues = import_dsg_csv(path)
    assert _deps(record) == {"1": (), "2": ("1",), "3": ("2",), "4": (), "5": ("4",)}
    cycles = [i for i in issues if "dependency cycle" in i.reason]
    assert [(i.line, i.kind) for i in cycles] == [(2, "repair"), (5, "repair")]
    assert "1 -> 3 -> 2 -> 1; dropped 1's dependency on 3" in cycles[0].reason


def test_dsg_bom_crlf_and_extra_columns(tmp_path):
    path = tmp_path / "bom.csv"
    text = ("\ufeffIdx,Item_ID,text,proposition_id,dependency,category_broad,category_detailed,"
            "question_natural_language\r\n"
            "0,x,P,1,0,entity,whole,Is there a cat?\r\n1,x,P,2,1,attribute,color,Is the cat red?\r\n")
    path.write_text(text, encoding="utf-8", newline="")
    (record,), issues = import_dsg_csv(path)
    assert issues == []
    assert _deps(record) == {"1": (), "2": ("1",)}
    assert [q.tag for q in record.questions] == ["Existence", "Attribute"]
    assert record.questions[1].metadata["tuple"] == ""


def test_dsg_without_categories_reports_the_fallback_tag(tmp_path):
    path = tmp_path / "bare.csv"
    path.write_text("item_id,text,proposition_id,dependency,question_natural_language\nx,P,1,0,Is it?\n")
    (record,), (issue,) = import_dsg_csv(path)
    assert record.questions[0].tag == "Attribute"
    assert (issue.line, issue.kind) == (2, "repair") and "unknown DSG category" in issue.reason


def test_dsg_missing_columns_is_fatal(tmp_path):
    path = tmp_path / "wrong.csv"
    path.write_text("a,b,c\n1,2,3\n")
    with pytest.raises(ImporterError, match="missing column"):
        import_dsg_csv(path)


# --- GenEval -------------------------------------------------------------------------------


def test_geneval_real_file_counts():
    records, issues = import_geneval(GENEVAL)
    assert issues == []
    assert len(records) == GENEVAL_PROMPTS
    assert all(r.questions for r in records)
    assert [r.item_id for r in records] == [f"{i:05d}" for i in range(GENEVAL_PROMPTS)]
    for r in records:
        validate_questions(list(r.questions))
        for q in r.questions:
            assert q.tag in SEMANTIC_TAGS and q.metadata["geneval_tag"]
            if q.tag != "Existence":
                assert q.depends_on and all(p.startswith("exists_") for p in q.depends_on)
    tags = Counter(r.questions[0].metadata["geneval_tag"] for r in records)
    assert tags == {"position": 100, "color_attr": 100, "two_object": 99, "colors": 94,
                    "single_object": 80, "counting": 80}


def test_geneval_question_phrasing():
    records, _ = import_geneval(GENEVAL)
    texts = {r.prompt: [q.text for q in r.questions] for r in records}
    assert texts["a photo of two clocks"] == ["Is there a clock?", "Are there exactly two clocks?"]
    assert texts["a photo of a blue fire hydrant"] == ["Is there a fire hydrant?", "Is the fire hydrant blue?"]
    assert texts["a photo of a dog right of a teddy bear"] == [
        "Is there a teddy bear?", "Is there a dog?", "Is the dog to the right of the teddy bear?",
    ]
    assert texts["a photo of three persons"][1] == "Are there exactly three people?"
    assert texts["a photo of a skis"] == ["Is there a pair of skis?"]
    pos = next(r for r in records if r.prompt == "a photo of a dog right of a teddy bear")
    assert _deps(pos)["position_1"] == ("exists_1", "exists_0")


def test_geneval_malformed_file():
    path = FIXTURES / "geneval_malformed.jsonl"
    records, issues = import_geneval(path)
    assert [r.item_id for r in records] == ["00000", "00004", "00005", "00008", "00009"]
    by_id = {r.item_id: r for r in records}
    assert [q.text for q in by_id["00004"].questions] == ["Is there a dog?", "Are there exactly three dogs?"]
    assert [q.id for q in by_id["00005"].questions] == ["exists_0", "exists_1"]  # bad position dropped
    absent = by_id["00008"].questions
    assert [(q.text, q.tag, q.depends_on) for q in absent[1:]] == [
        ("Is the image free of any cat?", "Negative", ()),
        ("Are there fewer than three people?", "Negative", ("exists_0",)),
    ]
    assert [q.text for q in by_id["00009"].questions if q.tag == "Attribute"] == [
        "Is there a red cup?", "Is there a blue cup?",
    ]
    assert [(i.line, i.kind) for i in issues] == [
        (2, "skip"), (3, "skip"), (4, "skip"), (5, "repair"), (6, "skip"), (7, "skip"), (7, "skip"),
    ]
    assert "invalid JSON" in issues[0].reason and "no prompt" in issues[2].reason


@pytest.mark.parametrize(("noun", "expected"), [
    ("dog", "dogs"), ("bus", "buses"), ("couch", "couches"), ("wine glass", "wine glasses"),
    ("person", "people"), ("sheep", "sheep"), ("knife", "knives"), ("computer mouse", "computer mice"),
])
def test_plural(noun, expected):
    assert plural(noun) == expected


def test_article():
    assert with_article("apple") == "an apple" and with_article("bench") == "a bench"


# --- TIFA ----------------------------------------------------------------------------------


def test_tifa_sample():
    path = FIXTURES / "tifa_sample.json"
    records, issues = import_tifa(path)
    assert [(r.item_id, r.prompt) for r in records] == [
        ("t1", "A red car parked by a tree."), ("t2", "Two dogs in a park."), ("A cat asleep.", "A cat asleep."),
    ]
    t1, t2, cat = records
    assert [(q.id, q.tag, q.text) for q in t1.questions] == [
        ("1", "Existence", "Is there a car?"),
        ("2", "Attribute", 'What color is the car? Is the answer "red"?'),
        ("4", "Spatial", "Is the car next to a tree?"),
    ]
    assert [(q.id, q.tag, q.text) for q in t2.questions] == [
        ("1", "Count", 'How many dogs are there? Is the answer "2"?'),
        ("3", "Environment", "Is this a park?"),
        ("4", "Attribute", "Is it sunny?"),
    ]
    assert cat.questions[0].tag == "Action"
    assert t1.questions[1].metadata["choices"] == ["red", "blue", "green", "black"]
    assert [(i.line, i.kind) for i in issues] == [(4, "skip"), (7, "skip"), (9, "repair"), (10, "skip"), (11, "skip")]
    assert "answer 'no'" in issues[0].reason


def test_tifa_jsonl_and_broken_json(tmp_path):
    entries = json.loads((FIXTURES / "tifa_sample.json").read_text())
    jsonl = tmp_path / "qa.jsonl"
    jsonl.write_text("\n".join(json.dumps(e) for e in entries[:2]) + "\n")
    (record,), issues = import_tifa(jsonl)
    assert len(record.questions) == 2 and issues == []
    broken = tmp_path / "broken.json"
    broken.write_text('[\n{"id": "a", "question": "is it?"},\n{"id": \n]\n')
    with pytest.raises(ImporterError, match=r"broken.json:4: invalid JSON"):
        import_tifa(broken)


# --- output and CLI ------------------------------------------------------------------------


def test_written_records_round_trip_as_score_questions(tmp_path):
    out = tmp_path / "q.jsonl"
    records, _ = import_dsg_csv(DSG)
    write_jsonl(records, out)
    lines = out.read_text(encoding="utf-8").splitlines()
    assert len(lines) == DSG_PROMPTS
    for line, record in zip(lines, records, strict=True):
        obj = json.loads(line)
        assert set(obj) == {"item_id", "prompt", "questions", "source"}
        assert obj["item_id"] == record.item_id
        validate_questions([Question.model_validate(q) for q in obj["questions"]])
    assert list(tmp_path.iterdir()) == [out]  # the temp file was renamed, not left behind


def test_cli_imports_and_summarises(tmp_path, capsys):
    out = tmp_path / "q.jsonl"
    assert main(["import", "dsg-csv", str(DSG), "-o", str(out)]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err[-1] == f"imported {DSG_PROMPTS} prompts, {DSG_QUESTIONS} questions; {DSG_SKIPPED} skipped, 81 repaired"
    assert len(err) == 1 + DSG_SKIPPED + 81
    assert err[0].startswith(f"{DSG}:") and ": skip: no question text" in err[0]
    assert len(out.read_text().splitlines()) == DSG_PROMPTS


def test_cli_strict_fails_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "q.jsonl"
    assert main(["import", "dsg-csv", str(DSG), "-o", str(out), "--strict"]) == 1
    assert "nothing written" in capsys.readouterr().err.splitlines()[-1]
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_cli_strict_passes_clean_file(tmp_path, capsys):
    out = tmp_path / "q.jsonl"
    assert main(["import", "geneval", str(GENEVAL), "-o", str(out), "--strict"]) == 0
    summary = capsys.readouterr().err.strip()
    questions = sum(len(json.loads(line)["questions"]) for line in out.read_text().splitlines())
    assert summary == f"imported {GENEVAL_PROMPTS} prompts, {questions} questions; 0 skipped, 0 repaired"
    assert len(out.read_text().splitlines()) == GENEVAL_PROMPTS


def test_cli_fatal_error(tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("x,y\n")
    assert main(["import", "dsg-csv", str(bad), "-o", str(tmp_path / "q.jsonl")]) == 2
    assert "missing column" in capsys.readouterr().err
    assert main(["import", "tifa", str(tmp_path / "absent.json"), "-o", str(tmp_path / "q.jsonl")]) == 2


def test_registry_matches_cli_formats():
    assert sorted(IMPORTERS) == ["alphagrpo", "dsg-csv", "geneval", "tifa"]


def test_dsg_duplicate_suffix_avoids_existing_ids(tmp_path):
    path = tmp_path / "dup.csv"
    header = "item_id,text,proposition_id,dependency,category_broad,category_detailed,question_natural_language\n"
    rows = ["a,P,3,,entity,whole,Q1?", "a,P,3_2,0,entity,whole,Q2?", "a,P,3,3,entity,whole,Q3?"]
    path.write_text(header + "\n".join(rows) + "\n")
    (record,), issues = import_dsg_csv(path)
    assert _deps(record) == {"3": (), "3_2": (), "3_3": ("3",)}
    assert [(i.line, i.kind) for i in issues] == [(4, "repair")] and "renamed to 3_3" in issues[0].reason


# --- AlphaGRPO training data ----------------------------------------------------------------


def test_alphagrpo_jsonl_to_questions(tmp_path, capsys):
    src = tmp_path / "train.jsonl"
    lines = [
        {"id": "a1", "prompt": "two dogs on grass", "semantic_questions": ["Are there two dogs?"],
         "quality_questions": [{"question": "Are the dogs' legs correct?", "tag": "Anatomy"}]},
        {"prompt": "a red kite", "metadata": {"semantic_questions": [{"question": "Is the kite red?",
                                                                     "tag": "Attribute"}]}},
        {"id": "a3", "prompt": "no questions here"},
        "not an object",
    ]
    src.write_text("\n".join(json.dumps(x) for x in lines) + "\n{broken\n", encoding="utf-8")
    out = tmp_path / "questions.jsonl"
    assert main(["import", "alphagrpo", str(src), "-o", str(out)]) == 0
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert [(r["item_id"], r["prompt"]) for r in records] == [("a1", "two dogs on grass"), ("2", "a red kite")]
    assert [(q["id"], q["kind"], q["tag"]) for q in records[0]["questions"]] == [
        ("s1", "semantic", "Attribute"), ("q1", "quality", "Anatomy")]
    assert records[1]["questions"][0]["text"] == "Is the kite red?"
    err = capsys.readouterr().err
    assert f"{src}:1: repair: semantic_questions[0]: no tag; tagged Attribute" in err
    assert f"{src}:3: skip: no semantic_questions or quality_questions" in err
    assert f"{src}:4: skip: not a JSON object" in err and f"{src}:5: skip: not JSON" in err
    assert "imported 2 prompts, 3 questions; 3 skipped, 1 repaired" in err
    # the output is usable as /v1/score questions as it is
    assert validate_questions([Question.model_validate(q) for q in records[0]["questions"]])
