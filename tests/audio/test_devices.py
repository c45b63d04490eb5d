"""The sounddevice input and output against a real PortAudio device: a PulseAudio null sink.

The ``pulse_device`` fixture (tests/conftest.py) starts a PulseAudio server with one null
sink. What is played to the sink comes back on its monitor, which the microphone records.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from voice.audio.sinks import SpeakerSink
from voice.audio.sources import MicrophoneSource
from voice.cli import main
from voice.errors import AudioDeviceError


def test_played_tone_is_recorded_through_the_device(pulse_device):
    async def play_and_record() -> np.ndarray:
        microphone = MicrophoneSource(pulse_device)
        blocks = []

        async def record():
            async for block in microphone.blocks():
                blocks.append(block)
                if len(blocks) >= 75:  # 1.5 s
                    return

        recording = asyncio.create_task(record())
        await asyncio.sleep(0.3)
        speaker = SpeakerSink(pulse_device)
        await speaker.open(22_050)
        seconds = np.arange(22_050) / 22_050
        await speaker.write((0.5 * np.sin(2 * np.pi * 440 * seconds)).astype(np.float32))
        await speaker.close(True)
        await recording
        return np.concatenate(blocks)

    audio = asyncio.run(play_and_record())
    spectrum = np.abs(np.fft.rfft(audio))
    frequencies = np.fft.rfftfreq(len(audio), 1 / 16_000)
    assert frequencies[spectrum.argmax()] == pytest.approx(440, abs=3)
    assert np.abs(audio).max() > 0.3


def test_devices_lists_the_device_with_its_rate(pulse_device, capsys):
    assert main(["devices"]) == 0
    listed = capsys.readouterr().out
    line = next(line for line in listed.splitlines() if f"  {pulse_device}  " in line)
    assert "input" in line
    assert "Hz" in line


def test_unsupported_rate_names_the_device_and_the_rate(pulse_device):
    speaker = SpeakerSink(pulse_device)
    with pytest.raises(AudioDeviceError) as raised:
        asyncio.run(speaker.open(1))
    message = str(raised.value)
    assert "'pulse'" in message
    assert "1 Hz" in message


def test_unknown_output_device_names_it(pulse_device):
    with pytest.raises(AudioDeviceError) as raised:
        SpeakerSink("no-such-speaker-xyz").check()
    assert "'no-such-speaker-xyz'" in str(raised.value)
