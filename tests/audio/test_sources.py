"""Live audio sources: the real-time replay used by tests and demos, and microphone errors."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from tests.conftest import FIXTURES
from voice.audio.sources import MicrophoneSource, ReplaySource, device_setting
from voice.audio.wav import load_speech
from voice.errors import AudioDeviceError


async def collect(source: ReplaySource) -> list[np.ndarray]:
    return [block async for block in source.blocks()]


def test_replay_runs_in_real_time():
    started = time.monotonic()
    blocks = asyncio.run(collect(ReplaySource([(0.5, FIXTURES / "en_espeak_time_now.wav")])))
    audio = np.concatenate(blocks)
    duration = len(audio) / 16_000
    assert time.monotonic() - started >= duration - 0.05
    assert duration == pytest.approx(0.5 + len(load_speech(FIXTURES / "en_espeak_time_now.wav")) / 16_000, abs=0.02)


def test_replay_waits_until_idle():
    question = FIXTURES / "en_espeak_time_now.wav"
    length = len(load_speech(question))
    calls = []

    def idle() -> bool:
        # Busy for the first 25 checks (half a second of 20 ms blocks), then idle.
        calls.append(True)
        return len(calls) > 25

    blocks = asyncio.run(collect(ReplaySource([(0.1, question), (0.1, question)], realtime=False, idle=idle)))
    samples = sum(len(block) for block in blocks)
    assert len(calls) == 26
    assert samples == 2 * (1600 + length) + 25 * 320
    # Only silence came while the source waited.
    waiting = np.concatenate(blocks)[1600 + length : 1600 + length + 25 * 320]
    assert float(np.abs(waiting).max()) == 0.0


def test_injected_audio_is_mixed_into_the_next_blocks():
    source = ReplaySource([(1.0, None)], realtime=False)

    async def run():
        blocks = []
        async for block in source.blocks():
            if len(blocks) == 5:
                source.inject(np.full(480, 0.25, dtype=np.float32))
            blocks.append(block)
        return blocks

    blocks = asyncio.run(run())
    levels = [float(np.abs(block).max()) for block in blocks]
    assert levels[:6] == [0.0] * 6
    assert levels[6:8] == [0.25, 0.25]
    assert max(levels[8:]) == 0.0


@pytest.mark.parametrize(("value", "expected"), [("", None), ("3", 3), ("USB Mic", "USB Mic")])
def test_device_setting(value, expected):
    assert device_setting(value) == expected


def test_unknown_microphone_names_the_device_and_the_fix():
    with pytest.raises(AudioDeviceError) as raised:
        MicrophoneSource("no-such-microphone-xyz").check()
    message = str(raised.value)
    assert "'no-such-microphone-xyz'" in message
    assert "voice devices" in message
