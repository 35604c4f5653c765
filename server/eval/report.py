"""report.html (self-contained: summary tables, then per image a thumbnail and its questions) and
summary.png (bar charts drawn with Pillow alone, so the report needs no plotting library)."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from server.eval.files import atomic_write
from server.eval.scoring import ImageLoadError, load_image_file

THUMB_PX = 192


# ---- HTML ---------------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222}
table{border-collapse:collapse;margin:8px 0 16px}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;font-size:13px;vertical-align:top}
th{background:#f2f2f2}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.item{border-top:2px solid #888;margin-top:24px;padding-top:8px}
.image{display:flex;gap:16px;margin:12px 0}
.image img{border:1px solid #aaa;max-width:192px;max-height:192px}
.noimg{width:192px;height:96px;border:1px dashed #aaa;color:#888;font-size:12px;display:flex;
align-items:center;justify-content:center;text-align:center}
.err{color:#a00;font-weight:bold}
.warn{background:#fff3cd;border:1px solid #e0c060;padding:8px;margin:8px 0}
"""


def _e(value: object) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _fmt(v: float | None, digits: int = 3) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def _colour(p: float | None) -> str:
    """Red (0) through yellow (0.5) to green (1); grey when there is no p."""
    if p is None:
        return "#e6e6e6"
    return f"hsl({round(120 * max(0.0, min(1.0, p)))},70%,80%)"


def _cell(p: float | None) -> str:
    return f'<td class="num" style="background:{_colour(p)}">{_fmt(p)}</td>'


def _thumbnail(path: str) -> str:
    try:
        image, _, _ = load_image_file(Path(path))
    except ImageLoadError as e:
        return f'<div class="noimg">image unavailable:<br>{_e(e)}</div>'
    image.thumbnail((THUMB_PX, THUMB_PX))
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=75)
    b64 = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img src="data:image/jpeg;base64,{b64}" alt="{_e(Path(path).name)}">'


def _table(title: str, rows: dict[str, dict[str, Any]], columns: Sequence[str]) -> str:
    if not rows:
        return ""
    head = "".join(f"<th>{_e(c)}</th>" for c in ("", *columns))
    body = []
    for name, row in rows.items():
        cells = []
        for c in columns:
            v = row.get(c)
            cells.append(_cell(v) if c in ("mean_p", "accuracy", "image_accuracy") else f'<td class="num">{_e(v)}</td>')
        body.append(f"<tr><th>{_e(name)}</th>{''.join(cells)}</tr>")
    return f"<h3>{_e(title)}</h3><table><tr>{head}</tr>{''.join(body)}</table>"


LABELS = {"reward": "reward", "sc": "SC", "pq": "PQ"}


def overall_order(s: dict[str, Any]) -> list[str]:
    """The overall figures, the one the summary leads with first; a half nobody asked about is left out."""
    o = s["overall"]
    lead = o["lead"]
    return [lead] + [k for k in ("reward", "sc", "pq") if k != lead and not (k != "reward" and o[k] is None)]


