"""The language-model stage: a question in, verified answer text streamed out.

``LanguageModelStage`` ties the pieces of this package together: the conversation builds
the prompt, ``SpeculativeDecoder`` produces verified tokens in a worker thread, and the
incremental detokenizer turns them into text fragments for the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

import torch

from voice.config import LlmConfig
from voice.llm.conversation import Conversation
from voice.llm.detokenize import IncrementalDetokenizer, StopStrings
from voice.llm.drafters import Drafter
from voice.llm.loading import LoadedModels, eos_token_ids
from voice.llm.sampling import Sampling
from voice.llm.speculative import DecodeStats, SpeculativeDecoder

logger = logging.getLogger(__name__)

_DONE = object()


@dataclass
class Answer:
    """The outcome of one answer: its text, its tokens and the decoder's counters."""

    text: str
    token_ids: list[int]
    stats: DecodeStats
    speculative: bool
    """Whether the draft model proposed tokens for this answer."""


class LanguageModelStage:
    """Answers questions with the target model, drafted by the draft model when enabled."""

    def __init__(self, models: LoadedModels, config: LlmConfig, drafter: Drafter | None = None) -> None:
        self.models = models
        self.config = config
        self.tokenizer = models.tokenizer
        self.decoder = SpeculativeDecoder(
            models.target_model,
            drafter,
            eos_token_ids(models.tokenizer, models.target_model),
            draft_tokens=config.draft_tokens,
            adaptive=config.adaptive_draft,
        )
        self.sampling = Sampling(config.temperature, config.top_k, config.top_p, config.seed if config.seed >= 0 else None)
        self.stop = StopStrings(self.tokenizer, config.stop_strings)
        self.conversation = Conversation(config.system_prompt, config.max_history_turns)
        self.last_answer: Answer | None = None
        self._decoder_lock = threading.Lock()
        """Held while a worker thread runs the decoder, whose calls are not thread-safe."""

    @property
    def can_speculate(self) -> bool:
        return self.decoder.drafter is not None

    def warm_up(self) -> int:
        """Prefill the prompt prefix every first turn shares (the system prompt); return its length.

        Without it the first question pays for the system prompt's prefill, about two
        seconds for 100 tokens on a 2-core CPU in float32. With the adaptive draft length,
        it also times the passes that the choice of k weighs against each other.
        """
        prefix = self.conversation.shared_prefix_ids(self.tokenizer)
        self.prefill(prefix)
        if self.config.adaptive_draft and self.can_speculate:
            with self._decoder_lock:
                self.decoder.calibrate()
        return len(prefix)

    def new_conversation(self) -> None:
        """Forget the history and cut both caches back to the system prompt.

        Clearing only the history would leave the previous turns in the caches, so
        asking the same question again would reuse them and look faster than a new one.
        """
        self.conversation.clear()
        self.warm_up()

    def replace_last_answer(self, user_text: str, assistant_text: str) -> None:
        """Replace the answer of the last exchange, if it is the one to ``user_text``.

        The decoder's caches may still contain the longer answer; the next prompt differs
        from them there, and only the common prefix is reused.
        """
        history = self.conversation.history
        if history and history[-1].user == user_text:
            history[-1].assistant = assistant_text.strip()

    def next_turn_prefix(self) -> list[int]:
        """Return what the next prompt starts with, whatever the question.

        That is the conversation so far and the opening of the next user message.
        """
        return self.conversation.shared_prefix_ids(self.tokenizer, self.max_prompt_tokens)

    def prefill(self, ids: list[int]) -> None:
        """Feed ``ids`` into the decoder's caches ahead of the prompt that starts with them.

        Blocking, so call it from a worker thread. The next question then prefills only
        the tokens after ``ids``.
        """
        with self._decoder_lock:
            try:
                self.decoder.prefill(ids)
            except Exception:
                # A pass that failed part-way may leave some layers longer than others.
                self.decoder.reset()
                raise

    @property
    def max_prompt_tokens(self) -> int:
        return self.config.max_context_tokens - self.config.max_new_tokens

    def prompt_ids(self, user_text: str) -> list[int]:
        return self.conversation.prompt_ids(self.tokenizer, user_text, self.max_prompt_tokens)

    async def answer(self, user_text: str, speculative: bool | None = None) -> AsyncIterator[str]:
        """Stream the answer to ``user_text`` as text fragments of verified tokens.

        The conversation records the question with whatever part of the answer was
        produced, also when the consumer stops early (cancellation keeps what was said).
        """
        if speculative is None:
            speculative = self.config.speculative
        speculative = speculative and self.can_speculate
        prompt = self.prompt_ids(user_text)
        detokenizer = IncrementalDetokenizer(self.tokenizer)
        shown = ""
        try:
            # aclosing stops the decoder as soon as this generator is closed early,
            # instead of whenever the inner generator is garbage-collected.
            async with contextlib.aclosing(self._stream_tokens(prompt, speculative)) as token_stream:
                async for tokens in token_stream:
                    detokenizer.push(tokens)
                    visible = self.stop.visible(detokenizer.text, final=False)
                    if len(visible) > len(shown):
                        # Recorded before the yield: a consumer that closes the stream
                        # there has still received this fragment.
                        fragment, shown = visible[len(shown) :], visible
                        yield fragment
            detokenizer.flush()
            visible = self.stop.visible(detokenizer.text, final=True)
            if len(visible) > len(shown):
                fragment, shown = visible[len(shown) :], visible
                yield fragment
        finally:
            self.last_answer = Answer(shown, detokenizer.ids, self.decoder.stats, speculative)
            self.conversation.add(user_text, shown.strip())

    async def _stream_tokens(self, prompt: list[int], speculative: bool) -> AsyncIterator[list[int]]:
        """Run the decoder in a worker thread and hand each verified batch to the event loop."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()

        def produce() -> None:
            if self.config.threads:
                torch.set_num_threads(self.config.threads)
            try:
                with self._decoder_lock:
                    steps = self.decoder.generate(prompt, self.config.max_new_tokens, speculative, cancel, self.sampling, self.stop or None)
                    for tokens in steps:
                        loop.call_soon_threadsafe(queue.put_nowait, tokens)
            except BaseException as error:  # handed to the consumer, which re-raises it
                loop.call_soon_threadsafe(queue.put_nowait, error)
            else:
                loop.call_soon_threadsafe(queue.put_nowait, _DONE)

        worker = asyncio.ensure_future(asyncio.to_thread(produce))
        try:
            while True:
                item = await queue.get()
                if item is _DONE:
                    break
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            # The decoder stops between steps, so the caches contain only verified tokens
            # once the worker ends. The next turn must not start before that.
            cancel.set()
            await asyncio.shield(worker)

    def generate_ids(self, prompt_ids: list[int], speculative: bool, max_new_tokens: int | None = None) -> list[int]:
        """Decode synchronously and return all verified ids (for tests and benchmarks)."""
        limit = max_new_tokens or self.config.max_new_tokens
        with self._decoder_lock:
            steps = self.decoder.generate(prompt_ids, limit, speculative, sampling=self.sampling, stop=self.stop or None)
            return [token for step in steps for token in step]
