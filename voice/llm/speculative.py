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

from voice.llm.adaptive import DraftLengthController
from voice.llm.cache import TokenCache
from voice.llm.detokenize import StopStrings
from voice.llm.drafters import Drafter, ModelDrafter, Proposal
from voice.llm.sampling import Sampling, distribution, sample

logger = logging.getLogger(__name__)

GREEDY = Sampling()


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
    """``eos``, ``stop`` (a stop string), ``max_tokens`` or ``cancelled``."""

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
    """Decoding of a target model, sped up by a drafter whose proposals the target verifies.

    Greedy decoding (temperature 0) accepts a draft token when it is the target's argmax.
    Sampling uses the rejection rule of Leviathan et al. (2022) and Chen et al. (2023). A
    draft token x drawn from the draft distribution q is accepted with probability
    min(1, p(x) / q(x)), where p is the target distribution. On rejection the token is
    drawn from the residual max(0, p - q), normalized. Every token is then distributed
    exactly as the target alone would sample it.

    The decoder keeps the KV caches between calls: a prompt that extends an earlier one
    (the next turn of a conversation) only runs the new tokens through the models.
    Calls are not thread-safe; one generation runs at a time.
    """

    def __init__(
        self,
        target_model: PreTrainedModel,
        drafter: Drafter | PreTrainedModel | None,
        eos_token_ids: set[int],
        draft_tokens: int = 4,
        adaptive: bool = False,
    ) -> None:
        if draft_tokens < 1:
            raise ValueError(f"draft_tokens must be at least 1, got {draft_tokens}")
        self.target = TokenCache(target_model)
        if isinstance(drafter, PreTrainedModel):
            drafter = ModelDrafter(drafter)
        self.drafter = drafter
        self.eos_token_ids = set(eos_token_ids)
        self.draft_tokens = draft_tokens
        self.controller = DraftLengthController(draft_tokens, adaptive)
        self.stats = DecodeStats()

    @property
    def draft(self) -> TokenCache | None:
        """The draft model's cache, when the drafter is a model with its own cache."""
        return getattr(self.drafter, "cache", None)

    def reset(self) -> None:
        """Forget the cached conversation."""
        self.target.clear()
        if self.drafter is not None:
            self.drafter.reset()

    def prefill(self, ids: list[int]) -> None:
        """Feed ``ids`` into both caches ahead of time, such as the system prompt at start.

        A later prompt that starts with ``ids`` then only runs its remaining tokens.
        """
        self.target.reuse_prefix(ids, keep_input=False)
        missing = ids[len(self.target) :]
        if missing:
            _, output = self._target_pass(missing, logits_to_keep=1)
            if self.drafter is not None:
                self.drafter.observe(ids, output, len(missing) - 1)
        if self.drafter is not None:
            self.drafter.prefill(ids)

    def calibrate(self) -> None:
        """Time a 1-token and a full-length verification pass and a draft token, for the adaptive k.

        Runs after ``prefill`` and leaves the caches as they were. The passes reuse the
        last cached token as input; its values do not matter for timing.
        """
        if self.drafter is None or not self.target.ids:
            return
        length = len(self.target)
        filler = self.target.ids[-1]

        def timed_target_pass(tokens: int) -> float:
            started = time.perf_counter()
            self._target_pass([filler] * tokens, logits_to_keep=tokens)
            elapsed = time.perf_counter() - started
            self.target.rollback(length)
            return elapsed

        timed_target_pass(1)  # the first pass after a prefill runs colder than later ones
        single = timed_target_pass(1)
        full = timed_target_pass(self.draft_tokens + 1)
        ids = list(self.target.ids)
        self.drafter.start(ids + [filler])
        started = time.perf_counter()
        self.drafter.propose(ids + [filler], 1, Sampling(), torch.Generator())
        draft_token = time.perf_counter() - started
        self.drafter.observe(ids)
        self.controller.calibrate(single, full, draft_token)
        logger.debug(
            "calibrated: target pass %.0f ms (1 token), %.0f ms (%d tokens); draft token %.0f ms",
            1000 * single, 1000 * full, self.draft_tokens + 1, 1000 * draft_token,
        )

    def generate(
        self,
        prompt_ids: list[int],
        max_new_tokens: int,
        speculative: bool = True,
        cancel: threading.Event | None = None,
        sampling: Sampling = GREEDY,
        stop: StopStrings | None = None,
    ) -> Iterator[list[int]]:
        """Yield verified tokens, one list per target pass, until a stop.

        The first pass prefills the prompt (all of it that the cache does not hold yet)
        and yields one token without drafting; later passes verify drafts.

        End-of-sequence tokens are not yielded; the token that completes a stop string is.
        ``cancel`` is checked between steps, so a cancelled generation leaves the caches
        holding verified tokens only.
        """
        if not prompt_ids:
            raise ValueError("prompt_ids is empty")
        if speculative and self.drafter is None:
            raise ValueError("speculative decoding needs a drafter (a draft model or prompt lookup)")
        started = time.perf_counter()
        self.stats = stats = DecodeStats(prompt_tokens=len(prompt_ids), accept_counts=[0] * (self.draft_tokens + 1))
        generator = sampling.generator()
        ids = list(prompt_ids)

        # The prompt is prefilled by the first step's target pass, which also yields the
        # first token: that step never drafts, so a draft model's own prefill (run by its
        # first proposal) does not delay the first token.
        self.target.reuse_prefix(ids)
        if self.drafter is not None:
            self.drafter.start(ids)
        stats.prefill_tokens = len(ids) - len(self.target)

        try:
            yield from self._decode_steps(ids, max_new_tokens, speculative, cancel, sampling, stop, generator, started)
        except GeneratorExit:
            raise  # closed at a yield, between steps: the caches hold verified tokens only
        except BaseException:
            # A pass interrupted inside the model (an error, Ctrl-C) may have appended keys
            # and values to some layers only, so the next call starts from empty caches.
            self.reset()
            raise
        stats.total_s = time.perf_counter() - started
        logger.debug(
            "generated %d tokens in %d steps (%s), drafted %d, accepted %d",
            stats.new_tokens, stats.steps, stats.stop_reason, stats.drafted, stats.accepted,
        )

    def _decode_steps(
        self,
        ids: list[int],
        max_new_tokens: int,
        speculative: bool,
        cancel: threading.Event | None,
        sampling: Sampling,
        stop: StopStrings | None,
        generator: torch.Generator,
        started: float,
    ) -> Iterator[list[int]]:
        stats = self.stats
        generated: list[int] = []
        while True:
            if cancel is not None and cancel.is_set():
                stats.stop_reason = "cancelled"
                break
            remaining = max_new_tokens - stats.new_tokens
            # The last token of the budget comes from the target alone, so drafting
            # never runs past max_new_tokens.
            if speculative and stats.steps:
                k = self.controller.choose(remaining, self.drafter.unseen_tokens(ids), stats.new_tokens)
            else:
                k = 0
            proposal = self._propose(ids, k, sampling, generator) if k else None
            if proposal:
                new_tokens = self._speculative_step(ids, proposal, sampling, generator, remaining)
            else:
                new_tokens = self._plain_step(ids, sampling, generator, timed=stats.steps > 0)
            stats.steps += 1

            new_tokens, stop_reason = self._apply_stops(generated, new_tokens, remaining, stop)
            ids.extend(new_tokens)
            generated.extend(new_tokens)
            stats.new_tokens += len(new_tokens)
            if stats.steps == 1:
                stats.prefill_s = time.perf_counter() - started
            if new_tokens:
                if stats.first_token_s is None:
                    stats.first_token_s = time.perf_counter() - started
                yield new_tokens
            if stop_reason:
                stats.stop_reason = stop_reason
                if stop_reason in ("eos", "stop"):
                    # Answers cut by the token budget say nothing about answer length.
                    self.controller.record_answer(stats.new_tokens)
                break

    def _apply_stops(
        self, generated: list[int], new_tokens: list[int], remaining: int, stop: StopStrings | None
    ) -> tuple[list[int], str]:
        """Cut a run of verified tokens at end-of-sequence, a stop string or the token budget."""
        for index, token in enumerate(new_tokens):
            if token in self.eos_token_ids:
                new_tokens, reason = new_tokens[:index], "eos"
                break
        else:
            reason = ""
        if stop is not None:
            keep = stop.first_match(generated, new_tokens)
            if keep is not None:
                return new_tokens[:keep], "stop"
        if reason:
            return new_tokens, reason
        if len(new_tokens) >= remaining:
            return new_tokens[:remaining], "max_tokens"
        return new_tokens, ""

    def _target_pass(self, input_ids: list[int], logits_to_keep: int):
        """Run the target over ``input_ids``; return its float32 logits and the full output."""
        options = self.drafter.target_forward_options if self.drafter is not None else {}
        output = self.target.forward(input_ids, logits_to_keep, **options)
        return output.logits[0].float(), output

    def _plain_step(self, ids: list[int], sampling: Sampling, generator: torch.Generator, timed: bool) -> list[int]:
        pending = ids[len(self.target) :]
        started = time.perf_counter()
        logits, output = self._target_pass(pending, logits_to_keep=1)
        if timed and len(pending) == 1:
            self.controller.record_verify(1, time.perf_counter() - started)
        token = _choose(logits[-1], sampling, generator)
        if self.drafter is not None:
            self.drafter.observe(ids, output, len(pending) - 1)
        return [token]

    def _propose(self, ids: list[int], k: int, sampling: Sampling, generator: torch.Generator) -> Proposal | None:
        """propose: up to k draft tokens; an end-of-sequence draft ends the proposal."""
        started = time.perf_counter()
        proposal = self.drafter.propose(ids, k, sampling, generator)
        self.stats.draft_s += time.perf_counter() - started
        proposal.seconds = time.perf_counter() - started
        for index, token in enumerate(proposal.tokens[:k]):
            if token in self.eos_token_ids:
                k = index + 1
                break
        if len(proposal.tokens) > k:
            proposal.tokens = proposal.tokens[:k]
            if proposal.probabilities is not None:
                proposal.probabilities = proposal.probabilities[:k]
        return proposal if proposal.tokens else None

    def _speculative_step(
        self, ids: list[int], proposal: Proposal, sampling: Sampling, generator: torch.Generator, remaining: int
    ) -> list[int]:
        target, stats = self.target, self.stats
        base = len(ids)
        draft_ids = proposal.tokens

        # verify: row i contains the target's logits after the prefix ids + draft_ids[:i].
        pending = ids[len(target) :]
        started = time.perf_counter()
        target_logits, output = self._target_pass(pending + draft_ids, logits_to_keep=len(draft_ids) + 1)
        target_logits = target_logits[-(len(draft_ids) + 1) :]
        verify_seconds = time.perf_counter() - started
        stats.verify_s += verify_seconds
        if len(pending) == 1:
            self.controller.record_verify(len(draft_ids) + 1, verify_seconds)

        # accept and resample: keep drafts while the target agrees, then add one token of
        # the target's own (a correction where a draft was rejected, a bonus token where
        # all were accepted).
        if sampling.greedy:
            accepted, next_token = _accept_greedy(draft_ids, target_logits)
        else:
            accepted, next_token = _accept_sampled(draft_ids, proposal.probabilities, target_logits, sampling, generator)
        new_tokens = draft_ids[:accepted] + [next_token]

        stats.draft_steps += 1
        stats.drafted += len(draft_ids)
        stats.accepted += accepted
        stats.accept_counts[accepted] += 1
        self.controller.record_draft(len(draft_ids), accepted, proposal.seconds - proposal.catch_up_seconds)
        self.controller.record_catch_up(proposal.catch_up_tokens, proposal.catch_up_seconds)

        # rollback: keep only positions whose tokens were verified.
        target.rollback(base + accepted)
        self.drafter.observe(ids + draft_ids[:accepted], output, len(pending) - 1 + accepted)
        return new_tokens


