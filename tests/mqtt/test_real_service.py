"""The MQTT service with the real models and a real Mosquitto: spoken questions, restarts, shutdown."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
import time
import wave
from collections.abc import Iterator

import pytest

from tests.conftest import FIXTURES, ROOT
from tests.mqtt.conftest import Observer
from voice.audio.wav import read_wav
from voice.mqtt import protocol

pytestmark = pytest.mark.slow

ASK = "voice/ask"


def wait_online(observer: Observer, timeout: float = 120) -> None:
    observer.wait_for(lambda: any(message.payload == b"online" for message in observer.on("voice/status")), timeout=timeout, description="voice/status online")


def test_spoken_question_answered_into_wav(assistant, observer, start_service, tmp_path):
    assistant.llm.new_conversation()
    start_service(assistant)
    wait_online(observer)
    reply = tmp_path / "reply.wav"
    observer.publish(ASK, {"id": "spoken", "wav": str(FIXTURES / "en_piper_capital_france_quiet.wav"), "output": str(reply), "speak": False})
    answer = observer.wait_for_payload("voice/answer", id="spoken", timeout=180)
    captured = observer.wait_for_payload(protocol.TEXT_CAPTURED, sessionId=answer["sessionId"])
    assert "france" in captured["text"].lower()
    assert 0 < captured["likelihood"] <= 1
    assert "paris" in answer["text"].lower()
    assert answer["output"] == str(reply)
    samples, rate = read_wav(reply)
    assert rate == assistant.synthesizer.sample_rate
    assert len(samples) > rate // 2
    metrics = observer.wait_for_payload("voice/metrics", id="spoken")
    assert metrics["speculative"]
    # None when the adaptive draft length chose not to draft for this short answer.
    assert metrics["acceptance_rate"] is None or 0 <= metrics["acceptance_rate"] <= 1
    assert 0 < metrics["first_token_ms"] <= metrics["first_audio_ms"] <= metrics["total_ms"]


def test_non_speech_recording_gets_no_answer(assistant, observer, start_service, tmp_path):
    start_service(assistant)
    wait_online(observer)
    reply = tmp_path / "reply.wav"
    observer.publish(ASK, {"id": "noise", "wav": str(FIXTURES / "nonspeech_sb_machine_noise_10s.wav"), "output": str(reply)})
    error = observer.wait_for_payload("voice/error", id="noise", timeout=120)
    assert error["code"] == "no_speech"
    ended = observer.wait_for_payload(protocol.SESSION_ENDED, sessionId=error["sessionId"])
    assert ended["termination"]["reason"] == "error"
    assert not observer.payloads("voice/answer", id="noise")
    assert not reply.exists()
    assert not list(tmp_path.glob("*.wav*"))


def test_broker_restart_in_the_middle_of_an_answer(assistant, broker, observer, start_service):
    assistant.llm.new_conversation()
    runner = start_service(assistant)
    wait_online(observer)
    observer.publish(ASK, {"id": "long", "text": "Explain how a rainbow forms.", "speak": False})
    observer.wait_for_payload("voice/answer/text", id="long", timeout=120)
    broker.restart()
    # Sent while the service is still reconnecting: the broker queues it for the
    # service's persistent session.
    observer.publish(ASK, {"id": "during", "text": "What is two plus two?", "speak": False})
    long_answer = observer.wait_for_payload("voice/answer", id="long", timeout=180)
    observer.wait_for_payload("voice/answer", id="during", timeout=180)
    assert runner.service.connections >= 2
    assert len(observer.payloads("voice/answer", id="long")) == 1
    assert len(observer.payloads("voice/answer", id="during")) == 1
    # Every streamed fragment arrived in order. A fragment in flight at the restart may
    # arrive twice, because QoS 1 delivers at least once; its index shows the copy.
    fragments = {}
    for fragment in observer.payloads("voice/answer/text", id="long"):
        fragments.setdefault(fragment["index"], fragment["text"])
    assert sorted(fragments) == list(range(len(fragments)))
    assert "".join(fragments[index] for index in sorted(fragments)) == long_answer["text"]


def test_tts_say_sends_bounded_audio_chunks(assistant, observer, start_service):
    start_service(assistant, publish_audio=True, audio_chunk_bytes=4096)
    wait_online(observer)
    observer.publish(protocol.TTS_SAY, {"text": "The washing machine has finished.", "siteId": "default", "id": "wash"})
    observer.wait_for_payload(protocol.TTS_SAY_FINISHED, id="wash", timeout=60)
    chunks = [message for message in observer.messages if message.topic.startswith("hermes/audioServer/default/playBytes/wash-")]
    assert len(chunks) > 5
    frames = 0
    for chunk in chunks:
        assert len(chunk.payload) <= 4096
        with wave.open(io.BytesIO(chunk.payload)) as wav:
            assert wav.getframerate() == assistant.synthesizer.sample_rate
            assert wav.getnchannels() == 1
            frames += wav.getnframes()
    assert frames > assistant.synthesizer.sample_rate  # over a second of speech
    assert not observer.payloads("voice/answer", id="wash")


@contextlib.contextmanager
def _killed_at_exit(process: subprocess.Popen) -> Iterator[subprocess.Popen]:
    """Yield ``process`` and kill it if it still runs when the block ends, so a failed test leaves no service behind."""
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


def _start_voice_mqtt(broker, tmp_path, password: str) -> subprocess.Popen:
    config = tmp_path / "config.yaml"
    config.write_text(
        "llm:\n  target: qwen2.5-coder-0.5b-instruct\n  speculative: false\n  max_new_tokens: 200\n"
        f"mqtt:\n  host: 127.0.0.1\n  port: {broker.port}\n  client_id: voice-subprocess\n  speaker: false\n"
        f"  username: kitchen\n  password: {password}\n"
    )
    environment = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "voice", "--config", str(config), "-v", "mqtt"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=environment,
    )


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
def test_voice_mqtt_stops_cleanly_after_the_current_turn(broker, observer, tmp_path, stop_signal):
    password = "secret-in-config-7f3a"
    with _killed_at_exit(_start_voice_mqtt(broker, tmp_path, password)) as process:
        wait_online(observer, timeout=180)
        observer.publish(ASK, {"id": "inflight", "text": "Explain how a rainbow forms.", "speak": False})
        observer.wait_for_payload("voice/answer/text", id="inflight", timeout=60)
        started = time.monotonic()
        process.send_signal(stop_signal)
        output, _ = process.communicate(timeout=120)
    text = output.decode(errors="replace")
    assert process.returncode == 0, text[-2000:]
    # The turn in progress was finished and published before the service went offline.
    answer = observer.wait_for_payload("voice/answer", id="inflight", timeout=5)
    assert answer["text"]
    assert observer.on("voice/status")[-1].payload == b"offline"
    assert "Stopping after the current turn" in text
    assert "MQTT service stopped" in text
    assert "Traceback" not in text
    assert password not in text, "the password appeared in the log"
    assert time.monotonic() - started < 120


def test_voice_mqtt_repeated_sigterm_while_idle_exits_zero(broker, observer, tmp_path):
    with _killed_at_exit(_start_voice_mqtt(broker, tmp_path, "secret-in-config-7f3a")) as process:
        wait_online(observer, timeout=180)
        # Signals keep coming while the service stops and the process exits, as from an
        # impatient user or a supervisor that repeats its stop request.
        deadline = time.monotonic() + 60
        while process.poll() is None and time.monotonic() < deadline:
            process.send_signal(signal.SIGTERM)
            time.sleep(0.05)
        output, _ = process.communicate(timeout=60)
    text = output.decode(errors="replace")
    assert process.returncode == 0, text[-2000:]
    assert "Stopping after the current turn" not in text
    assert "MQTT service stopped" in text
