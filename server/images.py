"""Image bytes at the service boundary: base64 decoding, size and cheap header checks, full decoding.

The API only reads headers (format and size, which stops decompression bombs before any
pixel is decoded) and forwards the original bytes; workers decode them.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dvreward_protocol.pixels import to_rgb
from server.errors import ErrorCode, ServiceError

if TYPE_CHECKING:
    from PIL.Image import Image

FORMATS = ("PNG", "JPEG", "WEBP")
# The Qwen2-VL family's image processors refuse anything thinner (and no generated image is): refusing it here
# makes it this image's error, not an exception that fails every image of the worker's batch.
MAX_ASPECT_RATIO = 200


@dataclass(frozen=True)
class ImageInfo:
    format: str
    width: int
    height: int


def decode_base64(text: str, field: str, max_bytes: int) -> bytes:
    """Strict base64 (data URLs accepted); size checked on the encoded length first."""
    if not isinstance(text, str) or not text:
        raise ServiceError(ErrorCode.bad_image, f"{field}: expected a non-empty base64 string")
    if text.startswith("data:"):
        head, sep, text = text.partition(",")
        if not sep or ";base64" not in head:
            raise ServiceError(ErrorCode.bad_image, f"{field}: data URL must be base64 encoded")
    if len(text) * 3 // 4 > max_bytes + 3:
        raise ServiceError(ErrorCode.too_large, f"{field}: image is larger than the limit of {max_bytes} bytes")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ServiceError(ErrorCode.bad_image, f"{field}: not valid base64 ({exc})") from exc
    check_size(data, field, max_bytes)
    return data


def check_size(data: bytes | memoryview, field: str, max_bytes: int) -> None:
    """An image's bytes, however they came (decoded base64, a multipart part), are neither none nor too many."""
    if not data:
        raise ServiceError(ErrorCode.bad_image, f"{field}: image is empty (zero bytes)")
    if len(data) > max_bytes:
        raise ServiceError(ErrorCode.too_large, f"{field}: image is {len(data)} bytes, the limit is {max_bytes}")


def inspect_image(data: bytes, field: str, max_pixels: int) -> ImageInfo:
    """Format and size from the header alone; refuses other formats and oversized images."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data), formats=list(FORMATS))
            info = ImageInfo(im.format or "?", *im.size)
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ServiceError(
            ErrorCode.bad_image, f"{field}: not a readable {', '.join(FORMATS)} image ({exc})"
        ) from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise ServiceError(ErrorCode.bad_image, f"{field}: corrupt image header ({exc})") from exc
    if info.width <= 0 or info.height <= 0:
        raise ServiceError(ErrorCode.bad_image, f"{field}: image has no pixels")
    if max(info.width, info.height) > MAX_ASPECT_RATIO * min(info.width, info.height):
        raise ServiceError(ErrorCode.bad_image, f"{field}: image is {info.width}x{info.height}; the aspect ratio "
                           f"must be at most {MAX_ASPECT_RATIO}:1")
    if info.width * info.height > max_pixels:
        raise ServiceError(
            ErrorCode.too_large,
            f"{field}: image is {info.width}x{info.height} = {info.width * info.height} pixels, "
            f"the limit is {max_pixels}",
        )
    return info


def load_image(data: bytes, max_pixels: int) -> Image:
    """Fully decode to RGB; raises ValueError with the reason for a corrupt or oversized image."""
    from PIL import Image

    inspect_image(data, "image", max_pixels)
    try:
        im = Image.open(io.BytesIO(data), formats=list(FORMATS))
        im.load()
    except (OSError, ValueError, SyntaxError) as exc:
        raise ValueError(f"image could not be decoded: {exc}") from exc
    return to_rgb(im)
