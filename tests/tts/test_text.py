"""Tests for speech text cleaning and streamed chunking."""

from __future__ import annotations

import random
import re

import pytest

from voice.config import TtsConfig
from voice.tts.text import SpeechChunker, clean_for_speech

# ---------------------------------------------------------------------------
# clean_for_speech


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # Markdown emphasis and structure
        ("This is **bold** text", "This is bold text"),
        ("This is *italic* text", "This is italic text"),
        ("This is __strong__ and _light_ text", "This is strong and light text"),
        ("***both*** at once", "both at once"),
        ("~~old~~ new", "old new"),
        ("Call my_function now", "Call my function now"),
        ("# Title\nBody text.", "Title. Body text."),
        ("### Closed heading ###\nNext.", "Closed heading. Next."),
        ("#hashtag", "hashtag"),
        ("- apples\n- pears", "apples. pears"),
        ("* one\n+ two\n• three", "one. two. three"),
        ("1. first\n2) second\n10. tenth", "first. second. tenth"),
        ("- [ ] open task\n- [x] done task", "open task. done task"),
        ("2024 was a good year.", "2024 was a good year."),
        ("> quoted line\n> more", "quoted line. more"),
        ("Above\n---\nBelow", "Above. Below"),
        ("| Name | Age |\n|------|:---:|\n| Bob | 42 |", "Name, Age. Bob, 42"),
        # Code
        ("Run `pip install voice` first.", "Run pip install voice first."),
        ("Here:\n```python\nprint('hi')\n```\nDone.", "Here: Done."),
        ("Here:\n~~~\ncode line\n~~~\nDone.", "Here: Done."),
        ("Start.\n```\nnever closed", "Start."),
        ("  ```js\n  let x = 1;\n  ```\nAfter.", "After."),
        ("```x``` is inline code", "x is inline code"),
        # Links, URLs, HTML and special tokens
        ("Read [the guide](https://example.com/guide) today.", "Read the guide today."),
        ("See [wiki](https://en.wikipedia.org/wiki/Cat_(animal)) now.", "See wiki now."),
        ("![a diagram](img.png) shows it.", "a diagram shows it."),
        ("Read [the guide][1] today.\n\n[1]: https://example.com", "Read the guide today."),
        ("Visit https://example.com/a?b=c for more.", "Visit for more."),
        ("Go to www.example.org.", "Go to."),
        ("Open <https://example.com> now.", "Open now."),
        ("Facts[1] matter.", "Facts matter."),
        ("<b>Hello</b> <i>there</i>.", "Hello there."),
        ("Line one<br>Line two", "Line one. Line two"),
        ("Tom &amp; Jerry", "Tom and Jerry"),
        ("Answer.<|im_end|>", "Answer."),
        ("Answer.</s>", "Answer."),
        ("<!-- hidden --> Shown.", "Shown."),
        # Emoji and pictographs
        ("Great job! 🎉", "Great job!"),
        ("Thumbs 👍🏽 up", "Thumbs up"),
        ("Family 👨‍👩‍👧 time", "Family time"),
        ("Heart ❤️ and star ★", "Heart and star"),
        ("Flag 🇫🇷 here", "Flag here"),
        ("Python™ rocks", "Python rocks"),
        # Symbols spoken as words
        ("Salt & pepper", "Salt and pepper"),
        ("Battery at 50%", "Battery at 50 percent"),
        ("It is 20°C outside", "It is 20 degrees Celsius outside"),
        ("It is 68 °F outside", "It is 68 degrees Fahrenheit outside"),
        ("Turn 90° left", "Turn 90 degrees left"),
        ("Boiling at 100℃", "Boiling at 100 degrees Celsius"),
        ("2 + 2 = 4", "2 plus 2 equals 4"),
        ("3*4 and 3 * 4", "3 times 4 and 3 times 4"),
        ("6 × 7", "6 times 7"),
        ("2^10 and 2**3", "2 to the power of 10 and 2 to the power of 3"),
        ("8 ÷ 2 and 10 / 5", "8 divided by 2 and 10 divided by 5"),
        ("Due 12/05/2024, half is 1/2, speed in km/h", "Due 12/05/2024, half is 1/2, speed in km/h"),
        ("It costs $5", "It costs 5 dollars"),
        ("Only $1 today", "Only 1 dollar today"),
        ("Pay $1,250.50 now", "Pay 1,250.50 dollars now"),
        ("A $2 billion deal", "A 2 billion dollars deal"),
        ("€30 or £12", "30 euros or 12 pounds"),
        ("It is 10€", "It is 10 euros"),
        ("~5 minutes", "about 5 minutes"),
        ("≈ 3 hours", "about 3 hours"),
        ("Input -> output → result", "Input to output to result"),
        ("x >= 5, y <= 2, z != 3", "x greater than or equal to 5, y less than or equal to 2, z does not equal 3"),
        ("a < b and c > d", "a less than b and c greater than d"),
        ("±2 degrees", "plus or minus 2 degrees"),
        ("C# and F#", "C sharp and F sharp"),
        ("Ranked #1", "Ranked number 1"),
        # Numbers stay as digits
        ("Pi is about 3.14159.", "Pi is about 3.14159."),
        ("Pay .5 more", "Pay .5 more"),
        ("It is -5 outside.", "It is -5 outside."),
        ("Call at 10:30, not 1,000 times.", "Call at 10:30, not 1,000 times."),
        # Whitespace, newlines and punctuation
        ("Hello   world\t\tagain", "Hello world again"),
        ("No punctuation here\nNext line", "No punctuation here. Next line"),
        ("Ends with comma,\nnext", "Ends with comma, next"),
        ("Question?\nAnswer!\n", "Question? Answer!"),
        ("Title\n\n\nParagraph.", "Title. Paragraph."),
        ("Wait... what?!", "Wait... what?!"),
        ("Done! 🎉.", "Done!"),
        ("More (see https://x.com) here", "More (see) here"),
        ("Windows\r\nline ends", "Windows. line ends"),
        # Nothing speakable
        ("", ""),
        ("   \n\t ", ""),
        ("...!!! ???", ""),
        ("🎉🎉", ""),
        ("```\ncode only\n```", ""),
        ("<|im_end|>", ""),
        ("---", ""),
    ],
    ids=lambda value: value[:30] if isinstance(value, str) else None,
)
def test_clean_for_speech(text: str, expected: str) -> None:
    assert clean_for_speech(text) == expected


