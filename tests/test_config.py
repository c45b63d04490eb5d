"""config.yaml parsing and validation."""

from __future__ import annotations

import pytest

from tests.conftest import ROOT
from voice.config import Config, load_config
from voice.errors import ConfigError


def write(tmp_path, text: str):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_repository_config_equals_defaults():
    assert load_config(ROOT / "config.yaml") == Config()


def test_empty_file_gives_defaults(tmp_path):
    assert load_config(write(tmp_path, "")) == Config()


def test_partial_section_keeps_other_defaults(tmp_path):
    config = load_config(write(tmp_path, "llm:\n  draft_tokens: 6\n"))
    assert config.llm.draft_tokens == 6
    assert config.llm.target == Config().llm.target
    assert config.asr == Config().asr


def test_float_field_accepts_integer(tmp_path):
    assert load_config(write(tmp_path, "tts:\n  length_scale: 1\n")).tts.length_scale == 1.0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("llm:\n  draft_tokenz: 4\n", "unknown key 'llm.draft_tokenz'"),
        ("colour: blue\n", "unknown key 'colour'"),
        ("llm:\n  draft_tokens: four\n", "llm.draft_tokens must be an integer from 1 to 16, got 'four'"),
        ("llm:\n  draft_tokens: 0\n", "llm.draft_tokens must be an integer from 1 to 16, got 0"),
        ("llm:\n  draft_tokens: true\n", "llm.draft_tokens must be an integer"),
        ("llm:\n  speculative: 'yes'\n", "llm.speculative must be true or false"),
        ("llm:\n  dtype: float16\n", "llm.dtype must be one of 'auto', 'float32', 'bfloat16'"),
        ("tts:\n  length_scale: 9\n", "tts.length_scale must be a number from 0.5 to 2.0, got 9"),
        ("asr:\n  vad_aggressiveness: 4\n", "asr.vad_aggressiveness must be an integer from 0 to 3"),
        ("llm: 5\n", "llm must be a mapping"),
        ("- a\n- b\n", "the top level must be a mapping"),
        ("llm:\n  draft_tokens: [1\n", "invalid YAML at line"),
        ("llm:\n  system_prompt: '  '\n", "llm.system_prompt must not be empty"),
        ("llm:\n  temperature: -0.5\n", "llm.temperature must be a number from 0.0 to 10.0, got -0.5"),
        ("llm:\n  top_p: 0\n", "llm.top_p must be above 0 and at most 1, got 0.0"),
        ("llm:\n  top_p: 1.5\n", "llm.top_p must be a number from 0.0 to 1.0, got 1.5"),
        ("llm:\n  top_k: -1\n", "llm.top_k must be an integer from 0"),
        ("llm:\n  drafter: medusa\n", "llm.drafter must be one of 'model', 'prompt_lookup', 'gemma4_assistant'"),
        ("llm:\n  draft_weights: int2\n", "llm.draft_weights must be one of 'auto', 'dense', 'int8', 'int4'"),
        ("llm:\n  target_weights: fp8\n", "llm.target_weights must be one of 'auto', 'dense', 'int8', 'int4'"),
        ("llm:\n  lookup_min_ngram: 4\n  lookup_max_ngram: 2\n", "llm.lookup_min_ngram (4) is above llm.lookup_max_ngram (2)"),
        ("llm:\n  stop_strings: 'User:'\n", "llm.stop_strings must be a list of non-empty strings"),
        ("llm:\n  stop_strings: ['']\n", "llm.stop_strings must be a list of non-empty strings"),
        ("llm:\n  max_new_tokens: 2000\n", "llm.max_new_tokens (2000) leaves less than 128 tokens of llm.max_context_tokens (2048)"),
        ("mqtt:\n  port: 70000\n", "mqtt.port must be an integer from 1 to 65535, got 70000"),
        ("mqtt:\n  topic_prefix: 'voice/#'\n", "mqtt.topic_prefix: 'voice/#' must be a topic without wildcards"),
        ("mqtt:\n  site_ids: []\n", "mqtt.site_ids must name at least one site"),
        ("mqtt:\n  site_ids: [kitchen/one]\n", "mqtt.site_ids: 'kitchen/one' must not contain / # or +"),
        ("mqtt:\n  tls_ca_certs: /no/such/ca.pem\n", "mqtt.tls_ca_certs: '/no/such/ca.pem' not found"),
        ("mqtt:\n  client_id: ''\n", "mqtt.client_id must not be empty"),
        ("mqtt:\n  queue_size: -1\n", "mqtt.queue_size must be an integer from 0 to 100"),
        ("mqtt:\n  site_ids: [default, default]\n", "mqtt.site_ids lists 'default' more than once"),
        ("listen:\n  silence_ms: 500\n  early_start_ms: 500\n", "listen.early_start_ms (500) must be below listen.silence_ms (500)"),
        ("asr:\n  window_s: 31\n", "asr.window_s must be an integer from 1 to 30, got 31"),
    ],
    ids=["unknown-nested", "unknown-top", "wrong-type", "below-range", "bool-for-int", "string-for-bool",
         "bad-choice", "above-range", "vad-range", "section-not-mapping", "top-not-mapping", "bad-yaml", "empty-prompt",
         "negative-temperature", "zero-top-p", "top-p-above-one", "negative-top-k", "unknown-drafter", "unknown-weights", "unknown-target-weights",
         "lookup-range", "stop-not-list", "empty-stop", "no-room-for-prompt", "mqtt-port", "mqtt-wildcard-prefix",
         "mqtt-no-sites", "mqtt-site-slash", "mqtt-missing-ca", "mqtt-empty-client-id", "mqtt-negative-queue",
         "mqtt-repeated-site", "early-start-not-before-end", "whisper-window-range"],
)
def test_invalid_config_names_file_and_key(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert str(path) in str(error.value)
    assert expected in str(error.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="Config file not found: .*nope.yaml. Pass an existing file with --config"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("llm:\n  target: ./no/such/model\n", "llm.target: './no/such/model' not found"),
        ("asr:\n  model: /no/whisper\n", "asr.model: '/no/whisper' not found"),
        ("tts:\n  voice: missing-voice.onnx\n", "tts.voice: 'missing-voice.onnx' not found"),
    ],
    ids=["target-folder", "whisper-folder", "piper-voice"],
)
def test_missing_model_path_rejected_at_load(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert str(path) in str(error.value)
    assert expected in str(error.value)
    assert "embedded name" in str(error.value)


def test_unknown_whisper_language_rejected(tmp_path):
    path = write(tmp_path, "asr:\n  language: xx\n")
    with pytest.raises(ConfigError, match="asr.language: 'xx' is not a Whisper language code"):
        load_config(path)


def test_empty_language_means_detect(tmp_path):
    assert load_config(write(tmp_path, "asr:\n  language: ''\n")).asr.language == ""


def test_cache_dir_that_is_a_file_rejected(tmp_path):
    occupied = tmp_path / "occupied"
    occupied.write_text("x")
    path = write(tmp_path, f"cache_dir: {occupied}\n")
    with pytest.raises(ConfigError, match="cache_dir: .* is a file, not a folder"):
        load_config(path)


def test_sampling_and_stop_settings_load(tmp_path):
    path = write(tmp_path, "llm:\n  temperature: 0.7\n  top_k: 40\n  top_p: 0.9\n  seed: 7\n  stop_strings: ['User:', '###']\n")
    config = load_config(path)
    assert (config.llm.temperature, config.llm.top_k, config.llm.top_p, config.llm.seed) == (0.7, 40, 0.9, 7)
    assert config.llm.stop_strings == ["User:", "###"]


@pytest.mark.parametrize(
    ("text", "key"),
    [("llm:\n  max_new_tokens: 50\nllm:\n  temperature: 0.5\n", "llm"), ("llm:\n  max_new_tokens: 50\n  max_new_tokens: 60\n", "max_new_tokens")],
    ids=["section", "setting"],
)
def test_duplicate_key_rejected(tmp_path, text, key):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"config.yaml: key '{key}' appears twice at line 3; keep one of them"):
        load_config(path)
