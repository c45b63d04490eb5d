"""The MQTT service against a real Mosquitto broker, with a tiny random target so turns take milliseconds."""

from __future__ import annotations

import asyncio
import json
import subprocess

import numpy as np
import pytest

from tests.conftest import FIXTURES
from tests.mqtt.conftest import Broker, Observer, ServiceThread, mqtt_config, tiny_assistant
from voice.config import Config, LlmConfig
from voice.errors import VoiceError
from voice.mqtt import protocol
from voice.mqtt.service import MqttService

ASK = "voice/ask"


@pytest.fixture(scope="module")
def assistant(qwen_tokenizer):
    return tiny_assistant(qwen_tokenizer)


def wait_online(observer: Observer) -> None:
    observer.wait_for(lambda: any(message.payload == b"online" for message in observer.on("voice/status")), description="voice/status online")


def test_text_question_streams_answer_in_order(assistant, observer, start_service):
    start_service(assistant)
    wait_online(observer)
    observer.publish(ASK, {"id": "q1", "text": "What is the capital of France?", "customData": "kitchen-button"})
    answer = observer.wait_for_payload("voice/answer", id="q1")
    ended = observer.wait_for_payload(protocol.SESSION_ENDED, sessionId=answer["sessionId"])

    fragments = observer.payloads("voice/answer/text", id="q1")
    assert [fragment["index"] for fragment in fragments] == list(range(len(fragments)))
    assert "".join(fragment["text"] for fragment in fragments) == answer["text"]
    assert answer["siteId"] == "default"
    assert answer["transcript"] == "What is the capital of France?"
    assert ended["termination"] == {"reason": "nominal"}
    assert ended["customData"] == "kitchen-button"

    # Hermes session start, then the streamed text, then the full answer and metrics.
    order = [message.topic for message in observer.messages if message.topic in (protocol.SESSION_STARTED, "voice/answer/text", "voice/answer", "voice/metrics", protocol.SESSION_ENDED)]
    assert order[0] == protocol.SESSION_STARTED
    assert order[-1] == protocol.SESSION_ENDED
    assert order.index("voice/answer") > max(i for i, topic in enumerate(order) if topic == "voice/answer/text")
    metrics = observer.wait_for_payload("voice/metrics", id="q1")
    assert metrics["answer_tokens"] >= 1
    assert metrics["first_token_ms"] >= 0


def test_hermes_nlu_query_is_answered(assistant, observer, start_service):
    start_service(assistant)
    wait_online(observer)
    observer.publish(protocol.NLU_QUERY, {"input": "Turn on the lights", "siteId": "default", "id": 17, "sessionId": "s-17"})
    answer = observer.wait_for_payload("voice/answer", id="17")
    assert answer["sessionId"] == "s-17"
    assert answer["transcript"] == "Turn on the lights"
    started = observer.wait_for_payload(protocol.SESSION_STARTED, sessionId="s-17")
    assert started["siteId"] == "default"


@pytest.mark.parametrize(
    ("payload", "code", "request_id"),
    [
        (b"{not json", "invalid_json", None),
        (b"[1, 2]", "invalid_json", None),
        (b'{"id": "m1"}', "invalid_request", "m1"),
        (b'{"id": "m2", "text": 42}', "invalid_request", "m2"),
        (b'{"id": "m3", "text": "   "}', "invalid_request", "m3"),
        (b'{"id": "m4", "text": "hi", "wav": "/tmp/a.wav"}', "invalid_request", "m4"),
        (b'{"id": "m5", "text": "hi", "speak": "yes"}', "invalid_request", "m5"),
        (b'{"id": "m6", "text": "hi", "siteId": "garage"}', "unknown_site", "m6"),
        (b'{"id": "m7", "text": "hi", "output": "/tmp/reply.mp3"}', "bad_output", "m7"),
        (b'{"id": "m8", "wav": "/nonexistent/question.wav"}', "bad_audio", "m8"),
        (b'{"id": [1], "text": "hi"}', "invalid_request", None),
        (b'\xff\xfe\x00', "invalid_json", None),
        (b'{"id": "m9", "text": "\\ud800"}', "invalid_request", "m9"),
        # Nested past Python's recursion limit: json.loads raises RecursionError.
        (b"[" * 60_000, "invalid_json", None),
        (b'{"a":' * 13_000, "invalid_json", None),
    ],
)
def test_malformed_request_gets_error_and_service_keeps_running(assistant, observer, start_service, payload, code, request_id):
    start_service(assistant)
    wait_online(observer)
    observer.publish(ASK, payload)
    error = observer.wait_for_payload("voice/error", code=code)
    assert error["id"] == request_id
    assert error["error"]
    # Still serving: the next good request is answered.
    observer.publish(ASK, {"id": "after", "text": "Hello"})
    observer.wait_for_payload("voice/answer", id="after")


