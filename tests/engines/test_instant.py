"""The load-test verifier (bench/instant.py): checkable answers at no cost, never selectable by a setting."""

from __future__ import annotations

from PIL import Image

from bench.instant import InstantVerifier, instant_p
from server.engines.base import ItemScores, VerifyItem
from server.settings import Settings


def test_p_is_a_function_of_the_pixels_and_the_question() -> None:
    red, blue = Image.new("RGB", (64, 64), "red"), Image.new("RGB", (64, 64), "blue")
    v = InstantVerifier()
    (a, b), (c, _) = v.verify([VerifyItem((red,), ("Is it red?", "Is it big?")),
                               VerifyItem((blue,), ("Is it red?", "x"))])
    assert v.verify([VerifyItem((red.copy(),), ("Is it red?",))]) == [[a]]
    assert len({a, b, c}) == 3 and all(0 < x < 1 for x in (a, b, c))
    assert 0 < instant_p(b"", "") < 1
    (scores,) = v.verify_each([VerifyItem((red,), ("Is it red?",))], greedy=True)
    assert isinstance(scores, ItemScores) and scores.answers == ("yes" if a > 0.5 else "no",)


def test_no_setting_selects_it() -> None:
    assert "instant" not in str(Settings.model_fields["verifier_engine"].annotation)
