"""Every setting is a flag of `dvreward serve`, flags parse to the setting's type, and flags beat the environment."""

from __future__ import annotations

import pytest

from server.cli import build_parser
from server.commands.service import API_SETTINGS, WORKER_SETTINGS, settings_from
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