def test_oversized_payload_rejected(assistant, observer, start_service):
    start_service(assistant, max_payload_bytes=1024)
    wait_online(observer)
    observer.publish(ASK, {"id": "big", "text": "x" * 2000})
    error = observer.wait_for_payload("voice/error", code="payload_too_large")
    assert "1024" in error["error"]
    assert error["id"] == "big"
    observer.publish(ASK, {"id": "small", "text": "Hello"})
    observer.wait_for_payload("voice/answer", id="small")


def test_oversized_nested_payload_rejected(assistant, observer, start_service):
    start_service(assistant, max_payload_bytes=1024)
    wait_online(observer)
    observer.publish(ASK, b"[" * 5000)
    error = observer.wait_for_payload("voice/error", code="payload_too_large")
    assert error["id"] is None
    observer.publish(ASK, {"id": "small", "text": "Hello"})
    observer.wait_for_payload("voice/answer", id="small")


def test_retained_nested_payload_ignored(assistant, observer, start_service):
    observer.client.publish(ASK, b"[" * 5000, qos=1, retain=True).wait_for_publish(10)
    start_service(assistant)
    wait_online(observer)
    error = observer.wait_for_payload("voice/error", code="retained")
    assert error["id"] is None
    observer.publish(ASK, {"id": "plain", "text": "Hello"})
    observer.wait_for_payload("voice/answer", id="plain")


def test_message_handler_error_keeps_serving(assistant, observer, start_service, monkeypatch):
    real_parse = protocol.parse_request

    def parse_or_fail(topic, payload, config, topics):
        if payload == b"fail":
            raise ValueError("parser bug")
        return real_parse(topic, payload, config, topics)

    monkeypatch.setattr(protocol, "parse_request", parse_or_fail)
    start_service(assistant)
    wait_online(observer)
    observer.publish(ASK, b"fail")
    error = observer.wait_for_payload("voice/error", code="internal")
    assert "parser bug" in error["error"]
    observer.publish(ASK, {"id": "after", "text": "Hello"})
    observer.wait_for_payload("voice/answer", id="after")


def test_repeated_request_id_answered_once(assistant, observer, start_service):
    start_service(assistant)
    wait_online(observer)
    observer.publish(ASK, {"id": "once", "text": "Hello"})
    observer.publish(ASK, {"id": "once", "text": "Hello"})
    observer.publish(ASK, {"id": "later", "text": "Hello again"})
    observer.wait_for_payload("voice/answer", id="later")
    assert len(observer.payloads("voice/answer", id="once")) == 1
    duplicate = observer.wait_for_payload("voice/error", code="duplicate_id")
    assert duplicate["id"] == "once"


def test_sites_served_in_arrival_order(qwen_tokenizer, observer, start_service):
    # Longer answers, so the second request arrives while the first is being answered.
    assistant = tiny_assistant(qwen_tokenizer, LlmConfig(speculative=False, max_new_tokens=300, max_context_tokens=2048))
    runner = start_service(assistant, site_ids=["kitchen", "bedroom"])
    wait_online(observer)
    observer.publish(ASK, {"id": "k", "siteId": "kitchen", "text": "Tell me a long story."})
    observer.publish(protocol.NLU_QUERY, {"id": "b", "siteId": "bedroom", "input": "Tell me another long story."})
    bedroom = observer.wait_for_payload("voice/answer", id="b")
    kitchen = observer.wait_for_payload("voice/answer", id="k")
    assert kitchen["siteId"] == "kitchen"
    assert bedroom["siteId"] == "bedroom"

    def index(topic, **match):
        return next(i for i, message in enumerate(observer.messages) if message.topic == topic and all(message.json().get(k) == v for k, v in match.items()))

    # The bedroom's session starts only after the kitchen's has ended, and it was queued.
    assert index(protocol.SESSION_ENDED, sessionId=kitchen["sessionId"]) < index(protocol.SESSION_STARTED, sessionId=bedroom["sessionId"])
    assert observer.payloads(protocol.SESSION_QUEUED, siteId="bedroom")
    # Each site keeps its own conversation.
    conversations = runner.service.conversations
    assert [exchange.user for exchange in conversations["kitchen"].history] == ["Tell me a long story."]
    assert [exchange.user for exchange in conversations["bedroom"].history] == ["Tell me another long story."]