def _choose(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> int:
    """Pick the target's token from one row of logits: argmax, or a sample of its distribution."""
    if sampling.greedy:
        return int(logits.argmax())
    return sample(distribution(logits[None], sampling)[0], generator)


def _accept_greedy(draft_ids: list[int], target_logits: torch.Tensor) -> tuple[int, int]:
    """Return the number of drafts equal to the target's argmax, and the target's token after them."""
    target_ids = target_logits.argmax(dim=-1).tolist()
    accepted = 0
    while accepted < len(draft_ids) and draft_ids[accepted] == target_ids[accepted]:
        accepted += 1
    return accepted, target_ids[accepted]


def _accept_sampled(
    draft_ids: list[int],
    draft_probabilities: torch.Tensor | None,
    target_logits: torch.Tensor,
    sampling: Sampling,
    generator: torch.Generator,
) -> tuple[int, int]:
    """Apply the speculative sampling rule; return the accepted count and the next token.

    ``draft_probabilities`` None means deterministic drafts, whose distribution is one-hot:
    a draft x is then accepted with probability p(x), and the residual is p without x.
    """
    target_probabilities = distribution(target_logits, sampling)
    for index, token in enumerate(draft_ids):
        p = target_probabilities[index]
        q = None if draft_probabilities is None else draft_probabilities[index]
        q_token = 1.0 if q is None else float(q[token])
        threshold = float(p[token]) / q_token if q_token > 0 else 0.0
        if float(torch.rand((), generator=generator)) < threshold:
            continue
        if q is None:
            residual = p.clone()
            residual[token] = 0.0
        else:
            residual = (p - q).clamp_min(0.0)
        # A residual of zero mass can only come from rounding when p and q agree.
        if float(residual.sum()) <= 0.0:
            residual = p
        return index, sample(residual / residual.sum(), generator)
    return len(draft_ids), sample(target_probabilities[len(draft_ids)], generator)
