"""Configuration: one dataclass per stage, loaded from config.yaml and validated before any model loads.

Every field's docstring gives its unit and allowed range; the repository's config.yaml
documents the same defaults for people. ``load_config`` rejects unknown keys, wrong
types and out-of-range values with the file, the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import logging
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from voice.errors import ConfigError

logger = logging.getLogger(__name__)

DEFAULT_SYSTEM_PROMPT = (
    "You are a voice assistant. Your answers are read aloud by a speech synthesizer, "
    "so answer in one or two short, plain spoken sentences. Never use markdown, lists, "
    "tables, code, emoji or URLs. Write numbers and units the way a person says them. "
    "You have no clock, no internet and no weather data, so never make up the time, the "
    "date or the weather: say that you cannot know it. You cannot set timers or alarms "
    "and cannot control lights or other devices yet: say so in one sentence."
)


@dataclass
class AsrConfig:
    """Speech recognition with faster-whisper."""

    model: str = "base"
    """Embedded name (base, tiny.en), a CTranslate2 Whisper folder, or a Hugging Face id."""
    compute_type: Literal["int8", "float32"] = "float32"
    """Whisper's weights. int8 is about a quarter faster but misheard a quiet question
    ("capital of France" as "capital of friends") on an AVX512 CPU."""
    language: str = "en"
    """Language code passed to Whisper; empty string lets Whisper detect it."""
    beam_size: int = field(default=5, metadata={"range": (1, 10)})
    """Beam width of Whisper's decoder; 1 is greedy. With the 15-second window, 5 made
    fewer word errors than greedy decoding of the full 30-second window."""
    threads: int = field(default=0, metadata={"range": (0, 256)})
    """CPU threads for Whisper; 0 uses every core."""
    window_s: int = field(default=15, metadata={"range": (1, 30)})
    """Shortest audio window (seconds) that Whisper's encoder runs over. A longer
    recording gets its length plus 2 s, up to the 30 s Whisper was trained on. The
    encoder's time grows with the window, and 15 s took half the time of 30 s."""
    min_speech_ms: int = field(default=250, metadata={"range": (0, 10_000)})
    """Voiced audio (milliseconds, by webrtcvad) a recording needs before Whisper runs."""
    vad_aggressiveness: int = field(default=3, metadata={"range": (0, 3)})
    """webrtcvad mode: 0 accepts the most audio as speech, 3 the least."""
    no_speech_threshold: float = field(default=0.6, metadata={"range": (0.0, 1.0)})
    """A segment whose no-speech probability exceeds this, with low confidence, is dropped."""
    log_prob_threshold: float = field(default=-1.0, metadata={"range": (-10.0, 0.0)})
    """Mean token log-probability under which a segment counts as low confidence."""