def test_full_queue_replies_busy(qwen_tokenizer, observer, start_service):
    assistant = tiny_assistant(qwen_tokenizer, LlmConfig(speculative=False, max_new_tokens=300, max_context_tokens=2048))
    start_service(assistant, queue_size=1)
    wait_online(observer)
    for number in range(4):
        observer.publish(ASK, {"id": f"r{number}", "text": f"Tell me story number {number}."})
    observer.wait_for_payload("voice/answer", id="r1")
    busy = observer.payloads("voice/error", code="busy")
    assert {error["id"] for error in busy} == {"r2", "r3"}
    assert "mqtt.queue_size" in busy[0]["error"]
    observer.wait_for_payload("voice/answer", id="r0")
    assert not observer.payloads("voice/answer", id="r2")


def test_discovery_resent_when_home_assistant_starts(assistant, broker, observer, start_service):
    start_service(assistant)
    wait_online(observer)

    def configs():
        return [m for m in observer.messages if m.topic.startswith("homeassistant/") and m.topic.endswith("/config")]

    observer.wait_for(lambda: len({m.topic for m in configs()}) == 6, description="six discovery configs")
    configs = configs()
    by_topic = {message.topic: message.json() for message in configs}
    assert set(by_topic) == {
        "homeassistant/sensor/voice-test/state/config",
        "homeassistant/sensor/voice-test/transcript/config",
        "homeassistant/sensor/voice-test/answer/config",
        "homeassistant/sensor/voice-test/latency/config",
        "homeassistant/text/voice-test/ask/config",
        "homeassistant/switch/voice-test/mute/config",
    }
    for topic, entity in by_topic.items():
        assert entity["availability_topic"] == "voice/status"
        assert entity["device"]["identifiers"] == ["voice-test"]
        assert entity["unique_id"].startswith("voice-test_")
    # Retained: a Home Assistant that subscribes later still gets every config.
    late = Observer(broker.port, client_id="late-home-assistant", topics=("homeassistant/#",))
    try:
        late.wait_for(lambda: len(late.messages) >= 6, description="retained discovery")
        assert {message.topic for message in late.messages if message.retain} == set(by_topic)
    finally:
        late.close()
    before = len(observer.messages)
    observer.publish("homeassistant/status", b"online")
    observer.wait_for(lambda: any(m.topic.endswith("/ask/config") for m in observer.messages[before:]), description="discovery sent again")
    # The text entity's template produces a request the service accepts.
    template = by_topic["homeassistant/text/voice-test/ask/config"]["command_template"]
    request = template.replace("{{ value | tojson }}", json.dumps("Hi there"))
    observer.publish(ASK, request.encode())
    answer = observer.wait_for_payload("voice/answer", transcript="Hi there")
    assert answer["siteId"] == "default"


def test_mute_switch_updates_state(assistant, observer, start_service):
    runner = start_service(assistant)
    wait_online(observer)
    observer.publish("voice/mute/set", b"ON")
    observer.wait_for(lambda: any(m.json().get("muted") for m in observer.on("voice/state")), description="muted state")
    assert runner.service.muted
    observer.publish("voice/mute/set", b"maybe")
    error = observer.wait_for_payload("voice/error", code="invalid_request")
    assert "invalid payload 'maybe'" in error["error"]
    assert "b'" not in error["error"]
    assert "send ON or OFF" in error["error"]
    observer.publish("voice/mute/set", b"off")
    observer.wait_for(lambda: not observer.on("voice/state")[-1].json()["muted"], description="unmuted state")


def test_state_topic_shows_last_turn(assistant, observer, start_service):
    start_service(assistant)
    wait_online(observer)
    observer.publish(ASK, {"id": "s1", "text": "What time is it?"})
    answer = observer.wait_for_payload("voice/answer", id="s1")
    state = observer.wait_for(lambda: [m.json() for m in observer.on("voice/state") if m.json()["state"] == "idle" and m.json()["answer"]], description="idle state")[-1]
    assert state["transcript"] == "What time is it?"
    assert state["answer"] == answer["text"][:255]
    assert state["latency_ms"] is not None


