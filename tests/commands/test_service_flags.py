"""Every setting is a flag of `dvreward serve`, flags parse to the setting's type, and flags beat the environment."""

from __future__ import annotations

import pytest

from server.cli import build_parser
from server.commands.service import API_SETTINGS, WORKER_SETTINGS, settings_from
from server.preflight import StartupError
from server.settings import Settings


def test_every_setting_is_a_serve_flag() -> None:
    serve = build_parser().parse_args(["serve"])
    assert set(Settings.model_fields) <= set(vars(serve))


@pytest.mark.parametrize(("text", "value"), [("false", False), ("true", True), ("0", False), ("yes", True)])
def test_boolean_flags_parse_both_ways(text: str, value: bool) -> None:
    assert settings_from(build_parser().parse_args(["serve", "--batched-vision", text])).batched_vision is value


def test_flags_override_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DVREWARD_MAX_IMAGES", "7")
    monkeypatch.setenv("DVREWARD_PORT", "9001")
    s = settings_from(build_parser().parse_args(["serve", "--port", "9002"]))
    assert (s.max_images, s.port) == (7, 9002)


def test_bad_boolean_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--batched-vision", "maybe"])
    assert "expected true or false" in capsys.readouterr().err


def test_api_and_worker_settings_lists_name_real_settings() -> None:
    """A misspelt name in either list would silently offer (or hide) a flag on the wrong command."""
    assert API_SETTINGS <= set(Settings.model_fields), API_SETTINGS - set(Settings.model_fields)
    assert WORKER_SETTINGS <= set(Settings.model_fields), WORKER_SETTINGS - set(Settings.model_fields)
    assert not API_SETTINGS & WORKER_SETTINGS


def test_empty_means_none_only_where_none_is_allowed() -> None:
    """Unset picks the device's default model; an empty decomposer disables it; an empty verifier is an error."""
    parse = build_parser().parse_args
    unset = settings_from(parse(["serve"]))
    assert unset.verifier and unset.decomposer  # the device's defaults
    assert settings_from(parse(["serve", "--decomposer", ""])).decomposer is None
    with pytest.raises(StartupError, match="the verifier cannot be empty"):
        settings_from(parse(["serve", "--verifier", ""]))
    with pytest.raises(ValueError, match="the verifier cannot be empty"):
        Settings(verifier=" ")


def test_commands_without_the_service_take_the_settings_defaults() -> None:
    """`decompose`, `score` and `eval` run engines in-process with the service's defaults, not their own."""
    sub = build_parser()
    decompose = sub.parse_args(["decompose", "a cat"])
    assert decompose.max_new_tokens == Settings.model_fields["decomposer_max_new_tokens"].default
    assert (decompose.pipeline, decompose.dtype, decompose.device) == ("fast", "float32", "cpu")
    for argv in (["score", "a.png", "--verifier", "v"],
                 ["eval", "--images", "i", "--questions", "q", "-o", "o", "--verifier", "v"]):
        args = sub.parse_args(argv)
        assert (args.dtype, args.device) == (Settings.model_fields["dtype"].default,
                                             Settings.model_fields["device"].default)
    with pytest.raises(SystemExit):
        sub.parse_args(["eval", "--images", "i", "--questions", "q", "-o", "o", "--verifier", "v", "--dtype", "f8"])


def test_the_engines_own_defaults_are_the_settings_defaults() -> None:
    """Engines and the bench scripts run without Settings; where they take a setting, their default is its."""
    import inspect

    from server.engines.decomposition.pipelines import PipelineDecomposer
    from server.engines.hf.decomposer import HFBackend, HFDecomposer
    from server.engines.hf.verifier import HFVerifier
    from server.engines.remote.client import RemoteOptions
    from server.engines.remote.decomposer import OpenAIDecomposer
    from server.engines.vllm.common import VLLMOptions
    from server.engines.vllm.decomposer import VLLMDecomposer

    def default(fn: object, name: str) -> object:
        return inspect.signature(fn).parameters[name].default  # type: ignore[arg-type]

    setting = {name: field.default for name, field in Settings.model_fields.items()}
    engine = {
        "device": [default(HFVerifier.load, "device"), default(HFBackend, "device")],
        "dtype": [default(HFVerifier.load, "dtype"), default(HFBackend, "dtype"), VLLMOptions().dtype],
        "verifier_mode": [default(HFVerifier, "mode")],
        "max_batch_tokens": [default(HFVerifier, "max_batch_tokens")],
        "batched_vision": [default(HFVerifier.load, "batched_vision")],
        "min_pixels": [default(HFVerifier.load, "min_pixels")],
        "max_pixels": [default(HFVerifier.load, "max_pixels")],
        "pipeline": [default(c, "pipeline") for c in (PipelineDecomposer, HFDecomposer, OpenAIDecomposer,
                                                      VLLMDecomposer)],
        "remote_concurrency": [RemoteOptions().concurrency],
        "remote_timeout_s": [RemoteOptions().timeout_s],
        "remote_retries": [RemoteOptions().retries],
        "vllm_tensor_parallel_size": [VLLMOptions().tensor_parallel_size],
        "vllm_gpu_memory_utilization": [VLLMOptions().gpu_memory_utilization],
        "vllm_max_model_len": [VLLMOptions().max_model_len],
    }
    assert {k: [setting[k]] * len(v) for k, v in engine.items()} == engine