@dataclass
class LlmConfig:
    """The speculative-decoding language-model stage."""

    target: str = "qwen2.5-coder-1.5b-instruct"
    """Embedded name, a transformers model folder, or a Hugging Face id."""
    draft: str = "qwen2.5-coder-0.5b-instruct"
    """Draft model with the target's tokenizer: embedded name, folder or Hugging Face id."""
    speculative: bool = True
    """False decodes with the target alone (for comparison); the draft is then not loaded."""
    drafter: Literal["model", "prompt_lookup", "gemma4_assistant"] = "model"
    """Source of proposed tokens: the draft model, n-gram lookup in the conversation (no
    model), or a Gemma 4 assistant model (named by ``draft``) that reads the target's
    KV cache."""
    draft_tokens: int = field(default=4, metadata={"range": (1, 16)})
    """Maximum tokens proposed per verification pass (k)."""
    draft_min_confidence: float = field(default=0.3, metadata={"range": (0.0, 1.0)})
    """The draft model stops proposing after a token to which it gives less probability
    than this; 0 always proposes the full k."""
    adaptive_draft: bool = True
    """Pick k before each pass from the measured acceptance and pass costs, down to no
    drafting where it does not pay; false always proposes draft_tokens."""
    draft_vocab: int = field(default=32768, metadata={"range": (0, 1_000_000)})
    """Tokens the draft model scores in its output layer, most frequent first; 0 scores
    the whole vocabulary."""
    draft_weights: Literal["auto", "dense", "int8", "int4"] = "auto"
    """int8: the draft runs in float32 with int8 linear weights (torch dynamic quantization);
    int4: 4-bit weights in groups of 32 in every layer, activations in ``dtype``; auto is
    int4 where voice's native kernels run and int8 elsewhere."""
    target_weights: Literal["auto", "dense", "int8", "int4"] = "auto"
    """Weights of the target's linear layers: dense (``dtype``), int8 (one scale per row) or
    int4 (groups of 32; an embedded GGUF model keeps its Q4_K codes); auto is int4 where
    ``dtype`` resolves to bfloat16 and dense elsewhere. The quantized target is the
    target: speculation stays exact relative to it."""
    draft_threads: int = field(default=0, metadata={"range": (0, 256)})
    """torch CPU threads while the draft model runs; 0 uses the target's setting."""
    lookup_max_ngram: int = field(default=3, metadata={"range": (1, 16)})
    """Longest suffix (tokens) that prompt lookup searches for in the conversation."""
    lookup_min_ngram: int = field(default=1, metadata={"range": (1, 16)})
    """Shortest suffix (tokens) that prompt lookup may match."""
    temperature: float = field(default=0.0, metadata={"range": (0.0, 10.0)})
    """0 is greedy decoding; above 0 samples, exactly as the target alone would."""
    top_k: int = field(default=0, metadata={"range": (0, 1_000_000)})
    """Sample only among the k most likely tokens; 0 turns it off."""
    top_p: float = field(default=1.0, metadata={"range": (0.0, 1.0)})
    """Sample only among the most likely tokens whose probabilities add up to top_p; above 0, 1 turns it off."""
    seed: int = field(default=-1, metadata={"range": (-1, 2**63 - 1)})
    """Seed for sampling; the same seed and question give the same answer. -1 draws a new one."""
    stop_strings: list[str] = field(default_factory=list)
    """Texts that end an answer where they first appear; they are not spoken."""
    max_new_tokens: int = field(default=120, metadata={"range": (1, 4096)})
    """Upper bound on the tokens of one answer."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """auto: bfloat16 where the CPU has AMX or AVX512-BF16, float32 elsewhere."""
    threads: int = field(default=0, metadata={"range": (0, 256)})
    """torch CPU threads; 0 uses every core."""
    max_context_tokens: int = field(default=2048, metadata={"range": (256, 32_768)})
    """Prompt plus answer; the oldest turns are dropped to stay under it."""
    max_history_turns: int = field(default=6, metadata={"range": (0, 100)})
    """Earlier question-answer pairs kept in the prompt."""
    system_prompt: str = DEFAULT_SYSTEM_PROMPT


@dataclass
class TtsConfig:
    """Speech synthesis with piper."""

    voice: str = "en_US-joe-medium"
    """Embedded voice name, or a path to a piper .onnx voice (its .onnx.json beside it)."""
    length_scale: float = field(default=1.0, metadata={"range": (0.5, 2.0)})
    """Speaking slowness: below 1 is faster, above 1 slower."""
    volume: float = field(default=1.0, metadata={"range": (0.0, 4.0)})
    """Gain applied to the voice (1.0 is unchanged)."""
    threads: int = field(default=1, metadata={"range": (0, 64)})
    """onnxruntime threads for piper; 0 uses every core. One leaves a core to the LLM."""
    first_chunk_min_words: int = field(default=3, metadata={"range": (1, 50)})
    """Words the first spoken chunk needs before it may end at a comma or a phrase boundary."""
    first_chunk_at_phrase: bool = True
    """Let the first chunk of a streamed answer also end before a word that starts a phrase ("the", "to" ...)."""
    max_chunk_chars: int = field(default=220, metadata={"range": (20, 2000)})
    """Maximum text handed to piper at once (characters)."""


@dataclass
class ListenConfig:
    """Live mode (``voice listen``): devices, endpointing, barge-in and the wake phrase."""

    input_device: str = ""
    """Microphone by name (or part of it) or index from ``voice devices``; empty is the default."""
    output_device: str = ""
    """Speaker by name or index; empty is the default."""
    silence_ms: int = field(default=600, metadata={"range": (100, 5000)})
    """Silence after speech that ends a turn."""
    early_start_ms: int = field(default=200, metadata={"range": (0, 5000)})
    """Silence after which the reply is prepared while the turn's end is awaited; 0 waits."""
    vad_aggressiveness: int = field(default=2, metadata={"range": (0, 3)})
    """webrtcvad mode for endpointing: 0 takes the most audio as speech, 3 the least."""
    max_turn_s: float = field(default=15.0, metadata={"range": (1.0, 120.0)})
    """A turn longer than this ends where it is."""
    preroll_ms: int = field(default=500, metadata={"range": (0, 2000)})
    """Audio kept from before speech was detected, so the first syllable is not cut."""
    min_speech_ms: int = field(default=150, metadata={"range": (30, 5000)})
    """Voiced audio a turn needs; shorter ones are dropped as noise."""
    barge_in: bool = True
    """Speaking over a reply stops it and cancels the rest of the answer."""
    barge_in_margin: float = field(default=3.0, metadata={"range": (1.0, 100.0)})
    """How many times louder than the measured echo of the reply the microphone must be,
    relative to the reply's own level, before speech over a reply counts as barge-in."""
    wake_phrase: str = ""
    """When set, a turn is answered only if it begins with this phrase, which is removed."""