def test_clean_for_speech_no_markup_left() -> None:
    text = "# Plan\n**Step** one: see [docs](http://a.b/c), run `make` & wait ~5 min 🎉\n| a | b |"

    cleaned = clean_for_speech(text)

    for symbol in "#*[]()`&~|🎉":
        assert symbol not in cleaned
    assert "http" not in cleaned


# ---------------------------------------------------------------------------
# SpeechChunker helpers and sample replies


def chunk_stream(text: str, fragment_size: int | None = None, **options: int) -> list[str]:
    chunker = SpeechChunker(**options)
    chunks: list[str] = []
    if fragment_size is None:
        chunks += chunker.push(text)
    else:
        for start in range(0, len(text), fragment_size):
            chunks += chunker.push(text[start : start + fragment_size])
    chunks += chunker.flush()
    return chunks


def words(text: str) -> list[str]:
    return [token for token in text.split() if any(char.isalnum() for char in token)]


REPLIES = {
    "plain": "Paris is the capital of France. It has about 2.1 million people! Do you want to know more?",
    "first-clause": "Well, the capital of France, which is Paris, is lovely. It is old, big and busy.",
    "abbreviations": (
        "Mr. Smith met Dr. Jones at 5 p.m. today. They discussed fruit, e.g. apples, i.e. the red ones, "
        "vs. pears etc. and more. J. R. R. Tolkien wrote it. Prices rose, etc. The end."
    ),
    "markdown": (
        "## Steps\n\n1. Open the **settings** menu.\n2. Choose *Audio*.\n3. Set the rate to 16 kHz\n\n"
        "| Option | Value |\n|---|---|\n| rate | 16000 |\n\nSee [the docs](https://example.com/docs) for more 🎉."
    ),
    "code": (
        "Here is an example:\n```python\ndef add(a, b):\n    return a + b. # not speech\n```\n"
        "Call it with two numbers. It returns the sum!\n~~~\nmore code\n~~~\nDone."
    ),
    "symbols": "It is 20°C & sunny, with a 30% chance of rain. Tickets cost $15 -> about €14. 2 + 2 = 4.",
    "long": (
        "This sentence keeps going without any full stop because the model likes to ramble on and on "
        "about many things such as weather, trains, music, history, cooking and gardening while never "
        "quite reaching a conclusion that would let a simple splitter find a natural place to break it "
        "and so it must be cut somewhere sensible before the limit is reached. Short one."
    ),
    "newlines": "First line without stop\nSecond line.\n\nThird paragraph, with a clause\n- bullet a\n- bullet b",
    "quotes": 'He said "Stop." Then she asked (quietly) "Why?" and left. The end...',
    "tokens": "The answer is 42.<|im_end|>",
}


