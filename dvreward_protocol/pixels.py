"""Any decoded image to 8-bit RGB, one rule for the service, the CLI and the client.

A 16-bit greyscale image decodes to an integer mode (I;16, or I) that Pillow's `convert("RGB")` clips at 255 of
65535, so every level above 255 became white: integer modes are scaled down by their high byte first, as
Pillow itself reads 16-bit colour PNGs. Takes and returns Pillow images; imports nothing.
"""

from __future__ import annotations

from typing import Any

_HIGH_BYTE = [level >> 8 for level in range(1 << 16)]


def to_rgb(im: Any) -> Any:
    """8 bits per channel, RGB."""
    if im.mode.startswith("I"):
        im = im.convert("I").point(_HIGH_BYTE, "L")
    return im.convert("RGB")
