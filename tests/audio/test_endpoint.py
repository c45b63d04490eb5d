"""Endpointing on the spoken fixtures, fed in 20 ms pieces as a microphone delivers them."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import FIXTURES, fixtures_of_kind
from voice.audio.endpoint import Endpointer, Pause, SpeechResumed, SpeechStarted, Utterance
from voice.audio.wav import load_speech

RATE = 16_000


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * RATE), dtype=np.float32)


def run(endpointer: Endpointer, audio: np.ndarray, piece_s: float = 0.02) -> list:
    events = []
    step = int(piece_s * RATE)
    for start in range(0, len(audio), step):
        events.extend(endpointer.feed(audio[start : start + step]))
    return events


def utterances(events: list) -> list[Utterance]:
    return [event for event in events if isinstance(event, Utterance)]


@pytest.mark.parametrize("row", fixtures_of_kind("question", "command", "followup", "speech"), ids=lambda row: row["file"])
def test_each_spoken_fixture_is_one_utterance(row):
    speech = load_speech(FIXTURES / row["file"])
    events = run(Endpointer(), np.concatenate([silence(1.0), speech, silence(1.5)]))
    found = utterances(events)
    assert len(found) == 1
    assert isinstance(events[0], SpeechStarted)
    assert found[0].reason == "silence"
    # The utterance covers the speech: it starts before it and ends after it.
    assert found[0].start_s <= 1.0 + 0.45
    assert found[0].speech_end_s >= 1.0 + len(speech) / RATE - 0.8


def test_one_word_command_is_a_turn():
    stop = load_speech(FIXTURES / "en_piper_stop_loud.wav")
    found = utterances(run(Endpointer(), np.concatenate([silence(0.5), stop, silence(1.0)])))
    assert len(found) == 1
    assert found[0].voiced_ms >= 150


def test_pause_length_decides_one_or_two_turns():
    first = load_speech(FIXTURES / "en_piper_romeo_juliet_author.wav")
    second = load_speech(FIXTURES / "en_piper_followup_when_born.wav")
    # The fixtures carry 0.4 s of silence at each end, so these gaps are 0.8 s more.
    joined = utterances(run(Endpointer(silence_ms=1200), np.concatenate([silence(0.5), first, second, silence(2.0)])))
    split = utterances(run(Endpointer(silence_ms=600), np.concatenate([silence(0.5), first, silence(0.5), second, silence(2.0)])))
    assert len(joined) == 1
    assert len(split) == 2


def test_endpoint_comes_silence_ms_after_the_speech():
    speech = load_speech(FIXTURES / "en_piper_weather_today.wav")
    found = utterances(run(Endpointer(silence_ms=600), np.concatenate([silence(1.0), speech, silence(2.0)])))[0]
    assert found.endpoint_s - found.speech_end_s == pytest.approx(0.6, abs=0.031)


def test_pre_roll_keeps_the_first_syllable():
    speech = load_speech(FIXTURES / "en_piper_weather_today.wav")
    started = [event for event in run(Endpointer(preroll_ms=300), np.concatenate([silence(1.0), speech, silence(1.0)])) if isinstance(event, Utterance)][0]
    # The fixture's speech begins after its 0.4 s lead-in. The turn begins 0.3 s before
    # the start window filled, so before the first voiced frame.
    assert started.start_s < 1.4


def test_max_length_ends_a_turn():
    speech = load_speech(FIXTURES / "en_jfk_inaugural.wav")
    found = utterances(run(Endpointer(max_turn_s=3.0), np.concatenate([silence(0.5), speech, silence(1.0)])))
    assert found[0].reason == "max_length"
    assert len(found[0].audio) / RATE == pytest.approx(3.0, abs=0.05)


def test_silence_and_a_click_give_no_turn():
    click = np.zeros(RATE, dtype=np.float32)
    click[8000:8040] = 0.9
    assert utterances(run(Endpointer(), np.concatenate([silence(3.0), click, silence(1.0)]))) == []


def test_flush_returns_the_unfinished_turn():
    speech = load_speech(FIXTURES / "en_piper_weather_today.wav")[:-6000]
    endpointer = Endpointer()
    assert utterances(run(endpointer, np.concatenate([silence(0.5), speech]))) == []
    final = endpointer.flush()
    assert final is not None
    assert final.reason == "end_of_stream"
    assert endpointer.flush() is None


def test_endpointer_pause_before_turn_end():
    speech = load_speech(FIXTURES / "en_piper_weather_today.wav")
    events = run(Endpointer(silence_ms=600, pause_ms=210), np.concatenate([silence(1.0), speech, silence(2.0)]))
    assert [type(event) for event in events] == [SpeechStarted, Pause, Utterance]
    pause, utterance = events[1], events[2]
    assert pause.at_s - pause.speech_end_s == pytest.approx(0.21, abs=0.031)
    assert pause.speech_end_s == utterance.speech_end_s
    # The early audio is the start of the turn's audio: nothing voiced came after it.
    assert np.array_equal(utterance.audio[: len(pause.audio)], pause.audio)
    assert len(utterance.audio) > len(pause.audio)


def test_speech_after_a_pause_resumes_the_same_turn():
    first = load_speech(FIXTURES / "en_piper_romeo_juliet_author.wav")
    second = load_speech(FIXTURES / "en_piper_followup_when_born.wav")
    # 0.8 s of silence between the two questions: a pause, but not the end of the turn.
    events = run(Endpointer(silence_ms=1200, pause_ms=300), np.concatenate([silence(0.5), first, second, silence(2.0)]))
    kinds = [type(event) for event in events]
    assert kinds == [SpeechStarted, Pause, SpeechResumed, Pause, Utterance]
    first_pause, resumed, second_pause, utterance = events[1:]
    assert first_pause.at_s < resumed.at_s < second_pause.speech_end_s
    assert second_pause.speech_end_s == utterance.speech_end_s
    assert len(first_pause.audio) < len(second_pause.audio) < len(utterance.audio)


@pytest.mark.parametrize("pause_ms", [0, 600, 900])
def test_endpointer_without_pause_below_silence_reports_no_pause(pause_ms):
    speech = load_speech(FIXTURES / "en_piper_weather_today.wav")
    events = run(Endpointer(silence_ms=600, pause_ms=pause_ms), np.concatenate([silence(1.0), speech, silence(2.0)]))
    assert [type(event) for event in events] == [SpeechStarted, Utterance]


def test_endpointer_click_in_silence_reports_no_pause():
    click = np.zeros(RATE, dtype=np.float32)
    click[8000:8040] = 0.9
    events = run(Endpointer(pause_ms=200), np.concatenate([silence(3.0), click, silence(1.0)]))
    # The click may open a turn, but its few voiced frames start nothing early.
    assert not [event for event in events if isinstance(event, (Pause, Utterance))]
