"""Speculative decoding: a draft model proposes tokens, the target model verifies them.

Each step runs four phases (Leviathan et al., 2022, "Fast Inference from Transformers via
Speculative Decoding"):

- propose: the draft model decodes ``k`` tokens greedily, one forward pass each;
- verify: the target model scores the pending token and all ``k`` drafts in one forward
  pass, which yields the target's own choice after each prefix;
- accept and resample: the longest prefix on which draft and target agree is kept, plus
  the target's token after it (a correction, or a bonus token when all drafts match);
- rollback: both KV caches are cut back to the verified tokens.

With greedy decoding every emitted token is the target's argmax given the verified
prefix, so the output is token for token what the target alone produces. The draft only
changes how many target passes that takes. Plain decoding (one target pass per token)
shares the same prefill, caches and stop handling, for comparison.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel

from voice.llm.cache import TokenCache

logger = logging.getLogger(__name__)


@dataclass
class DecodeStats:
    """Counters and timings of one ``generate`` call."""

    prompt_tokens: int = 0
    prefill_tokens: int = 0
    """Prompt tokens that needed a forward pass; the rest came from the reused cache."""
    new_tokens: int = 0
    steps: int = 0
    """Target forward passes, the first one (prefill plus first token) included."""
    draft_steps: int = 0
    """Steps in which the draft proposed tokens (the first and budget-limited ones do not)."""
    drafted: int = 0
    accepted: int = 0
    accept_counts: list[int] = field(default_factory=list)
    """accept_counts[n]: steps in which exactly n draft tokens were accepted."""
    prefill_s: float = 0.0
    """Seconds of the first step, which prefills the prompt and yields the first token."""
    first_token_s: float | None = None
    """Seconds from the call to the first verified token."""
    total_s: float = 0.0
    draft_s: float = 0.0
    verify_s: float = 0.0
    stop_reason: str = ""
    """``eos``, ``max_tokens`` or ``cancelled``."""

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted / self.drafted if self.drafted else None

    @property
    def mean_accepted(self) -> float | None:
        """Draft tokens accepted per step that drafted."""
        return self.accepted / self.draft_steps if self.draft_steps else None

    @property
    def tokens_per_s(self) -> float | None:
        """Verified tokens per second after the first token (the prefill step is excluded)."""
        decode_s = self.total_s - self.prefill_s
        return (self.new_tokens - 1) / decode_s if self.new_tokens > 1 and decode_s > 0 else None


class SpeculativeDecoder:
    """Greedy decoding of a target model, sped up by a draft model that shares its tokenizer.

    The decoder keeps both KV caches between calls: a prompt that extends an earlier one
    (the next turn of a conversation) only runs the new tokens through the models.
    Calls are not thread-safe; one generation runs at a time.
    """

    def __init__(
        self,
        target_model: PreTrainedModel,
        draft_model: PreTrainedModel | None,
        eos_token_ids: set[int],
        draft_tokens: int = 4,
    ) -> None:
        if draft_tokens < 1:
            raise ValueError(f"draft_tokens must be at least 1, got {draft_tokens}")
        self.target = TokenCache(target_model)
        self.draft = TokenCache(draft_model) if draft_model is not None else None
        self.eos_token_ids = set(eos_token_ids)
        self.draft_tokens = draft_tokens
        self.stats = DecodeStats()

    def reset(self) -> None:
        """Forget the cached conversation."""
        self.target.clear()
        if self.draft is not None:
            self.draft.clear()

    def prefill(self, ids: list[int]) -> None:
        """Feed ``ids`` into both caches ahead of time, such as the system prompt at start.

        A later prompt that starts with ``ids`` then only runs its remaining tokens.
        """
        for cache in (self.target, self.draft):
            if cache is None:
                continue
            cache.reuse_prefix(ids, keep_input=False)
            missing = ids[len(cache) :]
            if missing:
                _forward(cache, missing, logits_to_keep=1)

    def generate(
        self,
        prompt_ids: list[int],
        max_new_tokens: int,
        speculative: bool = True,
        cancel: threading.Event | None = None,
    ) -> Iterator[list[int]]:
        """Yield verified tokens, one list per target pass, until a stop.

        The first pass prefills the prompt (all of it that the cache does not hold yet)
        and yields one token without drafting; later passes verify drafts.

        End-of-sequence tokens are not yielded. ``cancel`` is checked between steps, so a
        cancelled generation leaves both caches holding verified tokens only.
        """
        if not prompt_ids:
            raise ValueError("prompt_ids is empty")
        if speculative and self.draft is None:
            raise ValueError("speculative decoding needs a draft model")
        started = time.perf_counter()
        self.stats = stats = DecodeStats(prompt_tokens=len(prompt_ids), accept_counts=[0] * (self.draft_tokens + 1))
        ids = list(prompt_ids)

        # The prompt is prefilled by the first step's target pass, which also yields the
        # first token: that step never drafts, so the draft's own prefill (run by its first
        # proposal) does not delay the first token.
        self.target.reuse_prefix(ids)
        if self.draft is not None:
            self.draft.reuse_prefix(ids)
        stats.prefill_tokens = len(ids) - len(self.target)

        while True:
            if cancel is not None and cancel.is_set():
                stats.stop_reason = "cancelled"
                break
            remaining = max_new_tokens - stats.new_tokens
            # The last token of the budget comes from the target alone, so drafting
            # never runs past max_new_tokens.
            k = min(self.draft_tokens, remaining - 1) if speculative and stats.steps else 0
            new_tokens = self._speculative_step(ids, k) if k > 0 else self._plain_step(ids)
            stats.steps += 1

            new_tokens, stop_reason = self._apply_stops(new_tokens, remaining)
            ids.extend(new_tokens)
            stats.new_tokens += len(new_tokens)
            if stats.steps == 1:
                stats.prefill_s = time.perf_counter() - started
            if new_tokens:
                if stats.first_token_s is None:
                    stats.first_token_s = time.perf_counter() - started
                yield new_tokens
            if stop_reason:
                stats.stop_reason = stop_reason
                break
        stats.total_s = time.perf_counter() - started
        logger.debug(
            "generated %d tokens in %d steps (%s), drafted %d, accepted %d",
            stats.new_tokens, stats.steps, stats.stop_reason, stats.drafted, stats.accepted,
        )

    def _apply_stops(self, new_tokens: list[int], remaining: int) -> tuple[list[int], str]:
        """Cut a run of verified tokens at end-of-sequence or at the token budget."""
        for index, token in enumerate(new_tokens):
            if token in self.eos_token_ids:
                return new_tokens[:index], "eos"
        if len(new_tokens) >= remaining:
            return new_tokens[:remaining], "max_tokens"
        return new_tokens, ""

    def _plain_step(self, ids: list[int]) -> list[int]:
        logits = _forward(self.target, ids[len(self.target) :], logits_to_keep=1)
        return [int(logits[-1].argmax())]

    def _speculative_step(self, ids: list[int], k: int) -> list[int]:
        target, draft, stats = self.target, self.draft, self.stats
        base = len(ids)

        # propose: up to k greedy draft tokens, one draft pass each; an end-of-sequence
        # draft ends the proposal, since nothing after it would be used.
        started = time.perf_counter()
        draft_ids: list[int] = []
        pending = ids[len(draft) :]
        while len(draft_ids) < k:
            draft_logits = _forward(draft, pending, logits_to_keep=1)  # (1, vocab)
            token = int(draft_logits[-1].argmax())
            draft_ids.append(token)
            if token in self.eos_token_ids:
                break
            pending = [token]
        verify_started = time.perf_counter()
        stats.draft_s += verify_started - started

        # verify: row i contains the target's logits after the prefix ids + draft_ids[:i].
        target_logits = _forward(target, ids[len(target) :] + draft_ids, logits_to_keep=len(draft_ids) + 1)
        target_ids = target_logits.argmax(dim=-1).tolist()  # (len(draft_ids) + 1,)
        stats.verify_s += time.perf_counter() - verify_started

        # accept: the longest prefix on which the draft chose what the target chooses.
        accepted = 0
        while accepted < len(draft_ids) and draft_ids[accepted] == target_ids[accepted]:
            accepted += 1
        stats.draft_steps += 1
        stats.drafted += len(draft_ids)
        stats.accepted += accepted
        stats.accept_counts[accepted] += 1

        # resample: the target's own token after the accepted prefix (a correction where a
        # draft was rejected, a bonus token where all were accepted).
        new_tokens = draft_ids[:accepted] + [target_ids[accepted]]

        # rollback: keep only positions whose tokens were verified. The target contains
        # ids + every draft, and the draft contains ids + all but its last proposal.
        target.rollback(base + accepted)
        draft.rollback(min(len(draft), base + accepted))
        return new_tokens


@torch.inference_mode()
def _forward(cache: TokenCache, input_ids: list[int], logits_to_keep: int) -> torch.Tensor:
    """Run ``input_ids`` through the cache's model; return the last ``logits_to_keep`` rows of logits."""
    output = cache.model(
        input_ids=torch.tensor([input_ids], dtype=torch.long),
        cache=cache.kv,
        use_cache=True,
        logits_to_keep=logits_to_keep,
    )
    cache.ids.extend(input_ids)
    return output.logits[0].float()