def _summary_html(s: dict[str, Any]) -> str:
    c, o = s["counts"], s["overall"]
    parts = []
    if not s.get("complete", True):
        parts.append(f'<div class="warn">Incomplete run: {c["pending"]} image(s) not scored yet; '
                     "rerun the same command to resume.</div>")
    parts.append("<h2>Summary</h2><table>"
                 + "".join(f"<tr><th>{_e(k)}</th><td class='num'>{_e(v)}</td></tr>" for k, v in c.items())
                 + "</table>")
    parts.append(f"<p>gating: {_e(s['gating'])}; aggregation: {_e(s['aggregation'])}; "
                 f"model(s): {_e(', '.join(s.get('models') or []) or '—')}</p>")
    for note in s["notes"]:
        parts.append(f'<div class="warn">{_e(note)}</div>')
    columns = overall_order(s)
    parts.append("<table><tr><th></th>" + "".join(f"<th>{_e(LABELS[k])}</th>" for k in columns)
                 + "<th>images</th></tr><tr><th>mean</th>" + "".join(_cell(o[k]) for k in columns)
                 + f"<td class='num'>{o['n']}</td></tr></table>")
    parts.append(_table("Mean p by semantic tag", s["by_tag"], ("mean_p", "n")))
    parts.append(_table("Mean p by quality aspect", s["by_aspect"], ("mean_p", "n")))
    for b in s["benchmark"].values():
        cols = ["mean_p", "accuracy", "n"]
        if any("image_accuracy" in r for r in b["categories"].values()):
            cols += ["image_accuracy", "n_images"]
        parts.append(_table(f"{b['label']} ({b['gating']} gating)", b["categories"], cols))
    for key, title in (("errors", "Failed images"), ("unmatched_images", "Images matching no item")):
        if s[key]:
            rows = "".join(f"<tr><td>{_e(e.get('item_id', ''))}</td><td>{_e(e['image'])}</td>"
                           f"<td class='err'>{_e(e.get('error') or e.get('reason'))}</td></tr>" for e in s[key])
            parts.append(f"<h3>{_e(title)} ({len(s[key])})</h3><table><tr><th>item</th><th>image</th>"
                         f"<th>reason</th></tr>{rows}</table>")
    if s["items_without_images"]:  # often hundreds of ids (a partial run): a count, the ids one click away
        parts.append(f"<details><summary>Items without images: {len(s['items_without_images'])}</summary><p>"
                     + ", ".join(_e(i) for i in s["items_without_images"]) + "</p></details>")
    return "\n".join(parts)


def _zeroed_cell(q: dict[str, Any], by_id: dict[str, dict[str, Any]]) -> str:
    parent = q.get("zeroed_by")  # absent in results written before it existed
    if parent is None:
        return "<td></td>"
    pq = by_id.get(parent, {})
    return f"<td>{_e(parent)}: {_e(pq.get('text'))} (p {_fmt(pq.get('gated_p'))})</td>"


def _image_html(r: dict[str, Any]) -> str:
    by_id = {q["id"]: q for q in r["questions"]}
    gated = any(q.get("zeroed_by") for q in r["questions"])
    rows = "".join(
        f"<tr><td>{_e(q['id'])}</td><td>{_e(q['text'])}</td><td>{_e(q['kind'])}</td><td>{_e(q['tag'])}</td>"
        f"{_cell(q['p'])}{_cell(q['gated_p'])}{_zeroed_cell(q, by_id) if gated else ''}</tr>"
        for q in r["questions"]
    )
    if r.get("error") is None:
        status = f"reward {_fmt(r['reward'])} · SC {_fmt(r['sc'])} · PQ {_fmt(r['pq'])}"
    else:
        status = f"<span class='err'>error: {_e(r['error'])}</span>"
    head = f"<b>{_e(r['image'])}</b><br>{status}"
    return (f'<div class="image"><div>{_thumbnail(r["image_path"])}</div><div>{head}'
            f"<table><tr><th>id</th><th>question</th><th>kind</th><th>tag</th><th>p</th><th>gated p</th>"
            f"{'<th>zeroed by parent (answered no)</th>' if gated else ''}</tr>"
            f"{rows}</table></div></div>")


def render_html(summary: dict[str, Any], records: Sequence[dict[str, Any]], max_images: int = 1000) -> str:
    """The whole report as one string; images beyond `max_images` are counted, not shown."""
    body = [f"<h1>DVReward evaluation</h1>{_summary_html(summary)}", "<h2>Images</h2>"]
    shown = list(records[:max_images]) if max_images >= 0 else list(records)
    if len(shown) < len(records):
        body.append(f'<div class="warn">Showing the first {len(shown)} of {len(records)} images '
                    "(--report-max-images); every image is in results.jsonl.</div>")
    current = None
    for r in shown:
        if r["item_id"] != current:
            if current is not None:
                body.append("</div>")
            current = r["item_id"]
            body.append(f'<div class="item"><h3>{_e(r["item_id"])}</h3><p>{_e(r["prompt"])}</p>')
        body.append(_image_html(r))
    if current is not None:
        body.append("</div>")
    return ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>DVReward evaluation</title>"
            f"<style>{_CSS}</style></head><body>{''.join(body)}</body></html>")


def write_html(path: Path, summary: dict[str, Any], records: Sequence[dict[str, Any]], max_images: int = 1000) -> None:
    atomic_write(path, render_html(summary, records, max_images).encode("utf-8"))


