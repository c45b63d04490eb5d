"""Live mode: listen, cut turns at pauses, answer out loud, and let the user interrupt.

    AudioSource ──blocks──▶ Endpointer ──utterance──▶ Assistant.respond_to_audio ──▶ PacedSink
         └──────────── while a reply plays: echo gate ──barge-in──▶ cancel the turn

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

from voice.audio.endpoint import Endpointer, SpeechStarted, Utterance
from voice.audio.sinks import PacedSink
from voice.audio.sources import AudioSource
from voice.audio.vad import SAMPLE_RATE
from voice.config import ListenConfig
from voice.pipeline import Assistant, TurnEvents, TurnResult

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
        )
        self.accept = wake_phrase_filter(config.wake_phrase) if config.wake_phrase else None
        self.gate = _EchoGate(config.barge_in_margin)
        self.turns: list[LiveTurn] = []
        self._task: asyncio.Task | None = None
        self._sink: PacedSink | None = None
        self._interrupted_at: float | None = None
        self._started_over_reply = False
        self._fed_s = 0.0
        self._history_length = 0
        self._loud_blocks = 0

    @property
    def replying(self) -> bool:
        return self._task is not None and not self._task.done()

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
                elif isinstance(event, Utterance):
                    self._on_utterance(event, now)
            self._collect()
            if max_turns is not None and len(self.turns) >= max_turns:
                break
        else:
            final = self.endpointer.flush()
            if final is not None:
                self._on_utterance(final, time.perf_counter())
        if self._task is not None:
            await asyncio.wait([self._task])
            self._collect()
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
            self._barge_in(now)
            return
        # The reply plays far longer than an interruption takes to detect, so these
        # ratios measure the echo, not the user.
        if playback is not None:
            self.gate.observe_echo(microphone, playback)

    def _barge_in(self, now: float) -> None:
        logger.info("Barge-in: the user spoke over the reply; stopping it")
        self._interrupted_at = now
        self._started_over_reply = False  # this speech is the user's, so it gets an answer
        self._task.cancel()

    def _on_utterance(self, utterance: Utterance, now: float) -> None:
        if self.replying:
            logger.debug("Ignoring speech that ended while a reply was still running")
            return
        if self._started_over_reply:
            self._started_over_reply = False
            logger.info("Ignoring speech heard during the reply: the echo gate took it for the assistant's own voice")
            return
        speech_end = now - (self._fed_s - utterance.speech_end_s)
        endpoint_ms = round((now - speech_end) * 1000)
        self._interrupted_at = None
        self._loud_blocks = 0
        self._history_length = len(self.assistant.llm.conversation.history)
        self._sink = self.sink_factory()
        self._task = asyncio.create_task(self._turn(utterance, speech_end, endpoint_ms), name="live-turn")

    async def _turn(self, utterance: Utterance, speech_end: float, endpoint_ms: int) -> TurnResult:
        return await self.assistant.respond_to_audio(
            utterance.audio, self._sink, self.events, started_at=speech_end, endpoint_ms=endpoint_ms, accept=self.accept
        )

    def _collect(self) -> None:
        """Record the turn task once it is done, finished or interrupted."""
        task = self._task
        if task is None or not task.done():
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
