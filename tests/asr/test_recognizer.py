"""Whisper base on every audio fixture: questions transcribed, non-speech rejected."""

from __future__ import annotations

import re

import numpy as np
import pytest

from tests.conftest import FIXTURES, fixtures_of_kind
from voice.asr.phantoms import is_phantom_phrase
from voice.audio.vad import normalize_peak
from voice.audio.wav import load_speech
from voice.config import AsrConfig

NUMBER_WORDS = "zero one two three four five six seven eight nine ten eleven twelve".split()


def spoken_words(text: str) -> list[str]:
    """Lowercase words with Whisper's digits 0 to 12 spelled out, as the manifest spells them."""
    words = re.findall(r"[a-z0-9']+", text.lower())
    return [NUMBER_WORDS[int(word)] if word.isdigit() and int(word) <= 12 else word for word in words]


@pytest.fixture(scope="module")
def recognizer():
    from voice.asr.recognizer import Recognizer
    from voice.models import cache_root, resolve_whisper

    source, _ = resolve_whisper("base", cache_root())
    return Recognizer(source, AsrConfig())


@pytest.mark.parametrize(
    "row", fixtures_of_kind("question", "command", "followup", "speech"), ids=lambda row: row["file"]
)
def test_speech_fixture_transcribed(recognizer, row):
    transcript = recognizer.transcribe(load_speech(FIXTURES / row["file"]))
    assert transcript.has_speech, transcript.reason
    words = spoken_words(transcript.text)
    for expected in row["expected_words"].split():
        assert expected in words, f"{expected!r} missing from {transcript.text!r}"


@pytest.mark.parametrize("row", fixtures_of_kind("nonspeech", "silence"), ids=lambda row: row["file"])
def test_non_speech_fixture_rejected(recognizer, row):
    transcript = recognizer.transcribe(load_speech(FIXTURES / row["file"]))
    assert transcript.text == ""
    assert transcript.reason


def test_white_noise_rejected(recognizer):
    noise = np.random.default_rng(0).normal(0.0, 0.1, 16_000 * 4).astype(np.float32)
    assert not recognizer.transcribe(noise).has_speech


def test_short_click_rejected_before_whisper(recognizer):
    audio = np.zeros(16_000 * 2, dtype=np.float32)
    audio[8_000:8_080] = 0.9
    transcript = recognizer.transcribe(audio)
    assert not transcript.has_speech
    assert "asr.min_speech_ms" in transcript.reason


@pytest.mark.parametrize(
    ("text", "phantom"),
    [
        ("Thank you.", True),
        ("Thanks for watching!", True),
        ("Thank you. Thank you.", True),
        ("...", True),
        ("Thank you for the weather report.", False),
        ("1, 2, 3.", False),
        ("Stop", False),
    ],
)
def test_phantom_phrase_detection(text, phantom):
    assert is_phantom_phrase(text) is phantom


def test_normalize_peak_caps_gain():
    quiet = np.full(100, 0.001, dtype=np.float32)
    assert np.max(normalize_peak(quiet)) == pytest.approx(0.001 * 10 ** 1.5, rel=1e-5)
    loud = np.full(100, 0.05, dtype=np.float32)
    assert np.max(normalize_peak(loud)) == pytest.approx(0.5)
    silent = np.zeros(100, dtype=np.float32)
    assert not normalize_peak(silent).any()


@pytest.mark.parametrize(
    ("content_frames", "min_frames", "expected"),
    [(300, 1500, 1500), (1400, 1500, 1600), (1550, 1500, 1800), (2900, 1500, 3000), (0, 3000, 3000)],
)
def test_encoder_window_frames(content_frames, min_frames, expected):
    from voice.asr.recognizer import encoder_frames

    assert encoder_frames(content_frames, min_frames) == expected


class _EncodeRecorder:
    """Proxy for the CTranslate2 model that records the encoder's input widths."""

    def __init__(self, model) -> None:
        self._model = model
        self.widths: list[int] = []

    def encode(self, features, **kwargs):
        self.widths.append(features.shape[-1])
        return self._model.encode(features, **kwargs)

    def __getattr__(self, name):
        return getattr(self._model, name)


def test_short_question_uses_shortest_window(recognizer, monkeypatch):
    recorder = _EncodeRecorder(recognizer.model.model)
    monkeypatch.setattr(recognizer.model, "model", recorder)
    transcript = recognizer.transcribe(load_speech(FIXTURES / "en_espeak_tallest_mountain.wav"))
    assert "mountain" in spoken_words(transcript.text)
    assert recorder.widths == [AsrConfig().window_s * 100]
