"""One attention call for all vision windows of a batch, instead of transformers' loop over them.

Without flash-attn, the Qwen2-VL family's vision attention runs one small SDPA call per window
of every image (thousands per forward pass): on a GPU that loop, not the matmuls, bounds the
verifier (docs/BENCHMARKS.md: the vision tower went from 33 to 80 images/s on a GPU once batched). Padding the
windows to one length and masking the padding gives the same result in one call.
"""

from __future__ import annotations

import logging
import sys
import types
from typing import Any

_ATTENTION_CLASSES = ("Qwen2_5_VLVisionAttention", "VisionAttention", "Qwen3VLVisionAttention",
                      "Qwen3VLMoeVisionAttention")

log = logging.getLogger("dvreward.engines")


def _batched_window_attention(
    self: Any, hidden_states: Any, cu_seqlens: Any, position_embeddings: Any = None, max_seqlen: Any = None,
    **kwargs: Any,
) -> Any:
    import torch
    import torch.nn.functional as F

    rotate = sys.modules[type(self).__module__].apply_rotary_pos_emb_vision
    n_tok = hidden_states.shape[0]
    q, k, v = self.qkv(hidden_states).reshape(n_tok, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    cos, sin = position_embeddings
    q, k = rotate(q, k, cos, sin)
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    n, width = lengths.numel(), int(lengths.max())
    window = torch.repeat_interleave(torch.arange(n, device=q.device), lengths)
    slot = torch.arange(n_tok, device=q.device) - cu_seqlens[:-1][window]

    def padded(x: Any) -> Any:  # (tokens, heads, d) -> (windows, heads, width, d)
        out = x.new_zeros(n, width, *x.shape[1:])
        out[window, slot] = x
        return out.transpose(1, 2)

    valid = (torch.arange(width, device=q.device)[None] < lengths[:, None])[:, None, None, :]
    o = F.scaled_dot_product_attention(padded(q), padded(k), padded(v), attn_mask=valid, scale=self.scaling)
    return self.proj(o.transpose(1, 2)[window, slot].reshape(n_tok, -1))


def enable_batched_vision_attention(model: Any) -> int:
    """Patch the vision attention modules of this model instance (not the class); returns how many.

    A model with none of the known classes keeps transformers' per-window loop (same scores, slower): said
    in a warning, so a new architecture's slowdown is visible.
    """
    patched = 0
    for module in model.modules():
        if type(module).__name__ in _ATTENTION_CLASSES and hasattr(module, "qkv"):
            module.forward = types.MethodType(_batched_window_attention, module)
            patched += 1
    if not patched:
        log.warning("%s has no vision attention this engine knows (%s): batched vision attention is off",
                    type(model).__name__, ", ".join(_ATTENTION_CLASSES))
    return patched