@dataclass
class MqttConfig:
    """The MQTT service (``voice mqtt``): broker connection, topics and limits."""

    host: str = "localhost"
    port: int = field(default=1883, metadata={"range": (1, 65535)})
    client_id: str = "voice"
    """Also names the broker's persistent session: two services must not share it."""
    username: str = ""
    password: str = ""
    """Empty reads the VOICE_MQTT_PASSWORD environment variable, which keeps it out of the file."""
    tls: bool = False
    tls_ca_certs: str = ""
    """PEM file of the CA that signed the broker's certificate; empty uses the system's CAs."""
    tls_certfile: str = ""
    tls_keyfile: str = ""
    tls_insecure: bool = False
    """Skip the check that the certificate names the host (self-signed test brokers only)."""
    keepalive_s: int = field(default=60, metadata={"range": (5, 3600)})
    reconnect_max_s: float = field(default=30.0, metadata={"range": (1.0, 3600.0)})
    """Maximum wait between reconnection attempts, in seconds; the wait doubles from one second up to it."""
    topic_prefix: str = "voice"
    """First level of the project's own topics (answers, metrics, errors, state)."""
    site_ids: list[str] = field(default_factory=lambda: ["default"])
    """Hermes siteIds this service serves; requests for any other site get an error."""
    queue_size: int = field(default=4, metadata={"range": (0, 100)})
    """Requests that may wait while one is in progress; later ones get a busy error."""
    max_payload_bytes: int = field(default=65_536, metadata={"range": (256, 16_777_216)})
    """Larger request payloads are rejected with an error."""
    speaker: bool = True
    """Play replies on this machine's default output device."""
    file_root: str = ""
    """When set, WAV paths in requests must lie inside this folder; empty allows any path."""
    publish_audio: bool = False
    """Also send reply audio as WAV chunks on hermes/audioServer/<siteId>/playBytes/<id>."""
    audio_chunk_bytes: int = field(default=32_768, metadata={"range": (1024, 1_048_576)})
    """Largest playBytes message, header included."""
    discovery: bool = True
    """Publish Home Assistant MQTT discovery configs."""
    discovery_prefix: str = "homeassistant"
    device_name: str = "Voice assistant"


@dataclass
class Config:
    asr: AsrConfig = field(default_factory=AsrConfig)
    llm: LlmConfig = field(default_factory=LlmConfig)
    tts: TtsConfig = field(default_factory=TtsConfig)
    listen: ListenConfig = field(default_factory=ListenConfig)
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    allow_download: bool = False
    """Let Hugging Face ids download missing model files; off keeps the program offline."""
    cache_dir: str = ""
    """Folder for converted models; empty means $XDG_CACHE_HOME/voice or ~/.cache/voice."""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


