"""Incremental detokenizer: verified tokens in, text out, never half a UTF-8 character."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase


class IncrementalDetokenizer:
    """Turn a growing list of token ids into text fragments as the tokens arrive.

    Byte-level BPE tokens can end inside a multi-byte character; decoding such a prefix
    gives U+FFFD. The detokenizer holds text back until the character completes, so the
    concatenation of all fragments equals ``tokenizer.decode(all_ids)``.

    Only the tokens after ``prefix_offset`` are decoded at each step, which keeps each
    step cheap; a few tokens of left context keep the decoder's spacing rules intact.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""
        """Text emitted so far."""
        self._prefix_offset = 0
        self._read_offset = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, new_ids: list[int]) -> str:
        """Add verified tokens; return the text they complete (possibly empty)."""
        self.ids.extend(new_ids)
        prefix_text = self._decode(self.ids[self._prefix_offset : self._read_offset])
        full_text = self._decode(self.ids[self._prefix_offset :])
        if full_text.endswith("\ufffd") or len(full_text) <= len(prefix_text):
            return ""
        fragment = full_text[len(prefix_text) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self.ids)
        self.text += fragment
        return fragment

    def flush(self) -> str:
        """Return whatever text is still held back (at the end of generation)."""
        final = self._decode(self.ids)
        rest = final[len(self.text) :] if final.startswith(self.text) else ""
        self.text += rest
        return rest


class StopStrings:
    """Strings that end an answer where they first appear in its text; the stop string itself is not part of the answer.

    Matching runs on decoded text, not on token ids, because one string can be tokenized
    in several ways and can start or end inside a token.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, strings: list[str]) -> None:
        if any(not string for string in strings):
            raise ValueError("stop strings must not be empty")
        self.tokenizer = tokenizer
        self.strings = list(strings)
        self._longest = max((len(string) for string in strings), default=0)

    def __bool__(self) -> bool:
        return bool(self.strings)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def first_match(self, generated: list[int], new_ids: list[int]) -> int | None:
        """Return how many of ``new_ids`` to keep so the text ends just past the first stop string, or None.

        ``generated`` is the answer so far, known to contain no stop string.
        """
        if not self.strings:
            return None
        # A match must end in the new text, so only the tail that could hold it is searched.
        # A character split across steps decodes as U+FFFD until complete, and the
        # completed character then sits at that same index.
        search_from = max(0, len(self._decode(generated).rstrip("\ufffd")) - self._longest + 1)
        for keep in range(1, len(new_ids) + 1):
            text = self._decode(generated + new_ids[:keep])
            if any(string in text[search_from:] for string in self.strings):
                return keep
        return None

    def visible(self, text: str, final: bool) -> str:
        """Return the part of ``text`` that may be shown or spoken.

        That is everything before the first stop string; before the end of the answer,
        a tail that could still grow into a stop string is held back too.
        """
        cut = len(text)
        for string in self.strings:
            index = text.find(string)
            if index != -1:
                cut = min(cut, index)
        if cut < len(text) or final:
            return text[:cut]
        for size in range(min(self._longest - 1, len(text)), 0, -1):
            tail = text[-size:]
            if any(string.startswith(tail) for string in self.strings):
                return text[:-size]
        return text
