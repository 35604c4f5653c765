"""Trainer images to PNG / JPEG / WebP files, importing torch, numpy or PIL only when given one of their objects.

Accepted images: PIL images, uint8 HWC numpy arrays, float CHW (or HWC) arrays / torch tensors in
[0, 1], encoded bytes (sent as they are), and paths. A group may also be one 4-D batch (NCHW or NHWC).
PNG from arrays goes through a small writer (Up filter + zlib) that costs a third of PIL's adaptive
filtering at the same size; zlib and numpy release the GIL, so encoding threads really run in parallel.
"""

from __future__ import annotations

import io
import os
import struct
import sys
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from dvreward_protocol.pixels import to_rgb

ImageFormat = Literal["png", "jpeg", "webp"]
DEFAULT_QUALITY = {"jpeg": 95, "webp": 90}
_TOLERANCE = 1e-3  # float images slightly outside [0, 1] from numerical noise are clipped, not refused
_CHANNELS = (1, 3, 4)


@dataclass(frozen=True)
class EncodeOptions:
    # JPEG q95 by default: a 448-image step costs ~0.55 s of client CPU (sent as multipart, nearly all of it
    # the encoding) and ~34 MB, where lossless PNG costs ~1 s (stored, multipart) to ~7 s (zlib level 1, JSON)
    # and 230-350 MB (docs/BENCHMARKS.md).
    format: ImageFormat = "jpeg"
    quality: int | None = None  # JPEG / WebP quality; None = DEFAULT_QUALITY
    png_compress_level: int = 1  # zlib level: 1 is most of the size gain at a fraction of level 6's CPU

    def __post_init__(self) -> None:
        if self.format not in ("png", "jpeg", "webp"):
            raise ValueError(f"image_format must be 'png', 'jpeg' or 'webp', got {self.format!r}")
        if self.quality is not None and not 1 <= self.quality <= 100:
            raise ValueError(f"quality must be in 1..100, got {self.quality}")
        if not 0 <= self.png_compress_level <= 9:
            raise ValueError(f"png_compress_level must be in 0..9, got {self.png_compress_level}")


def _lib(x: object) -> str:
    """Top-level module of an object's type: detects torch / numpy / PIL objects without importing them."""
    return type(x).__module__.partition(".")[0]


def _is_encoded(x: object) -> bool:
    return isinstance(x, bytes | bytearray | memoryview)


def split_group(group: Any, what: str = "group") -> list[Any]:
    """A group is a sequence of images or one 4-D batch; a lone image is refused (it is a common trainer bug)."""
    lib = _lib(group)
    if lib in ("torch", "numpy"):
        if group.ndim in (2, 3):
            raise TypeError(f"{what}: expected a list of images or a 4-D batch, got a single image of shape "
                            f"{tuple(group.shape)}; wrap it in a list")
        if group.ndim != 4:
            raise TypeError(f"{what}: a batch given as one tensor/array must be 4-D (N, C, H, W) or (N, H, W, C), "
                            f"got shape {tuple(group.shape)}")
        return [group[i] for i in range(group.shape[0])]
    if _is_encoded(group) or isinstance(group, str | os.PathLike) or lib == "PIL":
        raise TypeError(f"{what}: expected a list of images or a 4-D batch, got a single {type(group).__name__}; "
                        "wrap it in a list")
    if not isinstance(group, Sequence):
        raise TypeError(f"{what}: expected a list of images or a 4-D batch, got {type(group).__name__}")
    return list(group)


def _channels_last(a: Any, channels_first_default: bool) -> Any:
    """HWC view of a 3-D array; the layout is read from where a 1/3/4-sized axis is, else from the convention."""
    first, last = a.shape[0] in _CHANNELS, a.shape[-1] in _CHANNELS
    if last and not first:
        return a
    if first and not last:
        return a.transpose(1, 2, 0)
    return a.transpose(1, 2, 0) if channels_first_default else a


def _check_range(lo: float, hi: float, what: str) -> None:
    if not (lo >= -_TOLERANCE and hi <= 1 + _TOLERANCE):  # also catches NaN
        raise ValueError(f"{what}: float images must be in [0, 1], got values in [{lo:.4g}, {hi:.4g}]"
                         + (" (images in [-1, 1] need (x + 1) / 2)" if lo >= -1 - _TOLERANCE else ""))


def _numpy_hwc_uint8(a: Any, what: str) -> Any:
    import numpy as np

    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3:
        raise ValueError(f"{what}: an image array must be 2-D or 3-D, got shape {a.shape}")
    if a.dtype == np.uint8:
        a = _channels_last(a, channels_first_default=False)
    elif np.issubdtype(a.dtype, np.floating):
        a = _channels_last(a, channels_first_default=True)
        _check_range(float(a.min()), float(a.max()), what)
        a = np.clip(a.astype(np.float32) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    elif a.dtype == np.bool_:
        a = _channels_last(a, channels_first_default=False).astype(np.uint8) * 255
    else:
        raise TypeError(f"{what}: integer arrays must be uint8 (0..255), got {a.dtype}; floats must be in [0, 1]")
    if a.shape[2] not in _CHANNELS:
        raise ValueError(f"{what}: expected 1, 3 or 4 channels, got shape {a.shape}")
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"{what}: image has no pixels (shape {a.shape})")
    return np.ascontiguousarray(a)


