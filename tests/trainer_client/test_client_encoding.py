"""Encoding and chunk planning, without a service; and the import-weight promise of the package."""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from trainer_client.chunks import Part, plan_chunks, split_by_bytes
from trainer_client.encoding import EncodeOptions, encode_image, split_group


def test_import_pulls_no_torch_numpy_or_pil():
    code = ("import sys, trainer_client, trainer_client.adapters; "
            "heavy = {'torch', 'numpy', 'PIL'} & set(sys.modules); assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)


def _decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


@pytest.mark.parametrize("channels", [1, 3, 4])
@pytest.mark.parametrize("level", [0, 1, 9])
def test_png_writer_is_lossless(channels, level):
    a = np.random.default_rng(channels).integers(0, 256, (17, 23, channels), dtype=np.uint8)
    got = _decode(encode_image(a, EncodeOptions("png", png_compress_level=level)))
    assert np.array_equal(got.reshape(a.shape), a)


def test_float_chw_uint8_hwc_pil_and_torch_agree():
    import torch

    a = np.random.default_rng(0).integers(0, 256, (9, 11, 3), dtype=np.uint8)
    chw = a.transpose(2, 0, 1).astype(np.float32) / 255
    opts = EncodeOptions("png")
    for x in (a, chw, chw.transpose(1, 2, 0), Image.fromarray(a), torch.from_numpy(chw),
              torch.from_numpy(a).permute(2, 0, 1), torch.from_numpy(chw).unsqueeze(0)[0]):
        assert np.array_equal(_decode(encode_image(x, opts)), a), type(x)
    lossy = _decode(encode_image(torch.from_numpy(chw).to(torch.bfloat16), opts))  # bf16 cannot hold every k/255
    assert np.abs(lossy.astype(int) - a).max() <= 1
    gray = encode_image(np.zeros((5, 6), np.float64), opts)
    assert _decode(gray).shape == (5, 6)


def test_default_is_jpeg_q95():
    a = np.broadcast_to((np.arange(32, dtype=np.uint8) * 8)[:, None, None], (32, 32, 3)).copy()
    data = encode_image(a, EncodeOptions())
    assert data[:2] == b"\xff\xd8", "JPEG magic"
    assert np.abs(_decode(data).astype(int) - a).max() <= 8  # q95: lossy, but only just


def test_jpeg_and_webp_decode():
    a = np.random.default_rng(0).integers(0, 256, (32, 32, 4), dtype=np.uint8)  # alpha is dropped for lossy
    for fmt in ("jpeg", "webp"):
        im = Image.open(io.BytesIO(encode_image(a, EncodeOptions(fmt, quality=80))))
        assert im.format == fmt.upper() and im.size == (32, 32)


def test_bad_images_are_refused_clearly(tmp_path):
    opts = EncodeOptions()
    with pytest.raises(ValueError, match=r"\(x \+ 1\) / 2"):
        encode_image(np.full((3, 4, 4), -0.9, np.float32), opts)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        encode_image(np.full((3, 4, 4), np.nan, np.float32), opts)
    with pytest.raises(TypeError, match="uint8"):
        encode_image(np.zeros((4, 4, 3), np.int64), opts)
    with pytest.raises(ValueError, match=r"read as an image file, and '.*missing.png' could not be read"):
        encode_image(str(tmp_path / "missing.png"), opts)
    with pytest.raises(ValueError, match="empty"):
        encode_image(b"", opts)
    p = tmp_path / "x.png"
    p.write_bytes(b"\x89PNG...")
    assert encode_image(p, opts) == encode_image(str(p), opts) == b"\x89PNG..."  # str paths as the message says
    with pytest.raises(ValueError):
        EncodeOptions("gif")  # type: ignore[arg-type]


def test_split_group():
    batch = np.zeros((3, 3, 8, 8), np.float32)
    assert len(split_group(batch)) == 3
    assert len(split_group([b"a", b"b"])) == 2
    for single in (b"png", Image.new("RGB", (4, 4)), np.zeros((8, 8, 3), np.uint8)):
        with pytest.raises(TypeError, match="single"):
            split_group(single)


def _units(chunks: list[list[Part]]) -> list[tuple[int, int]]:
    return [(p.group, i) for c in chunks for p in c for i in range(p.start, p.stop)]


@pytest.mark.parametrize("sizes", [(5, 2, 4, 1), (14,) * 32, (1,), (3, 3, 3), (7, 1, 1, 9)])
@pytest.mark.parametrize("max_units", [1, 3, 4, 64])
def test_plan_chunks_covers_everything_in_order(sizes, max_units):
    chunks = plan_chunks(sizes, max_units)
    assert _units(chunks) == [(g, i) for g, n in enumerate(sizes) for i in range(n)]
    assert all(0 < sum(p.stop - p.start for p in c) <= max_units for c in chunks)
    for g, n in enumerate(sizes):  # a group that fits in one chunk is never split
        if n <= max_units:
            assert sum(1 for c in chunks for p in c if p.group == g) == 1


def test_split_by_bytes():
    parts = [Part(0, 0, 3), Part(1, 0, 2)]
    subs = split_by_bytes(parts, lambda g, i: 10, 25)
    assert [[(p.group, p.start, p.stop) for p in s] for s in subs] == [[(0, 0, 2)], [(0, 2, 3), (1, 0, 1)], [(1, 1, 2)]]
    assert split_by_bytes(parts, lambda g, i: 100, 25) == [[Part(0, i, i + 1)] for i in range(3)] + [
        [Part(1, 0, 1)], [Part(1, 1, 2)]]
    assert split_by_bytes(parts, lambda g, i: 1, 1000) == [parts]
