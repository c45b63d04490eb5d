"""Frequency-ranked draft vocabulary: the token ids a draft model scores in its output layer.

A draft spends a large part of each pass in its output layer (151,936 rows for the Qwen
2.5 tokenizer), yet spoken answers use a small share of those tokens. Scoring only the N
most frequent tokens makes each draft pass cheaper and costs acceptance only where the
target picks a token outside the table. The target still scores every token, so the
output does not change.

Token frequencies are estimated once per tokenizer from the English word frequencies of
the wordfreq package (subtitles, Wikipedia, news, books and web text): each word's
frequency is added to the tokens of its spellings as a tokenizer sees them mid-sentence,
capitalized and at the start of a text. The table is stored in the cache folder, keyed
by a hash of the tokenizer's vocabulary and the table size.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import string
import time
from collections import Counter
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

# Share of a word's occurrences credited to each spelling: mid-sentence after a space,
# capitalized after a space (names, sentence starts after punctuation), and capitalized
# with no space before it (the start of a text).
_SPELLINGS = ((" {word}", 0.85), (" {capitalized}", 0.10), ("{capitalized}", 0.05))
_TABLE_FORMAT = 2
_WORDS = 100_000


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """Return a short hash of the tokenizer's vocabulary and added tokens."""
    vocabulary = sorted(tokenizer.get_vocab().items())
    digest = hashlib.sha256(json.dumps(vocabulary, ensure_ascii=False).encode("utf-8"))
    return digest.hexdigest()[:16]


def required_token_ids(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> set[int]:
    """Return ids the table always contains: special tokens, printable ASCII characters and the tokens of ``texts``.

    Single characters keep every word spellable, and ``texts`` (the chat template's
    wrapping of the system prompt) covers the tokens of the prompt format.
    """
    ids = set(tokenizer.all_special_ids)
    ids.update(int(token_id) for token_id in getattr(tokenizer, "added_tokens_decoder", {}))
    characters = [c for c in string.printable if c not in "\x0b\x0c"]
    for text in characters + [" " + c for c in characters] + list(texts):
        ids.update(tokenizer.encode(text, add_special_tokens=False))
    return ids


def estimate_token_frequencies(tokenizer: PreTrainedTokenizerBase) -> Counter:
    """Estimate how often each token occurs in English text, from wordfreq's word frequencies."""
    import wordfreq

    frequencies = wordfreq.get_frequency_dict("en", wordlist="best")
    # The 100,000 most frequent words carry 99.3% of the frequency mass of wordfreq's
    # 321,000 English words and take a third of the time to tokenize.
    words = dict(sorted(frequencies.items(), key=lambda item: item[1], reverse=True)[:_WORDS])
    counts: Counter = Counter()
    for pattern, share in _SPELLINGS:
        spelled = [pattern.format(word=word, capitalized=word[:1].upper() + word[1:]) for word in words]
        encoded = tokenizer(spelled, add_special_tokens=False)["input_ids"]
        for frequency, token_ids in zip(words.values(), encoded):
            for token_id in token_ids:
                counts[token_id] += frequency * share
    return counts


def build_draft_vocabulary(tokenizer: PreTrainedTokenizerBase, size: int, texts: list[str]) -> torch.Tensor:
    """Return the sorted ids of the ``size`` most frequent tokens, required ids included."""
    vocabulary_size = len(tokenizer)
    if not 0 < size <= vocabulary_size:
        raise ValueError(f"draft vocabulary size must be from 1 to {vocabulary_size}, got {size}")
    chosen = {token_id for token_id in required_token_ids(tokenizer, texts) if token_id < vocabulary_size}
    if len(chosen) > size:
        raise ValueError(f"draft vocabulary size {size} is smaller than the {len(chosen)} tokens it must contain")
    for token_id, _ in estimate_token_frequencies(tokenizer).most_common():
        if len(chosen) >= size:
            break
        chosen.add(token_id)
    # Too few distinct tokens in the word list: fill up in id order, which for BPE
    # tokenizers follows merge order, itself a frequency ranking of the training text.
    next_id = 0
    while len(chosen) < size:
        chosen.add(next_id)
        next_id += 1
    return torch.tensor(sorted(chosen), dtype=torch.long)


def load_draft_vocabulary(tokenizer: PreTrainedTokenizerBase, size: int, texts: list[str], cache: Path) -> torch.Tensor:
    """Return the draft vocabulary of ``size`` tokens, building and caching it on first use."""
    key = hashlib.sha256(json.dumps(sorted(texts)).encode("utf-8")).hexdigest()[:8]
    path = cache / "vocab" / f"{tokenizer_fingerprint(tokenizer)}-{size}-{key}.json"
    try:
        stored = json.loads(path.read_text())
        if stored.get("format") == _TABLE_FORMAT and len(stored["ids"]) == size:
            return torch.tensor(stored["ids"], dtype=torch.long)
    except (OSError, ValueError, KeyError, TypeError):
        pass
    started = time.perf_counter()
    ids = build_draft_vocabulary(tokenizer, size, texts)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_suffix(f".{os.getpid()}.tmp")
    staging.write_text(json.dumps({"format": _TABLE_FORMAT, "size": size, "source": "wordfreq en best", "ids": ids.tolist()}))
    staging.replace(path)
    logger.info("Built the draft vocabulary of %d tokens in %.1f s: %s", size, time.perf_counter() - started, path)
    return ids