@pytest.mark.parametrize("fragment_size", [1, 2, 3, 7])
@pytest.mark.parametrize("name", sorted(REPLIES))
def test_chunker_fragment_size_independent(name: str, fragment_size: int) -> None:
    text = REPLIES[name]
    assert chunk_stream(text, fragment_size) == chunk_stream(text)


@pytest.mark.parametrize("fragment_size", [1, 3])
@pytest.mark.parametrize("name", sorted(REPLIES))
def test_chunker_fragments_small_limit(name: str, fragment_size: int) -> None:
    text = REPLIES[name]
    assert chunk_stream(text, fragment_size, max_chunk_chars=40) == chunk_stream(text, max_chunk_chars=40)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("name", sorted(REPLIES))
def test_chunker_random_fragments(name: str, seed: int) -> None:
    text = REPLIES[name]
    generator = random.Random(seed)
    chunker = SpeechChunker()
    chunks: list[str] = []
    start = 0
    while start < len(text):
        size = generator.randint(1, 12)
        chunks += chunker.push(text[start : start + size])
        start += size
    chunks += chunker.flush()

    assert chunks == chunk_stream(text)


@pytest.mark.parametrize("name", sorted(REPLIES))
def test_chunker_preserves_cleaned_words(name: str) -> None:
    text = REPLIES[name]

    chunks = chunk_stream(text)

    assert words(" ".join(chunks)) == words(clean_for_speech(text))


@pytest.mark.parametrize("name", sorted(REPLIES))
def test_chunker_chunks_clean_and_bounded(name: str) -> None:
    for chunk in chunk_stream(REPLIES[name]):
        assert chunk
        assert chunk == chunk.strip()
        assert len(chunk) <= 220
        assert clean_for_speech(chunk) == chunk


# ---------------------------------------------------------------------------
# SpeechChunker boundaries


def test_chunker_sentences() -> None:
    assert chunk_stream(REPLIES["plain"]) == [
        "Paris is the capital of France.",
        "It has about 2.1 million people!",
        "Do you want to know more?",
    ]


def test_chunker_waits_for_whitespace() -> None:
    chunker = SpeechChunker()

    assert chunker.push("Hello there.") == []
    assert chunker.push(" ") == ["Hello there."]
    assert chunker.push("Bye now!") == []
    assert chunker.flush() == ["Bye now!"]


def test_chunker_decimal_not_split() -> None:
    chunker = SpeechChunker()

    assert chunker.push("The value is 3.") == []
    assert chunker.push("5 today. Next") == ["The value is 3.5 today."]
    assert chunker.flush() == ["Next"]


@pytest.mark.parametrize(
    "text",
    [
        "Mr. Smith is here.",
        "Mrs. Brown is here.",
        "Dr. Jones is here.",
        "St. Louis is far.",
        "Bring fruit e.g. apples today.",
        "Bring fruit i.e. apples today.",
        "It was cats vs. dogs today.",
        "Bring pens etc. and paper.",
        "The U.S. economy grew.",
        "J. K. Rowling wrote it.",
        "Meet at 5 p.m. tomorrow.",
        "See fig. 3 for details.",
    ],
)
def test_chunker_abbreviation_not_split(text: str) -> None:
    assert chunk_stream(text, first_chunk_min_words=50) == [text]


def test_chunker_abbreviation_then_capital_splits() -> None:
    assert chunk_stream("Bring pens etc. The rest is here.", first_chunk_min_words=50) == [
        "Bring pens etc.",
        "The rest is here.",
    ]


def test_chunker_abbreviation_waits_for_next_word() -> None:
    chunker = SpeechChunker()

    assert chunker.push("We sell pens etc. ") == []
    assert chunker.push("The shop") == ["We sell pens etc."]


def test_chunker_pronoun_i_ends_sentence() -> None:
    assert chunk_stream("So did I. Then we left.") == ["So did I.", "Then we left."]