def test_stop_replies_to_queued_requests_and_goes_offline(qwen_tokenizer, observer, start_service):
    assistant = tiny_assistant(qwen_tokenizer, LlmConfig(speculative=False, max_new_tokens=300, max_context_tokens=2048))
    runner = start_service(assistant)
    wait_online(observer)
    observer.publish(ASK, {"id": "current", "text": "Tell me a long story."})
    observer.publish(ASK, {"id": "queued", "text": "And another."})
    observer.wait_for_payload(protocol.SESSION_STARTED)
    runner.stop()
    assert runner.error is None
    # The current turn finished; the queued one got a shutting_down error.
    observer.wait_for_payload("voice/answer", id="current")
    queued = observer.wait_for_payload("voice/error", id="queued", code="shutting_down")
    ended = observer.wait_for_payload(protocol.SESSION_ENDED, sessionId=queued["sessionId"])
    assert ended["termination"]["reason"] == "error"
    observer.wait_for(lambda: observer.on("voice/status")[-1].payload == b"offline", description="offline status")


def test_service_reconnects_after_broker_restart(assistant, broker, observer, start_service):
    runner = start_service(assistant)
    wait_online(observer)
    broker.restart()
    observer.wait_for(lambda: runner.service.connections >= 2, timeout=30, description="reconnection")
    observer.publish(ASK, {"id": "after-restart", "text": "Hello"})
    observer.wait_for_payload("voice/answer", id="after-restart")


def test_requests_sent_while_service_is_away_are_answered(assistant, broker, observer, start_service):
    runner = start_service(assistant)
    wait_online(observer)
    runner.stop()
    # The persistent session keeps the subscription: the broker queues QoS 1 requests.
    observer.publish(ASK, {"id": "while-away", "text": "Hello"})
    start_service(assistant)
    observer.wait_for_payload("voice/answer", id="while-away")
    assert len(observer.payloads("voice/answer", id="while-away")) == 1


def test_wrong_password_ends_with_clear_error(tmp_path, assistant):
    passwords = tmp_path / "passwords"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(passwords), "homeassistant", "right-password"], check=True)
    broker = Broker(tmp_path, password_file=passwords)
    broker.start()
    try:
        config = Config(mqtt=mqtt_config(broker, username="homeassistant", password="wrong-password"))
        with pytest.raises(VoiceError) as raised:
            asyncio.run(asyncio.wait_for(MqttService(assistant, config).run(), 30))
        message = str(raised.value)
        assert "'homeassistant'" in message
        assert "VOICE_MQTT_PASSWORD" in message
        assert "wrong-password" not in message
    finally:
        broker.stop()


def _certificates(folder) -> tuple:
    """A throwaway CA and a server certificate for 127.0.0.1 it signed, made with openssl."""

    def openssl(*arguments):
        subprocess.run(["openssl", *arguments], check=True, capture_output=True, cwd=folder)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=voice test CA")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    (folder / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out", "server.pem", "-days", "2", "-extfile", "san.ext")
    return folder / "ca.pem", folder / "server.pem", folder / "server.key"


def test_service_connects_over_tls(tmp_path, assistant):
    ca, certificate, key = _certificates(tmp_path)
    broker = Broker(tmp_path, tls=(ca, certificate, key))
    broker.start()
    observer = Observer(broker.port)
    runner = None
    try:
        settings = mqtt_config(broker, port=broker.tls_port, tls=True, tls_ca_certs=str(ca))
        runner = ServiceThread(MqttService(assistant, Config(llm=assistant.llm.config, mqtt=settings)))
        wait_online(observer)
        observer.publish(ASK, {"id": "tls", "text": "Hello"})
        observer.wait_for_payload("voice/answer", id="tls")
    finally:
        if runner is not None:
            runner.stop()
        observer.close()
        broker.stop()


def test_unknown_tls_ca_stops_service(tmp_path, assistant):
    ca, certificate, key = _certificates(tmp_path)
    broker = Broker(tmp_path, tls=(ca, certificate, key))
    broker.start()
    try:
        # Without tls_ca_certs the system CAs are used, and they do not know the test CA.
        config = Config(mqtt=mqtt_config(broker, port=broker.tls_port, tls=True))
        with pytest.raises(VoiceError) as raised:
            asyncio.run(asyncio.wait_for(MqttService(assistant, config).run(), 30))
        assert "mqtt.tls_ca_certs" in str(raised.value)
    finally:
        broker.stop()


def test_retained_request_is_not_answered(assistant, broker, observer, start_service):
    observer.client.publish(ASK, json.dumps({"id": "sticky", "text": "Hello"}), qos=1, retain=True).wait_for_publish(10)
    start_service(assistant)
    wait_online(observer)
    error = observer.wait_for_payload("voice/error", code="retained")
    assert error["id"] == "sticky"
    observer.publish(ASK, {"id": "plain", "text": "Hello"})
    observer.wait_for_payload("voice/answer", id="plain")
    assert not observer.payloads("voice/answer", id="sticky")


