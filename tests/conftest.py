"""Shared fixtures: the fixture manifest and the real models, loaded once per test session."""

from __future__ import annotations

import asyncio
import csv
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "audio_fixtures"


def fixture_rows() -> list[dict[str, str]]:
    with open(FIXTURES / "MANIFEST.tsv", newline="", encoding="utf-8") as manifest:
        return list(csv.DictReader(manifest, delimiter="\t"))


def fixtures_of_kind(*kinds: str) -> list[dict[str, str]]:
    return [row for row in fixture_rows() if row["kind"] in kinds]


@pytest.fixture(scope="session")
def assistant():
    """The real assistant with the default embedded models (minutes on first run)."""
    from voice.config import Config
    from voice.pipeline import load_assistant

    return asyncio.run(load_assistant(Config()))


@pytest.fixture(scope="session")
def qwen_tokenizer():
    """The embedded target's tokenizer (assembles and converts the target on first use)."""
    from transformers import AutoTokenizer

    from voice import models

    path, _ = models.resolve_llm("qwen2.5-coder-1.5b-instruct", models.cache_root())
    return AutoTokenizer.from_pretrained(path)
