"""Phrases Whisper tends to invent on silence, noise or music."""

from __future__ import annotations

import re

# Collected from Whisper's behaviour on near-silent input: subtitle credits and
# sign-offs from its training data. Matched on the whole transcript, case and
# punctuation ignored.
PHANTOM_PHRASES = frozenset(
    {
        "thank you",
        "thank you very much",
        "thanks",
        "thanks for watching",
        "thank you for watching",
        "thanks for watching and see you next time",
        "please subscribe",
        "subscribe to my channel",
        "like and subscribe",
        "see you next time",
        "see you in the next video",
        "bye",
        "bye bye",
        "goodbye",
        "you",
        "oh",
        "hmm",
        "uh",
        "um",
        "so",
        "okay",
        "music",
        "applause",
        "silence",
        "subtitles by the amaraorg community",
        "transcribed by otterai",
    }
)


def normalize(text: str) -> str:
    return re.sub(r"[^a-z0-9 ]+", "", text.lower().replace("-", " ")).strip()


def is_phantom_phrase(text: str) -> bool:
    """Return True when the transcript is nothing but phantom phrases (repeats included)."""
    words = normalize(text)
    if not words:
        return True
    sentences = [normalize(part) for part in re.split(r"[.!?,]+", text) if normalize(part)]
    return all(sentence in PHANTOM_PHRASES for sentence in sentences)
