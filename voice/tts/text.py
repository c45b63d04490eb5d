"""Turn language-model text into speakable phrases, and cut a streamed reply into TTS chunks."""

from __future__ import annotations

import html
import logging
import re
import unicodedata

logger = logging.getLogger(__name__)

# --- Markup that spans lines or wraps text, removed before the per-line pass --------------------

_SPECIAL_TOKEN = re.compile(r"<\|[^<>|]*\|>")
_HTML_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
_HTML_BREAK = re.compile(r"<br\s*/?>", re.IGNORECASE)
_AUTOLINK = re.compile(r"<(?:https?|ftp|mailto):[^<>\s]*>", re.IGNORECASE)
_HTML_TAG = re.compile(r"</?[A-Za-z][\w-]*(?:\s[^<>]*)?/?>")
_MARKDOWN_ESCAPE = re.compile(r"\\(?=[!-/:-@\[-`{-~])")
_IMAGE = re.compile(r"!\[([^\]\n]*)\]\((?:[^()\s]|\([^()\s]*\))*(?:\s+\"[^\"]*\")?\)")
_LINK = re.compile(r"\[([^\]\n]+)\]\((?:[^()\s]|\([^()\s]*\))*(?:\s+\"[^\"]*\")?\)")
_REFERENCE_LINK = re.compile(r"\[([^\]\n]+)\]\[[^\]\n]*\]")
_FOOTNOTE = re.compile(r"\[\^?\d+\]")
# A bare URL ends before trailing sentence punctuation, so "see example.com." keeps its full stop.
_URL = re.compile(r"\b(?:https?://|ftp://|www\.)[^\s<>\"'\])]*[^\s<>\"'\]).,;:!?]", re.IGNORECASE)

# --- Line structure, applied only where a line really starts -------------------------------------

_HORIZONTAL_RULE = re.compile(r"^\s*([-*_])(?:\s*\1){2,}\s*$")
_TABLE_SEPARATOR = re.compile(r"^\s*\|?\s*:?-{3,}:?\s*(?:\|\s*:?-{3,}:?\s*)*\|?\s*$")
_REFERENCE_DEFINITION = re.compile(r"^\s*\[[^\]]+\]:\s*\S+")
_HEADING = re.compile(r"^\s{0,3}#{1,6}(?:\s+|$)")
_CLOSING_HASHES = re.compile(r"\s+#+\s*$")
_BLOCKQUOTE = re.compile(r"^\s*(?:>\s?)+")
# Numbered markers stop at three digits, so a line that opens with a year keeps its number.
_LIST_MARKER = re.compile(r"^\s*(?:[-*+•‣◦▪]|\d{1,3}[.)])\s+(?:\[[ xX]\]\s+)?")
_TABLE_EDGE_PIPES = re.compile(r"^\s*\||\|\s*$")

# --- Inline markup -------------------------------------------------------------------------------

_INLINE_CODE = re.compile(r"(`+)(.+?)\1")
_STRIKETHROUGH = re.compile(r"~~(?=\S)(.+?)(?<=\S)~~")
_BOLD = re.compile(r"\*\*(?=\S)(.+?)(?<=\S)\*\*")
_BOLD_UNDERSCORE = re.compile(r"(?<!\w)__(?=\S)(.+?)(?<=\S)__(?!\w)")
_ITALIC = re.compile(r"(?<![\w*])\*(?=\S)(.+?)(?<=\S)\*(?![\w*])")
_ITALIC_UNDERSCORE = re.compile(r"(?<!\w)_(?=\S)(.+?)(?<=\S)_(?!\w)")
# Characters left over from markup that a voice would read out as symbol names.
_STRAY_MARKUP = re.compile(r"[*_#~`\\\[\]{}<>^•|]")

# --- Symbols spoken as words, applied in this order ----------------------------------------------
# "/" becomes "divided by" only between numbers with spaces around it ("10 / 2"), so dates
# (12/05/2024), fractions (1/2) and units (km/h) stay as written for the TTS front end.

_NUMBER = r"\d[\d,]*(?:\.\d+)?"
_SCALE = r"(?:\s?(?:thousand|million|billion|trillion)\b)?"
_CURRENCY_NAMES = {
    "$": ("dollar", "dollars"), "€": ("euro", "euros"), "£": ("pound", "pounds"), "¥": ("yen", "yen"),
}  # fmt: skip

