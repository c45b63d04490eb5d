"""Destinations for reply audio: a WAV file, the speaker, or none."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from pathlib import Path

import numpy as np

from voice.errors import AudioDeviceError

logger = logging.getLogger(__name__)


class AudioSink:
    """Receives float32 mono chunks in [-1, 1]; ``close(ok=False)`` throws away a partial reply."""

    async def open(self, sample_rate: int) -> None:
        self.sample_rate = sample_rate

    async def write(self, samples: np.ndarray) -> None:
        raise NotImplementedError

    async def close(self, ok: bool) -> None:
        pass

    def interrupt(self) -> None:
        """Stop playing at once (barge-in); ``close(ok=False)`` still follows."""


class NullSink(AudioSink):
    async def write(self, samples: np.ndarray) -> None:
        pass


class WavFileSink(AudioSink):
    """Writes the reply to a WAV file as it arrives; the final path appears only when complete."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._writer = None

    async def open(self, sample_rate: int) -> None:
        from voice.audio.wav import ReplyWavWriter

        await super().open(sample_rate)
        self._writer = ReplyWavWriter(self.path, sample_rate)

    async def write(self, samples: np.ndarray) -> None:
        await asyncio.to_thread(self._writer.write, samples)

    async def close(self, ok: bool) -> None:
        if self._writer is None:
            return
        writer, self._writer = self._writer, None
        if ok:
            await asyncio.to_thread(writer.commit)
        else:
            await asyncio.to_thread(writer.discard)


