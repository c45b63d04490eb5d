"""Checks of the fixed benchmark prompts and the chat messages built from them."""

from __future__ import annotations

import dataclasses
import re
from collections import Counter

import pytest

from voice.bench.prompts import CATEGORIES, PROMPTS, BenchPrompt, chat_messages

KEBAB_CASE = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)+$")
SYSTEM_PROMPT = "You are a voice assistant."


def test_prompts_count():
    assert len(PROMPTS) >= 32


def test_prompts_per_category():
    counts = Counter(prompt.category for prompt in PROMPTS)
    assert set(counts) == set(CATEGORIES)
    for category in CATEGORIES:
        assert counts[category] >= 6, f"category {category} has {counts[category]} prompts"


def test_prompt_ids_unique():
    counts = Counter(prompt.id for prompt in PROMPTS)
    duplicates = [prompt_id for prompt_id, count in counts.items() if count > 1]
    assert duplicates == []


def test_prompt_ids_kebab_case_with_category():
    for prompt in PROMPTS:
        assert KEBAB_CASE.match(prompt.id), prompt.id
        assert prompt.id.startswith(prompt.category + "-"), prompt.id


def test_prompt_texts_not_empty():
    for prompt in PROMPTS:
        assert prompt.question.strip(), prompt.id
        for user_text, assistant_text in prompt.history:
            assert user_text.strip(), prompt.id
            assert assistant_text.strip(), prompt.id


def test_only_followups_have_history():
    for prompt in PROMPTS:
        if prompt.category == "followup":
            assert len(prompt.history) >= 1, prompt.id
        else:
            assert prompt.history == (), prompt.id


def test_history_is_tuple_of_pairs():
    for prompt in PROMPTS:
        assert isinstance(prompt.history, tuple), prompt.id
        for turn in prompt.history:
            assert isinstance(turn, tuple), prompt.id
            assert len(turn) == 2, prompt.id


def test_bench_prompt_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        PROMPTS[0].question = "changed"


def test_bench_prompt_rejects_unknown_category():
    with pytest.raises(ValueError, match="invalid category 'weather'"):
        BenchPrompt(id="weather-today", category="weather", question="Will it rain today?")


def test_chat_messages_without_history():
    prompt = BenchPrompt(id="fact-capital-france", category="fact", question="What is the capital of France?")

    messages = chat_messages(prompt, SYSTEM_PROMPT)

    assert messages == [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": "What is the capital of France?"},
    ]


def test_chat_messages_with_history():
    prompt = BenchPrompt(
        id="followup-test",
        category="followup",
        question="And the third?",
        history=(("First question?", "First answer."), ("Second question?", "Second answer.")),
    )

    messages = chat_messages(prompt, SYSTEM_PROMPT)

    assert messages == [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": "First question?"},
        {"role": "assistant", "content": "First answer."},
        {"role": "user", "content": "Second question?"},
        {"role": "assistant", "content": "Second answer."},
        {"role": "user", "content": "And the third?"},
    ]


def test_chat_messages_roles_for_every_prompt():
    for prompt in PROMPTS:
        messages = chat_messages(prompt, SYSTEM_PROMPT)

        roles = [message["role"] for message in messages]
        assert roles == ["system"] + ["user", "assistant"] * len(prompt.history) + ["user"], prompt.id
        assert messages[0]["content"] == SYSTEM_PROMPT
        assert messages[-1]["content"] == prompt.question
