"""The configuration AlphaGRPO's own reward ran with, and how a running service differs from it.

The paper's verifier system prompt is the user's to paste (README, "Reproduce AlphaGRPO's reward"); only
its digest is kept here, so a service can say whether the prompt it runs is that one.
"""

from __future__ import annotations

import hashlib
import logging

PAPER_VERIFIER = "Qwen/Qwen3-VL-30B-A3B-Instruct"
PAPER_DTYPE = "bfloat16"
PAPER_SYSTEM_PROMPT_SHA256 = "b345fa60b08c010e7d6d50f26ef47cfa3f14450243ac36072e894db566c68d77"

log = logging.getLogger("dvreward")


def differences(verifier: str, dtype: str | None, system_prompt: str) -> list[str]:
    """What differs from the paper's reward configuration, one phrase each (empty: the paper's). `dtype` None:
    a remote server decides it, so it is not compared."""
    out = []
    if verifier != PAPER_VERIFIER:
        out.append(f"verifier {verifier} (the paper's: {PAPER_VERIFIER})")
    if dtype is not None and dtype != PAPER_DTYPE:
        out.append(f"dtype {dtype} (the paper's: {PAPER_DTYPE})")
    if hashlib.sha256(system_prompt.strip().encode()).hexdigest() != PAPER_SYSTEM_PROMPT_SHA256:
        out.append("the verifier system prompt (pass the paper's with --verifier-system-prompt-file)")
    return out


def log_comparison(verifier: str, dtype: str | None, system_prompt: str) -> None:
    """One line at start, as information: a run that means to reproduce the paper sees what it does not."""
    found = differences(verifier, dtype, system_prompt)
    if found:
        log.info("this configuration differs from AlphaGRPO's reward in: %s", "; ".join(found))
    else:
        log.info("this configuration is AlphaGRPO's reward: %s, %s, the paper's system prompt",
                 PAPER_VERIFIER, PAPER_DTYPE)
