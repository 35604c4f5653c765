"""Scoring backends for `dvreward eval`: any in-process `Verifier`, or the service over HTTP.

Both take a batch of (image file, questions) and return, per image, either the p of every
question or an error message; a failure of one image never fails its neighbours, and never
becomes a 0. Failures of the service as a whole (unreachable, bad API key, still overloaded
after the retries) raise `ServiceUnavailableError` instead: the run stops, keeps what it has,
and resumes on the next invocation.
"""

from __future__ import annotations

import base64
import email.utils
import io
import math
import random
import time
import uuid
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import httpx
from pydantic import ValidationError

from server.engines.base import Verifier, VerifyItem
from server.schemas import VerifyItemIn, VerifyRequest, VerifyResponse

if TYPE_CHECKING:
    from PIL.Image import Image

WIRE_FORMATS = ("PNG", "JPEG", "WEBP")  # what /v1 accepts; anything else is re-encoded as PNG
RETRY_STATUSES = frozenset({429, 503})
FATAL_STATUSES = frozenset({401, 403, 404, 405})
MAX_RETRY_WAIT_S = 120.0


class ServiceUnavailableError(RuntimeError):
    """The scoring backend as a whole cannot score now; the run stops and can be resumed."""


class ImageLoadError(ValueError):
    """An image file cannot be read or decoded; the message says why."""


@dataclass(frozen=True)
class ScoreInput:
    path: Path
    questions: tuple[str, ...]


@dataclass(frozen=True)
class Outcome:
    """p per question, or an error; exactly one of the two is set."""

    p: list[float] | None = None
    error: str | None = None


class Backend(Protocol):
    @property
    def model_id(self) -> str | None: ...

    def score(self, inputs: Sequence[ScoreInput]) -> list[Outcome]: ...

    def close(self) -> None: ...


