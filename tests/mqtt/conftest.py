"""A real Mosquitto broker on a free loopback port, an observing client, and the service in a thread."""

from __future__ import annotations

import asyncio
import getpass
import json
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as paho
import pytest

from voice.config import Config, LlmConfig, MqttConfig
from voice.mqtt.service import MqttService


def _mosquitto() -> str:
    found = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
    if found is None:
        pytest.fail("mosquitto is not installed; install it with: apt-get install mosquitto")
    return found


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Broker:
    """One mosquitto process with persistence on, so sessions and queued messages survive a restart."""

    def __init__(self, folder: Path, password_file: Path | None = None, tls: tuple[Path, Path, Path] | None = None) -> None:
        """``tls`` is (CA certificate, server certificate, server key): adds a TLS listener on ``tls_port``."""
        self.folder = folder
        self.port = free_port()
        self.tls_port = free_port() if tls else None
        self.config = folder / "mosquitto.conf"
        lines = [
            f"listener {self.port} 127.0.0.1",
            # Started as root, mosquitto would switch to its own user, which cannot
            # read or write the test's private temporary folder.
            f"user {getpass.getuser()}",
            "persistence true",
            f"persistence_location {folder}/",
            f"log_dest file {folder}/mosquitto.log",
        ]
        if password_file:
            lines += ["allow_anonymous false", f"password_file {password_file}"]
        else:
            lines.append("allow_anonymous true")
        if tls:
            ca, certificate, key = tls
            lines += [f"listener {self.tls_port} 127.0.0.1", f"cafile {ca}", f"certfile {certificate}", f"keyfile {key}"]
        self.config.write_text("\n".join(lines) + "\n")
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = subprocess.Popen([_mosquitto(), "-c", str(self.config)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mosquitto exited: {self.process.stderr.read().decode(errors='replace')}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"mosquitto did not listen on port {self.port} within 10 s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            # SIGTERM makes mosquitto save its persistence file before it exits.
            self.process.terminate()
            self.process.wait(timeout=10)
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()


@pytest.fixture
def broker(tmp_path):
    instance = Broker(tmp_path)
    instance.start()
    yield instance
    instance.stop()


@dataclass
class Received:
    topic: str
    payload: bytes
    retain: bool
    at: float = field(default_factory=time.perf_counter)

    def json(self):
        return json.loads(self.payload)


class Observer:
    """A paho client in its own thread that records every message and can publish requests.

    Its session is persistent and it reconnects by itself, so it also receives what the
    service publishes after a broker restart.
    """

    def __init__(self, port: int, client_id: str = "test-observer", topics: tuple[str, ...] = ("#",)) -> None:
        self.messages: list[Received] = []
        self._lock = threading.Condition()
        self._subscribed = threading.Event()
        self._connected = threading.Event()
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False)
        self.client.reconnect_delay_set(0.1, 1)
        self.client.on_message = self._on_message
        self.topics = topics
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = lambda *args: self._connected.clear()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise RuntimeError("the test observer could not subscribe")

    def _on_connect(self, client, userdata, flags, reason, properties) -> None:
        client.subscribe([(topic, 1) for topic in self.topics])
        self._connected.set()
        self._subscribed.set()

    def _on_message(self, client, userdata, message) -> None:
        with self._lock:
            self.messages.append(Received(message.topic, message.payload, message.retain))
            self._lock.notify_all()

    def publish(self, topic: str, payload, qos: int = 1) -> None:
        """Publish once connected (after a broker restart the observer reconnects first)."""
        if isinstance(payload, (dict, list)):
            payload = json.dumps(payload)
        if not self._connected.wait(30):
            raise RuntimeError("the test observer did not reconnect within 30 s")
        self.client.publish(topic, payload, qos=qos).wait_for_publish(10)

    def on(self, topic: str) -> list[Received]:
        with self._lock:
            return [message for message in self.messages if message.topic == topic]

    def payloads(self, topic: str, **match) -> list[dict]:
        found = []
        for message in self.on(topic):
            try:
                data = message.json()
            except ValueError:
                continue
            if all(data.get(key) == value for key, value in match.items()):
                found.append(data)
        return found

    def wait_for(self, predicate: Callable[[], object], timeout: float = 30, description: str = "a message") -> object:
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                result = predicate()
                if result:
                    return result
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    topics = sorted({message.topic for message in self.messages})
                    raise AssertionError(f"timed out after {timeout} s waiting for {description}; topics seen: {topics}")
                self._lock.wait(min(remaining, 0.1))

    def wait_for_payload(self, topic: str, timeout: float = 30, **match) -> dict:
        found = self.wait_for(lambda: self.payloads(topic, **match), timeout, f"{topic} with {match}")
        return found[0]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture
def observer(broker):
    instance = Observer(broker.port)
    yield instance
    instance.close()


class ServiceThread:
    """Runs MqttService.run() in its own event loop thread, as ``voice mqtt`` runs it."""

    def __init__(self, service: MqttService) -> None:
        self.service = service
        self.loop = asyncio.new_event_loop()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.loop.run_until_complete(self.service.run())
        except BaseException as error:  # noqa: BLE001 - reported by the test
            self.error = error

    def stop(self, timeout: float = 60) -> None:
        if self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.service.stop)
            self.thread.join(timeout)
        assert not self.thread.is_alive(), "the MQTT service did not stop"

    def join(self, timeout: float) -> None:
        self.thread.join(timeout)


def mqtt_config(broker: Broker, **settings) -> MqttConfig:
    values = {"port": broker.port, "host": "127.0.0.1", "speaker": False, "client_id": "voice-test", **settings}
    return MqttConfig(**values)


def tiny_assistant(tokenizer, llm: LlmConfig | None = None):
    """An Assistant whose target is a tiny random model with the real tokenizer: answers in milliseconds."""
    from tests.llm.tiny_models import tiny_qwen2
    from voice.llm.loading import LoadedModels
    from voice.llm.stage import LanguageModelStage
    from voice.pipeline import Assistant

    config = llm or LlmConfig(speculative=False, max_new_tokens=12)
    models = LoadedModels(tokenizer, tiny_qwen2(seed=5, vocab_size=len(tokenizer)), None)
    stage = LanguageModelStage(models, config)
    stage.warm_up()
    return Assistant(Config(llm=config), stage)


@pytest.fixture
def start_service(broker):
    started: list[ServiceThread] = []

    def start(assistant, **settings) -> ServiceThread:
        config = Config(llm=assistant.llm.config, mqtt=mqtt_config(broker, **settings))
        runner = ServiceThread(MqttService(assistant, config))
        started.append(runner)
        return runner

    yield start
    for runner in started:
        runner.stop()
