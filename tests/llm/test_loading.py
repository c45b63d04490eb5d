"""Draft compatibility checks and dtype choice."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tests.llm.tiny_models import tiny_qwen2
from voice.errors import ModelError
from voice.llm.loading import check_draft_compatible, resolve_dtype


def vocabulary(size: int, renamed: int | None = None) -> SimpleNamespace:
    tokens = {f"token{i}": i for i in range(size)}
    if renamed is not None:
        del tokens[f"token{renamed}"]
        tokens["other"] = renamed
    return SimpleNamespace(get_vocab=lambda: dict(tokens))


def test_matching_draft_accepted():
    check_draft_compatible(vocabulary(96), vocabulary(96), tiny_qwen2(seed=1), tiny_qwen2(seed=2))


def test_draft_with_other_tokenizer_rejected():
    with pytest.raises(ModelError, match="llm.draft: the tokenizer of the draft model differs from the target's"):
        check_draft_compatible(vocabulary(96), vocabulary(96, renamed=5), tiny_qwen2(seed=1), tiny_qwen2(seed=2))


def test_draft_with_other_vocabulary_size_rejected():
    with pytest.raises(ModelError, match="llm.draft: the draft model scores 80 tokens and the target 96"):
        check_draft_compatible(vocabulary(96), vocabulary(96), tiny_qwen2(seed=1), tiny_qwen2(seed=2, vocab_size=80))


@pytest.mark.parametrize(("name", "expected"), [("float32", torch.float32), ("bfloat16", torch.bfloat16)])
def test_explicit_dtype(name, expected):
    assert resolve_dtype(name) is expected


def test_auto_dtype_follows_cpu(monkeypatch):
    import voice.llm.loading as loading

    monkeypatch.setattr(loading, "cpu_has_fast_bf16", lambda: True)
    assert resolve_dtype("auto") is torch.bfloat16
    monkeypatch.setattr(loading, "cpu_has_fast_bf16", lambda: False)
    assert resolve_dtype("auto") is torch.float32
