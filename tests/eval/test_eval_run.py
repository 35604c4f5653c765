"""`dvreward eval` in-process with the tiny verifier: outputs, mismatches, failures, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from server.cli import main
from server.eval.importers import import_dsg_csv, import_geneval, write_jsonl
from server.eval.run import EvalOptions, run_eval
from server.eval.scoring import LocalBackend

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
REPO = Path(__file__).resolve().parents[2]


def _draw(path: Path, seed: int) -> None:
    im = Image.new("RGB", (96, 80), ((seed * 53) % 256, (seed * 97) % 256, 120))
    d = ImageDraw.Draw(im)
    d.ellipse((8 + seed % 20, 10, 60, 60), fill=(220, 40, 40))
    d.rectangle((50, 30, 90, 75), fill=(30, 30, 200))
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)


def _dsg_questions(tmp_path: Path, n: int) -> tuple[Path, list[str]]:
    records, _ = import_dsg_csv(FIXTURES / "dsg_tifa160_dev.csv")
    path = tmp_path / "questions.jsonl"
    write_jsonl(records[:n], path)
    return path, [r.item_id for r in records[:n]]


def _images(root: Path, item_ids: list[str], per_item: int = 2) -> list[str]:
    names = []
    for i, item_id in enumerate(item_ids):
        for k in range(per_item):
            name = f"{item_id}_{k}.png"
            _draw(root / name, i * 10 + k)
            names.append(name)
    return names


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _eval(tmp_path: Path, verifier: Path, images: Path, questions: Path, out: str = "out", *extra: str) -> int:
    return main(["eval", "--images", str(images), "--questions", str(questions), "--verifier", str(verifier),
                 "-o", str(tmp_path / out), "--no-progress", *extra])


def test_eval_writes_results_summary_report_and_chart(tmp_path, tiny_models, capsys):
    questions, ids = _dsg_questions(tmp_path, 4)
    images = tmp_path / "images"
    names = _images(images, ids[:3])  # the 4th item gets no image
    _draw(images / "stray_prompt.png", 99)  # matches no item
    (images / "notes.txt").write_text("not an image")  # not an image: ignored
    (images / f"{ids[0]}_7.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")  # corrupt

    assert _eval(tmp_path, tiny_models["verifier"], images, questions, "out", "--gating", "hard",
                 "--batch-size", "3") == 0
    err = capsys.readouterr().err
    assert "stray_prompt.png" in err and ids[3] in err  # both mismatches reported on stderr

    out = tmp_path / "out"
    results = _lines(out / "results.jsonl")
    assert sorted(r["image"] for r in results) == sorted([*names, f"{ids[0]}_7.png"])
    by_image = {r["image"]: r for r in results}
    bad = by_image[f"{ids[0]}_7.png"]
    assert bad["reward"] is None and bad["sc"] is None and bad["error"]  # explicit error, never 0
    assert all(q["p"] is None for q in bad["questions"])
    for name in names:
        r = by_image[name]
        assert r["error"] is None and 0.0 < r["reward"] <= 1.0
        assert r["prompt"] and r["item_id"] in ids and r["gating"] == "hard"
        for q in r["questions"]:
            assert set(q) == {"id", "text", "kind", "tag", "p", "gated_p", "zeroed_by"}
            assert 0.0 < q["p"] < 1.0 and 0.0 <= q["gated_p"] <= q["p"]

    summary = json.loads((out / "summary.json").read_text())
    c = summary["counts"]
    assert (c["items"], c["items_with_images"], c["items_without_images"]) == (4, 3, 1)
    assert (c["images"], c["scored"], c["errors"], c["unmatched_images"], c["pending"]) == (7, 6, 1, 1, 0)
    assert summary["items_without_images"] == [ids[3]]
    assert summary["unmatched_images"][0]["image"] == "stray_prompt.png"
    assert summary["errors"][0]["image"] == f"{ids[0]}_7.png"
    ok = [r for r in results if r["error"] is None]
    assert summary["overall"]["reward"] == pytest.approx(sum(r["reward"] for r in ok) / len(ok))  # errors excluded
    assert {"Existence", "Spatial"} <= set(summary["by_tag"])
    bench = summary["benchmark"]
    assert bench["category_broad"]["gating"] == "hard"
    assert {"entity", "relation"} <= set(bench["category_broad"]["categories"])
    assert "whole" in bench["category_detailed"]["categories"]
    assert all(0 <= row["mean_p"] <= 1 for row in bench["category_broad"]["categories"].values())

    # DSG imports are semantic only: PQ is 1 by definition, so the summary leads with SC and says why
    o = summary["overall"]
    assert (o["lead"], o["pq"], summary["halves"]) == ("sc", None, {"semantic": 6, "quality": 0})
    assert o["sc"] == pytest.approx(sum(r["sc"] for r in ok) / len(ok))
    (note,) = summary["notes"]
    assert "no quality questions" in note and "sqrt(SC)" in note
    assert f"mean SC {o['sc']:.4f}" in err and "note: no quality questions" in err

    html = (out / "report.html").read_text()
    assert note in html and html.index("<th>SC</th>") < html.index("<th>reward</th>") and "<th>PQ</th>" not in html
    assert f"<details><summary>Items without images: 1</summary><p>{ids[3]}</p></details>" in html
    assert all(item_id in html for item_id in ids[:3])
    assert html.count("<img ") == 7 - 1  # the corrupt image has a placeholder, not an <img>
    assert "data:image/jpeg;base64," in html and "image unavailable" in html

    with Image.open(out / "summary.png") as chart:
        chart.load()
        assert chart.format == "PNG" and chart.width == 1000 and 300 < chart.height < 4000


def test_html_escapes_text(tmp_path, tiny_models):
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({
        "item_id": "x1", "prompt": "<script>alert('p')</script>", "source": "hand",
        "questions": [{"id": "a", "text": "Is there a <b>cat</b>?", "tag": "Existence"},
                      {"id": "b", "text": "Is it sharp & clear?", "kind": "quality", "tag": "Texture"}],
    }) + "\n")
    _draw(tmp_path / "img" / "x1.png", 1)
    assert _eval(tmp_path, tiny_models["verifier"], tmp_path / "img", questions) == 0
    html = (tmp_path / "out" / "report.html").read_text()
    assert "<script>" not in html and "&lt;script&gt;" in html and "&lt;b&gt;cat&lt;/b&gt;" in html
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert set(summary["by_aspect"]) == {"Texture"} and summary["benchmark"] == {}
    assert summary["overall"]["lead"] == "reward" and summary["notes"] == []  # both halves asked: nothing lifted


def test_folder_layouts_and_geneval_categories(tmp_path, tiny_models, capsys):
    records, _ = import_geneval(FIXTURES / "geneval_evaluation_metadata.jsonl")
    questions = tmp_path / "geneval.jsonl"
    write_jsonl(records[:3], questions)
    a, b, c = (r.item_id for r in records[:3])
    root = tmp_path / "geneval_out"
    for k in range(2):
        _draw(root / a / "samples" / f"{k:05d}.png", k)  # GenEval's own layout
    _draw(root / a / "grid.png", 5)  # GenEval's grid: not a sample
    (root / a / "metadata.jsonl").write_text("{}\n")
    _draw(root / b / "0.png", 3)  # <item_id>/<k>.<ext>
    _draw(root / f"{c}.png", 4)  # <item_id>.<ext>

    assert _eval(tmp_path, tiny_models["verifier"], root, questions) == 0
    assert f"{a}/grid.png" in capsys.readouterr().err
    results = _lines(tmp_path / "out" / "results.jsonl")
    assert [(r["item_id"], r["image"]) for r in results] == [
        (a, f"{a}/samples/00000.png"), (a, f"{a}/samples/00001.png"), (b, f"{b}/0.png"), (c, f"{c}.png"),
    ]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    tags = summary["benchmark"]["geneval_tag"]["categories"]
    assert set(tags) == {r.questions[0].metadata["geneval_tag"] for r in records[:3]}
    assert all("image_accuracy" in row and row["n_images"] >= 1 for row in tags.values())


def test_mapping_file_with_missing_and_unknown_entries(tmp_path, tiny_models):
    questions, ids = _dsg_questions(tmp_path, 2)
    _draw(tmp_path / "pics" / "one.png", 1)
    mapping = tmp_path / "pics" / "map.jsonl"
    mapping.write_text("\n".join(json.dumps(x) for x in [
        {"image": "one.png", "item_id": ids[0]},
        {"image": "one.png", "item_id": ids[1]},  # the same image judged against another prompt
        {"image": "missing.png", "item_id": ids[1]},  # file does not exist: an error line
        {"image": "one.png", "item_id": "nope"},  # unknown item: reported
        {"image": "one.png", "item_id": ids[0]},  # duplicate: reported
    ]) + "\nnot json\n")
    assert _eval(tmp_path, tiny_models["verifier"], mapping, questions) == 0
    results = _lines(tmp_path / "out" / "results.jsonl")
    assert [(r["item_id"], r["image"]) for r in results] == [(ids[0], "one.png"), (ids[1], "missing.png"),
                                                             (ids[1], "one.png")]
    assert results[1]["reward"] is None and "cannot read" in results[1]["error"]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["counts"]["unmatched_images"] == 3 and summary["counts"]["errors"] == 1


class _Counting:
    """A verifier wrapper that counts the images it is asked to score."""

    def __init__(self, inner) -> None:
        self.inner, self.model_id, self.images = inner, inner.model_id, 0

    def verify(self, items):
        self.images += len(items)
        return self.inner.verify(items)


def test_resume_after_sigkill_scores_only_the_rest(tmp_path, tiny_models):
    questions, ids = _dsg_questions(tmp_path, 3)
    images = tmp_path / "images"
    names = _images(images, ids, per_item=4)  # 12 images
    out = tmp_path / "out"
    # A real process, each verifier call slowed down so it is surely killed midway.
    script = (
        "import sys, time\n"
        "from server.engines.hf import verifier as h\n"
        "orig = h.HFVerifier.verify\n"
        "h.HFVerifier.verify = lambda self, items: (time.sleep(0.4), orig(self, items))[1]\n"
        "from server.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    cmd = [sys.executable, "-c", script, "eval", "--images", str(images), "--questions", str(questions),
           "--verifier", str(tiny_models["verifier"]), "-o", str(out), "--batch-size", "1", "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    results = out / "results.jsonl"
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if results.exists() and results.read_bytes().count(b"\n") >= 3:
                break
            time.sleep(0.02)
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else "exited early"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        if proc.stderr:
            proc.stderr.close()
    before = results.read_bytes()
    done_before = before.count(b"\n")
    assert 3 <= done_before < len(names)
    before_keys = [r["image"] for r in _lines(results)[:done_before]] if before.endswith(b"\n") else None

    from server.engines.hf.verifier import HFVerifier

    counting = _Counting(HFVerifier.load(str(tiny_models["verifier"])))
    opts = EvalOptions(images=images, questions=questions, out=out, verifier=str(tiny_models["verifier"]),
                       batch_size=4, progress=False)
    result = run_eval(opts, LocalBackend(counting))
    assert result.exit_code == 0
    assert counting.images == len(names) - done_before  # nothing scored twice
    lines = _lines(results)
    assert len(lines) == len(names)
    assert Counter(r["image"] for r in lines).most_common(1)[0][1] == 1  # no duplicate keys
    if before_keys is not None:
        assert [r["image"] for r in lines[:done_before]] == before_keys  # old lines untouched
    c = result.summary["counts"]
    assert (c["resumed"], c["scored_this_run"], c["scored"], c["pending"]) == (
        done_before, len(names) - done_before, len(names), 0)

    counting.images = 0  # a third run has nothing left to do
    assert run_eval(opts, LocalBackend(counting)).exit_code == 0 and counting.images == 0


def test_truncated_last_line_is_reported_and_rescored(tmp_path, tiny_models, capsys):
    questions, ids = _dsg_questions(tmp_path, 2)
    images = tmp_path / "images"
    names = _images(images, ids, per_item=2)
    # A complete run, then a torn last write as a kill mid-write leaves it.
    assert _eval(tmp_path, tiny_models["verifier"], images, questions, "out") == 0
    results = tmp_path / "out" / "results.jsonl"
    lines = results.read_text().splitlines(keepends=True)
    results.write_text("".join(lines[:2]) + lines[2][: len(lines[2]) // 2])  # killed mid-write
    capsys.readouterr()
    assert _eval(tmp_path, tiny_models["verifier"], images, questions, "out") == 0
    err = capsys.readouterr().err
    assert "truncated" in err and "scoring the remaining 2" in err
    after = _lines(results)
    assert sorted(r["image"] for r in after) == sorted(names)


def test_resume_refuses_other_settings_and_retries_errors_on_request(tmp_path, tiny_models, capsys):
    questions, ids = _dsg_questions(tmp_path, 1)
    images = tmp_path / "images"
    _images(images, ids, per_item=1)
    corrupt = images / f"{ids[0]}_1.png"
    corrupt.write_bytes(b"")
    assert _eval(tmp_path, tiny_models["verifier"], images, questions, "out") == 0
    assert _eval(tmp_path, tiny_models["verifier"], images, questions, "out", "--gating", "soft") == 2
    assert "gating" in capsys.readouterr().err

    _draw(corrupt, 3)  # fixed on disk: a plain rerun keeps the error, --retry-errors scores it again
    assert _eval(tmp_path, tiny_models["verifier"], images, questions, "out") == 0
    assert _lines(tmp_path / "out" / "results.jsonl")[1]["error"] is not None
    assert _eval(tmp_path, tiny_models["verifier"], images, questions, "out", "--retry-errors") == 0
    lines = _lines(tmp_path / "out" / "results.jsonl")
    assert len(lines) == 2 and all(r["error"] is None for r in lines)


def test_bad_inputs_exit_2(tmp_path, tiny_models, capsys):
    questions, ids = _dsg_questions(tmp_path, 1)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _eval(tmp_path, tiny_models["verifier"], empty, questions) == 2
    assert "no image" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"item_id": "a", "prompt": "p", "questions": [{"id": "1", "text": "?", "tag": "Nope"}]}\n')
    assert _eval(tmp_path, tiny_models["verifier"], empty, bad) == 2
    assert "bad.jsonl:1" in capsys.readouterr().err
