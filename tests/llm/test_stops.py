"""Stop strings: matched on decoded text, exact inside runs of accepted drafts, never shown."""

from __future__ import annotations

import pytest

from tests.llm.tiny_models import perturbed_copy, tiny_qwen2
from voice.llm.detokenize import StopStrings
from voice.llm.speculative import SpeculativeDecoder

NO_EOS: set[int] = set()


class LetterTokenizer:
    """Decodes token i to a letter, and every tenth id to two letters, so strings can span tokens."""

    def decode(self, ids, skip_special_tokens=True, clean_up_tokenization_spaces=False):
        return "".join(chr(ord("a") + token % 26) * (2 if token % 10 == 0 else 1) for token in ids)


def test_first_match_counts_tokens_to_keep():
    stop = StopStrings(LetterTokenizer(), ["cd"])
    assert stop.first_match([], [0, 1, 2, 3, 4]) == 4  # "aabcd..." ends with the match at token 3
    assert stop.first_match([0, 1, 2], [3, 4]) == 1  # the match spans earlier and new tokens
    assert stop.first_match([], [5, 6]) is None


def test_visible_text_hides_stop_and_its_possible_start():
    stop = StopStrings(LetterTokenizer(), ["User:", "###"])
    assert stop.visible("Hello User: next", final=False) == "Hello "
    assert stop.visible("Hello Us", final=False) == "Hello "  # "Us" may become "User:"
    assert stop.visible("Hello Us", final=True) == "Hello Us"  # the answer ended, so it is not a stop
    assert stop.visible("a ## b", final=False) == "a ## b"


def test_empty_stop_string_rejected():
    with pytest.raises(ValueError, match="empty"):
        StopStrings(LetterTokenizer(), [""])


@pytest.mark.parametrize("stop_index", [3, 6, 9])
def test_stop_inside_accepted_run_is_exact(stop_index):
    target = tiny_qwen2(seed=60)
    tokenizer = LetterTokenizer()
    plain = SpeculativeDecoder(target, None, NO_EOS)
    reference = [t for step in plain.generate([1, 2, 3], 30, speculative=False) for t in step]
    text = tokenizer.decode(reference)
    stop_text = tokenizer.decode(reference[stop_index - 1 : stop_index + 1])
    first = text.find(stop_text)
    stop = StopStrings(tokenizer, [stop_text])

    # Same weights: every draft is accepted, so the stop falls inside an accepted run.
    decoder = SpeculativeDecoder(target, perturbed_copy(target, 0.0, seed=0), NO_EOS, draft_tokens=4)
    output = [t for step in decoder.generate([1, 2, 3], 30, stop=stop) for t in step]
    assert decoder.stats.stop_reason == "stop"
    assert decoder.stats.accepted > 0
    # Output ends with the token that completes the stop string's first occurrence.
    assert tokenizer.decode(output).find(stop_text) == first
    assert first + len(stop_text) <= len(tokenizer.decode(output))
    assert first + len(stop_text) > len(tokenizer.decode(output[:-1]))
    assert output == reference[: len(output)]
    # Plain decoding stops at the same token.
    plain_output = [t for step in plain.generate([1, 2, 3], 30, speculative=False, stop=stop) for t in step]
    assert plain_output == output
