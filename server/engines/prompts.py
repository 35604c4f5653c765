"""Every prompt template the engines send to a model, in one place, versioned.

TEMPLATE_VERSION is hashed into cache keys and returned with results, so changing any
template below must bump it.
"""

from __future__ import annotations

import hashlib

TEMPLATE_VERSION = "2026-11-26.1"

VERIFIER_SYSTEM = (
    "You are a careful visual verifier. Look at the image and answer the question about it "
    "with a single word: yes or no. If the subject the question is about does not exist in "
    "the image, answer no."
)

# Placed between the image(s) and the question; kept fixed and at least 16 tokens long so
# that prefix caching (vLLM) shares the whole image block across the questions of an image.
VERIFIER_PREAMBLE = (
    "Consider only what is visible in the image above. Answer the following question with "
    "yes or no.\nQuestion: "
)


def template_hash() -> str:
    """Short digest of every template, so results name exactly what produced them."""
    from server.engines import prompts as mod

    text = "\n".join(
        f"{k}={v}" for k, v in sorted(vars(mod).items()) if k.isupper() and isinstance(v, str)
    )
    return hashlib.sha256(text.encode()).hexdigest()[:12]
