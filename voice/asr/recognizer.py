"""Speech recognition with faster-whisper, with the checks that keep non-speech from being answered.

Whisper transcribes whatever it is given: on silence or noise it often invents a phrase
such as "Thank you." Three gates stand before a transcript reaches the language model:

1. webrtcvad must hear a continuous stretch of speech of at least ``min_speech_ms``
   in the peak-normalized audio;
2. faster-whisper's Silero VAD filter must keep some audio;
3. each segment must pass Whisper's own signals (no-speech probability with low
   confidence, compression ratio), and a transcript made only of a known phantom phrase
   is dropped unless Whisper was confident in it.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field

import numpy as np

from voice.asr.phantoms import is_phantom_phrase
from voice.audio.vad import longest_voiced_run_ms, normalize_peak
from voice.config import AsrConfig
from voice.errors import ModelError, first_line

logger = logging.getLogger(__name__)

# A segment whose text compresses better than this (gzip ratio) is a repetition loop.
_MAX_COMPRESSION_RATIO = 2.4
# Mean log-probability above which a phantom phrase is trusted as really spoken.
_PHANTOM_TRUSTED_LOG_PROB = -0.3
# Whisper's encoder input: 100 log-mel frames per second, 3000 frames (30 s) at most.
_FRAMES_PER_S = 100
_MAX_FRAMES = 3000
# Silence kept after the speech when a recording is longer than the shortest window.
_WINDOW_MARGIN_FRAMES = 200


@dataclass
class Transcript:
    text: str
    """Empty when no speech was found."""
    reason: str = ""
    """Why the text is empty: which gate rejected the audio, as a clause for messages."""
    duration_s: float = 0.0
    voiced_ms: int = 0
    segments: list[dict] = field(default_factory=list)
    """Per segment: text, start_s, end_s, no_speech_prob, avg_logprob."""

    @property
    def has_speech(self) -> bool:
        return bool(self.text)


class Recognizer:
    """Wraps one faster-whisper model, loaded once and used for every turn."""

    def __init__(self, model_source: str, config: AsrConfig, local_files_only: bool = True) -> None:
        started = time.monotonic()
        self.config = config
        try:
            self.model = _windowed_model_class()(
                config.window_s * _FRAMES_PER_S,
                model_source,
                device="cpu",
                compute_type=config.compute_type,
                cpu_threads=config.threads,
                local_files_only=local_files_only,
            )
        except (RuntimeError, ValueError) as error:  # CTranslate2's errors for unreadable model files
            raise ModelError(
                f"Whisper model {model_source} failed to load ({first_line(error)}): "
                "run voice prepare to check the cached models and rebuild damaged ones"
            ) from None
        logger.info("Loaded Whisper model %s in %.1f s", model_source, time.monotonic() - started)

    def transcribe(self, audio: np.ndarray) -> Transcript:
        """Transcribe 16 kHz mono float32 audio; blocking, so call it from a worker thread."""
        duration_s = len(audio) / 16_000
        voiced_ms, rejected = check_speech(audio, self.config)
        if rejected is not None:
            return rejected

        # Whisper gets the audio peak-normalized too. Without it, a quiet "capital of
        # France" came out as "capital of friends" at some of the endpointer's cuts. Over
        # the spoken fixtures cut as live mode cuts them, word errors fell from 7.5% to 6.5%.
        segments, _info = self.model.transcribe(
            normalize_peak(audio),
            language=self.config.language or None,
            beam_size=self.config.beam_size,
            vad_filter=True,
            condition_on_previous_text=False,
            no_speech_threshold=self.config.no_speech_threshold,
            log_prob_threshold=self.config.log_prob_threshold,
            compression_ratio_threshold=_MAX_COMPRESSION_RATIO,
        )
        kept = []
        details = []
        # faster-whisper's segments are a lazy generator: the decoding happens here.
        for segment in segments:
            detail = {
                "text": segment.text.strip(),
                "start_s": round(segment.start, 2),
                "end_s": round(segment.end, 2),
                "no_speech_prob": round(segment.no_speech_prob, 3),
                "avg_logprob": round(segment.avg_logprob, 3),
            }
            details.append(detail)
            if self._is_noise(segment):
                logger.debug("Dropped segment %r (no_speech_prob %.2f, avg_logprob %.2f)", detail["text"], segment.no_speech_prob, segment.avg_logprob)
                continue
            kept.append(segment)

        text = " ".join(segment.text.strip() for segment in kept).strip()
        if not details:
            return Transcript("", "the Silero voice activity detector found no speech", duration_s, voiced_ms)
        if not _has_words(text):
            return Transcript("", "Whisper rated every segment as non-speech", duration_s, voiced_ms, details)
        best_log_prob = max(segment.avg_logprob for segment in kept)
        if is_phantom_phrase(text) and best_log_prob < _PHANTOM_TRUSTED_LOG_PROB:
            return Transcript("", f"{text!r} is a phrase Whisper invents on silence and noise, and it was not confident", duration_s, voiced_ms, details)
        return Transcript(text, "", duration_s, voiced_ms, details)

    def _is_noise(self, segment) -> bool:
        if segment.compression_ratio > _MAX_COMPRESSION_RATIO:
            return True
        return (
            segment.no_speech_prob > self.config.no_speech_threshold
            and segment.avg_logprob < self.config.log_prob_threshold
        )


def encoder_frames(content_frames: int, min_frames: int) -> int:
    """Return how many log-mel frames Whisper's encoder gets for ``content_frames`` of audio.

    At least ``min_frames``; a longer recording keeps 2 s of the padding after it. Whole
    seconds, at most the 30-second window Whisper was trained on.
    """
    frames = max(min_frames, content_frames + _WINDOW_MARGIN_FRAMES)
    frames = -(-frames // _FRAMES_PER_S) * _FRAMES_PER_S
    return min(frames, _MAX_FRAMES)


def _windowed_model_class():
    """Return a faster-whisper model class whose encoder skips most of the padding.

    faster-whisper pads every recording to a 30-second window, and the encoder's cost
    grows with the window. CTranslate2 encodes a shorter window as whisper.cpp's
    audio_ctx does, by using the first positions only. The 23 spoken fixtures were cut by
    live mode's endpointer after 4 different lead-ins. On 2 Xeon cores in float32, their
    median greedy transcription took 0.82 s with 30 s and 0.42 s with 15 s, and word errors
    rose from 6.3% to 7.0%. Windows that end right after the speech (a few hundred
    milliseconds of padding) made more errors and once sent the decoder into a
    14-second repetition loop.
    """
    from faster_whisper import WhisperModel

    class WindowedWhisperModel(WhisperModel):
        def __init__(self, min_frames: int, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.min_frames = min_frames

        def encode(self, features: np.ndarray):
            # pad_or_trim pads with zeros. A frame of the recording that is all zeros at its
            # end is silence too, so counting it as padding changes nothing.
            voiced = np.flatnonzero(np.any(features != 0, axis=tuple(range(features.ndim - 1))))
            content_frames = int(voiced[-1]) + 1 if len(voiced) else 0
            return super().encode(features[..., : encoder_frames(content_frames, self.min_frames)])

    return WindowedWhisperModel


def check_speech(audio: np.ndarray, config: AsrConfig) -> tuple[int, Transcript | None]:
    """Return the longest voiced run of 16 kHz audio in ms, and a no-speech Transcript when it is under ``min_speech_ms``.

    Needs webrtcvad only, so callers can reject silence and noise before loading Whisper.
    """
    voiced_ms = longest_voiced_run_ms(normalize_peak(audio), config.vad_aggressiveness)
    if voiced_ms >= config.min_speech_ms:
        return voiced_ms, None
    reason = f"the longest stretch of speech was {voiced_ms} ms, under asr.min_speech_ms ({config.min_speech_ms} ms)"
    return voiced_ms, Transcript("", reason, len(audio) / 16_000, voiced_ms)


def _has_words(text: str) -> bool:
    return re.search(r"\w", text) is not None
