"""Images of more than 8 bits per channel score as what they show: a 16-bit greyscale PNG decoded to an integer
mode that `convert("RGB")` clipped at 255 of 65535, so nearly every pixel was white."""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from server.cli import main
from server.eval.scoring import load_image_file
from server.images import load_image
from tests.tolerance import assert_p_close
from trainer_client.encoding import EncodeOptions, encode_image

pytestmark = pytest.mark.float_sensitive

# A horizontal gradient over every 8-bit level; its 16-bit version has the same levels times 257 (0x00ff -> 0xffff).
LEVELS = np.tile(np.arange(256, dtype=np.uint8), (32, 1))


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


def png16_rgb(array: np.ndarray) -> bytes:
    """A 16-bit RGB PNG written by hand (Pillow writes 16 bits for greyscale only)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    h, w, _ = array.shape
    rows = b"".join(b"\x00" + array[y].astype(">u2").tobytes() for y in range(h))
    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def test_a_16_bit_png_decodes_to_the_pixels_of_its_8_bit_version() -> None:
    grey16 = png(LEVELS.astype(np.uint16) * 257)
    assert Image.open(io.BytesIO(grey16)).mode == "I;16"
    want = np.asarray(load_image(png(LEVELS), 10**6))
    assert np.array_equal(np.asarray(load_image(grey16, 10**6)), want)
    rgb = np.stack([LEVELS, LEVELS[:, ::-1], LEVELS], axis=-1)
    assert np.array_equal(np.asarray(load_image(png16_rgb(rgb.astype(np.uint16) * 257), 10**6)),
                          np.asarray(load_image(png(rgb), 10**6)))


def test_a_16_bit_gradient_scores_as_its_8_bit_version(embedded_server: str) -> None:

    images = [png(LEVELS), png(LEVELS.astype(np.uint16) * 257)]
    body = {"items": [{"images": [base64.b64encode(im).decode()], "questions": ["Is it a gradient?",
                                                                                "Is the image white?"]}
                      for im in images]}
    r = httpx.post(embedded_server + "/v1/verify", json=body, timeout=60)
    assert r.status_code == 200, r.text
    eight, sixteen = (item["p"] for item in r.json()["results"])
    assert_p_close(sixteen, eight)


def test_every_way_in_reads_16_bits_as_their_8_bit_version(tmp_path: Path, tiny_models: dict[str, Path],
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """`dvreward score`, `dvreward eval`'s other formats (a 16-bit TIFF) and the client's JPEG encoding each
    decoded the 16-bit gradient as white too."""
    eight, sixteen = Image.fromarray(LEVELS), Image.fromarray(LEVELS.astype(np.uint16) * 257)
    assert sixteen.mode == "I;16"
    (tmp_path / "8.png").write_bytes(png(LEVELS))
    (tmp_path / "16.png").write_bytes(png(LEVELS.astype(np.uint16) * 257))
    sixteen.save(tmp_path / "16.tif")
    want = np.asarray(eight.convert("RGB"))
    assert np.array_equal(np.asarray(load_image_file(tmp_path / "16.tif")[0]), want)
    jpeg = EncodeOptions("jpeg")
    assert encode_image(sixteen, jpeg) == encode_image(eight.convert("RGB"), jpeg)
    as_png = encode_image(sixteen.convert("I"), EncodeOptions("png"))  # 32-bit integers: no PNG mode holds them
    assert np.array_equal(np.asarray(load_image(as_png, 10**6)), want)
    questions = tmp_path / "q.json"
    questions.write_text(json.dumps([{"id": "1", "text": "Is the image white?", "tag": "Attribute"},
                                     {"id": "q1", "text": "Is it sharp?", "kind": "quality", "tag": "Texture"}]))
    assert main(["score", "--verifier", str(tiny_models["verifier"]), "--questions", str(questions),
                 "--prompt", "a gradient", str(tmp_path / "8.png"), str(tmp_path / "16.png")]) == 0
    from_eight, from_sixteen = (r["p"] for r in json.loads(capsys.readouterr().out)["results"])
    assert_p_close([from_sixteen[q] for q in ("1", "q1")], [from_eight[q] for q in ("1", "q1")])
