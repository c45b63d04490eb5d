"""Word error rate and the normalization both sides get before words are compared."""

from __future__ import annotations

import pytest

from voice.bench.wer import normalize, number_words, word_error_rate, word_errors


@pytest.mark.parametrize(
    ("number", "words"),
    [(0, "zero"), (7, "seven"), (19, "nineteen"), (40, "forty"), (96, "ninety six"), (100, "one hundred"),
     (1205, "one thousand two hundred five"), (2_000_000, "two million")],
)
def test_number_words(number, words):
    assert number_words(number) == words


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("Set a timer for 10 minutes.", "set a timer for ten minutes"),
        ("Set the alarm for 7:30 tomorrow morning.", "set the alarm for seven thirty tomorrow morning"),
        ("Remind me to call Mom at 5 o'clock.", "remind me to call mom at five o'clock"),
        ("Call me at 9:05", "call me at nine oh five"),
        ("What's 12 times 8?", "what's twelve times eight"),
        ("It is 1,500.5 meters", "it is one thousand five hundred point five meters"),
        ('"Quoted", she said - twice!', "quoted she said twice"),
    ],
)
def test_normalize(text, words):
    assert normalize(text) == words.split()


def test_spelling_differences_are_not_errors():
    assert word_errors("Set a timer for ten minutes.", "Set a timer for 10 minutes") == (0, 6)


def test_substitution_deletion_and_insertion_each_count_once():
    assert word_errors("turn on the kitchen lights", "turn of the lights please") == (3, 5)


def test_corpus_rate_weights_by_reference_words():
    pairs = [("one two three four", "one two three four"), ("stop", "top")]
    assert word_error_rate(pairs) == pytest.approx(1 / 5)


def test_empty_corpus_has_no_rate():
    assert word_error_rate([]) is None