_SYMBOL_RULES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"-->|->|=>|→|⟶|⇒"), " to "),
    (re.compile(r"<=|≤"), " less than or equal to "),
    (re.compile(r">=|≥"), " greater than or equal to "),
    (re.compile(r"!=|≠"), " does not equal "),
    (re.compile(r"==|="), " equals "),
    (re.compile(r"(?<=\d)\s*(?:\*\*|\^)\s*(?=\d)"), " to the power of "),
    (re.compile(r"(?<=\d)\s*\*\s*(?=\d)|×"), " times "),
    (re.compile(r"÷|(?<=\d)\s+/\s+(?=\d)"), " divided by "),
    (re.compile(r"(?<=\d)\s*\+\s*(?=\d)"), " plus "),
    (re.compile(r"±"), " plus or minus "),
    (re.compile(r"(?<=[\w)])\s+<\s+(?=[\w(])|(?<=\d)<(?=\d)"), " less than "),
    (re.compile(r"(?<=[\w)])\s+>\s+(?=[\w(])|(?<=\d)>(?=\d)"), " greater than "),
    (re.compile(r"≈|~\s*(?=[\d$€£¥])"), " about "),
    (re.compile(r"\s*°\s*C\b|\s*℃"), " degrees Celsius"),
    (re.compile(r"\s*°\s*F\b|\s*℉"), " degrees Fahrenheit"),
    (re.compile(r"\s*°\s*"), " degrees "),
    (re.compile(r"\s*%"), " percent "),
    (re.compile(r"&"), " and "),
    (re.compile(r"\b([CF])#(?!\w)"), r"\1 sharp"),
    (re.compile(r"#(?=\d)"), "number "),
]
_CURRENCY_BEFORE = re.compile(rf"([$€£¥])\s?({_NUMBER})({_SCALE})")
_CURRENCY_AFTER = re.compile(rf"({_NUMBER})({_SCALE})\s?([€£¥])")

# --- Final tidying -------------------------------------------------------------------------------

_SPACE_BEFORE_PUNCTUATION = re.compile(r"\s+([,.;:!?…]+)(?=\s|$)")
_REPEATED_SEPARATOR = re.compile(r"([,;:])(?:\s*[,;:])+")
_SEPARATOR_BEFORE_END = re.compile(r"[,;:]\s*([.!?…])(?=\s|$)")
_SEPARATOR_AFTER_END = re.compile(r"(?:(?<=[!?…])|(?<=[^.]\.))\s*[.,;:](?=\s|$)")
_EMPTY_BRACKETS = re.compile(r"\(\s*\)|\[\s*\]")
_LEADING_PUNCTUATION = re.compile(r"^(?:[\s,;:!?…)]|\.(?!\d))+")
_LINE_END = ".!?…:;,"
_CLOSERS = "\"'”’»)]*_"


def _is_pictograph(char: str) -> bool:
    """Return whether char is an emoji or other symbol (Unicode So, Sk, Cs, Co, Me) that a voice must not read."""
    code = ord(char)
    if char in "\u200d\ufe0e\ufe0f" or 0xE0020 <= code <= 0xE007F:
        return True
    return unicodedata.category(char) in ("So", "Sk", "Cs", "Co", "Me")


def _speak_currency(amount: str, scale: str, symbol: str) -> str:
    singular, plural = _CURRENCY_NAMES[symbol]
    unit = singular if amount == "1" and not scale else plural
    return f"{amount}{scale} {unit}"


def _replace_symbols(line: str) -> str:
    line = _STRIKETHROUGH.sub(r"\1", line)
    line = _CURRENCY_BEFORE.sub(lambda m: _speak_currency(m[2], m[3], m[1]), line)
    line = _CURRENCY_AFTER.sub(lambda m: _speak_currency(m[1], m[2], m[3]), line)
    for pattern, replacement in _SYMBOL_RULES:
        line = pattern.sub(replacement, line)
    return line