def test_chunker_first_chunk_clause_break() -> None:
    assert chunk_stream(REPLIES["first-clause"]) == [
        "Well, the capital of France,",
        "which is Paris, is lovely.",
        "It is old, big and busy.",
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "I don't have the ability to know the current weather.",
            ["I don't have", "the ability to know the current weather."],
        ),
        # Two words before "the" are too few; "by" comes after enough.
        (
            "Photosynthesis is the process by which plants make food. Done.",
            ["Photosynthesis is the process", "by which plants make food.", "Done."],
        ),
        ("The capital of France is Paris.", ["The capital of France is Paris."]),
        # A comma after enough words still ends the first chunk first.
        ("Sure, I can help with that, gladly.", ["Sure, I can help", "with that, gladly."]),
        ("Well, that depends, honestly.", ["Well, that depends,", "honestly."]),
        # "then" starts no phrase, and "there" is not "the".
        ("I went there then came back.", ["I went there then came back."]),
        # Not after another phrase word, inside a number range or inside a quotation.
        ("Light travels at about 300,000 kilometers per second.", ["Light travels at about 300,000 kilometers per second."]),
        ("It was about 3 to 4 hours.", ["It was about 3 to 4 hours."]),
        ('He said "to be or not to be" and then left.', ['He said "to be or not to be"', "and then left."]),
        # The next chunk never starts with a lone phrase word.
        ("Who are you talking to", ["Who are you talking to"]),
        ("I went home and\nthe dog barked.", ["I went home and.", "the dog barked."]),
    ],
)
def test_chunker_first_chunk_phrase_break(text: str, expected: list[str]) -> None:
    assert chunk_stream(text, first_chunk_at_phrase=True) == expected
    assert chunk_stream(text, fragment_size=1, first_chunk_at_phrase=True) == expected


def test_chunker_phrase_break_from_config() -> None:
    text = "I don't have the ability to know the current weather."
    config = TtsConfig()
    assert config.first_chunk_at_phrase
    streamed = SpeechChunker.from_config(config)
    assert streamed.push(text) + streamed.flush() == ["I don't have", "the ability to know the current weather."]
    # Text known whole in advance (voice say) gains nothing from the cut.
    whole = SpeechChunker.from_config(config, streamed=False)
    assert whole.push(text) + whole.flush() == [text]


def test_chunker_phrase_break_only_first_chunk() -> None:
    text = "Paris is lovely. It is the capital of France and the largest city."
    assert chunk_stream(text, first_chunk_at_phrase=True) == ["Paris is lovely.", "It is the capital of France and the largest city."]
    assert chunk_stream(text) == chunk_stream(text, first_chunk_at_phrase=True)


@pytest.mark.parametrize("fragment_size", [1, 2, 5])
@pytest.mark.parametrize("name", sorted(REPLIES))
def test_chunker_phrase_break_fragment_independent(name: str, fragment_size: int) -> None:
    text = REPLIES[name]
    whole = chunk_stream(text, first_chunk_at_phrase=True)
    assert chunk_stream(text, fragment_size, first_chunk_at_phrase=True) == whole
    assert words(" ".join(whole)) == words(" ".join(chunk_stream(text)))


def test_chunker_first_clause_needs_min_words() -> None:
    assert chunk_stream("Yes, sure, of course, I can help.") == ["Yes, sure, of course,", "I can help."]
    assert chunk_stream("Yes, sure.", first_chunk_min_words=3) == ["Yes, sure."]


@pytest.mark.parametrize(
    ("text", "first"),
    [
        ("The answer is simple; it works. Fine.", "The answer is simple;"),
        ("Here is the plan: we go. Fine.", "Here is the plan:"),
        ("The answer is simple - it works. Fine.", "The answer is simple -"),
        ("The answer is simple—it works. Fine.", "The answer is simple—"),
    ],
    ids=["semicolon", "colon", "spaced-hyphen", "em-dash"],
)
def test_chunker_first_clause_marks(text: str, first: str) -> None:
    assert chunk_stream(text)[0] == first


def test_chunker_first_clause_only_once() -> None:
    chunks = chunk_stream("Sure. Then, as you asked, we will go, slowly and calmly.")

    assert chunks == ["Sure.", "Then, as you asked, we will go, slowly and calmly."]


@pytest.mark.parametrize(
    "text",
    ["There were 1,000 people there.", "We meet at 10:30 sharp today.", "It is a well-known fact today."],
)
def test_chunker_no_clause_without_space(text: str) -> None:
    assert chunk_stream(text, first_chunk_min_words=1) == [text]


def test_chunker_clause_waits_for_space() -> None:
    chunker = SpeechChunker()

    assert chunker.push("There were many people,") == []
    assert chunker.push(" so") == ["There were many people,"]


def test_chunker_newline_ends_chunk() -> None:
    chunker = SpeechChunker()

    assert chunker.push("## Heading") == []
    assert chunker.push("\nBody text") == ["Heading."]
    assert chunker.flush() == ["Body text"]


