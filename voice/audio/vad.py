"""Voice activity detection with webrtcvad on 16 kHz mono audio."""

from __future__ import annotations

import numpy as np
import webrtcvad

SAMPLE_RATE = 16_000
FRAME_MS = 30
"""webrtcvad accepts 10, 20 or 30 ms frames."""
FRAME_SAMPLES = SAMPLE_RATE * FRAME_MS // 1000


def to_pcm16(samples: np.ndarray) -> bytes:
    """Convert float samples in [-1, 1] to little-endian 16-bit PCM bytes."""
    return (np.clip(samples, -1.0, 1.0) * 32767.0).round().astype("<i2").tobytes()


def normalize_peak(samples: np.ndarray, peak: float = 0.5, max_gain_db: float = 30.0) -> np.ndarray:
    """Scale audio so its peak reaches ``peak``, amplifying by at most ``max_gain_db``.

    webrtcvad's decisions depend on level: speech peaking at -30 dBFS passed as only
    210 ms of voiced audio, and 1440 ms once normalized. The gain cap keeps a near-silent
    line from being raised into loud noise.
    """
    current = float(np.max(np.abs(samples))) if samples.size else 0.0
    if current == 0.0:
        return samples
    gain = min(peak / current, 10.0 ** (max_gain_db / 20.0))
    return (samples * gain).astype(np.float32)


def voiced_frames(samples: np.ndarray, aggressiveness: int) -> np.ndarray:
    """Return one bool per 30 ms frame of 16 kHz audio: True where webrtcvad hears speech."""
    vad = webrtcvad.Vad(aggressiveness)
    pcm = to_pcm16(samples)
    frame_bytes = FRAME_SAMPLES * 2
    count = len(pcm) // frame_bytes
    return np.array(
        [vad.is_speech(pcm[i * frame_bytes : (i + 1) * frame_bytes], SAMPLE_RATE) for i in range(count)],
        dtype=bool,
    )


def longest_voiced_run_ms(samples: np.ndarray, aggressiveness: int, max_gap_frames: int = 3) -> int:
    """Return the longest stretch of speech in milliseconds, bridging gaps of a few frames.

    Noise makes webrtcvad fire on scattered frames; speech gives runs of hundreds of
    milliseconds, so the longest run separates the two better than a plain frame count.
    """
    longest = current = gap = 0
    for voiced in voiced_frames(samples, aggressiveness):
        if voiced:
            current += 1 + gap
            gap = 0
            longest = max(longest, current)
        elif current:
            gap += 1
            if gap > max_gap_frames:
                current = gap = 0
    return longest * FRAME_MS
