"""The MQTT service: requests in, streamed answers, audio and metrics out, one turn at a time.

Three tasks share the service:

    connection ──requests──▶ worker ──messages──▶ outbox ──▶ publisher ──▶ broker

- connection keeps one aiomqtt client connected, reconnecting with a doubling wait when
  the broker goes away, and checks each message as it arrives. The session is persistent
  (clean_session off), so QoS 1 requests sent while the service is away wait in the broker.
- worker answers queued requests in arrival order with the loaded models.
- publisher sends the outbox in order. Messages published while the broker is away stay
  in the outbox until the next connection, so a broker restart in the middle of an answer
  loses none of it.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import ssl
import time
import wave
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Any

import aiomqtt
from aiomqtt.exceptions import MqttConnectError
import numpy as np

from voice.audio.sinks import AudioSink, SpeakerSink, TeeSink, WavFileSink
from voice.config import Config
from voice.llm.conversation import Conversation
from voice.errors import AudioDeviceError, AudioInputError, VoiceError
from voice.mqtt import protocol
from voice.mqtt.discovery import MAX_STATE_CHARS, discovery_messages, status_topic
from voice.mqtt.protocol import Request, RequestError, Topics
from voice.pipeline import Assistant, TurnEvents

logger = logging.getLogger(__name__)

# Request ids remembered to recognise a redelivered QoS 1 message; a redelivery follows
# a lost acknowledgement within seconds, long before this many newer requests arrive.
_SEEN_IDS = 4096
# Messages kept while the broker is away. Past it the oldest are dropped with a warning
# rather than letting a long outage grow memory without bound.
_OUTBOX_LIMIT = 10_000
# Seconds to wait for the outbox to drain at shutdown before disconnecting anyway.
_DRAIN_TIMEOUT_S = 10.0
# CONNACK codes that retrying cannot fix: MQTT 3.1.1 (4, 5) and MQTT 5 (134, 135).
_AUTH_FAILURES = {4, 5, 134, 135}


@dataclass
class _Outgoing:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False


class MqttService:
    """Serves requests from the broker in ``config.mqtt`` with ``assistant`` until ``stop()``."""

    def __init__(self, assistant: Assistant, config: Config) -> None:
        self.assistant = assistant
        self.config = config
        self.settings = config.mqtt
        self.topics = Topics.under(config.mqtt.topic_prefix)
        self.muted = False
        self._outbox: asyncio.Queue[_Outgoing] = asyncio.Queue()
        self._requests: asyncio.Queue[Request | None] = asyncio.Queue()
        self._client: aiomqtt.Client | None = None
        self._connected = asyncio.Event()
        self._stopping = asyncio.Event()
        self._seen: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._turn: asyncio.Task | None = None
        self.conversations: dict[str, Conversation] = {}
        """Each site's conversation, by siteId."""
        self._state: dict[str, Any] = {"state": "idle", "muted": False, "transcript": "", "answer": "", "latency_ms": None}
        self.connections = 0
        """Successful connections so far; above 1 means the service reconnected."""

    # -- lifecycle -------------------------------------------------------------------

    async def run(self) -> None:
        """Serve until ``stop()``; the current turn ends first, queued requests get an error."""
        connection = asyncio.create_task(self._connection(), name="mqtt-connection")
        publisher = asyncio.create_task(self._publisher(), name="mqtt-publisher")
        worker = asyncio.create_task(self._worker(), name="mqtt-worker")
        try:
            done, _ = await asyncio.wait([connection, worker], return_when=asyncio.FIRST_COMPLETED)
            if connection in done:
                connection.result()  # a fatal connection error (bad credentials) ends the service
            await worker
            self.set_state(state="offline")
            try:
                if not connection.done():
                    await asyncio.wait_for(self._outbox.join(), _DRAIN_TIMEOUT_S)
            except TimeoutError:
                pass
            if self._outbox.qsize():
                unsent = self._outbox.qsize()
                logger.warning("Stopping with %d MQTT %s unsent: the broker is unreachable", unsent, "message" if unsent == 1 else "messages")
            if self._client is not None:
                # A clean disconnect does not fire the last will, so publish it here.
                try:
                    await self._client.publish(self.topics.status, b"offline", qos=1, retain=True, timeout=5)
                except aiomqtt.MqttError:
                    pass
        finally:
            for task in (connection, publisher, worker):
                task.cancel()
            await asyncio.gather(connection, publisher, worker, return_exceptions=True)
        logger.info("MQTT service stopped")

    @property
    def stopping(self) -> bool:
        """True once ``stop`` was called."""
        return self._stopping.is_set()

    def stop(self) -> None:
        """First call: finish the current turn, then stop. Second call: cancel the current turn too."""
        if self._stopping.is_set():
            if self._turn is not None and not self._turn.done():
                logger.info("Cancelling the current turn")
                self._turn.cancel()
            return
        if self._turn is not None and not self._turn.done():
            logger.info("Stopping after the current turn (signal again to cancel it)")
        else:
            logger.info("Stopping")
        self._stopping.set()
        self._requests.put_nowait(None)

    # -- connection --------------------------------------------------------------------

    def _client_options(self) -> dict[str, Any]:
        settings = self.settings
        options: dict[str, Any] = {
            "hostname": settings.host,
            "port": settings.port,
            "identifier": settings.client_id,
            "clean_session": False,
            "keepalive": settings.keepalive_s,
            "will": aiomqtt.Will(self.topics.status, b"offline", qos=1, retain=True),
            "logger": logging.getLogger("voice.mqtt.client"),
        }
        if settings.username:
            options["username"] = settings.username
            options["password"] = settings.password or os.environ.get("VOICE_MQTT_PASSWORD") or None
        if settings.tls:
            options["tls_params"] = aiomqtt.TLSParameters(
                ca_certs=settings.tls_ca_certs or None,
                certfile=settings.tls_certfile or None,
                keyfile=settings.tls_keyfile or None,
            )
            options["tls_insecure"] = settings.tls_insecure
        return options

    async def _connection(self) -> None:
        settings = self.settings
        where = f"{settings.host}:{settings.port}"
        delay = 1.0
        while not self._stopping.is_set():
            try:
                async with aiomqtt.Client(**self._client_options()) as client:
                    delay = 1.0
                    await client.subscribe(self._subscriptions())
                    self._client = client
                    self._connected.set()
                    self.connections += 1
                    logger.info("Connected to the MQTT broker at %s as %s", where, settings.client_id)
                    self._announce()
                    async for message in client.messages:
                        self._handle_message(message)
            except aiomqtt.MqttError as error:
                self._connected.clear()
                self._client = None
                code = getattr(getattr(error, "rc", None), "value", getattr(error, "rc", None))
                if isinstance(error, MqttConnectError) and code in _AUTH_FAILURES:
                    raise VoiceError(
                        f"The MQTT broker at {where} rejected user {settings.username or '(none)'!r}: {error}. "
                        "Check mqtt.username and the password (mqtt.password or VOICE_MQTT_PASSWORD)"
                    ) from None
                if isinstance(error.__context__, ssl.SSLCertVerificationError):
                    raise VoiceError(
                        f"The certificate of the MQTT broker at {where} failed verification: {error.__context__.verify_message}. "
                        "Set mqtt.tls_ca_certs to the CA that signed it (or mqtt.tls_insecure: true if only the host name differs)"
                    ) from None
                if self._stopping.is_set():
                    return
                logger.warning("MQTT broker at %s unreachable (%s); retrying in %.0f s", where, error, delay)
                try:
                    await asyncio.wait_for(self._stopping.wait(), delay)
                except TimeoutError:
                    pass
                delay = min(delay * 2, settings.reconnect_max_s)
            finally:
                self._connected.clear()
                self._client = None

    def _subscriptions(self) -> list[tuple[str, int]]:
        topics = [self.topics.ask, protocol.NLU_QUERY, protocol.TTS_SAY, self.topics.mute_set]
        if self.settings.discovery:
            topics.append(status_topic(self.settings))
        return [(topic, 1) for topic in topics]

    def _announce(self) -> None:
        """Availability, discovery and state, sent on every connection: the broker may have lost them."""
        self.send(self.topics.status, b"online", retain=True)
        self._send_discovery()
        self._send_state()

    def _send_discovery(self) -> None:
        if self.settings.discovery:
            for topic, payload in discovery_messages(self.settings, self.topics):
                self.send(topic, protocol.dumps(payload), retain=True)

    async def _publisher(self) -> None:
        while True:
            message = await self._outbox.get()
            while True:
                await self._connected.wait()
                client = self._client
                if client is None:
                    await asyncio.sleep(0.1)
                    continue
                try:
                    await client.publish(message.topic, message.payload, qos=message.qos, retain=message.retain, timeout=10)
                    break
                except aiomqtt.MqttError as error:
                    # The connection task notices the loss and reconnects; the message
                    # goes out on the next connection.
                    logger.debug("Publishing on %s failed (%s); retrying after reconnection", message.topic, error)
                    await asyncio.sleep(0.2)
            self._outbox.task_done()

    def send(self, topic: str, payload: bytes, retain: bool = False) -> None:
        if self._outbox.qsize() >= _OUTBOX_LIMIT:
            dropped = self._outbox.get_nowait()
            self._outbox.task_done()
            logger.warning("MQTT outbox full while the broker is away; dropped a message for %s", dropped.topic)
        self._outbox.put_nowait(_Outgoing(topic, payload, retain=retain))

    def publish(self, topic: str, payload: dict[str, Any]) -> None:
        self.send(topic, protocol.dumps(payload))

    # -- incoming ----------------------------------------------------------------------

    def _handle_message(self, message: aiomqtt.Message) -> None:
        """Handle one message. An unexpected error is logged and reported instead of ending the connection."""
        try:
            self._on_message(message)
        except Exception as error:
            logger.exception("Handling a message on %s failed", message.topic.value)
            self._report(RequestError("internal", f"internal error while reading a message on {message.topic.value}: {error}; see the service log"))

    def _on_message(self, message: aiomqtt.Message) -> None:
        topic = message.topic.value
        payload = message.payload if isinstance(message.payload, bytes) else str(message.payload).encode()
        if topic == self.topics.mute_set:
            self._set_mute(payload)
        elif topic == status_topic(self.settings):
            if payload.strip() == b"online":
                logger.info("Home Assistant came online; sending discovery again")
                self._send_discovery()
                self._send_state()
        elif not payload:
            # An empty payload is how a retained message is deleted, not a request.
            logger.debug("Ignoring an empty message on %s", topic)
        elif message.retain:
            # The broker hands a retained request to every new subscription, so it would
            # be answered again after each reconnection.
            request_id, site_id = protocol.peek_ids(payload)
            self._report(RequestError("retained", f"retained message on {topic} ignored; publish requests without the retain flag", request_id, site_id))
        else:
            self._accept(topic, payload)

    def _set_mute(self, payload: bytes) -> None:
        value = payload.strip().upper()
        if value not in (b"ON", b"OFF"):
            shown = payload[:40].decode("utf-8", errors="replace")
            self._report(RequestError("invalid_request", f"invalid payload {shown!r} on {self.topics.mute_set}; send ON or OFF"))
            return
        self.muted = value == b"ON"
        logger.info("Speaker %s", "muted" if self.muted else "unmuted")
        self.set_state(muted=self.muted)

    def _accept(self, topic: str, payload: bytes) -> None:
        try:
            request = protocol.parse_request(topic, payload, self.settings, self.topics)
        except RequestError as error:
            self._report(error)
            return
        request.received_at = time.perf_counter()
        key = (request.site_id, request.id)
        if key in self._seen:
            # A QoS 1 redelivery or a reused id: either way the first one is answered.
            self._reject(request, "duplicate_id", f"request id {request.id!r} from {request.site_id} was already received and is answered once; use a new id for a new request")
            return
        if self._stopping.is_set():
            self._reject(request, "shutting_down", "the service is stopping; send the request again once it is back online")
            return
        ahead = self._requests.qsize() + (1 if self._turn is not None else 0)
        if ahead > self.settings.queue_size:
            self._reject(request, "busy", f"{ahead} requests are ahead of this one (mqtt.queue_size is {self.settings.queue_size}); try again shortly")
            return
        self._seen[key] = None
        while len(self._seen) > _SEEN_IDS:
            self._seen.popitem(last=False)
        if ahead:
            self.publish(protocol.SESSION_QUEUED, self._session(request))
        self._requests.put_nowait(request)

    def _reject(self, request: Request, code: protocol.ErrorCode, message: str) -> None:
        self._report(RequestError(code, message, request.id, request.site_id, request.session_id))

    def _report(self, error: RequestError) -> None:
        """Log ``error`` with the request's ids and publish it on the error topic."""
        logger.warning("Request %s from site %s: %s: %s", error.request_id, error.site_id, error.code, error)
        self.publish(self.topics.error, error.payload())

    # -- turns -------------------------------------------------------------------------

    async def _worker(self) -> None:
        while True:
            request = await self._requests.get()
            if request is None:
                break
            self._turn = asyncio.create_task(self._serve(request), name=f"turn-{request.id}")
            try:
                await asyncio.wait([self._turn])
                if self._turn.cancelled():
                    self._reject(request, "shutting_down", "the answer was cancelled by a second stop signal; send the request again once the service is back online")
                    self._end_session(request, "abortedByUser", "cancelled at shutdown")
                elif (error := self._turn.exception()) is not None:
                    logger.error("Request %s failed", request.id, exc_info=error)
                    self._fail(request, RequestError("internal", f"internal error: {error}; see the service log"))
            finally:
                self._turn = None
                self.set_state(state="idle")
            if self._stopping.is_set():
                break
        while not self._requests.empty():
            request = self._requests.get_nowait()
            if request is not None:
                self._reject(request, "shutting_down", "the service stopped before answering; send the request again once it is back online")
                self._end_session(request, "error", "the service stopped")

    async def _serve(self, request: Request) -> None:
        self.publish(protocol.SESSION_STARTED, self._session(request))
        self.set_state(state="recognizing" if request.wav else "answering")
        try:
            sink = self._sink(request)
            if request.kind == "say":
                seconds = await self.assistant.speak(request.text, sink) if sink else 0.0
                self.publish(protocol.TTS_SAY_FINISHED, {"id": request.id, "siteId": request.site_id, "sessionId": request.session_id})
                self.publish(self.topics.metrics, request.reply(audio_s=round(seconds, 3), spoken=sink is not None))
            else:
                await self._answer(request, sink)
        except RequestError as error:
            self._fail(request, error)
            return
        except AudioDeviceError as error:
            self._fail(request, RequestError("audio_device", str(error)))
            return
        self._end_session(request, "nominal")

    async def _answer(self, request: Request, sink: AudioSink | None) -> None:
        llm = self.assistant.llm
        # Each site keeps its own conversation, so the kitchen's follow-up questions do
        # not continue the bedroom's.
        llm.conversation = self.conversations.setdefault(request.site_id, replace(llm.conversation, history=[]))
        events = _PublishingEvents(self, request)
        if request.wav:
            from voice.audio.wav import load_speech

            try:
                audio = await asyncio.to_thread(load_speech, request.wav)
            except AudioInputError as error:
                raise RequestError("bad_audio", str(error)) from None
            result = await self.assistant.respond_to_audio(audio, sink, events, started_at=request.received_at)
            if not result.transcript.has_speech:
                raise RequestError("no_speech", f"no speech in {request.wav}: {result.transcript.reason}; nothing was answered")
        else:
            self.set_state(transcript=request.text[:MAX_STATE_CHARS])
            result = await self.assistant.respond_to_text(request.text, sink, events, started_at=request.received_at)
        metrics = result.metrics
        answer = {"text": result.answer, "transcript": result.transcript.text if result.transcript else request.text}
        if request.output:
            answer["output"] = request.output
        self.publish(self.topics.answer, request.reply(**answer))
        self.publish(self.topics.metrics, request.reply(**metrics.as_dict()))
        latency = metrics.first_audio_ms if metrics.first_audio_ms is not None else metrics.first_token_ms
        self.set_state(answer=result.answer[:MAX_STATE_CHARS], latency_ms=latency)

    def _sink(self, request: Request) -> AudioSink | None:
        """Return the reply's destinations: the requested WAV file, the local speaker, MQTT chunks."""
        sinks: list[AudioSink] = []
        if request.output:
            from voice.audio.wav import check_output_path, is_same_file

            try:
                check_output_path(request.output, probe_write=True, setting="the request's 'output'")
            except VoiceError as error:
                raise RequestError("bad_output", str(error)) from None
            if request.wav and is_same_file(request.wav, request.output):
                raise RequestError(
                    "bad_output", f"output {request.output!r} is the question recording 'wav', so the reply would overwrite it; choose another path"
                )
            sinks.append(WavFileSink(request.output))
        if request.speak and self.settings.speaker and not self.muted:
            sinks.append(_MutableSink(SpeakerSink(hint="or set mqtt.speaker: false in config.yaml"), self))
        if self.settings.publish_audio:
            sinks.append(MqttAudioSink(self, request))
        if not sinks or self.assistant.synthesizer is None:
            return None
        return sinks[0] if len(sinks) == 1 else TeeSink(sinks)

    def _fail(self, request: Request, error: RequestError) -> None:
        error.request_id, error.site_id, error.session_id = request.id, request.site_id, request.session_id
        self._report(error)
        self._end_session(request, "error", str(error))

    def _session(self, request: Request) -> dict[str, Any]:
        return {"sessionId": request.session_id, "siteId": request.site_id, "customData": request.custom_data}

    def _end_session(self, request: Request, reason: str, error: str | None = None) -> None:
        termination: dict[str, Any] = {"reason": reason}
        if error:
            termination["error"] = error
        self.publish(protocol.SESSION_ENDED, {**self._session(request), "termination": termination})

    def set_state(self, **changes: Any) -> None:
        self._state.update(changes)
        self._send_state()

    def _send_state(self) -> None:
        self.send(self.topics.state, protocol.dumps(self._state), retain=True)


