"""Live audio in: the microphone, or WAV files replayed in real time through the same interface.

A source yields float32 mono blocks at 16 kHz, each as soon as it is captured. The
replay source paces its blocks at the speed of real time, so the live loop, the
endpointer and the turn timings see exactly what they would see from a microphone.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import numpy as np

from voice.audio.vad import SAMPLE_RATE
from voice.audio.wav import load_speech
from voice.errors import AudioDeviceError

logger = logging.getLogger(__name__)

# Block length handed to the endpointer, in milliseconds: short enough that a decision
# waits at most this long for audio, long enough to keep the callback rate low.
BLOCK_MS = 20


class AudioSource:
    """Yields 16 kHz mono float32 blocks; ``blocks()`` ends when the source is exhausted."""

    async def blocks(self) -> AsyncIterator[np.ndarray]:
        raise NotImplementedError
        yield  # pragma: no cover - makes this an async generator


def device_setting(value: str) -> int | str | None:
    """Config value to sounddevice's device argument: empty is the default, digits an index."""
    if value == "":
        return None
    return int(value) if value.isdigit() else value


class MicrophoneSource(AudioSource):
    """Captures the input device at its native rate and resamples to 16 kHz."""

    def __init__(self, device: str = "") -> None:
        self.device = device_setting(device)
        self.rate: int | None = None

    def _name(self) -> str:
        return "the default input device" if self.device is None else f"input device {self.device!r}"

    def check(self):
        """Raise AudioDeviceError now, before models load, if the device is missing; return its info."""
        try:
            import sounddevice
        except OSError as error:  # PortAudio is missing
            raise AudioDeviceError(f"Cannot record audio: {error}. Install PortAudio (apt-get install libportaudio2)") from None
        try:
            info = sounddevice.query_devices(self.device, kind="input")
        except (sounddevice.PortAudioError, ValueError) as error:
            problem = "No default input device was found" if self.device is None else f"Cannot use {self._name()}"
            raise AudioDeviceError(f"{problem} ({error}). Run 'voice devices' to list devices and set listen.input_device") from None
        self.rate = int(info["default_samplerate"])
        return info

    async def blocks(self) -> AsyncIterator[np.ndarray]:
        import sounddevice
        import soxr

        self.check()
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[np.ndarray] = asyncio.Queue()
        overflows = 0

        def captured(indata, frames, time, status) -> None:
            nonlocal overflows
            if status.input_overflow:
                overflows += 1
            loop.call_soon_threadsafe(queue.put_nowait, indata[:, 0].copy())

        try:
            stream = sounddevice.InputStream(
                samplerate=self.rate, channels=1, dtype="float32", device=self.device, blocksize=self.rate * BLOCK_MS // 1000, callback=captured
            )
            stream.start()
        except (sounddevice.PortAudioError, ValueError) as error:
            raise AudioDeviceError(
                f"Cannot open {self._name()} at {self.rate} Hz ({error}); it may be busy or not support that rate. "
                "Run 'voice devices' and pick another with listen.input_device"
            ) from None
        logger.info("Listening on %s at %d Hz", self._name(), self.rate)
        resampler = soxr.ResampleStream(self.rate, SAMPLE_RATE, 1, dtype="float32") if self.rate != SAMPLE_RATE else None
        try:
            while True:
                block = await queue.get()
                if overflows:
                    logger.warning("Lost %d blocks of microphone audio: the machine is too busy to keep up", overflows)
                    overflows = 0
                yield resampler.resample_chunk(block) if resampler else block
        finally:
            stream.abort()
            stream.close()


class ReplaySource(AudioSource):
    """Plays WAV files into the live loop in real time, with silence before, between and after them.

    ``script`` is a list of (seconds of silence, WAV path or None); the blocks come at the
    pace they would arrive from a microphone. With ``idle``, a file after the first waits
    in silence until ``idle()`` is true (the assistant has finished its reply), as a
    person waits for an answer. ``inject(samples)`` mixes extra audio into what comes
    next, which is how a test speaks over the assistant's reply.
    """

    def __init__(self, script: list[tuple[float, str | Path | None]], realtime: bool = True, idle: Callable[[], bool] | None = None) -> None:
        self.script = script
        self.realtime = realtime
        self.idle = idle
        self._injected: list[np.ndarray] = []
        self.position_s = 0.0
        """Seconds of audio delivered so far."""

    def inject(self, samples: np.ndarray) -> None:
        self._injected.append(np.asarray(samples, dtype=np.float32))

    def _raw_blocks(self, step: int) -> Iterator[np.ndarray]:
        for number, (pause_s, path) in enumerate(self.script):
            if number and path is not None and self.idle is not None:
                while not self.idle():
                    yield np.zeros(step, dtype=np.float32)
            parts = [np.zeros(int(pause_s * SAMPLE_RATE), dtype=np.float32)]
            if path is not None:
                parts.append(load_speech(path))
            segment = np.concatenate(parts)
            for start in range(0, len(segment), step):
                yield segment[start : start + step].copy()

    async def blocks(self) -> AsyncIterator[np.ndarray]:
        step = SAMPLE_RATE * BLOCK_MS // 1000
        loop = asyncio.get_running_loop()
        started = loop.time()
        pending = np.zeros(0, dtype=np.float32)
        delivered = 0
        for block in self._raw_blocks(step):
            while self._injected:
                pending = np.concatenate([pending, self._injected.pop(0)])
            if pending.size:
                mixed = min(len(block), len(pending))
                block[:mixed] += pending[:mixed]
                pending = pending[mixed:]
            delivered += len(block)
            self.position_s = delivered / SAMPLE_RATE
            if self.realtime:
                await asyncio.sleep(max(0.0, started + self.position_s - loop.time()))
            yield block
