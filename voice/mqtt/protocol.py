"""Topics and payloads of the MQTT service: Hermes where it has a message, our own namespace elsewhere.

Hermes (the protocol of Snips and Rhasspy) covers a text query, text to speak, captured
speech and session start and end. It has no message for an answer that streams as it is
verified, for per-turn metrics or for a question recorded in a WAV file, so those live
under ``<prefix>/``. docs/mqtt.md lists every topic with a payload to paste into
``mosquitto_pub``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from voice.config import MqttConfig

# Hermes topics, fixed by the protocol.
NLU_QUERY = "hermes/nlu/query"
TTS_SAY = "hermes/tts/say"
TTS_SAY_FINISHED = "hermes/tts/sayFinished"
TEXT_CAPTURED = "hermes/asr/textCaptured"
SESSION_STARTED = "hermes/dialogueManager/sessionStarted"
SESSION_QUEUED = "hermes/dialogueManager/sessionQueued"
SESSION_ENDED = "hermes/dialogueManager/sessionEnded"

# Maximum length of a question or of text to speak, in characters. The prompt limit would cut a longer
# question anyway, and the cut would change its meaning silently.
MAX_TEXT_CHARS = 2000

# Payloads up to this size are still read for their id when they are rejected as a whole.
_PEEK_LIMIT = 1 << 20

ErrorCode = Literal[
    "invalid_json", "invalid_request", "payload_too_large", "unknown_site", "busy",
    "bad_audio", "bad_output", "no_speech", "audio_device", "duplicate_id", "retained", "shutting_down", "internal",
]


@dataclass(frozen=True)
class Topics:
    """The project's own topics, each under the configured prefix."""

    ask: str
    answer_text: str
    answer: str
    metrics: str
    error: str
    status: str
    state: str
    mute_set: str

    @classmethod
    def under(cls, prefix: str) -> Topics:
        names = {"answer_text": "answer/text", "mute_set": "mute/set"}
        return cls(**{field.name: f"{prefix}/{names.get(field.name, field.name)}" for field in dataclasses.fields(cls)})


def play_bytes_topic(site_id: str, request_id: str) -> str:
    return f"hermes/audioServer/{site_id}/playBytes/{request_id}"


@dataclass
class Request:
    """One request, whichever topic it came on."""

    kind: Literal["ask", "say"]
    """ask: a question (text or WAV) for the language model; say: ``text`` to speak as it is."""
    topic: str
    id: str
    site_id: str
    session_id: str
    text: str | None = None
    wav: str | None = None
    output: str | None = None
    """Write the reply here as a WAV file."""
    speak: bool = True
    """Play the reply on the local speaker (when the service has one and is not muted)."""
    custom_data: str | None = None
    received_at: float = 0.0
    """time.perf_counter() when the message arrived."""

    def reply(self, **payload: Any) -> dict[str, Any]:
        """Return ``payload`` with the identifiers every reply to this request carries."""
        return {"id": self.id, "siteId": self.site_id, "sessionId": self.session_id, **payload}