class PacedSink(AudioSink):
    """An output that plays in real time, written in 50 ms pieces so a stop takes effect at once.

    ``close(ok=False)`` stops the piece loop before its next piece and aborts the device,
    which is how barge-in silences a reply within a fraction of a second.
    ``played`` lists (time.perf_counter() at the start of a piece, its RMS level), which
    the live loop compares with the microphone to tell its own echo from a user.
    """

    PIECE_MS = 50

    def __init__(self) -> None:
        self._stop = threading.Event()
        self.played: deque[tuple[float, float]] = deque(maxlen=400)
        self.barged_in = False

    async def open(self, sample_rate: int) -> None:
        await super().open(sample_rate)
        self._stop.clear()

    async def write(self, samples: np.ndarray) -> None:
        await asyncio.to_thread(self._write_pieces, np.ascontiguousarray(samples, dtype=np.float32))

    def _write_pieces(self, samples: np.ndarray) -> None:
        step = max(1, self.sample_rate * self.PIECE_MS // 1000)
        for start in range(0, len(samples), step):
            if self._stop.is_set():
                return
            piece = samples[start : start + step]
            self.played.append((time.perf_counter(), float(np.sqrt(np.mean(piece * piece)))))
            self._play(piece)

    def _play(self, piece: np.ndarray) -> None:
        """Play one piece, returning when the device has taken it (at the pace of playback)."""
        raise NotImplementedError

    def level(self, since: float, until: float) -> float | None:
        """Return the loudest piece RMS played between two perf_counter() times, or None when none was."""
        window = since - self.PIECE_MS / 1000
        levels = [rms for started, rms in list(self.played) if window <= started <= until]
        return max(levels) if levels else None

    def interrupt(self) -> None:
        self._stop.set()

    def mark_barge_in(self) -> None:
        """Record that the user spoke over the reply; cancelling the turn then stops it."""
        self.barged_in = True

    async def close(self, ok: bool) -> None:
        if not ok:
            self._stop.set()


class PacedWavSink(PacedSink):
    """Writes a reply to a WAV file at the pace of playback, for the live loop without a speaker.

    The live loop's timing, echo gate and barge-in work as with a speaker. A reply cut
    off by barge-in keeps what was written until then, which is what a speaker would
    have played. A reply that fails or is stopped by Ctrl-C leaves no file.
    """

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        self.path = Path(path)
        self._writer = None

    async def open(self, sample_rate: int) -> None:
        from voice.audio.wav import ReplyWavWriter

        await super().open(sample_rate)
        self.barged_in = False
        self._writer = ReplyWavWriter(self.path, sample_rate)

    def _play(self, piece: np.ndarray) -> None:
        started = time.perf_counter()
        self._writer.write(piece)
        time.sleep(max(0.0, len(piece) / self.sample_rate - (time.perf_counter() - started)))

    async def close(self, ok: bool) -> None:
        await super().close(ok)
        if self._writer is None:
            return
        writer, self._writer = self._writer, None
        # Only a reply cut off by barge-in keeps what was written: the part the user heard.
        if ok or self.barged_in:
            await asyncio.to_thread(writer.commit)
        else:
            await asyncio.to_thread(writer.discard)


class SpeakerSink(PacedSink):
    """Plays the reply through a sounddevice output stream."""

    def __init__(self, device: int | str | None = None, hint: str = "") -> None:
        super().__init__()
        self.device = device
        self.hint = hint
        """The alternative the error messages offer, such as "or write to a file with --output"."""
        self._stream = None

    def _device_name(self) -> str:
        return "the default output device" if self.device is None else f"output device {self.device!r}"

    def _sounddevice(self):
        try:
            import sounddevice
        except OSError as error:  # PortAudio is missing
            raise AudioDeviceError(f"Cannot play audio: {error}. Install PortAudio (apt-get install libportaudio2) {self.hint}".rstrip()) from None
        return sounddevice

    def check(self) -> None:
        """Raise AudioDeviceError now if the output device does not exist, before models load."""
        sounddevice = self._sounddevice()
        try:
            sounddevice.query_devices(self.device, kind="output")
        except (sounddevice.PortAudioError, ValueError) as error:
            problem = "No default output device was found" if self.device is None else f"Cannot use {self._device_name()}"
            raise AudioDeviceError(f"{problem} (PortAudio: {error}). Run 'voice devices' to list devices, {self.hint}".rstrip(", ")) from None

    async def open(self, sample_rate: int) -> None:
        await super().open(sample_rate)
        sounddevice = self._sounddevice()
        try:
            self._stream = sounddevice.OutputStream(samplerate=sample_rate, channels=1, dtype="float32", device=self.device)
            self._stream.start()
        except (sounddevice.PortAudioError, ValueError) as error:
            raise AudioDeviceError(
                f"Cannot open {self._device_name()} at {sample_rate} Hz: {error}. Run 'voice devices' to list devices, {self.hint}".rstrip(", ")
            ) from None

    def _play(self, piece: np.ndarray) -> None:
        stream = self._stream  # close() may clear it from the event loop's thread
        if stream is not None:
            # A blocking write paces the caller at the speed of playback.
            stream.write(piece.reshape(-1, 1))

    async def close(self, ok: bool) -> None:
        await super().close(ok)
        if self._stream is None:
            return
        stream, self._stream = self._stream, None
        await asyncio.to_thread(stream.stop if ok else stream.abort)
        stream.close()


class TeeSink(AudioSink):
    """Sends the same reply to several sinks, such as a WAV file and the speaker."""

    def __init__(self, sinks: list[AudioSink]) -> None:
        self.sinks = sinks

    async def open(self, sample_rate: int) -> None:
        await super().open(sample_rate)
        opened = []
        try:
            for sink in self.sinks:
                await sink.open(sample_rate)
                opened.append(sink)
        except BaseException:
            for sink in opened:
                await sink.close(False)
            raise

    async def write(self, samples: np.ndarray) -> None:
        for sink in self.sinks:
            await sink.write(samples)

    def interrupt(self) -> None:
        for sink in self.sinks:
            sink.interrupt()

    async def close(self, ok: bool) -> None:
        # Every sink is closed even when one fails, so no partial file is left behind.
        failure = None
        for sink in self.sinks:
            try:
                await sink.close(ok)
            except Exception as error:  # noqa: BLE001 - re-raised after the others are closed
                failure = failure or error
        if failure is not None:
            raise failure
