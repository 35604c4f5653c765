"""`dvreward score`: offline scoring through the real CLI entry point and the tiny verifier."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from PIL import Image

from server.cli import main

QUESTIONS = [
    {"id": "1", "text": "Is there a cat?", "tag": "Existence"},
    {"id": "2", "text": "Is the cat red?", "tag": "Attribute", "depends_on": ["1"]},
    {"id": "q1", "text": "Is the cat well drawn?", "kind": "quality", "tag": "Anatomy"},
]


@pytest.fixture
def images(tmp_path: Path) -> list[str]:
    paths = []
    for i, color in enumerate(["red", "navy"]):
        p = tmp_path / f"{i}.png"
        Image.new("RGB", (64, 48), color).save(p)
        paths.append(str(p))
    return paths


def test_score_prints_rewards_from_p(tiny_models, tmp_path, images, capsys):
    qfile = tmp_path / "q.json"
    qfile.write_text(json.dumps(QUESTIONS))
    code = main(["score", "--verifier", str(tiny_models["verifier"]), "--questions", str(qfile),
                 "--prompt", "a red cat", *images])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["image"] for r in out["results"]] == images
    for r in out["results"]:
        p = r["p"]
        sc, pq = (p["1"] + p["2"]) / 2, p["q1"]
        assert math.isclose(r["reward"], math.sqrt(sc * pq), rel_tol=1e-9)
    assert out["results"][0]["p"] != out["results"][1]["p"]


def test_score_reports_bad_input_without_traceback(tiny_models, tmp_path, images, capsys):
    empty = tmp_path / "empty.json"
    empty.write_text("")
    assert main(["score", "--verifier", str(tiny_models["verifier"]), "--questions", str(empty), *images]) == 2
    assert "empty" in capsys.readouterr().err
    qfile = tmp_path / "q.json"
    qfile.write_text(json.dumps(QUESTIONS))
    assert main(["score", "--verifier", str(tmp_path / "missing"), "--questions", str(qfile), *images]) == 2
    assert "tiny-models" in capsys.readouterr().err


def test_score_takes_the_prompt_of_a_one_record_jsonl(tiny_models, tmp_path, images, capsys):
    qfile = tmp_path / "q.jsonl"
    qfile.write_text(json.dumps({"prompt": "a red cat", "questions": QUESTIONS}) + "\n")
    assert main(["score", "--verifier", str(tiny_models["verifier"]), "--questions", str(qfile), *images]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["prompt"] == "a red cat" and len(out["results"]) == 2


@pytest.mark.parametrize(("content", "says"), [
    ("\n".join(json.dumps({"prompt": p, "questions": QUESTIONS}) for p in ("a", "b")), "holds 2 records"),
    (json.dumps(["Is there a cat?"]), "question 1 is str"),
    (json.dumps([{"id": "1", "text": "Is there a cat?"}]), "question 1: tag: Field required"),
    (json.dumps([{"id": "1", "text": "Is there a cat?", "tag": "Anatomy"}]), "expected one of Style"),
])
def test_score_refuses_unclear_question_files(tiny_models, tmp_path, images, capsys, content, says):
    qfile = tmp_path / "q.jsonl"
    qfile.write_text(content)
    assert main(["score", "--verifier", str(tiny_models["verifier"]), "--questions", str(qfile), *images]) == 2
    err = capsys.readouterr().err
    assert says in err and len(err.strip().splitlines()) == 1, err