def test_mute_silences_a_reply_already_playing():
    from voice.audio.sinks import AudioSink
    from voice.mqtt.service import _MutableSink

    class Recorder(AudioSink):
        def __init__(self):
            self.chunks, self.closed_ok = [], None

        async def write(self, samples):
            self.chunks.append(samples)

        async def close(self, ok):
            self.closed_ok = ok

    class Service:
        muted = False

    async def play(service, recorder):
        sink = _MutableSink(recorder, service)
        await sink.open(22050)
        await sink.write(np.zeros(10, dtype=np.float32))
        service.muted = True
        await sink.write(np.zeros(10, dtype=np.float32))
        await sink.close(True)

    recorder = Recorder()
    asyncio.run(play(Service(), recorder))
    assert len(recorder.chunks) == 1
    assert recorder.closed_ok is False  # aborted, not drained


def test_empty_message_is_ignored(assistant, observer, start_service):
    start_service(assistant)
    wait_online(observer)
    # An empty retained publish is how a client deletes a retained request.
    observer.publish(ASK, b"")
    observer.publish(ASK, {"id": "next", "text": "Hello"})
    observer.wait_for_payload("voice/answer", id="next")
    assert not observer.on("voice/error")


def test_relative_paths_are_taken_inside_the_file_root(tmp_path):
    from voice.config import MqttConfig
    from voice.mqtt.protocol import RequestError, Topics, parse_request

    config = MqttConfig(file_root=str(tmp_path))
    topics = Topics.under("voice")
    request = parse_request(ASK, json.dumps({"wav": "q.wav", "output": "replies/a.wav"}).encode(), config, topics)
    assert request.wav == str(tmp_path.resolve() / "q.wav")
    assert request.output == str(tmp_path.resolve() / "replies" / "a.wav")
    with pytest.raises(RequestError) as raised:
        parse_request(ASK, json.dumps({"wav": "../outside.wav"}).encode(), config, topics)
    assert raised.value.code == "bad_audio"


@pytest.mark.parametrize(
    ("topic", "fragment"),
    [(protocol.TTS_SAY, "needs 'text' (the words to speak)"), (protocol.NLU_QUERY, "needs 'input' (the question to answer)")],
    ids=["tts-say", "nlu-query"],
)
def test_missing_text_error_names_field(topic, fragment):
    from voice.config import MqttConfig

    with pytest.raises(protocol.RequestError) as raised:
        protocol.parse_request(topic, b"{}", MqttConfig(), protocol.Topics.under("voice"))
    assert raised.value.code == "invalid_request"
    assert fragment in str(raised.value)


@pytest.mark.parametrize(("topic", "example"), [(ASK, '{"text": "..."}'), (protocol.NLU_QUERY, '{"input": "..."}')], ids=["ask", "nlu-query"])
def test_invalid_json_hint_per_topic(topic, example):
    from voice.config import MqttConfig

    with pytest.raises(protocol.RequestError) as raised:
        protocol.parse_request(topic, b"{not json", MqttConfig(), protocol.Topics.under("voice"))
    assert raised.value.code == "invalid_json"
    assert str(raised.value).endswith(f"send an object such as {example}")


def test_output_overwriting_question_rejected(assistant, observer, start_service, tmp_path):
    recording = tmp_path / "question.wav"
    recording.write_bytes((FIXTURES / "en_piper_capital_france_quiet.wav").read_bytes())
    before = recording.read_bytes()
    start_service(assistant)
    wait_online(observer)
    observer.publish(ASK, {"id": "same", "wav": str(recording), "output": str(tmp_path / "." / "question.wav")})
    error = observer.wait_for_payload("voice/error", id="same")
    assert error["code"] == "bad_output"
    assert "would overwrite" in error["error"]
    assert recording.read_bytes() == before


def test_unsent_message_count_in_shutdown_log(assistant, broker, observer, start_service, monkeypatch, caplog):
    from voice.mqtt import service

    monkeypatch.setattr(service, "_DRAIN_TIMEOUT_S", 0.5)
    runner = start_service(assistant)
    wait_online(observer)
    broker.stop()
    with caplog.at_level("WARNING", logger="voice.mqtt.service"):
        runner.stop()
    unsent = [record.getMessage() for record in caplog.records if "unsent" in record.getMessage()]
    assert unsent == ["Stopping with 1 MQTT message unsent: the broker is unreachable"]
