"""Word error rate of a transcript against its reference, after normalizing both.

Whisper writes "Set a timer for 10 minutes." where the reference has "ten", and
"7:30" for "seven thirty"; counting those as errors would measure spelling, not
recognition. Both texts are lowercased, numbers are spelled out, and punctuation other
than apostrophes inside words is dropped before words are compared.
"""

from __future__ import annotations

import re

_ONES = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen".split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_words(number: int) -> str:
    """Spell out ``number`` (0 to 999,999,999) in words: 1205 -> "one thousand two hundred five"."""
    if number < 20:
        return _ONES[number]
    if number < 100:
        tens, ones = divmod(number, 10)
        return _TENS[tens] + (f" {_ONES[ones]}" if ones else "")
    if number < 1000:
        hundreds, rest = divmod(number, 100)
        return f"{_ONES[hundreds]} hundred" + (f" {number_words(rest)}" if rest else "")
    for size, name in ((1_000_000, "million"), (1000, "thousand")):
        if number >= size:
            high, rest = divmod(number, size)
            return f"{number_words(high)} {name}" + (f" {number_words(rest)}" if rest else "")
    raise ValueError(number)


def _spell_time(match: re.Match) -> str:
    hours, minutes = int(match.group(1)), int(match.group(2))
    if minutes == 0:
        return f"{number_words(hours)} o'clock"
    return f"{number_words(hours)} {'oh ' if minutes < 10 else ''}{number_words(minutes)}"


def _spell_number(match: re.Match) -> str:
    digits = match.group(0).replace(",", "")
    if "." in digits:
        whole, fraction = digits.split(".", 1)
        return f"{number_words(int(whole))} point {' '.join(_ONES[int(digit)] for digit in fraction)}"
    value = int(digits)
    return number_words(value) if value < 1_000_000_000 else " ".join(_ONES[int(digit)] for digit in digits)


def normalize(text: str) -> list[str]:
    """Return the words of ``text`` in the form both sides are compared in."""
    text = text.lower().replace("%", " percent")
    text = re.sub(r"\b(\d{1,2}):(\d{2})\b", _spell_time, text)
    text = re.sub(r"\d[\d,]*(?:\.\d+)?", _spell_number, text)
    text = re.sub(r"(?<![a-z])'|'(?![a-z])", " ", text)  # quotes, not the apostrophe of "what's"
    text = re.sub(r"[^a-z0-9' ]+", " ", text)
    return text.split()


def word_errors(reference: str, hypothesis: str) -> tuple[int, int]:
    """Return (substitutions + deletions + insertions, reference word count) after normalizing both."""
    expected, recognized = normalize(reference), normalize(hypothesis)
    previous = list(range(len(recognized) + 1))
    for row, word in enumerate(expected, start=1):
        current = [row]
        for column, other in enumerate(recognized, start=1):
            current.append(min(previous[column] + 1, current[column - 1] + 1, previous[column - 1] + (word != other)))
        previous = current
    return previous[-1], len(expected)


def word_error_rate(pairs: list[tuple[str, str]]) -> float | None:
    """Corpus word error rate over (reference, hypothesis) pairs: total errors over total reference words."""
    errors = words = 0
    for reference, hypothesis in pairs:
        wrong, count = word_errors(reference, hypothesis)
        errors += wrong
        words += count
    return errors / words if words else None