class _PublishingEvents(TurnEvents):
    """Publishes the transcript and each verified fragment of the answer as it arrives."""

    def __init__(self, service: MqttService, request: Request) -> None:
        self.service = service
        self.request = request
        self.index = 0

    def on_transcript(self, transcript) -> None:
        if not transcript.has_speech:
            return
        request = self.request
        likelihood = _likelihood(transcript.segments)
        self.service.publish(
            protocol.TEXT_CAPTURED,
            {"text": transcript.text, "likelihood": likelihood, "seconds": round(transcript.duration_s, 3), "siteId": request.site_id, "sessionId": request.session_id},
        )
        self.service.set_state(state="answering", transcript=transcript.text[:MAX_STATE_CHARS])

    def on_text(self, fragment: str) -> None:
        self.service.publish(self.service.topics.answer_text, self.request.reply(index=self.index, text=fragment))
        self.index += 1


def _likelihood(segments: list[dict]) -> float:
    """Whisper's mean token probability over the segments, the nearest thing to Hermes' likelihood."""
    if not segments:
        return 0.0
    mean_log_prob = sum(segment.get("avg_logprob", 0.0) for segment in segments) / len(segments)
    return round(float(np.exp(mean_log_prob)), 4)


class _MutableSink(AudioSink):
    """Drops the rest of a reply from ``sink`` once the service is muted, so the mute switch silences it at once."""

    def __init__(self, sink: AudioSink, service: MqttService) -> None:
        self.sink = sink
        self.service = service

    async def open(self, sample_rate: int) -> None:
        await super().open(sample_rate)
        await self.sink.open(sample_rate)

    async def write(self, samples: np.ndarray) -> None:
        if not self.service.muted:
            await self.sink.write(samples)

    def interrupt(self) -> None:
        self.sink.interrupt()

    async def close(self, ok: bool) -> None:
        # Abort rather than drain the device buffer when muted mid-reply.
        await self.sink.close(ok and not self.service.muted)


class MqttAudioSink(AudioSink):
    """Sends reply audio as small WAV files on Hermes' playBytes topic, each under the size limit."""

    def __init__(self, service: MqttService, request: Request) -> None:
        self.service = service
        self.request = request
        self.count = 0
        # 44 header bytes, 2 bytes per 16-bit sample.
        self.samples_per_message = (service.settings.audio_chunk_bytes - 44) // 2

    async def write(self, samples: np.ndarray) -> None:
        pcm = (np.clip(samples, -1.0, 1.0) * 32767).astype("<i2")
        for start in range(0, len(pcm), self.samples_per_message):
            buffer = io.BytesIO()
            with wave.open(buffer, "wb") as wav:
                wav.setnchannels(1)
                wav.setsampwidth(2)
                wav.setframerate(self.sample_rate)
                wav.writeframes(pcm[start : start + self.samples_per_message].tobytes())
            topic = protocol.play_bytes_topic(self.request.site_id, f"{self.request.id}-{self.count}")
            self.service.send(topic, buffer.getvalue())
            self.count += 1