def _type_name(annotation: Any) -> str:
    if typing.get_origin(annotation) is Literal:
        return "one of " + ", ".join(repr(choice) for choice in typing.get_args(annotation))
    if annotation == list[str]:
        return "a list of non-empty strings"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(annotation, str(annotation))


def _convert(value: Any, annotation: Any, spec: dataclasses.Field, where: str) -> Any:
    """Check one YAML value against its field; return it converted to the field's type."""
    allowed = _type_name(annotation)
    value_range = spec.metadata.get("range")
    if value_range:
        allowed += f" from {value_range[0]} to {value_range[1]}"
    problem = ConfigError(f"{where} must be {allowed}, got {value!r}")
    if typing.get_origin(annotation) is Literal:
        if value not in typing.get_args(annotation):
            raise problem
        return value
    if annotation == list[str]:
        if not isinstance(value, list) or not all(isinstance(item, str) and item for item in value):
            raise problem
        return list(value)
    if annotation is bool:
        if not isinstance(value, bool):
            raise problem
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise problem
    elif annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise problem
        value = float(value)
    elif annotation is str:
        if not isinstance(value, str):
            raise problem
    if value_range and not value_range[0] <= value <= value_range[1]:
        raise problem
    return value


def _build(cls: type, data: Any, path: Path, prefix: str = "") -> Any:
    section = prefix.rstrip(".") or "the top level"
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: {section} must be a mapping of keys to values, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {spec.name: spec for spec in dataclasses.fields(cls)}
    values = {}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(f"{path}: unknown key '{prefix}{key}' in {section}; allowed keys: {', '.join(fields)}")
        annotation = hints[key]
        if dataclasses.is_dataclass(annotation):
            values[key] = _build(annotation, value, path, f"{prefix}{key}.")
        else:
            values[key] = _convert(value, annotation, fields[key], f"{path}: {prefix}{key}")
    return cls(**values)


class _DuplicateKeyError(ValueError):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe YAML loader that rejects a key given twice in one mapping, where PyYAML keeps the last silently."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _value_node in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise _DuplicateKeyError(
                    f"key {key!r} appears twice at line {key_node.start_mark.line + 1}; keep one of them"
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_config(path: str | Path | None) -> Config:
    """Read and validate a config file; ``None`` returns the defaults."""
    if path is None:
        return Config()
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"Config file not found: {path}. Pass an existing file with --config") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"Cannot read config file {path}: {error}") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except _DuplicateKeyError as error:
        raise ConfigError(f"{path}: {error}") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: invalid YAML{line}: {getattr(error, 'problem', error)}") from None
    if data is None:
        data = {}
    config = _build(Config, data, path)
    if config.llm.system_prompt.strip() == "":
        raise ConfigError(f"{path}: llm.system_prompt must not be empty")
    _check_llm(config.llm, path)
    _check_mqtt(config.mqtt, path)
    if config.listen.early_start_ms >= config.listen.silence_ms:
        raise ConfigError(
            f"{path}: listen.early_start_ms ({config.listen.early_start_ms}) must be below listen.silence_ms "
            f"({config.listen.silence_ms}), which ends the turn anyway; lower it, or use 0 to wait for the end of the turn"
        )
    _check_model_paths(config, path)
    _check_language(config, path)
    if config.cache_dir and Path(config.cache_dir).expanduser().exists() and not Path(config.cache_dir).expanduser().is_dir():
        raise ConfigError(f"{path}: cache_dir: {config.cache_dir!r} is a file, not a folder; name a folder or leave it empty")
    return config