class RequestError(Exception):
    """A request that cannot be served; published on the error topic with what to fix."""

    def __init__(self, code: ErrorCode, message: str, request_id: str | None = None, site_id: str | None = None, session_id: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.request_id = request_id
        self.site_id = site_id
        self.session_id = session_id

    def payload(self) -> dict[str, Any]:
        return {"id": self.request_id, "siteId": self.site_id, "sessionId": self.session_id, "code": self.code, "error": str(self)}


def peek_ids(payload: bytes) -> tuple[str | None, str | None]:
    """Return the request's id and siteId if the payload is a readable JSON object, else Nones.

    Used for errors about a request that is rejected as a whole, so the sender can still
    match the error to its request.
    """
    if len(payload) > _PEEK_LIMIT:
        return None, None
    try:
        data = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None, None
    if not isinstance(data, dict):
        return None, None
    request_id, site_id = data.get("id"), data.get("siteId")
    request_id = str(request_id) if isinstance(request_id, (str, int)) and not isinstance(request_id, bool) else None
    return request_id, site_id if isinstance(site_id, str) else None


def parse_request(topic: str, payload: bytes, config: MqttConfig, topics: Topics) -> Request:
    """Check one request message and return it; raise RequestError naming the field and the fix."""
    if len(payload) > config.max_payload_bytes:
        raise RequestError(
            "payload_too_large",
            f"payload of {len(payload)} bytes is over the limit of {config.max_payload_bytes} bytes (mqtt.max_payload_bytes); "
            "send a shorter request or a WAV file path instead of audio",
            *peek_ids(payload),
        )
    # hermes/nlu/query carries its text in "input", the other request topics in "text".
    example = f"{{\"{'input' if topic == NLU_QUERY else 'text'}\": \"...\"}}"
    try:
        data = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RequestError("invalid_json", f"payload on {topic} is not JSON ({error}); send an object such as {example}") from None
    except RecursionError:
        # Python's json module recurses once per nesting level, so about 1000 levels
        # exceed the interpreter's recursion limit. A 60 kB payload can nest 60,000 levels.
        raise RequestError("invalid_json", f"payload on {topic} is nested too deeply to parse; send a flat object such as {example}") from None
    if not isinstance(data, dict):
        raise RequestError("invalid_json", f"payload on {topic} must be a JSON object, got {type(data).__name__}")

    request_id = _identifier(data, "id", topic)
    site_id = _optional_string(data, "siteId", topic, request_id) or "default"
    session_id = _optional_string(data, "sessionId", topic, request_id, site_id)
    problem = functools.partial(RequestError, request_id=request_id, site_id=site_id, session_id=session_id)
    if site_id not in config.site_ids:
        raise problem("unknown_site", f"siteId {site_id!r} is not served here; use one of {', '.join(config.site_ids)} or add it to mqtt.site_ids")
    request = Request(
        kind="ask",
        topic=topic,
        id=request_id or uuid.uuid4().hex,
        site_id=site_id,
        session_id=session_id or uuid.uuid4().hex,
        custom_data=_optional_string(data, "customData", topic, request_id, site_id),
    )
    if topic == NLU_QUERY:
        request.text = _required_text(data, "input", "the question to answer", topic, problem)
    elif topic == TTS_SAY:
        request.kind = "say"
        request.text = _required_text(data, "text", "the words to speak", topic, problem)
    elif topic == topics.ask:
        has_text, has_wav = data.get("text") is not None, data.get("wav") is not None
        if has_text == has_wav:
            raise problem("invalid_request", f"a request on {topic} needs exactly one of 'text' (the question) and 'wav' (a path to a recording of it)")
        if has_text:
            request.text = _required_text(data, "text", "the question to answer", topic, problem)
        else:
            request.wav = _path(data, "wav", config, problem)
        if data.get("output") is not None:
            request.output = _path(data, "output", config, problem)
            if not request.output.lower().endswith(".wav"):
                raise problem("bad_output", f"output {request.output!r} must end in .wav")
        speak = data.get("speak", True)
        if not isinstance(speak, bool):
            raise problem("invalid_request", f"'speak' must be true or false, got {speak!r}")
        request.speak = speak
    else:
        raise problem("invalid_request", f"{topic} is not a request topic")
    return request


def _identifier(data: dict, key: str, topic: str) -> str | None:
    value = data.get(key)
    if value is None:
        return None
    # Numbers are common ids in home automation flows; they come back as strings.
    if isinstance(value, bool) or not isinstance(value, (str, int)) or value == "":
        raise RequestError("invalid_request", f"'{key}' on {topic} must be a non-empty string or an integer, got {value!r}")
    return str(value)


def _optional_string(data: dict, key: str, topic: str, request_id: str | None, site_id: str | None = None) -> str | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise RequestError("invalid_request", f"'{key}' on {topic} must be a non-empty string, got {value!r}", request_id, site_id)
    if key == "siteId" and any(character in value for character in "#+/"):
        raise RequestError("invalid_request", f"siteId {value!r} must not contain / # or +", request_id)
    return value


def _required_text(data: dict, key: str, meaning: str, topic: str, problem) -> str:
    value = data.get(key)
    if value is None:
        raise problem("invalid_request", f"a request on {topic} needs '{key}' ({meaning}); send for example {{\"{key}\": \"Good morning\"}}")
    if not isinstance(value, str):
        raise problem("invalid_request", f"'{key}' on {topic} must be a string, got {value!r}")
    if not value.strip():
        raise problem("invalid_request", f"'{key}' on {topic} is empty; send the words to answer or speak")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        # JSON allows escaped lone surrogates ("\ud800"), which no tokenizer can take.
        raise problem("invalid_request", f"'{key}' on {topic} contains an invalid character (a lone UTF-16 surrogate); send valid Unicode text") from None
    if len(value) > MAX_TEXT_CHARS:
        raise problem("invalid_request", f"'{key}' on {topic} has {len(value)} characters; the limit is {MAX_TEXT_CHARS}")
    return value.strip()


def _path(data: dict, key: str, config: MqttConfig, problem) -> str:
    """Return the path in ``data[key]``; a relative path is taken inside mqtt.file_root when that is set."""
    value = data[key]
    if not isinstance(value, str) or not value:
        raise problem("invalid_request", f"'{key}' must be a file path, got {value!r}")
    if config.file_root:
        root = Path(config.file_root).expanduser().resolve()
        resolved = (root / Path(value).expanduser()).resolve()
        if not resolved.is_relative_to(root):
            code = "bad_audio" if key == "wav" else "bad_output"
            raise problem(code, f"'{key}' {value!r} is outside mqtt.file_root ({root}); use a path inside it")
        return str(resolved)
    return value


def dumps(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