def _torch_hwc_uint8(t: Any, what: str) -> Any:
    import torch

    t = t.detach()
    if t.ndim == 2:
        t = t.unsqueeze(0)
    if t.ndim != 3:
        raise ValueError(f"{what}: an image tensor must be 2-D or 3-D, got shape {tuple(t.shape)}")
    if t.shape[-1] in _CHANNELS and t.shape[0] not in _CHANNELS:
        t = t.permute(2, 0, 1)  # HWC given; torch's convention is CHW
    if t.is_floating_point():
        lo, hi = torch.aminmax(t)
        _check_range(float(lo), float(hi), what)
        t = (t.float() * 255.0 + 0.5).clamp_(0, 255).to(torch.uint8)
    elif t.dtype == torch.bool:
        t = t.to(torch.uint8) * 255
    elif t.dtype != torch.uint8:
        raise TypeError(f"{what}: integer tensors must be uint8 (0..255), got {t.dtype}; floats must be in [0, 1]")
    return _numpy_hwc_uint8(t.permute(1, 2, 0).cpu().numpy(), what)


def _png(a: Any, level: int) -> bytes:
    """Minimal PNG writer: 8-bit gray / RGB / RGBA, every row Up-filtered (row 0's 'up' is zeros, i.e. unfiltered)."""
    import numpy as np

    h, w, c = a.shape
    rows = a.reshape(h, w * c)
    raw = np.empty((h, w * c + 1), np.uint8)
    if level == 0:
        raw[:, 0] = 0
        raw[:, 1:] = rows
    else:
        raw[:, 0] = 2
        raw[0, 1:] = rows[0]
        np.subtract(rows[1:], rows[:-1], out=raw[1:, 1:])  # uint8 wrap-around is exactly PNG's modulo 256
    data = zlib.compress(raw.data, level)

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(body, zlib.crc32(tag)))

    color = {1: 0, 3: 2, 4: 6}[c]
    return b"".join((b"\x89PNG\r\n\x1a\n", chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, color, 0, 0, 0)),
                     chunk(b"IDAT", data), chunk(b"IEND", b"")))


def _pil_save(im: Any, opts: EncodeOptions) -> bytes:
    buf = io.BytesIO()
    if opts.format == "png":
        if im.mode not in ("1", "L", "LA", "RGB", "RGBA", "P", "I;16"):
            im = to_rgb(im)
        im.save(buf, "PNG", compress_level=opts.png_compress_level)
    else:
        if im.mode not in ("L", "RGB"):
            im = to_rgb(im)
        quality = opts.quality if opts.quality is not None else DEFAULT_QUALITY[opts.format]
        im.save(buf, opts.format.upper(), quality=quality)
    return buf.getvalue()


def _encode_array(a: Any, opts: EncodeOptions) -> bytes:
    if opts.format == "png":
        return _png(a, opts.png_compress_level)
    from PIL import Image

    return _pil_save(Image.fromarray(a[:, :, 0] if a.shape[2] == 1 else a), opts)


def encode_image(x: Any, opts: EncodeOptions, what: str = "image") -> bytes:
    """One image to the bytes of an encoded file (thread-safe; meant to run in a pool)."""
    if _is_encoded(x):
        data = bytes(x)
        if not data:
            raise ValueError(f"{what}: encoded image is empty (zero bytes)")
        return data
    if isinstance(x, str | os.PathLike):
        try:
            return Path(x).read_bytes()
        except OSError as exc:
            shown = str(x) if len(str(x)) <= 120 else str(x)[:117] + "..."
            raise ValueError(f"{what}: a str or Path is read as an image file, and {shown!r} could not be read "
                             f"({exc.strerror or exc})") from None
    lib = _lib(x)
    if lib == "numpy":
        return _encode_array(_numpy_hwc_uint8(x, what), opts)
    if lib == "torch":
        return _encode_array(_torch_hwc_uint8(x, what), opts)
    if lib == "PIL":
        np = sys.modules.get("numpy")  # the fast PNG writer only if numpy is already in use; never import it here
        if opts.format == "png" and np is not None and x.mode in ("L", "RGB", "RGBA"):
            return _png(np.ascontiguousarray(np.asarray(x)).reshape(x.size[1], x.size[0], -1),
                        opts.png_compress_level)
        return _pil_save(x, opts)
    raise TypeError(f"{what}: unsupported image type {type(x).__module__}.{type(x).__qualname__}; give a PIL image, "
                    "a uint8 HWC array, a float CHW array/tensor in [0, 1], encoded bytes or a path")
