"""Endpointing: cut a live 16 kHz stream into utterances with webrtcvad.

    idle ──speech starts──▶ in speech ──short pause──▶ pause ──more silence──▶ utterance (then idle)
                                │                    └──speech again──▶ resumed (in speech)
                                └─max length────▶ utterance

Speech starts when ``start_frames`` of the last ``start_window`` 30 ms frames are voiced,
so a single click does not open a turn. The utterance then begins ``preroll_ms`` before
that point. The pre-roll keeps the first syllable, which the window needs to recognise.
The turn ends after ``silence_ms`` of unvoiced frames, or at ``max_turn_s``. Utterances
with less than ``min_speech_ms`` of voiced frames are dropped as noise.

With ``pause_ms`` set (below ``silence_ms``), a shorter silence first reports a Pause with
the audio so far, so that the caller can start working on the turn while the endpointer
still waits. If the speaker goes on, SpeechResumed follows and the turn continues.

Positions are seconds of stream time (samples fed so far / 16000); the caller maps them
to wall-clock time.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Literal

import numpy as np
import webrtcvad

from voice.audio.vad import FRAME_MS, FRAME_SAMPLES, SAMPLE_RATE, to_pcm16


@dataclass
class SpeechStarted:
    at_s: float
    """Stream position where the start window filled."""


@dataclass
class Pause:
    """A silence of ``pause_ms`` after speech, where the turn probably ends."""

    audio: np.ndarray
    """16 kHz mono float32, from the pre-roll to the pause."""
    speech_end_s: float
    """End of the last voiced frame."""
    at_s: float
    voiced_ms: int


@dataclass
class SpeechResumed:
    """Speech after a Pause, so the turn goes on."""

    at_s: float


@dataclass
class Utterance:
    audio: np.ndarray
    """16 kHz mono float32, from the pre-roll to the endpoint."""
    start_s: float
    speech_end_s: float
    """End of the last voiced frame."""
    endpoint_s: float
    """Position of the end of the turn: speech_end_s + silence_ms, or the length limit."""
    reason: Literal["silence", "max_length", "end_of_stream"]
    voiced_ms: int


class Endpointer:
    """Feed audio of any length; get SpeechStarted and Utterance events back in order."""

    def __init__(
        self,
        silence_ms: int = 600,
        aggressiveness: int = 2,
        max_turn_s: float = 15.0,
        preroll_ms: int = 500,
        min_speech_ms: int = 150,
        start_frames: int = 3,
        start_window: int = 4,
        pause_ms: int = 0,
    ) -> None:
        self.vad = webrtcvad.Vad(aggressiveness)
        self.silence_frames = max(1, round(silence_ms / FRAME_MS))
        # 0 turns pauses off, as does a pause no shorter than the turn's end.
        pause_frames = round(pause_ms / FRAME_MS)
        self.pause_frames = pause_frames if 0 < pause_frames < self.silence_frames else 0
        self.max_turn_frames = max(1, round(max_turn_s * 1000 / FRAME_MS))
        self.preroll_frames = max(0, round(preroll_ms / FRAME_MS))
        self.min_speech_frames = max(1, round(min_speech_ms / FRAME_MS))
        self.start_frames = start_frames
        self.start_window = start_window
        self._pending = np.zeros(0, dtype=np.float32)
        self._frames_seen = 0
        self.reset()

    def reset(self) -> None:
        """Forget any speech in progress (after barge-in handling or a device restart)."""
        self._history: deque[tuple[np.ndarray, bool]] = deque(maxlen=max(self.preroll_frames, self.start_window))
        self._turn: list[np.ndarray] | None = None
        self._turn_start = 0
        self._voiced = 0
        self._silence = 0
        self._last_voiced_end = 0
        self._paused = False

    @property
    def in_speech(self) -> bool:
        return self._turn is not None

    def feed(self, samples: np.ndarray) -> list[SpeechStarted | Pause | SpeechResumed | Utterance]:
        events: list[SpeechStarted | Pause | SpeechResumed | Utterance] = []
        data = np.concatenate([self._pending, np.asarray(samples, dtype=np.float32).reshape(-1)])
        whole = len(data) // FRAME_SAMPLES * FRAME_SAMPLES
        for start in range(0, whole, FRAME_SAMPLES):
            event = self._frame(data[start : start + FRAME_SAMPLES])
            if event is not None:
                events.append(event)
        self._pending = data[whole:]
        return events

    def flush(self) -> Utterance | None:
        """End of the stream: return the turn in progress, if it contains enough speech."""
        if self._turn is None:
            return None
        return self._finish("end_of_stream")

    def _frame(self, frame: np.ndarray) -> SpeechStarted | Pause | SpeechResumed | Utterance | None:
        voiced = self.vad.is_speech(to_pcm16(frame), SAMPLE_RATE)
        index = self._frames_seen
        self._frames_seen += 1
        if self._turn is None:
            self._history.append((frame, voiced))
            recent = list(self._history)[-self.start_window :]
            if sum(flag for _, flag in recent) < self.start_frames:
                return None
            # Speech starts: the turn opens with the pre-roll, which contains the window.
            keep = list(self._history)[-max(self.preroll_frames, len(recent)) :]
            self._turn = [audio for audio, _ in keep]
            self._turn_start = index + 1 - len(keep)
            self._voiced = sum(flag for _, flag in keep)
            self._silence = 0
            self._last_voiced_end = index + 1
            self._history.clear()
            return SpeechStarted(self._seconds(index + 1))
        self._turn.append(frame)
        if voiced:
            self._voiced += 1
            self._silence = 0
            self._last_voiced_end = index + 1
        else:
            self._silence += 1
        if self._silence >= self.silence_frames:
            return self._finish("silence")
        if len(self._turn) >= self.max_turn_frames:
            return self._finish("max_length")
        if voiced and self._paused:
            self._paused = False
            return SpeechResumed(self._seconds(index))
        if self.pause_frames and self._silence == self.pause_frames and self._voiced >= self.min_speech_frames:
            self._paused = True
            return Pause(
                audio=np.concatenate(self._turn),
                speech_end_s=self._seconds(self._last_voiced_end),
                at_s=self._seconds(index + 1),
                voiced_ms=self._voiced * FRAME_MS,
            )
        return None

    def _finish(self, reason: str) -> Utterance | None:
        turn, voiced = self._turn, self._voiced
        start, speech_end = self._turn_start, self._last_voiced_end
        end = start + len(turn)
        self.reset()
        if voiced < self.min_speech_frames:
            return None
        return Utterance(
            audio=np.concatenate(turn),
            start_s=self._seconds(start),
            speech_end_s=self._seconds(speech_end),
            endpoint_s=self._seconds(end),
            reason=reason,
            voiced_ms=voiced * FRAME_MS,
        )

    @staticmethod
    def _seconds(frames: int) -> float:
        return frames * FRAME_MS / 1000
