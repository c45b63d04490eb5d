"""The sounddevice input and output against a real PortAudio device: a PulseAudio null sink.

The fixture starts its own PulseAudio server in a private runtime folder with one null
sink; PortAudio reaches it through ALSA's pulse plugin as the device "pulse". What is
played to the sink comes back on its monitor, which the microphone source records.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time

import numpy as np
import pytest

from voice.audio.sinks import SpeakerSink
from voice.audio.sources import MicrophoneSource
from voice.cli import main
from voice.errors import AudioDeviceError


@pytest.fixture(scope="module")
def pulse_device(tmp_path_factory):
    if shutil.which("pulseaudio") is None:
        pytest.fail("pulseaudio is not installed; install it with: apt-get install pulseaudio pulseaudio-utils libasound2-plugins")
    runtime = tmp_path_factory.mktemp("pulse-runtime")
    runtime.chmod(0o700)
    saved = {key: os.environ.get(key) for key in ("XDG_RUNTIME_DIR", "PULSE_SERVER")}
    os.environ["XDG_RUNTIME_DIR"] = str(runtime)
    os.environ["PULSE_SERVER"] = f"unix:{runtime}/pulse/native"
    subprocess.run(
        ["pulseaudio", "--daemonize=yes", "--exit-idle-time=-1", "-n", "--load=module-native-protocol-unix", "--load=module-null-sink sink_name=voice_test"],
        check=True,
        capture_output=True,
        timeout=30,
    )
    deadline = time.monotonic() + 10
    while subprocess.run(["pactl", "info"], capture_output=True).returncode != 0:
        if time.monotonic() > deadline:
            pytest.fail("the test's PulseAudio server did not start within 10 s")
        time.sleep(0.1)
    import sounddevice

    # PortAudio lists devices once, when it starts: start it again to see the new server.
    sounddevice._terminate()
    sounddevice._initialize()
    yield "pulse"
    subprocess.run(["pactl", "exit"], capture_output=True)
    sounddevice._terminate()
    sounddevice._initialize()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


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
