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
