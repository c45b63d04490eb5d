"""Live mode: listen, cut turns at pauses, answer out loud, and let the user interrupt.

    AudioSource ──blocks──▶ Endpointer ──utterance──▶ Assistant.respond_to_audio ──▶ PacedSink
         └──────────── while a reply plays: echo gate ──barge-in──▶ cancel the turn

The turn starts early, at a pause of ``listen.early_start_ms``. Speech recognition, the
language model and piper run while the endpointer waits for ``listen.silence_ms`` to end
the turn, and the audio is held back until then. If the user goes on speaking, the early
turn is cancelled unheard and leaves the conversation as it was. The next pause starts
again with the longer recording.

The loop keeps reading the microphone while a reply plays. The microphone then also
hears the reply itself, so speech over a reply interrupts only when it is louder, relative
to what is playing, than the echo measured while the reply played alone
(``listen.barge_in_margin`` times). Speech that the gate takes for echo is never answered.

Each turn's times run from the end of speech: endpoint decided, transcript ready, first
verified token, first audio. One INFO line per turn reports them.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from voice.audio.endpoint import Endpointer, Pause, SpeechResumed, SpeechStarted, Utterance
from voice.audio.sinks import PacedSink
from voice.audio.sources import AudioSource
from voice.audio.vad import SAMPLE_RATE
from voice.config import ListenConfig
from voice.pipeline import Assistant, Hold, TurnEvents, TurnResult

logger = logging.getLogger(__name__)

# Seconds of echo measurements the coupling estimate keeps.
_ECHO_HISTORY = 100
# Microphone blocks quieter than this RMS are never barge-in, whatever is playing.
_MIN_BARGE_IN_RMS = 0.005


@dataclass
class LiveTurn:
    result: TurnResult | None
    """The finished turn; None when it was interrupted."""
    interrupted: bool = False
    """True when the user spoke over the reply and it was cut off."""
    barge_in_ms: int | None = None
    """From the detection of the interruption to the end of playback."""
    spoken: str = ""
    """The answer as far as it was spoken; what the conversation history keeps."""


def wake_phrase_filter(phrase: str) -> Callable[[str], str | None]:
    """Return a filter that keeps transcripts starting with ``phrase`` and removes it, case and punctuation aside."""
    words = re.findall(r"[a-z0-9']+", phrase.lower())
    pattern = re.compile(r"^\W*" + r"\W+".join(re.escape(word) for word in words) + r"\b[\s,.!?;:-]*", re.IGNORECASE)

    def accept(text: str) -> str | None:
        match = pattern.match(text)
        if not match:
            return None
        rest = text[match.end() :].strip()
        return rest or None

    return accept


@dataclass
class _EchoGate:
    """Learns how loud the reply comes back through the microphone, and spots a louder user."""

    margin: float
    ratios: deque = field(default_factory=lambda: deque(maxlen=_ECHO_HISTORY * 1000 // 20))

    @property
    def coupling(self) -> float:
        """The echo's level relative to the reply: the 90th percentile of measured ratios.

        A high percentile, because the reply's level is the loudest piece of a window
        while the microphone block may fall in a pause between words: the loud moments
        show how strong the echo gets. Until 10 blocks were measured, assume the
        microphone hears the reply at its own level.
        """
        if len(self.ratios) < 10:
            return 1.0
        return float(np.percentile(self.ratios, 90))

    def observe_echo(self, microphone_rms: float, playback_rms: float) -> None:
        if playback_rms > 1e-4:
            self.ratios.append(microphone_rms / playback_rms)

    def is_user(self, microphone_rms: float, playback_rms: float | None) -> bool:
        if microphone_rms < _MIN_BARGE_IN_RMS:
            return False
        if playback_rms is None or playback_rms < 1e-4:
            return True
        return microphone_rms > self.margin * self.coupling * playback_rms


class _HeldTurn(TurnEvents):
    """Events and audio of an early turn, held back until its end is confirmed.

    A dropped turn therefore neither shows its transcript and text nor plays anything.
    """

    def __init__(self, events: TurnEvents) -> None:
        self.events = events
        self.hold = Hold()
        self.backlog: list[tuple[str, tuple]] | None = []

    def release(self, endpoint_ms: int) -> None:
        self.hold.release(endpoint_ms)
        backlog, self.backlog = self.backlog or [], None
        for name, args in backlog:
            getattr(self.events, name)(*args)

    def _call(self, name: str, *args) -> None:
        if self.backlog is None:
            getattr(self.events, name)(*args)
        else:
            self.backlog.append((name, args))

    def on_transcript(self, transcript) -> None:
        self._call("on_transcript", transcript)

    def on_text(self, fragment: str) -> None:
        self._call("on_text", fragment)

    def on_answer_end(self) -> None:
        self._call("on_answer_end")


class LiveLoop:
    """Live turns from ``source``, until it ends or ``max_turns`` turns are done."""

    def __init__(
        self,
        assistant: Assistant,
        config: ListenConfig,
        source: AudioSource,
        sink_factory: Callable[[], PacedSink],
        events: TurnEvents | None = None,
    ) -> None:
        self.assistant = assistant
        self.config = config
        self.source = source
        self.sink_factory = sink_factory
        self.events = events or TurnEvents()
        self.endpointer = Endpointer(
            silence_ms=config.silence_ms,
            aggressiveness=config.vad_aggressiveness,
            max_turn_s=config.max_turn_s,
            preroll_ms=config.preroll_ms,
            min_speech_ms=config.min_speech_ms,
            pause_ms=config.early_start_ms,
        )
        self.accept = wake_phrase_filter(config.wake_phrase) if config.wake_phrase else None
        self.gate = _EchoGate(config.barge_in_margin)
        self.turns: list[LiveTurn] = []
        self._task: asyncio.Task | None = None
        self._early_turn: _HeldTurn | None = None
        """Set while ``_task`` started at a pause and waits for the end of the turn."""
        self._dropped: asyncio.Task | None = None
        """The last early turn that was cancelled; the next turn waits until it has stopped."""
        self.early_starts = 0
        self.dropped_starts = 0
        self._sink: PacedSink | None = None
        self._interrupted_at: float | None = None
        self._started_over_reply = False
        self._fed_s = 0.0
        self._history_length = 0
        self._speech_end = 0.0
        self._loud_blocks = 0

    @property
    def idle(self) -> bool:
        """True when no turn is running or being spoken: the moment a person would speak next."""
        dropped_done = self._dropped is None or self._dropped.done()
        return self._task is None and dropped_done and not self.endpointer.in_speech

    @property
    def replying(self) -> bool:
        """True while a turn whose end was confirmed is still running (and may be playing)."""
        return self._task is not None and self._early_turn is None and not self._task.done()

    def _playing(self, now: float) -> float | None:
        """Return the loudest level of the reply in the last 300 ms, or None when nothing played then.

        The window covers the delay and the room's reverberation between a piece leaving
        the speaker and its echo reaching the microphone, and the quiet gaps between words.
        """
        if self._sink is None:
            return None
        return self._sink.level(now - 0.3, now)

    async def run(self, max_turns: int | None = None) -> list[LiveTurn]:
        async for block in self.source.blocks():
            now = time.perf_counter()
            self._fed_s += len(block) / SAMPLE_RATE
            self._check_echo(block, now)
            for event in self.endpointer.feed(block):
                if isinstance(event, SpeechStarted):
                    self._started_over_reply = self.replying
                elif isinstance(event, Pause):
                    self._on_pause(event, now)
                elif isinstance(event, SpeechResumed):
                    self._drop_early_turn()
                elif isinstance(event, Utterance):
                    self._on_utterance(event, now)
            self._collect()
            if max_turns is not None and len(self.turns) >= max_turns:
                break
        else:
            final = self.endpointer.flush()
            if final is not None:
                self._on_utterance(final, time.perf_counter())
        # Left at max_turns during a pause: that turn was never finished.
        self._drop_early_turn()
        if self._task is not None:
            await asyncio.wait([self._task])
            self._collect()
        if self._dropped is not None:
            await asyncio.wait([self._dropped])
        return self.turns

    def _check_echo(self, block: np.ndarray, now: float) -> None:
        if not self.replying:
            return
        # None between two chunks of the reply: nothing plays, so no echo either.
        playback = self._playing(now)
        microphone = float(np.sqrt(np.mean(block * block))) if block.size else 0.0
        # The endpointer hears the reply's echo as speech too, so the check runs on every
        # block of speech. A user must stand out from the learned echo level.
        listening = self.config.barge_in and self.endpointer.in_speech and self._interrupted_at is None
        user = listening and self.gate.is_user(microphone, playback)
        # Two blocks in a row (40 ms), so one misaligned echo peak does not interrupt.
        self._loud_blocks = self._loud_blocks + 1 if user else 0
        if self._loud_blocks >= 2:
            self._barge_in(now, microphone, playback)
            return
        # The reply plays far longer than an interruption takes to detect, so these
        # ratios measure the echo, not the user.
        if playback is not None:
            self.gate.observe_echo(microphone, playback)

    def _barge_in(self, now: float, microphone: float, playback: float | None) -> None:
        reply = "nothing playing" if playback is None else f"reply {playback:.3f}, echo coupling {self.gate.coupling:.2f}"
        logger.info("Barge-in: the user spoke over the reply (microphone RMS %.3f, %s); stopping it", microphone, reply)
        self._interrupted_at = now
        self._started_over_reply = False  # this speech is the user's, so it gets an answer
        if self._sink is not None:
            self._sink.mark_barge_in()
        self._task.cancel()

    def _on_pause(self, pause: Pause, now: float) -> None:
        """Start the turn at a pause, its audio held back until the endpointer confirms the end."""
        if self._task is not None or self._started_over_reply:
            return
        self._start(pause.audio, self._wall_time(pause.speech_end_s, now), None, _HeldTurn(self.events))
        self.early_starts += 1
        logger.debug("Pause after %d ms of speech: starting the turn before its end is certain", pause.voiced_ms)

    def _drop_early_turn(self) -> None:
        """Cancel the early turn, unheard: the user went on speaking."""
        if self._early_turn is None:
            return
        task = self._task
        task.cancel()
        # A model error in a dropped turn comes back when the turn is started again.
        task.add_done_callback(lambda done: done.cancelled() or done.exception())
        self._dropped, self._task, self._early_turn = task, None, None
        self.dropped_starts += 1
        logger.debug("Speech resumed after a pause: dropping the early start")

    def _on_utterance(self, utterance: Utterance, now: float) -> None:
        if self._early_turn is not None:
            # The early turn covers this utterance: nothing was voiced since its pause.
            self._early_turn.release(round((now - self._speech_end) * 1000))
            self._early_turn = None
            return
        if self.replying:
            logger.debug("Ignoring speech that ended while a reply was still running")
            return
        if self._started_over_reply:
            self._started_over_reply = False
            logger.info("Ignoring speech heard during the reply: the echo gate took it for the assistant's own voice")
            return
        speech_end = self._wall_time(utterance.speech_end_s, now)
        self._start(utterance.audio, speech_end, round((now - speech_end) * 1000), None)

    def _wall_time(self, stream_s: float, now: float) -> float:
        """Return the perf_counter() time of a stream position, given that ``now`` is the end of the stream so far."""
        return now - (self._fed_s - stream_s)

    def _start(self, audio: np.ndarray, speech_end: float, endpoint_ms: int | None, early_turn: _HeldTurn | None) -> None:
        self._interrupted_at = None
        self._loud_blocks = 0
        self._speech_end = speech_end
        self._early_turn = early_turn
        self._sink = self.sink_factory()
        events, hold = (early_turn, early_turn.hold) if early_turn else (self.events, None)
        self._task = asyncio.create_task(self._turn(audio, speech_end, endpoint_ms, hold, events, self._dropped), name="live-turn")

    async def _turn(
        self,
        audio: np.ndarray,
        speech_end: float,
        endpoint_ms: int | None,
        hold: Hold | None,
        events: TurnEvents,
        dropped: asyncio.Task | None,
    ) -> TurnResult:
        if dropped is not None:
            # Its decoder stops at the end of a step. Wait for that, because both turns share the caches.
            await asyncio.wait([dropped])
        self._history_length = len(self.assistant.llm.conversation.history)
        return await self.assistant.respond_to_audio(
            audio, self._sink, events, started_at=speech_end, endpoint_ms=endpoint_ms, accept=self.accept, hold=hold
        )

    def _collect(self) -> None:
        """Record the turn task once it is done, finished or interrupted."""
        task = self._task
        if task is None or self._early_turn is not None or not task.done():
            return
        self._task = None
        if not task.cancelled():
            result = task.result()
            self.turns.append(LiveTurn(result, spoken=result.answer))
            return
        history = self.assistant.llm.conversation.history
        # The turn may have been cut before its exchange reached the history.
        spoken = history[-1].assistant if len(history) > self._history_length else ""
        interrupted_at = self._interrupted_at or time.perf_counter()
        played = list(self._sink.played) if self._sink else []
        stopped = max((started for started, _ in played), default=interrupted_at) + PacedSink.PIECE_MS / 1000
        barge_in_ms = max(0, round((stopped - interrupted_at) * 1000))
        logger.info("turn: interrupted; playback stopped %d ms after the interruption was detected", barge_in_ms)
        self.turns.append(LiveTurn(None, True, barge_in_ms, spoken))