def _strip_emphasis(line: str) -> str:
    for pattern in (_BOLD, _BOLD_UNDERSCORE, _ITALIC, _ITALIC_UNDERSCORE):
        line = pattern.sub(r"\1", line)
    # Underscores left inside words (snake_case) become spaces, so "snake_case" reads "snake case".
    return _STRAY_MARKUP.sub(" ", line)


def _clean_line(line: str, at_line_start: bool) -> str:
    if at_line_start:
        if _HORIZONTAL_RULE.match(line) or _TABLE_SEPARATOR.match(line) or _REFERENCE_DEFINITION.match(line):
            return ""
        if _HEADING.match(line):
            line = _CLOSING_HASHES.sub("", _HEADING.sub("", line))
        line = _BLOCKQUOTE.sub("", line)
        line = _LIST_MARKER.sub("", line)
        # Table rows "| a | b |" lose their edge pipes here and read "a, b" below.
        line = _TABLE_EDGE_PIPES.sub("", line)
    line = _INLINE_CODE.sub(r"\2", line)
    line = line.replace("|", ",")
    line = _replace_symbols(line)
    line = _strip_emphasis(line)
    line = "".join(" " if _is_pictograph(char) else char for char in line)
    return " ".join(line.split())


def _tidy(text: str) -> str:
    text = " ".join(text.split())
    text = _SPACE_BEFORE_PUNCTUATION.sub(r"\1", text)
    text = _REPEATED_SEPARATOR.sub(r"\1", text)
    text = _SEPARATOR_BEFORE_END.sub(r"\1", text)
    text = _SEPARATOR_AFTER_END.sub("", text)
    text = _EMPTY_BRACKETS.sub("", text)
    text = text.replace("( ", "(").replace(" )", ")")
    text = _LEADING_PUNCTUATION.sub("", text)
    return " ".join(text.split())


def _clean_markup(text: str, starts_line: bool = True) -> str:
    """Clean text that contains no fenced code. starts_line is False when text begins mid-line."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _SPECIAL_TOKEN.sub(" ", text)
    text = _HTML_COMMENT.sub(" ", text)
    text = _HTML_BREAK.sub("\n", text)
    text = _AUTOLINK.sub(" ", text)
    text = _HTML_TAG.sub(" ", text)
    text = html.unescape(text)
    text = _MARKDOWN_ESCAPE.sub("", text)
    text = _IMAGE.sub(r"\1", text)
    text = _LINK.sub(r"\1", text)
    text = _REFERENCE_LINK.sub(r"\1", text)
    text = _FOOTNOTE.sub("", text)
    text = _URL.sub(" ", text)

    lines = text.split("\n")
    spoken: list[str] = []
    for index, raw_line in enumerate(lines):
        line = _clean_line(raw_line, at_line_start=index > 0 or starts_line)
        if not line:
            continue
        # A line that ends without punctuation (a heading, a list item) gets a full stop,
        # so the voice pauses there. The last line has no newline after it and keeps its end.
        ends_line = index < len(lines) - 1
        if ends_line and line.rstrip(_CLOSERS)[-1:] not in _LINE_END:
            line += "."
        spoken.append(line)

    text = _tidy(" ".join(spoken))
    return text if any(char.isalnum() for char in text) else ""


class _CodeFenceFilter:
    """Remover of fenced code blocks (``` or ~~~ at a line start) from text that arrives in pieces.

    It keeps back only the text it cannot classify yet: the start of a line that may become
    a fence, and the current line inside a block. So streamed and whole text give the same output.
    """

    _OPENING = re.compile(r"[ \t]*(`{3,}|~{3,})")
    _UNDECIDED = re.compile(r"[ \t]*(?:`{0,2}|~{0,2})")

    def __init__(self) -> None:
        self._unclassified = ""
        self._fence = ""  # the opening marker while inside a block, else ""
        self._at_line_start = True

    def feed(self, text: str, final: bool = False) -> str:
        """Add text and return what is now known to lie outside code blocks."""
        self._unclassified += text
        output: list[str] = []
        while self._unclassified:
            newline = self._unclassified.find("\n")
            if self._fence:
                if newline < 0:
                    if final:
                        self._unclassified = ""
                    break
                line, self._unclassified = self._unclassified[:newline], self._unclassified[newline + 1 :]
                closing = line.strip()
                if closing.startswith(self._fence) and closing.strip(self._fence[0]) == "":
                    self._fence = ""
                continue

            if self._at_line_start:
                opening = self._OPENING.match(self._unclassified)
                line = self._unclassified if newline < 0 else self._unclassified[:newline]
                # Per CommonMark, a backtick fence's info string contains no backtick, so
                # "```x``` is code" at a line start is inline code, not a fence.
                is_fence = opening is not None and not (
                    opening[1][0] == "`" and "`" in line[opening.end() :]
                )
                if is_fence and newline < 0 and not final:
                    break
                if is_fence:
                    self._fence = opening[1]
                    self._unclassified = "" if newline < 0 else self._unclassified[newline + 1 :]
                    continue
                if self._UNDECIDED.fullmatch(self._unclassified) and not final:
                    break

            if newline < 0:
                output.append(self._unclassified)
                self._unclassified = ""
                self._at_line_start = False
            else:
                output.append(self._unclassified[: newline + 1])
                self._unclassified = self._unclassified[newline + 1 :]
                self._at_line_start = True
        return "".join(output)


