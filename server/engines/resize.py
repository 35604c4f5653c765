"""Resizing images the way the transformers engine's image processor does, before vLLM or a server sees them.

vLLM and model servers run the checkpoint's torchvision image processor, whose bicubic resize
differs from the PIL one the transformers engine uses (p moved by up to ~0.3 on a tiny model).
An image already at its target size passes through either processor unchanged, so resizing it
here, with PIL and transformers' own target-size rule, makes every engine see the same pixels.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from server.engines.base import EngineError
from server.engines.loading import load_error, pretrained_kwargs

if TYPE_CHECKING:
    from PIL.Image import Image


class Resizer:
    """Target size: a multiple of patch * merge within [min_pixels, max_pixels], as Qwen2-VL processors compute it."""

    def __init__(self, factor: int, min_pixels: int, max_pixels: int, resample: int) -> None:
        self.factor, self.min_pixels, self.max_pixels, self.resample = factor, min_pixels, max_pixels, resample

    @classmethod
    def from_pretrained(cls, ref: str, role: str, min_pixels: int | None = None,
                        max_pixels: int | None = None) -> Resizer:
        """The checkpoint's own pixel range and resampling, unless `min_pixels` / `max_pixels` override them."""
        from transformers import Qwen2VLImageProcessorPil

        from server.engines.hf.verifier import pixel_range

        try:
            proc: Any = Qwen2VLImageProcessorPil.from_pretrained(ref, **pretrained_kwargs(ref))
        except (OSError, ValueError) as exc:
            raise EngineError(load_error(role, ref, exc)) from exc
        size = pixel_range(proc.size, min_pixels, max_pixels)
        return cls(proc.patch_size * proc.merge_size, size["shortest_edge"], size["longest_edge"], int(proc.resample))

    def __call__(self, image: Image) -> Image:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        rgb = image.convert("RGB")
        h, w = smart_resize(rgb.height, rgb.width, factor=self.factor, min_pixels=self.min_pixels,
                            max_pixels=self.max_pixels)
        return rgb if (w, h) == rgb.size else rgb.resize((w, h), self.resample)
