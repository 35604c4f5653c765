"""Scoring backends for `dvreward eval`: any in-process `Verifier`, or the service over HTTP.

Both take a batch of (image file, questions) and return, per image, either the p of every
question or an error message; a failure of one image never fails its neighbours, and never
becomes a 0. Failures of the service as a whole (unreachable, bad API key, a 5xx or 504, still
overloaded after the retries) raise `ServiceUnavailableError` instead: the run stops, keeps what
it has, and resumes on the next invocation.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import httpx

from dvreward_protocol.pixels import to_rgb
from server.engines.base import Verifier, VerifyItem
from server.errors import ServiceError
from server.images import FORMATS as WIRE_FORMATS
from server.images import load_image
from server.settings import Settings
from trainer_client import BadRequest, DVRewardClient, DVRewardError, Unauthorized

if TYPE_CHECKING:
    from PIL.Image import Image

    from dvreward_protocol.schemas import VerifyItemResult

# The service's own limit (`dvreward serve --max-image-pixels`), so eval refuses exactly what the service would.
MAX_IMAGE_PIXELS: int = Settings.model_fields["max_image_pixels"].default
CONTENT_REFUSED = frozenset({413, 422})  # the service refused what was sent: split to find the image


class ServiceUnavailableError(RuntimeError):
    """The scoring backend as a whole cannot score now; the run stops and can be resumed."""


class ImageLoadError(ValueError):
    """An image file cannot be read or decoded; the message says why."""


@dataclass(frozen=True)
class ScoreInput:
    path: Path
    questions: tuple[str, ...]
    source: Path | None = None  # editing: shown before the image


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


def load_image_file(path: Path, max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[Image, bytes, str]:
    """(RGB image, file bytes, format) of an image file, or ImageLoadError with the reason.

    PNG, JPEG and WebP (what /v1 accepts) go through the service's own `server.images.load_image`:
    the same header, decompression-bomb and decoding checks as a worker. The other formats PIL reads
    (BMP, GIF, TIFF, ...) are held to the same pixel limit before any pixel is decoded.
    """
    from PIL import Image as PILImage
    from PIL import UnidentifiedImageError

    try:
        data = path.read_bytes()
    except OSError as e:
        raise ImageLoadError(f"cannot read image file: {e.strerror or e}") from e
    if not data:
        raise ImageLoadError("image file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", PILImage.DecompressionBombWarning)
            with PILImage.open(io.BytesIO(data)) as im:  # the header only
                fmt, (width, height) = im.format, im.size
    except UnidentifiedImageError as e:
        raise ImageLoadError(f"not a readable image file ({len(data)} bytes; corrupt or an unknown format)") from e
    except (PILImage.DecompressionBombError, PILImage.DecompressionBombWarning) as e:
        raise ImageLoadError(f"image refused as a possible decompression bomb: {e}") from e
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise ImageLoadError(f"image header cannot be read: {e}") from e
    if fmt in WIRE_FORMATS:
        try:
            return load_image(data, max_pixels), data, fmt
        except ServiceError as e:
            raise ImageLoadError(e.message) from e
        except ValueError as e:
            raise ImageLoadError(str(e)) from e
    if width * height > max_pixels:
        raise ImageLoadError(f"image is {width}x{height} = {width * height} pixels, the limit is {max_pixels}")
    try:
        with PILImage.open(io.BytesIO(data)) as im:
            im.load()
            rgb = to_rgb(im)
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise ImageLoadError(f"image cannot be decoded: {e}") from e
    return rgb, data, fmt or "?"


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
                shown = [load_image_file(p)[0] for p in (inp.source, inp.path) if p is not None]
            except ImageLoadError as e:
                out[i] = Outcome(error=str(e))
                continue
            items.append(VerifyItem(images=tuple(shown), questions=inp.questions))
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
    """One image (after its source, for editing) ready for the wire, with its questions cut into chunks the
    service accepts."""

    data: list[bytes]
    chunks: list[tuple[str, ...]]


class HTTPBackend:
    """The service's POST /v1/verify through `trainer_client.DVRewardClient`.

    The client owns the transport policy: the Bearer key, explicit timeouts, one Idempotency-Key per
    request (a retry never scores twice), and retries with backoff on 429, 503 and transport errors,
    honouring Retry-After. Here: a request the service refuses for its content (413, 422) is split
    until the offending image is isolated, and that image gets the service's message as its error.
    Any other failure (401/403/404, a 5xx or 504, still 429/503 after the retries, a response that does
    not fit the request) is the service's, not an image's: it raises ServiceUnavailableError.
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
    ) -> None:
        self.client = DVRewardClient(
            url, api_key, transport=transport, max_retries=max_retries,
            timeout=httpx.Timeout(timeout_s, connect=min(connect_timeout_s, timeout_s)),
        )
        self.max_questions = max_questions
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
        step = max(1, self.max_questions)
        return _Wire([_wire_bytes(p) for p in (inp.source, inp.path) if p is not None],
                     [inp.questions[i:i + step] for i in range(0, len(inp.questions), step)])

    def _verify(self, wires: list[_Wire]) -> list[Outcome]:
        """One item per (image, question chunk), its source first; the client sends encoded bytes as they are."""
        images = [w.data for w in wires for _ in w.chunks]
        if not images:
            return [_join([], 0) for _ in wires]
        try:
            result = self.client.verify(images, [list(c) for w in wires for c in w.chunks], on_error="nan")
        except DVRewardError as e:
            if not (isinstance(e, BadRequest) and e.status in CONTENT_REFUSED):
                raise ServiceUnavailableError(self._describe(e)) from e
            if len(wires) > 1:
                mid = len(wires) // 2
                return self._verify(wires[:mid]) + self._verify(wires[mid:])
            return [Outcome(error=f"service refused the image (HTTP {e.status}): {e.code}: {e.message}")]
        self._model_id = result.response.model
        results = result.response.results
        out: list[Outcome] = []
        k = 0
        for w in wires:
            out.append(_join(results[k:k + len(w.chunks)], sum(len(c) for c in w.chunks)))
            k += len(w.chunks)
        return out

    def _describe(self, e: DVRewardError) -> str:
        where = f"{self.client.base_url}/v1/verify"
        if isinstance(e, Unauthorized):
            return f"{where} refused the API key (check --api-key or DVREWARD_API_KEY): {e}"
        if e.retryable:
            return f"{where} still fails after {self.client.backoff.max_retries + 1} attempts: {e}"
        return f"{where} failed: {e}"


def _wire_bytes(path: Path) -> bytes:
    """A file's bytes as the service accepts them (formats it does not take are sent as PNG)."""
    image, data, fmt = load_image_file(path)
    if fmt in WIRE_FORMATS:
        return data
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _join(results: Sequence[VerifyItemResult], n_questions: int) -> Outcome:
    p: list[float] = []
    for r in results:
        if r.error is not None or r.p is None:
            err = r.error
            return Outcome(error=f"{err.code}: {err.message}" if err else "service returned no scores")
        p.extend(r.p)
    problem = check_p(p, n_questions)
    return Outcome(error=problem) if problem else Outcome(p=p)
