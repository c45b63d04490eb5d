"""The paced WAV sink, which replaces the speaker in the live loop on machines without one."""

from __future__ import annotations

import asyncio
import time

import numpy as np

from voice.audio.sinks import PacedWavSink
from voice.audio.wav import read_wav

RATE = 16_000


def tone(seconds: float) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)


def test_paced_wav_sink_writes_at_playback_pace(tmp_path):
    path = tmp_path / "reply.wav"

    async def play() -> float:
        sink = PacedWavSink(path)
        await sink.open(RATE)
        started = time.perf_counter()
        await sink.write(tone(0.4))
        elapsed = time.perf_counter() - started
        await sink.close(ok=True)
        return elapsed

    elapsed = asyncio.run(play())
    assert elapsed >= 0.35
    samples, rate = read_wav(path)
    assert rate == RATE
    assert abs(len(samples) / rate - 0.4) < 0.01
    assert not list(tmp_path.glob(".*.partial"))


def stop_after(path, seconds: float, barge_in: bool) -> None:
    async def play_and_stop() -> None:
        sink = PacedWavSink(path)
        await sink.open(RATE)
        writing = asyncio.create_task(sink.write(tone(2.0)))
        await asyncio.sleep(seconds)
        if barge_in:
            sink.mark_barge_in()
        # What the pipeline does when the turn is cancelled, by barge-in or Ctrl-C.
        sink.interrupt()
        await writing
        await sink.close(ok=False)

    asyncio.run(play_and_stop())


def test_paced_wav_sink_barge_in(tmp_path):
    path = tmp_path / "reply.wav"
    stop_after(path, 0.3, barge_in=True)
    samples, _rate = read_wav(path)
    seconds = len(samples) / RATE
    assert 0.2 <= seconds <= 0.6


def test_paced_wav_sink_cancelled_reply_leaves_no_file(tmp_path):
    path = tmp_path / "reply.wav"
    stop_after(path, 0.3, barge_in=False)
    assert not path.exists()
    assert not list(tmp_path.glob(".*.partial"))


def test_paced_wav_sink_failed_reply_leaves_no_file(tmp_path):
    path = tmp_path / "reply.wav"

    async def fail() -> None:
        sink = PacedWavSink(path)
        await sink.open(RATE)
        await sink.write(tone(0.1))
        await sink.close(ok=False)

    asyncio.run(fail())
    assert not path.exists()
    assert not list(tmp_path.glob(".*.partial"))