# ---- PNG ----------------------------------------------------------------------------------------

WIDTH, LABEL_W, BAR_W, ROW_H, PAD = 1000, 300, 520, 24, 20
MAX_ROWS = 40


def _font(size: int) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow without FreeType: the small bitmap font
        return ImageFont.load_default()


def _fit(draw: Any, text: str, font: Any, width: int) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def chart_sections(summary: dict[str, Any]) -> list[tuple[str, list[tuple[str, float | None, int]]]]:
    """(title, [(label, value, n)]) for every non-empty chart section."""
    o = summary["overall"]
    lifted = "reward (lifted: a half is absent)" if summary["notes"] else "reward"
    labels = {**LABELS, "reward": lifted}
    sections = [("Overall (mean over scored images)", [(labels[k], o[k], o["n"]) for k in overall_order(summary)])]
    sections.append(("Mean p by semantic tag", [(k, v["mean_p"], v["n"]) for k, v in summary["by_tag"].items()]))
    sections.append(("Mean p by quality aspect", [(k, v["mean_p"], v["n"]) for k, v in summary["by_aspect"].items()]))
    for b in summary["benchmark"].values():
        sections.append((f"{b['label']}: mean p, {b['gating']} gating",
                         [(k, v["mean_p"], v["n"]) for k, v in b["categories"].items()]))
    return [(t, rows) for t, rows in sections if rows]


def render_png(summary: dict[str, Any]) -> bytes:
    """Horizontal bars on a 0..1 axis with label, value and count on each row."""
    from PIL import Image, ImageDraw

    sections = chart_sections(summary)
    trimmed = []
    for title, rows in sections:
        if len(rows) > MAX_ROWS:
            rows = sorted(rows, key=lambda r: -r[2])[:MAX_ROWS]
            title += f" (top {MAX_ROWS} by count)"
        trimmed.append((title, rows))
    height = PAD * 2 + 40 + sum(ROW_H * (len(rows) + 2) for _, rows in trimmed)
    img = Image.new("RGB", (WIDTH, height), "white")
    draw = ImageDraw.Draw(img)
    title_font, head_font, font = _font(20), _font(16), _font(13)
    c = summary["counts"]
    draw.text((PAD, PAD), _fit(draw, f"DVReward evaluation: {c['scored']} scored, {c['errors']} failed, "
                                     f"{c['pending']} pending · gating {summary['gating']}", title_font,
                               WIDTH - 2 * PAD), fill="black", font=title_font)
    y = PAD + 40
    x0 = PAD + LABEL_W
    for title, rows in trimmed:
        draw.text((PAD, y + 4), _fit(draw, title, head_font, WIDTH - 2 * PAD), fill="black", font=head_font)
        y += ROW_H + 4
        top, bottom = y, y + ROW_H * len(rows)
        for t in (0.0, 0.25, 0.5, 0.75, 1.0):
            x = x0 + round(t * BAR_W)
            draw.line([(x, top), (x, bottom)], fill="#dddddd" if t not in (0.0, 0.5) else "#999999")
            draw.text((x - 8, bottom + 1), f"{t:g}", fill="#666666", font=font)
        for label, value, n in rows:
            draw.text((PAD, y + 4), _fit(draw, label, font, LABEL_W - 10), fill="black", font=font)
            if value is not None:
                w = max(1, round(max(0.0, min(1.0, value)) * BAR_W))
                draw.rectangle([(x0, y + 3), (x0 + w, y + ROW_H - 4)], fill=_rgb(value), outline="#555555")
            text = f"{'n/a' if value is None else f'{value:.3f}'}  (n={n})"
            draw.text((x0 + BAR_W + 10, y + 4), text, fill="black", font=font)
            y += ROW_H
        y += ROW_H - 4
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _rgb(p: float) -> tuple[int, int, int]:
    """The same red -> yellow -> green scale as the HTML, a little darker for bars."""
    import colorsys

    r, g, b = colorsys.hls_to_rgb(max(0.0, min(1.0, p)) / 3, 0.6, 0.65)
    return round(r * 255), round(g * 255), round(b * 255)


def write_png(path: Path, summary: dict[str, Any]) -> None:
    atomic_write(path, render_png(summary))
