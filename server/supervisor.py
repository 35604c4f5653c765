"""`dvreward worker --devices 0,1,2,3`: one worker process per device, restarted when it dies.

Compose cannot spread `--scale worker=N` over GPUs, so one container reserves them all and this
supervisor pins one worker to each (CUDA_VISIBLE_DEVICES, so a worker cannot touch another's GPU).
A dead worker loses nothing: its claimed tasks are re-delivered after the visibility timeout, and
the restarted process registers under a new id. SIGTERM is passed on, so every worker drains.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

log = logging.getLogger("dvreward.supervisor")

MAX_BACKOFF_S = 30.0
STABLE_S = 60.0  # a worker that lived this long restarts at once again after its next death


def parse_devices(text: str, gpu_count: Callable[[], int]) -> list[str]:
    """`all`, GPU indices (`0,1`), torch devices (`cuda:1`) or `cpu` (repeatable: `cpu,cpu`)."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if parts == ["all"]:
        n = gpu_count()
        if n == 0:
            raise ValueError("--devices all: no GPU is visible; name devices, e.g. --devices cpu,cpu")
        return [f"cuda:{i}" for i in range(n)]
    if not parts:
        raise ValueError("--devices needs at least one device, e.g. 0,1 or all or cpu")
    out = []
    for p in parts:
        if p.isdigit():
            out.append(f"cuda:{p}")
        elif p == "cpu" or (p.startswith("cuda:") and p[5:].isdigit()):
            out.append(p)
        else:
            raise ValueError(f"--devices: {p!r} is not a GPU index, cuda:N, cpu or all")
    return out


def worker_ports(base: int, n: int) -> list[int]:
    """Each supervised worker's metrics port: base + its index, so every process is scraped apart (0: none)."""
    if base == 0:
        return [0] * n
    if base + n - 1 > 65535:
        raise ValueError(f"--worker-metrics-port {base}: {n} workers need ports up to {base + n - 1}, past 65535")
    return [base + i for i in range(n)]


def child_environment(device: str, base: Mapping[str, str]) -> tuple[dict[str, str], str]:
    """(environment, --device) of the worker for `device`: a GPU worker sees only its own GPU."""
    env = dict(base)
    if not device.startswith("cuda:"):
        return env, device
    index = int(device[5:])
    visible = [v for v in base.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if visible and index >= len(visible):
        raise ValueError(f"{device}: CUDA_VISIBLE_DEVICES={base['CUDA_VISIBLE_DEVICES']} shows {len(visible)} GPUs")
    env["CUDA_VISIBLE_DEVICES"] = visible[index] if visible else str(index)
    return env, "cuda"


@dataclass
class Slot:
    device: str
    argv: list[str]
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    deaths: int = 0
    restart_at: float = 0.0


class Supervisor:
    """Keeps one worker process per slot alive until stopped; polled, so it needs no SIGCHLD handler."""

    def __init__(self, slots: Sequence[Slot], poll_s: float = 0.5) -> None:
        self.slots = list(slots)
        self.poll_s = poll_s
        self.stop = threading.Event()

    def _start(self, slot: Slot) -> None:
        slot.proc = subprocess.Popen(slot.argv, env=slot.env)
        slot.started = time.monotonic()
        log.info("worker on %s started (pid %d)", slot.device, slot.proc.pid)

    def _check(self, slot: Slot, now: float) -> None:
        if slot.proc is not None:
            code = slot.proc.poll()
            if code is None:
                return
            lived = now - slot.started
            slot.deaths = 1 if lived >= STABLE_S else slot.deaths + 1
            delay = min(MAX_BACKOFF_S, 0.5 * 2 ** (slot.deaths - 1))
            log.warning("worker on %s (pid %d) exited with %s after %.0f s; restarting in %.1f s",
                        slot.device, slot.proc.pid, code, lived, delay)
            slot.proc = None
            slot.restart_at = now + delay
        if now >= slot.restart_at:
            self._start(slot)

    def run(self) -> int:
        for slot in self.slots:
            self._start(slot)
        while not self.stop.wait(self.poll_s):
            now = time.monotonic()
            for slot in self.slots:
                self._check(slot, now)
        return self._drain()

    def _drain(self) -> int:
        """Pass SIGTERM on and wait: each worker finishes the batch in hand and deregisters."""
        live = [s.proc for s in self.slots if s.proc is not None and s.proc.poll() is None]
        for proc in live:
            proc.send_signal(signal.SIGTERM)
        codes = [proc.wait() for proc in live]
        log.info("all %d workers stopped", len(live))
        return 0 if all(c == 0 for c in codes) else 1


def supervise(devices: Sequence[str], base_env: Mapping[str, str], ports: Sequence[int]) -> int:
    """Run `dvreward worker` once per device with the same settings (passed on in the environment), each
    with its own metrics port from `ports` (kept across restarts)."""
    slots = []
    for device, port in zip(devices, ports, strict=True):
        env, flag = child_environment(device, base_env)
        env["DVREWARD_WORKER_METRICS_PORT"] = str(port)
        slots.append(Slot(device, [sys.executable, "-m", "server.cli", "worker", "--device", flag], env))
    sup = Supervisor(slots)

    def on_signal(signum: int, _frame: object) -> None:
        log.info("signal %d: draining %d workers", signum, len(slots))
        sup.stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    log.info("supervising %d workers on %s (pid %d)", len(slots), ", ".join(devices), os.getpid())
    return sup.run()
