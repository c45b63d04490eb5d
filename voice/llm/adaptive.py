"""Choice of the draft length k before each verification pass, from measured costs and acceptance.

Drafting k tokens costs k draft passes plus a target pass over k + 1 tokens, and yields
the accepted drafts plus one token of the target's. Under the usual model in which each
draft token is accepted with probability a, independently of the others (Leviathan et
al., 2022), a step with k drafts yields (1 - a^(k+1)) / (1 - a) tokens on average. The
controller picks the k with the most expected tokens per second, and k = 0 (a plain
target pass) when no drafting pays, so speculation does not fall far below plain decoding
when the draft agrees poorly with the target.

A draft model must also catch up on a new question before its first proposal: its first
pass feeds every token it has not seen. On a short answer that catch-up can cost more than
drafting saves (with an int4 target on 2 Zen 4 cores, a 7-token answer took 0.88 s
with drafting against 0.74 s without). So the first drafting step of an answer also
needs the expected saving over the rest of the answer, judged from the lengths of
earlier answers, to exceed the measured cost of that catch-up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Weight of the older measurements after each new one: about the last 10 to 20 steps count.
_DECAY = 0.9
# Pseudo-observations that start the acceptance estimate at 0.6 per token, a typical
# value for a same-family draft, until real steps outweigh them.
_PRIOR_ACCEPTED = 1.2
_PRIOR_REJECTED = 0.8
_FIRST_PROBE_INTERVAL = 4
_MAX_PROBE_INTERVAL = 64
# Catch-ups shorter than this add too little time to a draft pass to measure its cost
# per token.
_CATCH_UP_MIN_TOKENS = 4
# Acceptance a probe hopes to find. A probe that would first have to pay a catch-up pass
# runs only if drafting at this acceptance would repay that pass over the rest of the answer.
_HOPED_ACCEPTANCE = 0.8


@dataclass
class RunningAverage:
    """Exponentially weighted mean of a measured duration in seconds."""

    value: float | None = None

    def add(self, sample: float, decay: float = _DECAY) -> None:
        self.value = sample if self.value is None else decay * self.value + (1 - decay) * sample


class DraftLengthController:
    """Picks k for each step; with ``adaptive`` off, k is always ``max_tokens``.

    Costs come from ``calibrate`` and from the decoder's timings of every pass.
    While drafting does not pay, a single-token probe runs after 4, then 8, 16, up to 64
    skipped steps, so a rise in acceptance (a new prompt, a quoted phrase) is noticed at
    little cost. No probe runs where drafting would lose even at 80% acceptance, or where
    the draft's catch-up pass would cost more than that acceptance could save.
    """

    def __init__(self, max_tokens: int, adaptive: bool = True) -> None:
        if max_tokens < 1:
            raise ValueError(f"max draft tokens must be at least 1, got {max_tokens}")
        self.max_tokens = max_tokens
        self.adaptive = adaptive
        self.verify_s = [RunningAverage() for _ in range(max_tokens + 2)]
        """verify_s[n]: seconds of a target pass over n new tokens (index 0 unused)."""
        self.draft_s = RunningAverage()
        """Seconds per proposed draft token."""
        self.accepted = _PRIOR_ACCEPTED
        self.rejected = _PRIOR_REJECTED
        self.skipped = 0
        self.probe_interval = _FIRST_PROBE_INTERVAL
        self.catch_up_token_s = RunningAverage()
        """Seconds per unseen token that a catch-up adds to the draft's first pass."""
        self.answer_tokens = RunningAverage()
        """Length of recent answers in tokens."""

    @property
    def acceptance(self) -> float:
        """Estimated probability that the target accepts a draft token."""
        return self.accepted / (self.accepted + self.rejected)

    def calibrate(self, single_s: float, full_s: float, draft_token_s: float) -> None:
        """Seed the costs: a 1-token and a (max_tokens + 1)-token target pass, and one draft token."""
        self.verify_s[1].value = single_s
        self.verify_s[self.max_tokens + 1].value = full_s
        self.draft_s.value = draft_token_s

    def choose(self, remaining: int, unseen: int = 0, generated: int = 0) -> int:
        """Return the number of tokens to draft when ``remaining`` tokens of the budget are left.

        ``unseen`` is how many tokens the drafter must catch up on before it proposes, and
        ``generated`` how many tokens this answer has so far.
        """
        limit = min(self.max_tokens, remaining - 1)
        if limit <= 0:
            return 0
        if not self.adaptive:
            return limit
        plain_rate = self.expected_tokens(0) / self.step_seconds(0)
        best_k, best_rate = 0, plain_rate
        for k in range(1, limit + 1):
            rate = self.expected_tokens(k) / self.step_seconds(k)
            if rate > best_rate:
                best_k, best_rate = k, rate
        if best_k and not self._catch_up_pays(unseen, generated, remaining, plain_rate, best_rate):
            return 0
        if best_k:
            self.skipped = 0
            self.probe_interval = _FIRST_PROBE_INTERVAL
            return best_k
        self.skipped += 1
        if self.skipped < self.probe_interval:
            return 0
        hoped_rate = max(self.expected_tokens(k, _HOPED_ACCEPTANCE) / self.step_seconds(k) for k in range(1, limit + 1))
        # Where the draft cost alone makes drafting lose (a fast quantized target), a probe
        # would only buy the catch-up pass over a whole new question. A skipped probe is
        # tried again at the next step, since the catch-up may pay once an answer runs long.
        if hoped_rate <= plain_rate or not self._catch_up_pays(unseen, generated, remaining, plain_rate, hoped_rate):
            return 0
        self.skipped = 0
        self.probe_interval = min(2 * self.probe_interval, _MAX_PROBE_INTERVAL)
        return 1

    def _catch_up_pays(self, unseen: int, generated: int, remaining: int, plain_rate: float, best_rate: float) -> bool:
        """Return True when drafting for the rest of the answer saves more than the catch-up costs."""
        if unseen <= 1 or self.catch_up_token_s.value is None or self.answer_tokens.value is None:
            return True  # nothing to catch up on, or nothing measured yet: try drafting
        # An answer already longer than usual is taken to go on about as long again.
        expected_left = min(remaining, max(1.0, self.answer_tokens.value - generated, generated))
        saving = expected_left * (1 / plain_rate - 1 / best_rate)
        return saving > self.catch_up_seconds(unseen)

    def catch_up_seconds(self, tokens: int) -> float:
        """Estimate what catching up on ``tokens`` unseen tokens adds to the draft's first pass."""
        return tokens * (self.catch_up_token_s.value or 0.0)

    def record_catch_up(self, tokens: int, seconds: float) -> None:
        """Record a catch-up over ``tokens`` tokens that added ``seconds`` to a draft pass."""
        if tokens >= _CATCH_UP_MIN_TOKENS:
            self.catch_up_token_s.add(seconds / tokens, decay=0.5)

    def record_answer(self, tokens: int) -> None:
        """Record the length of a finished answer."""
        if tokens > 0:
            self.answer_tokens.add(tokens, decay=0.7)

    def expected_tokens(self, k: int, acceptance: float | None = None) -> float:
        """Return the tokens a step with ``k`` drafts yields on average, at the estimated or given acceptance."""
        a = min(self.acceptance if acceptance is None else acceptance, 1 - 1e-9)
        return (1 - a ** (k + 1)) / (1 - a)

    def step_seconds(self, k: int) -> float:
        draft = (self.draft_s.value or 0.0) * k
        return draft + self.verify_seconds(k + 1)

    def verify_seconds(self, tokens: int) -> float:
        """Measured or interpolated seconds of a target pass over ``tokens`` tokens."""
        known = [(n, average.value) for n, average in enumerate(self.verify_s) if average.value is not None]
        if not known:
            return 1.0  # no timing yet: only the relative costs of the choices matter
        for n, value in known:
            if n == tokens:
                return value
        below = [(n, value) for n, value in known if n < tokens]
        above = [(n, value) for n, value in known if n > tokens]
        if below and above:
            (n0, v0), (n1, v1) = below[-1], above[0]
            return v0 + (v1 - v0) * (tokens - n0) / (n1 - n0)
        # Outside the measured range: assume the cost grows by 10% per extra token, a
        # cautious slope that makes long drafts look expensive until they are measured.
        n0, v0 = (below or above)[-1 if below else 0]
        return v0 * math.pow(1.1, tokens - n0)

    def record_verify(self, tokens: int, seconds: float) -> None:
        """Record a target pass over ``tokens`` new tokens (the prefill excluded)."""
        if 1 <= tokens < len(self.verify_s):
            self.verify_s[tokens].add(seconds)

    def record_draft(self, drafted: int, accepted: int, seconds: float) -> None:
        """Record one drafting step: ``drafted`` proposals, ``accepted`` of them kept, in ``seconds``."""
        if drafted <= 0:
            return
        self.draft_s.add(seconds / drafted)
        self.accepted = _DECAY * self.accepted + accepted
        self.rejected = _DECAY * self.rejected + (1 if accepted < drafted else 0)
