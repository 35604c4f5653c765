"""Split mode: the model ids in a response name the worker's models, never the API's own settings."""

from __future__ import annotations

import asyncio
import types
from pathlib import Path
from typing import Any

from dvreward_protocol.schemas import ScoreRequest
from server.runtime import build_broker, build_service, load_decomposer, running
from server.service import ScoreImages
from server.settings import Settings
from server.worker import Worker


async def test_ids_come_from_the_worker_that_did_the_work(redis_url: str, tiny_models: dict[str, Path],
                                                          tiny_verifier: Any, kit: types.SimpleNamespace) -> None:
    # The API process is told about models that never run anywhere (its by-device defaults, say).
    api = Settings(redis_url=redis_url, verifier="Qwen/Never-Ran-VL", decomposer="Qwen/Never-Ran-LM",
                   pipeline="dsg")
    decomposer = await asyncio.to_thread(
        load_decomposer, Settings(verifier=str(tiny_models["verifier"]), decomposer=str(tiny_models["decomposer"])))
    api_broker, worker_broker = build_broker(api), build_broker(api)
    service = build_service(api, api_broker)
    worker = Worker(worker_broker, tiny_verifier, decomposer, template_version="test", batch_size=32,
                    batch_wait=0.01, heartbeat_s=0.5, batch_timeout_s=600, max_image_pixels=4096 * 4096)
    image = kit.png_bytes(1)
    deaths: list[BaseException] = []
    try:
        async with running(worker, deaths.append):
            images = ScoreImages([[image]], [None])
            decomposed = await service.score(
                ScoreRequest.model_validate({"groups": [{"prompt": "a red cat", "images": ["x"]}]}), images, "a")
            explicit = await service.score(ScoreRequest.model_validate(
                {"groups": [{"questions": kit.explicit_questions(), "images": ["x"]}]}), images, "b")
    finally:
        await worker_broker.close()
        await api_broker.close()
    assert deaths == [], "the worker ran until told to stop"
    assert decomposed.groups[0].rewards[0] is not None, decomposed.groups[0].images
    assert decomposed.models.verifier == tiny_verifier.model_id
    assert (decomposed.models.decomposer, decomposed.models.pipeline) == (decomposer.model_id, "fast")
    assert explicit.models.verifier == tiny_verifier.model_id
    assert (explicit.models.decomposer, explicit.models.pipeline) == (None, None), "no decomposer did any work"
