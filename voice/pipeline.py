"""The turn pipeline: recognize, answer, speak, each stage a task linked by asyncio queues.

    audio ──Recognizer──▶ transcript ──LanguageModelStage──▶ verified text
          ──SpeechChunker──▶ speakable chunks ──Synthesizer──▶ audio chunks ──AudioSink

Model work (Whisper, torch, piper) runs in worker threads; the event loop only moves
data between stages. The language model keeps decoding while piper speaks the chunks
already verified, so the first audio leaves long before the answer is complete.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from voice.asr.recognizer import Recognizer, Transcript
from voice.audio.sinks import AudioSink
from voice.config import Config, LlmConfig
from voice.llm.stage import LanguageModelStage
from voice.metrics import TurnMetrics
from voice.tts.synthesizer import Synthesizer, speak
from voice.tts.text import SpeechChunker

logger = logging.getLogger(__name__)

# A chunk or audio queue this long means a stage downstream has stalled; the bound keeps
# a runaway answer from piling up audio in memory.
_QUEUE_SIZE = 32


class TurnEvents:
    """Hooks a front end overrides to show a turn as it happens; all no-ops here."""

    def on_transcript(self, transcript: Transcript) -> None:
        pass

    def on_text(self, fragment: str) -> None:
        pass

    def on_answer_end(self) -> None:
        pass


class Hold:
    """A gate that keeps a turn's audio back until the endpointer confirms that the turn is over.

    A live turn may start at a short pause, before the end of the turn is certain. It then
    recognizes, decodes and synthesizes as usual, but plays nothing before ``release``.
    Cancelled before that, it leaves the conversation as it found it.
    """

    def __init__(self) -> None:
        self._event = asyncio.Event()
        self.endpoint_ms: int | None = None

    @property
    def released(self) -> bool:
        return self._event.is_set()

    def release(self, endpoint_ms: int | None = None) -> None:
        self.endpoint_ms = endpoint_ms
        self._event.set()

    async def wait(self) -> None:
        await self._event.wait()


@dataclass
class TurnResult:
    transcript: Transcript | None
    answer: str
    """The full verified answer text; empty when nothing was heard."""
    metrics: TurnMetrics


class Assistant:
    """The loaded models and the conversation; each ``respond_*`` call is one turn."""

    def __init__(
        self,
        config: Config,
        llm: LanguageModelStage,
        recognizer: Recognizer | None = None,
        synthesizer: Synthesizer | None = None,
    ) -> None:
        self.config = config
        self.llm = llm
        self.recognizer = recognizer
        self.synthesizer = synthesizer
        self.prepare_next_turn = True
        """Whether a complete turn prefills the next prompt's opening; off for one-shot commands."""
        self._next_turn_prefill: asyncio.Future[None] | None = None

    async def respond_to_audio(
        self,
        audio: np.ndarray,
        sink: AudioSink | None,
        events: TurnEvents | None = None,
        speculative: bool | None = None,
        started_at: float | None = None,
        endpoint_ms: int | None = None,
        accept: Callable[[str], str | None] | None = None,
        hold: Hold | None = None,
    ) -> TurnResult:
        """Answer 16 kHz mono speech; returns without an answer when no speech is found.

        ``started_at`` (a ``time.perf_counter()`` value) is the zero of the turn's timings
        when it lies before this call: the end of speech in live mode, or the arrival of
        a queued MQTT request. ``endpoint_ms`` is when the endpointer decided the turn
        was over, on the same scale. ``accept`` maps the transcript to the question to
        answer, or to None to drop the turn (a missing wake phrase).
        """
        events = events or TurnEvents()
        metrics = _metrics(started_at, input_audio_s=len(audio) / 16_000, endpoint_ms=endpoint_ms)
        if self.recognizer is None:
            raise RuntimeError("this Assistant was built without a recognizer")
        transcript = await asyncio.to_thread(self.recognizer.transcribe, audio)
        metrics.asr_ms = metrics.elapsed_ms()
        events.on_transcript(transcript)
        question = None
        if not transcript.has_speech:
            skipped = f"no speech detected, because {transcript.reason}"
        else:
            question = accept(transcript.text) if accept else transcript.text
            skipped = None if question else f"not addressed to the assistant: {transcript.text!r}"
        if skipped is not None:
            if hold is not None:
                # A turn that may still be dropped logs nothing before its end is confirmed.
                await hold.wait()
            metrics.total_ms = metrics.elapsed_ms()
            logger.info("turn: %s | asr %d ms", skipped, metrics.asr_ms)
            return TurnResult(transcript, "", metrics)
        answer = await self._answer(question, sink, events, metrics, speculative, hold)
        return TurnResult(transcript, answer, metrics)

    async def respond_to_text(
        self,
        text: str,
        sink: AudioSink | None,
        events: TurnEvents | None = None,
        speculative: bool | None = None,
        started_at: float | None = None,
    ) -> TurnResult:
        metrics = _metrics(started_at)
        answer = await self._answer(text, sink, events or TurnEvents(), metrics, speculative)
        return TurnResult(None, answer, metrics)

    async def _answer(
        self,
        question: str,
        sink: AudioSink | None,
        events: TurnEvents,
        metrics: TurnMetrics,
        speculative: bool | None,
        hold: Hold | None = None,
    ) -> str:
        speak = sink is not None and self.synthesizer is not None
        history = list(self.llm.conversation.history)
        opened = False
        metrics.spoken = speak
        chunks: asyncio.Queue[str | None] = asyncio.Queue(_QUEUE_SIZE)
        # (samples, the text chunk they belong to, whether they end it)
        audio: asyncio.Queue[tuple[np.ndarray, str, bool] | None] = asyncio.Queue(_QUEUE_SIZE)
        parts: list[str] = []
        spoken: list[str] = []
        """Text chunks whose audio was written to the sink in full."""

        async def generate() -> None:
            chunker = SpeechChunker.from_config(self.config.tts)
            try:
                async for fragment in self.llm.answer(question, speculative):
                    if metrics.first_token_ms is None:
                        metrics.first_token_ms = metrics.elapsed_ms()
                    parts.append(fragment)
                    events.on_text(fragment)
                    if speak:
                        for chunk in chunker.push(fragment):
                            await chunks.put(chunk)
                if speak:
                    for chunk in chunker.flush():
                        await chunks.put(chunk)
            finally:
                events.on_answer_end()
                if speak:
                    await chunks.put(None)

        async def synthesize() -> None:
            previous = None
            try:
                while (chunk := await chunks.get()) is not None:
                    pieces = await asyncio.to_thread(self.synthesizer.synthesize_joined, chunk, previous)
                    previous = chunk
                    for number, samples in enumerate(pieces):
                        await audio.put((samples, chunk, number == len(pieces) - 1))
            finally:
                await audio.put(None)

        async def play() -> None:
            nonlocal opened
            if hold is not None:
                # A held turn opens the device only once released.
                await hold.wait()
                metrics.endpoint_ms = hold.endpoint_ms
                await sink.open(self.synthesizer.sample_rate)
                opened = True
            try:
                while (item := await audio.get()) is not None:
                    samples, chunk, last = item
                    if metrics.first_audio_ms is None:
                        # Taken before the write: a speaker's write returns only when played.
                        metrics.first_audio_ms = metrics.elapsed_ms()
                    await sink.write(samples)
                    metrics.audio_s += len(samples) / self.synthesizer.sample_rate
                    if last:
                        spoken.append(chunk)
            except asyncio.CancelledError:
                # Silence the output now: the task group still waits for the decoder to
                # finish its current step (up to a target pass) before the sink closes.
                sink.interrupt()
                raise

        ok = False
        if speak and hold is None:
            await sink.open(self.synthesizer.sample_rate)
            opened = True
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(generate(), name="llm")
                if speak:
                    group.create_task(synthesize(), name="tts")
                    group.create_task(play(), name="sink")
            ok = True
        except BaseExceptionGroup as failed:
            # One stage failed and the task group cancelled the others: raise the failure
            # itself, which callers know how to report (a device error, a model error).
            raise failed.exceptions[0] from None
        finally:
            if opened:
                await sink.close(ok)
            if speak and not ok:
                if hold is not None and not hold.released:
                    # Dropped before the user finished speaking: the turn never happened.
                    self.llm.conversation.history[:] = history
                else:
                    # Cut off (barge-in) or failed: the history keeps what the user heard.
                    # NOTE: a chunk counts as heard only once all its audio was written.
                    self.llm.replace_last_answer(question, " ".join(spoken))
        metrics.total_ms = metrics.elapsed_ms()
        self._record_decoding(metrics)
        logger.info("turn: %s", metrics.summary())
        if ok and self.prepare_next_turn:
            # The reply is complete, so the next question is seconds away. The executor,
            # unlike a task, is waited for when asyncio.run ends.
            prefix = self.llm.next_turn_prefix()
            self._next_turn_prefill = asyncio.get_running_loop().run_in_executor(None, self.llm.prefill, prefix)
            self._next_turn_prefill.add_done_callback(_log_prefill_failure)
        return "".join(parts)

    async def settle(self) -> None:
        """Wait until the work started after the last turn (the next prompt's prefill) is done."""
        pending, self._next_turn_prefill = self._next_turn_prefill, None
        # The future of an event loop that has closed since is done, because that loop
        # waited for its executor's threads before closing.
        if pending is not None and not pending.done():
            await asyncio.wait([pending])

    async def speak(self, text: str, sink: AudioSink) -> float:
        """Speak ``text`` as it is; return the seconds of audio written."""
        if self.synthesizer is None:
            raise RuntimeError("this Assistant was built without a synthesizer")
        return await speak(self.synthesizer, self.config.tts, text, sink)

    def _record_decoding(self, metrics: TurnMetrics) -> None:
        answer = self.llm.last_answer
        if answer is None:
            return
        stats = answer.stats
        metrics.speculative = answer.speculative
        metrics.prompt_tokens = stats.prompt_tokens
        metrics.prefill_tokens = stats.prefill_tokens
        metrics.answer_tokens = stats.new_tokens
        metrics.tokens_per_s = stats.tokens_per_s
        metrics.acceptance_rate = stats.acceptance_rate
        metrics.mean_accepted = stats.mean_accepted
        metrics.accept_counts = list(stats.accept_counts)