def _check_llm(llm: LlmConfig, path: Path) -> None:
    """Reject language-model settings that are valid one by one but not together."""
    if llm.max_new_tokens >= llm.max_context_tokens - 128:
        raise ConfigError(
            f"{path}: llm.max_new_tokens ({llm.max_new_tokens}) leaves less than 128 tokens of llm.max_context_tokens "
            f"({llm.max_context_tokens}) for the system prompt and the question; lower the first or raise the second"
        )
    if llm.top_p <= 0:
        raise ConfigError(f"{path}: llm.top_p must be above 0 and at most 1, got {llm.top_p!r}; use 1 to turn it off")
    if llm.lookup_min_ngram > llm.lookup_max_ngram:
        raise ConfigError(
            f"{path}: llm.lookup_min_ngram ({llm.lookup_min_ngram}) is above llm.lookup_max_ngram "
            f"({llm.lookup_max_ngram}); lower the minimum or raise the maximum"
        )


def _check_mqtt(mqtt: MqttConfig, path: Path) -> None:
    for key in ("host", "client_id", "topic_prefix", "discovery_prefix", "device_name"):
        if not getattr(mqtt, key).strip():
            raise ConfigError(f"{path}: mqtt.{key} must not be empty")
    for key in ("topic_prefix", "discovery_prefix"):
        value = getattr(mqtt, key)
        if any(character in value for character in "#+") or value.startswith("/") or value.endswith("/"):
            raise ConfigError(f"{path}: mqtt.{key}: {value!r} must be a topic without wildcards (# +) or a leading or trailing slash")
    for site in mqtt.site_ids:
        if any(character in site for character in "#+/"):
            raise ConfigError(f"{path}: mqtt.site_ids: {site!r} must not contain / # or +")
    if not mqtt.site_ids:
        raise ConfigError(f"{path}: mqtt.site_ids must name at least one site, such as default")
    repeated = sorted({site for site in mqtt.site_ids if mqtt.site_ids.count(site) > 1})
    if repeated:
        raise ConfigError(f"{path}: mqtt.site_ids lists {repeated[0]!r} more than once; name each site once")
    for key in ("tls_ca_certs", "tls_certfile", "tls_keyfile"):
        value = getattr(mqtt, key)
        if value and not Path(value).expanduser().is_file():
            raise ConfigError(f"{path}: mqtt.{key}: {value!r} not found; name a PEM file or leave it empty")
    if mqtt.tls_keyfile and not mqtt.tls_certfile:
        raise ConfigError(f"{path}: mqtt.tls_keyfile is set without mqtt.tls_certfile; give both or neither")
    if mqtt.file_root and not Path(mqtt.file_root).expanduser().is_dir():
        raise ConfigError(f"{path}: mqtt.file_root: {mqtt.file_root!r} is not a folder; name an existing folder or leave it empty")


def _check_language(config: Config, path: Path) -> None:
    """Reject a Whisper language code that faster-whisper would only reject mid-turn."""
    if not config.asr.language:
        return
    try:
        from faster_whisper.tokenizer import _LANGUAGE_CODES as codes
    except ImportError:  # the private list moved; Whisper reports a bad code itself
        return
    if config.asr.language not in codes:
        raise ConfigError(
            f"{path}: asr.language: {config.asr.language!r} is not a Whisper language code; "
            "use a code such as en, de or fr, or an empty string to detect the language"
        )


def _check_model_paths(config: Config, path: Path) -> None:
    """Reject model settings that name a local path which does not exist."""
    from voice.models import embedded_names

    settings = [
        ("asr.model", config.asr.model, "whisper", "a CTranslate2 Whisper folder"),
        ("llm.target", config.llm.target, "llm", "a transformers model folder"),
        ("llm.draft", config.llm.draft, "llm", "a transformers model folder"),
        ("tts.voice", config.tts.voice, "piper", "a piper .onnx voice file"),
    ]
    for key, value, kind, local in settings:
        if value in embedded_names(kind):
            continue
        looks_like_path = value.startswith((".", "/", "~")) or value.endswith(".onnx") or kind == "piper"
        if looks_like_path and not Path(value).expanduser().exists():
            raise ConfigError(
                f"{path}: {key}: {value!r} not found; use an embedded name "
                f"({', '.join(embedded_names(kind))})"
                + (f" or {local}" if kind == "piper" else f", {local}, or a Hugging Face id")
            )