def clean_for_speech(text: str) -> str:
    """Rewrite language-model text so a TTS voice reads only words.

    Drops markdown, fenced code, URLs, HTML, special tokens and emoji. Symbols a voice
    needs become words ("&" to "and", "%" to "percent", "$5" to "5 dollars"). Digits and
    decimals stay, because the TTS front end reads them. Lines that end without
    punctuation get a full stop so the voice pauses. Returns "" when no word is left.
    """
    return _clean_markup(_CodeFenceFilter().feed(text, final=True))


# --- Chunking ------------------------------------------------------------------------------------

_SENTENCE_END = ".!?…"
_SENTENCE_RUN = _SENTENCE_END + _CLOSERS
_CLAUSE_END = ",;:"
# Titles precede a name, so a full stop after them is never taken as a sentence end.
_TITLES = {"mr", "mrs", "ms", "dr", "prof", "st", "mt", "rev", "gen", "capt", "lt", "sgt", "col", "gov", "sen"}
# A full stop after these ends a sentence unless the next word starts with a lowercase letter or digit.
_ABBREVIATIONS = {
    "etc", "vs", "approx", "incl", "fig", "figs", "no", "vol", "ch", "pp", "jr", "sr", "inc", "ltd",
    "co", "corp", "dept", "est", "cf", "al", "jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep",
    "sept", "oct", "nov", "dec",
}  # fmt: skip
_DOTTED_ABBREVIATION = re.compile(r"(?:[A-Za-z]\.)+[A-Za-z]")  # "e.g", "i.e", "U.S" before the last dot
_WHITESPACE = re.compile(r"\s*")
# A chunk that ends with one of these ends a sentence or clause, where a pause belongs.
_PAUSE_MARKS = _SENTENCE_RUN + _CLAUSE_END + "—–-"
# Words that start a phrase: the first chunk may end before one of them. Cutting there
# keeps each chunk a whole phrase ("I don't have | the ability to know ..."), and speech
# starts several tokens before the sentence ends. The pipeline trims piper's silences at the
# cut to about 60 ms.
_PHRASE_STARTS = {
    "the", "a", "an", "to", "of", "in", "on", "at", "for", "with", "from", "by", "about", "into",
    "and", "but", "or", "so", "because", "that", "which", "who", "when", "where", "while", "if",
    "than", "as", "until", "unless", "since", "before", "after",
}  # fmt: skip
_LONG_CUT_CLAUSE = re.compile(r"[,;:](?=\s)| -(?= )|[—–]")


def ends_mid_sentence(chunk: str) -> bool:
    """Return True when ``chunk`` stops inside a sentence, so the next chunk goes on without a pause."""
    stripped = chunk.rstrip()
    return bool(stripped) and stripped[-1] not in _PAUSE_MARKS