def load_image_file(path: Path) -> tuple[Image, bytes, str]:
    """(RGB image, original bytes, format); any PIL format, with PIL's decompression-bomb limit."""
    from PIL import Image, UnidentifiedImageError

    try:
        data = path.read_bytes()
    except OSError as e:
        raise ImageLoadError(f"cannot read image file: {e.strerror or e}") from e
    if not data:
        raise ImageLoadError("image file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            fmt = im.format or "?"
            im.load()
            rgb = im.convert("RGB")
    except UnidentifiedImageError as e:
        raise ImageLoadError(f"not a readable image file ({len(data)} bytes; corrupt or an unknown format)") from e
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageLoadError(f"image refused as a possible decompression bomb: {e}") from e
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise ImageLoadError(f"image cannot be decoded: {e}") from e
    if rgb.width <= 0 or rgb.height <= 0:
        raise ImageLoadError("image has no pixels")
    return rgb, data, fmt


def check_p(p: object, n_questions: int) -> str | None:
    """Why `p` is not n valid probabilities, or None."""
    if not isinstance(p, list) or len(p) != n_questions:
        got = len(p) if isinstance(p, list) else type(p).__name__
        return f"backend returned {got} scores for {n_questions} questions"
    for v in p:
        if not isinstance(v, int | float) or isinstance(v, bool) or math.isnan(v) or not 0.0 <= v <= 1.0:
            return f"backend returned {v!r}, not a probability"
    return None


class LocalBackend:
    """Any `Verifier` in this process; a failing batch is split until the failing image is isolated."""

    def __init__(self, verifier: Verifier) -> None:
        self.verifier = verifier

    @property
    def model_id(self) -> str | None:
        return getattr(self.verifier, "model_id", None)

    def score(self, inputs: Sequence[ScoreInput]) -> list[Outcome]:
        out: list[Outcome | None] = [None] * len(inputs)
        items: list[VerifyItem] = []
        where: list[int] = []
        for i, inp in enumerate(inputs):
            try:
                image, _, _ = load_image_file(inp.path)
            except ImageLoadError as e:
                out[i] = Outcome(error=str(e))
                continue
            items.append(VerifyItem(images=(image,), questions=inp.questions))
            where.append(i)
        for i, outcome in zip(where, self._verify(items), strict=True):
            out[i] = outcome
        return [o if o is not None else Outcome(error="internal: no outcome") for o in out]

    def _verify(self, items: list[VerifyItem]) -> list[Outcome]:
        if not items:
            return []
        try:
            scores = self.verifier.verify(items)
        except Exception as e:  # noqa: BLE001 - isolate the failing image, report the reason on it
            if len(items) == 1:
                return [Outcome(error=f"verifier failed: {type(e).__name__}: {e}")]
            mid = len(items) // 2
            return self._verify(items[:mid]) + self._verify(items[mid:])
        if not isinstance(scores, list) or len(scores) != len(items):
            return [Outcome(error="verifier returned a result list of the wrong length")] * len(items)
        out = []
        for item, p in zip(items, scores, strict=True):
            problem = check_p(p, len(item.questions))
            out.append(Outcome(error=problem) if problem else Outcome(p=[float(v) for v in p]))
        return out

    def close(self) -> None:
        return None


@dataclass
class _Wire:
    """One image ready for the wire, with its questions cut into chunks the service accepts."""

    b64: str
    chunks: list[tuple[str, ...]]


class HTTPBackend:
    """POST /v1/verify with a Bearer key, explicit timeouts, and retries on 429/503 honouring Retry-After.

    A retried request carries the same Idempotency-Key, so the service never scores it twice.
    A request refused for its content (4xx/5xx other than the retried ones) is split until the
    offending image is isolated, and that image gets the service's message as its error.
    """

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        *,
        timeout_s: float = 300.0,
        connect_timeout_s: float = 10.0,
        max_retries: int = 8,
        max_questions: int = 64,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(
            base_url=url.rstrip("/"), headers=headers, transport=transport,
            timeout=httpx.Timeout(timeout_s, connect=min(connect_timeout_s, timeout_s)),
        )
        self.max_retries = max_retries
        self.max_questions = max_questions
        self.sleep = sleep
        self._model_id: str | None = None

    @property
    def model_id(self) -> str | None:
        return self._model_id

    def close(self) -> None:
        self.client.close()

    def score(self, inputs: Sequence[ScoreInput]) -> list[Outcome]:
        out: list[Outcome | None] = [None] * len(inputs)
        wires: list[_Wire] = []
        where: list[int] = []
        for i, inp in enumerate(inputs):
            try:
                wires.append(self._wire(inp))
                where.append(i)
            except ImageLoadError as e:
                out[i] = Outcome(error=str(e))
        for i, outcome in zip(where, self._verify(wires), strict=True):
            out[i] = outcome
        return [o if o is not None else Outcome(error="internal: no outcome") for o in out]

    def _wire(self, inp: ScoreInput) -> _Wire:
        image, data, fmt = load_image_file(inp.path)
        if fmt not in WIRE_FORMATS:
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            data = buf.getvalue()
        step = max(1, self.max_questions)
        chunks = [inp.questions[i:i + step] for i in range(0, len(inp.questions), step)]
        return _Wire(base64.b64encode(data).decode("ascii"), chunks)

    def _verify(self, wires: list[_Wire]) -> list[Outcome]:
        if not wires:
            return []
        items = [VerifyItemIn(images=[w.b64], questions=list(chunk)) for w in wires for chunk in w.chunks]
        payload = VerifyRequest(items=items).model_dump(mode="json")
        status, body = self._post("/v1/verify", payload)
        if status != 200:
            if len(wires) > 1:
                mid = len(wires) // 2
                return self._verify(wires[:mid]) + self._verify(wires[mid:])
            return [Outcome(error=f"service refused the image (HTTP {status}): {_message(body)}")]
        try:
            resp = VerifyResponse.model_validate(body)
        except ValidationError as e:
            raise ServiceUnavailableError(f"the service answered /v1/verify with an unexpected body: {e}") from e
        if len(resp.results) != len(items):
            raise ServiceUnavailableError(
                f"the service returned {len(resp.results)} results for {len(items)} items"
            )
        self._model_id = resp.model
        out: list[Outcome] = []
        k = 0
        for w in wires:
            results = resp.results[k:k + len(w.chunks)]
            k += len(w.chunks)
            out.append(_join(results, sum(len(c) for c in w.chunks)))
        return out

    def _post(self, path: str, payload: dict[str, Any]) -> tuple[int, Any]:
        """(status, JSON body) of a request that is not to be retried; raises when the service is unusable."""
        headers = {"Idempotency-Key": uuid.uuid4().hex}
        for attempt in range(self.max_retries + 1):
            last = attempt == self.max_retries
            try:
                r = self.client.post(path, json=payload, headers=headers)
            except httpx.TransportError as e:
                if last:
                    raise ServiceUnavailableError(
                        f"cannot reach {self.client.base_url}{path} after {attempt + 1} attempts: "
                        f"{type(e).__name__}: {e}") from e
                self.sleep(_backoff(attempt))
                continue
            body = _json(r)
            if r.status_code in RETRY_STATUSES:
                if last:
                    raise ServiceUnavailableError(
                        f"{self.client.base_url}{path} still answers HTTP {r.status_code} after "
                        f"{attempt + 1} attempts: {_message(body)}")
                self.sleep(_retry_after(r.headers.get("Retry-After"), attempt))
                continue
            if r.status_code in FATAL_STATUSES:
                hint = " (check --api-key or DVREWARD_API_KEY)" if r.status_code in (401, 403) else ""
                raise ServiceUnavailableError(
                    f"{self.client.base_url}{path} answered HTTP {r.status_code}{hint}: {_message(body)}")
            return r.status_code, body
        raise AssertionError("unreachable")


def _join(results: Sequence[Any], n_questions: int) -> Outcome:
    p: list[float] = []
    for r in results:
        if r.error is not None or r.p is None:
            err = r.error
            return Outcome(error=f"{err.code}: {err.message}" if err else "service returned no scores")
        p.extend(r.p)
    problem = check_p(p, n_questions)
    return Outcome(error=problem) if problem else Outcome(p=p)


def _json(r: httpx.Response) -> Any:
    try:
        return r.json()
    except ValueError:
        return r.text[:500]


def _message(body: Any) -> str:
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return str(body["error"].get("message", body["error"]))
    if isinstance(body, dict) and "detail" in body:
        return str(body["detail"])[:500]
    return str(body)[:500]


def _backoff(attempt: int) -> float:
    return min(MAX_RETRY_WAIT_S, 0.5 * 2 ** attempt) * random.uniform(0.5, 1.0)


def _retry_after(value: str | None, attempt: int) -> float:
    """Seconds to wait: the Retry-After header (seconds or HTTP date) when given, else backoff."""
    if value:
        value = value.strip()
        try:
            return min(MAX_RETRY_WAIT_S, max(0.0, float(value)))
        except ValueError:
            pass
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            when = None
        if when is not None:
            if when.tzinfo is None:
                when = when.replace(tzinfo=UTC)
            return min(MAX_RETRY_WAIT_S, max(0.0, (when - datetime.now(UTC)).total_seconds()))
    return _backoff(attempt)
