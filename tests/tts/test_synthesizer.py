"""Joining the audio of chunks that split one sentence: edges cut, other pauses kept."""

from __future__ import annotations

import numpy as np
import pytest

from voice import models
from voice.config import TtsConfig
from voice.tts.synthesizer import JOIN_LEADING_S, JOIN_TRAILING_S, SILENCE_LEVEL, Synthesizer, trim_silence
from voice.tts.text import ends_mid_sentence

RATE = 16_000


@pytest.mark.parametrize(
    ("chunk", "expected"),
    [
        ("I don't have", True),
        ("The capital of France is Paris.", False),
        ("Well, the capital of France,", False),
        ('He said "to be or not to be"', False),
        ("Is it ready?", False),
        ("   ", False),
    ],
)
def test_ends_mid_sentence(chunk, expected):
    assert ends_mid_sentence(chunk) is expected


def test_trim_silence_keeps_margins():
    tone = 0.5 * np.sin(np.linspace(0.5, 200 * np.pi, RATE // 2)).astype(np.float32)
    samples = np.concatenate([np.zeros(RATE // 10, np.float32), tone, np.zeros(RATE // 5, np.float32)])
    both = trim_silence(samples, RATE, leading=True, trailing=True)
    assert quiet_run_s(both, RATE, at_start=True) == pytest.approx(JOIN_LEADING_S, abs=2 / RATE)
    assert quiet_run_s(both, RATE, at_start=False) == pytest.approx(JOIN_TRAILING_S, abs=2 / RATE)
    trailing_only = trim_silence(samples, RATE, leading=False, trailing=True)
    assert quiet_run_s(trailing_only, RATE, at_start=True) == pytest.approx(0.1, abs=2 / RATE)
    assert len(trim_silence(samples, RATE, leading=False, trailing=False)) == len(samples)
    silence = np.zeros(RATE, np.float32)
    assert len(trim_silence(silence, RATE, leading=True, trailing=True)) == RATE


def quiet_run_s(samples: np.ndarray, rate: int, at_start: bool) -> float:
    """Return the seconds of silence at the start or at the end of ``samples``."""
    loud = np.flatnonzero(np.abs(samples) > SILENCE_LEVEL)
    if loud.size == 0:
        return len(samples) / rate
    return (loud[0] if at_start else len(samples) - 1 - loud[-1]) / rate


def test_phrase_join_with_piper_has_short_pause():
    synthesizer = Synthesizer(models.resolve_piper(TtsConfig().voice, models.cache_root()), TtsConfig())
    first, second = "I don't have", "the ability to know the weather."
    rate = synthesizer.sample_rate

    def join_pause_s(cut_edges: bool) -> float:
        if cut_edges:
            head = synthesizer.synthesize_joined(first, previous=None)
            tail = synthesizer.synthesize_joined(second, previous=first)
        else:
            head = synthesizer.synthesize_all(first)
            tail = synthesizer.synthesize_all(second)
        return quiet_run_s(head[-1], rate, at_start=False) + quiet_run_s(tail[0], rate, at_start=True)

    # Piper's own silences at the join last longer than a pause inside a phrase.
    assert join_pause_s(cut_edges=False) > 0.15
    assert join_pause_s(cut_edges=True) <= JOIN_LEADING_S + JOIN_TRAILING_S + 2 / rate


def test_damaged_voice_file_names_the_fix(tmp_path):
    from voice.errors import ModelError

    voice = models.resolve_piper(TtsConfig().voice, models.cache_root())
    damaged = tmp_path / voice.name
    damaged.write_bytes(voice.read_bytes()[:1000])
    (tmp_path / f"{voice.name}.json").write_bytes(voice.with_name(f"{voice.name}.json").read_bytes())
    with pytest.raises(ModelError, match=r"failed to load .*run voice prepare"):
        Synthesizer(damaged, TtsConfig())