def test_chunker_numbered_list_not_split() -> None:
    text = "Steps:\n1. Open it.\n2. Close it.\n"

    assert chunk_stream(text) == ["Steps:", "Open it.", "Close it."]


def test_chunker_max_length_split() -> None:
    chunks = chunk_stream(REPLIES["long"], max_chunk_chars=80)

    assert len(chunks) > 3
    for chunk in chunks:
        assert len(chunk) <= 80
    assert words(" ".join(chunks)) == words(clean_for_speech(REPLIES["long"]))
    # Cuts fall between words, never inside one.
    original_words = {token.strip(",.") for token in REPLIES["long"].split()}
    for chunk in chunks:
        for token in words(chunk):
            assert token.strip(",.") in original_words


def test_chunker_max_length_prefers_clause() -> None:
    text = "alpha beta gamma delta, epsilon zeta eta theta iota kappa lambda mu"

    chunks = chunk_stream(text, max_chunk_chars=40, first_chunk_min_words=50)

    assert chunks[0] == "alpha beta gamma delta,"


def test_chunker_max_length_hard_cut() -> None:
    token = "x" * 50

    chunks = chunk_stream(token, max_chunk_chars=20)

    assert chunks == ["x" * 20, "x" * 20, "x" * 10]


def test_chunker_max_length_after_expansion() -> None:
    # Each "5%" becomes "5 percent", so the cleaned chunk outgrows the raw one.
    text = "5% " * 20 + "done."

    chunks = chunk_stream(text, max_chunk_chars=60)

    for chunk in chunks:
        assert len(chunk) <= 60
    assert words(" ".join(chunks)) == words(clean_for_speech(text))


def test_chunker_long_text_emitted_while_streaming() -> None:
    chunker = SpeechChunker(max_chunk_chars=50)

    chunks = chunker.push("word " * 30)

    assert chunks
    for chunk in chunks:
        assert len(chunk) <= 50


def test_chunker_flush_returns_tail() -> None:
    chunker = SpeechChunker()

    assert chunker.push("First sentence here. And an unfinished") == ["First sentence here."]
    assert chunker.flush() == ["And an unfinished"]
    assert chunker.flush() == []


def test_chunker_flush_resets_state() -> None:
    chunker = SpeechChunker()
    chunker.push("Well, one reply here. ")
    chunker.push("```\nopen fence")
    chunker.flush()

    assert chunker.push("Next reply, with a clause, ok") == ["Next reply, with a clause,"]
    assert chunker.flush() == ["ok"]


def test_chunker_fence_across_fragments() -> None:
    fragments = ["Example", ":\n`", "`", "`py", "thon\nsecret = 1. Hidden", " text.\n", "``", "`\nVisible", " again."]
    chunker = SpeechChunker()
    chunks: list[str] = []

    for fragment in fragments:
        chunks += chunker.push(fragment)
    chunks += chunker.flush()

    assert chunks == ["Example:", "Visible again."]
    assert not any("secret" in chunk or "Hidden" in chunk or "python" in chunk for chunk in chunks)


def test_chunker_unclosed_fence_dropped() -> None:
    chunker = SpeechChunker()

    assert chunker.push("Look:\n~~~\nprint(1). Still code.\n") == ["Look:"]
    assert chunker.push("more code. ") == []
    assert chunker.flush() == []


def test_chunker_fence_with_crlf_line_ends() -> None:
    assert chunk_stream("A:\r\n```\r\ncode\r\n```\r\nB.") == ["A:", "B."]


def test_chunker_fence_needs_matching_close() -> None:
    text = "A:\n````\ninner\n```\nstill code\n````\nB."

    assert chunk_stream(text) == ["A:", "B."]


def test_chunker_special_token_dropped() -> None:
    assert chunk_stream(REPLIES["tokens"]) == ["The answer is 42."]


@pytest.mark.parametrize("text", ["", "   ", "\n\n", "...", "!?!", "🎉 👍", "```\ncode\n```", "- \n* \n"])
def test_chunker_nothing_speakable(text: str) -> None:
    for fragment_size in (None, 1):
        assert chunk_stream(text, fragment_size) == []


@pytest.mark.parametrize(
    ("options", "name"), [({"first_chunk_min_words": 0}, "first"), ({"max_chunk_chars": 0}, "max")]
)
def test_chunker_rejects_invalid_options(options: dict[str, int], name: str) -> None:
    with pytest.raises(ValueError, match=re.escape(name)):
        SpeechChunker(**options)