def _log_prefill_failure(future: asyncio.Future[None]) -> None:
    if not future.cancelled() and future.exception() is not None:
        logger.warning("Prefilling the next turn's prompt failed (%s); the next question prefills its whole prompt", future.exception())


async def load_assistant(config: Config, need_asr: bool = True, need_tts: bool = True, speculative: bool | None = None) -> Assistant:
    """Resolve every configured model, then load them side by side in worker threads.

    Resolution (and so any first-run assembly or conversion) happens before loading, so
    a missing package fails in seconds rather than after a minute of loading.
    """
    from voice import models
    from voice.llm.loading import load_models, resolve_draft_weights, resolve_dtype

    started = time.monotonic()
    cache = models.cache_root(config.cache_dir)
    llm_config = config.llm
    if speculative is not None and speculative != llm_config.speculative:
        llm_config = replace(llm_config, speculative=speculative)
    use_draft = llm_config.speculative and llm_config.drafter != "prompt_lookup"
    target = await asyncio.to_thread(models.resolve_llm, config.llm.target, cache, config.allow_download, "llm.target")
    draft = await asyncio.to_thread(models.resolve_llm, config.llm.draft, cache, config.allow_download, "llm.draft") if use_draft else None
    whisper = await asyncio.to_thread(models.resolve_whisper, config.asr.model, cache, config.allow_download) if need_asr else None
    voice_path = await asyncio.to_thread(models.resolve_piper, config.tts.voice, cache) if need_tts else None

    dtype = resolve_dtype(config.llm.dtype)
    int8_draft = llm_config.drafter == "model" and resolve_draft_weights(llm_config.draft_weights) == "int8"
    draft_dtype = torch.float32 if int8_draft else dtype
    draft_has_tokenizer = llm_config.drafter != "gemma4_assistant"
    llm_task = asyncio.to_thread(load_models, target, draft, dtype, config.allow_download, draft_dtype, draft_has_tokenizer)
    asr_task = asyncio.to_thread(Recognizer, whisper[0], config.asr, not config.allow_download) if whisper else _none()
    tts_task = asyncio.to_thread(Synthesizer, voice_path, config.tts) if voice_path else _none()
    loaded, recognizer, synthesizer = await asyncio.gather(llm_task, asr_task, tts_task)
    llm = await asyncio.to_thread(_language_model_stage, loaded, llm_config, cache)
    prefix_tokens = await asyncio.to_thread(llm.warm_up)
    logger.info("Ready in %.1f s (system prompt of %d tokens prefilled)", time.monotonic() - started, prefix_tokens)
    return Assistant(config, llm, recognizer, synthesizer)


def _language_model_stage(loaded, config: LlmConfig, cache: Path) -> LanguageModelStage:
    from voice.llm.loading import build_drafter, quantize_target

    quantize_target(config, loaded, cache)
    return LanguageModelStage(loaded, config, build_drafter(config, loaded, cache))


def _metrics(started_at: float | None, **values) -> TurnMetrics:
    metrics = TurnMetrics(**values)
    if started_at is not None:
        metrics.started_at = started_at
    return metrics


async def _none() -> None:
    return None