def _long_cut(text: str, limit: int) -> int:
    """Return where to cut text that runs past limit characters without a boundary.

    Prefers the last clause boundary in the second half of the window, then the last
    space, and cuts mid-word at limit only when the window has no space.
    """
    window = text[: limit + 1]
    clause_ends = [match.end() for match in _LONG_CUT_CLAUSE.finditer(window) if match.end() <= limit]
    if clause_ends and clause_ends[-1] >= limit // 2:
        return clause_ends[-1]
    space = max(window.rfind(" "), window.rfind("\t"))
    return space if space > 0 else limit


def _split_long(text: str, limit: int) -> list[str]:
    pieces: list[str] = []
    while len(text) > limit:
        cut = _long_cut(text, limit)
        head, text = text[:cut].strip(), text[cut:].strip()
        if head:
            pieces.append(head)
    if text:
        pieces.append(text)
    return pieces


class SpeechChunker:
    """Splitter of a streamed language-model reply into cleaned phrases for the TTS.

    push() takes text fragments as they arrive and returns every chunk that is complete.
    flush() ends the reply, returns the rest and resets the chunker for the next reply.
    A chunk ends at a sentence end (. ! ? …) once the whitespace after it has arrived, or
    at a newline. A full stop after an abbreviation, an initial or a list number ("2.")
    does not end a chunk. The first chunk may also end at a clause boundary (, ; : - —) once it
    has first_chunk_min_words words, so speech starts sooner, and with first_chunk_at_phrase
    before a word that starts a phrase ("the", "to", "because" ...). A chunk never exceeds
    max_chunk_chars characters. The limit applies to the raw text while scanning and
    again to the cleaned chunk, which symbol words can make longer.
    Chunks do not depend on how the text was split into fragments.
    """

    def __init__(self, first_chunk_min_words: int = 3, max_chunk_chars: int = 220, first_chunk_at_phrase: bool = False) -> None:
        if first_chunk_min_words < 1:
            raise ValueError(f"first_chunk_min_words must be at least 1, got {first_chunk_min_words}")
        if max_chunk_chars < 1:
            raise ValueError(f"max_chunk_chars must be at least 1, got {max_chunk_chars}")
        self.first_chunk_min_words = first_chunk_min_words
        self.max_chunk_chars = max_chunk_chars
        self.first_chunk_at_phrase = first_chunk_at_phrase
        self._reset()

    @classmethod
    def from_config(cls, config, streamed: bool = True) -> SpeechChunker:
        """Build the chunker that the ``tts`` section of the configuration describes.

        ``streamed`` False is for text known whole in advance, which gains nothing from
        a phrase cut and would only get its pause.
        """
        return cls(config.first_chunk_min_words, config.max_chunk_chars, streamed and config.first_chunk_at_phrase)

    def _reset(self) -> None:
        self._fences = _CodeFenceFilter()
        self._pending = ""
        self._pending_starts_line = True
        self._first_chunk_sent = False

    def push(self, fragment: str) -> list[str]:
        """Append a streamed fragment and return the chunks it completes."""
        self._pending += self._fences.feed(fragment)
        return self._take_chunks(final=False)

    def flush(self) -> list[str]:
        """Return the remaining text as final chunks and reset for the next reply."""
        self._pending += self._fences.feed("", final=True)
        chunks = self._take_chunks(final=True)
        self._reset()
        return chunks

    def _take_chunks(self, final: bool) -> list[str]:
        chunks: list[str] = []
        while self._pending:
            cut = self._find_cut(self._pending, final)
            if cut is None:
                break
            raw, self._pending = self._pending[:cut], self._pending[cut:]
            cleaned = _clean_markup(raw, starts_line=self._pending_starts_line)
            self._pending_starts_line = raw.endswith("\n")
            if cleaned:
                self._first_chunk_sent = True
                chunks.extend(_split_long(cleaned, self.max_chunk_chars))
        if chunks:
            logger.debug("Speech chunks ready: %r", chunks)
        return chunks

    def _find_cut(self, text: str, final: bool) -> int | None:
        """Return the end of the next chunk in text, or None until more text arrives.

        Every decision uses only text that has arrived, and the scan stops at the first
        position that later text could still change. That keeps the chunks independent of
        how the stream was split.
        """
        limit = self.max_chunk_chars
        index = 0
        while index < len(text) and index < limit:
            char = text[index]
            if char == "\n":
                return index + 1

            if char in _SENTENCE_END:
                end = index + 1
                while end < len(text) and text[end] in _SENTENCE_RUN:
                    end += 1
                if end == len(text):
                    return end if final else None
                if text[end].isspace():
                    verdict = self._ends_sentence(text, index, end, final)
                    if verdict is None:
                        return None
                    if verdict:
                        return end
                index = end
                continue

            if not self._first_chunk_sent:
                clause_end = self._clause_end(text, index, final)
                if clause_end != 0:
                    return clause_end
                if self.first_chunk_at_phrase:
                    phrase_end = self._phrase_end(text, index, final)
                    if phrase_end != 0:
                        return phrase_end
            index += 1

        if len(text) > limit:
            return _long_cut(text, limit)
        return len(text) if final else None

    def _clause_end(self, text: str, index: int, final: bool) -> int | None:
        """Return the end of a first-chunk clause at index, 0 when there is none, None to wait."""
        char = text[index]
        spaced_dash = char in "-–" and index >= 2 and text[index - 1] == " " and not text[index - 2].isspace()
        if char != "—" and char not in _CLAUSE_END and not spaced_dash:
            return 0
        end = index + 1

        words = _clean_markup(text[:end], starts_line=self._pending_starts_line).split()
        if len(words) < self.first_chunk_min_words:
            return 0
        if char == "—":
            return end
        if end == len(text):
            return 0 if final else None
        # "1,000", "10:30" and "well-known" have no space after the mark, so they are no clause boundary.
        return end if text[end].isspace() else 0

    def _phrase_end(self, text: str, index: int, final: bool) -> int | None:
        """Return index when the first chunk may end at the space there, 0 when not, None to wait.

        The cut needs first_chunk_min_words words before it, a whole word after it that
        starts a phrase, and another word after that one on the same line, so the next
        chunk is never a lone "to". A word is whole once whitespace follows it, or at the
        end of the reply.
        """
        if text[index] not in " \t" or index == 0 or text[index - 1].isspace():
            return 0
        start = _WHITESPACE.match(text, index).end()
        end = start
        while end < len(text) and not text[end].isspace():
            end += 1
        if end == len(text):
            return 0 if final else None
        if text[start:end].lower() not in _PHRASE_STARTS or "\n" in text[index:start]:
            return 0
        following = end
        while following < len(text) and text[following] in " \t":
            following += 1
        if following == len(text):
            return 0 if final else None
        if text[following] == "\n":
            return 0
        before = text[:index]
        previous = before.split()[-1]
        # Not after another phrase word ("travels at | about"), inside a number range
        # ("3 | to 4") or inside a quotation.
        if previous.lower().strip("\"'“”‘’*_(") in _PHRASE_STARTS or previous[-1].isdigit():
            return 0
        if before.count('"') % 2 or before.count("“") > before.count("”"):
            return 0
        words = _clean_markup(before, starts_line=self._pending_starts_line).split()
        return index if len(words) >= self.first_chunk_min_words else 0

    def _ends_sentence(self, text: str, index: int, end: int, final: bool) -> bool | None:
        """Return whether the punctuation run text[index:end] ends a sentence, or None to wait for the next word."""
        run = text[index:end]
        if any(mark in run for mark in "!?…") or run.count(".") > 1:
            return True

        token_start = index
        while token_start > 0 and not text[token_start - 1].isspace():
            token_start -= 1
        token = text[token_start:index].lstrip("\"'“‘([*_")
        if not token:
            return True

        line_start = text.rfind("\n", 0, token_start)
        starts_line = line_start >= 0 or self._pending_starts_line
        if token.isdigit() and len(token) <= 3 and starts_line and not text[line_start + 1 : token_start].strip():
            return False  # a numbered list marker such as "2."
        lowered = token.lower()
        if lowered in _TITLES:
            return False
        if len(token) == 1 and token.isupper() and token != "I":
            return False  # an initial, as in "J. R. R. Tolkien"
        if lowered in _ABBREVIATIONS or _DOTTED_ABBREVIATION.fullmatch(token):
            following = _WHITESPACE.match(text, end).end()
            if following == len(text):
                return True if final else None
            next_char = text[following]
            return not (next_char.islower() or next_char.isdigit())
        return True
