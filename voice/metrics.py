"""Per-turn timings and decoding counters, printed as one line and kept for benchmarks."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field


def _ms(seconds: float) -> int:
    return int(round(seconds * 1000))


@dataclass
class TurnMetrics:
    """One turn. Times are milliseconds from the end of the user's input (audio or text)."""

    started_at: float = field(default_factory=time.perf_counter)
    """perf_counter() at the end of the input; the zero of every ``*_ms`` field."""
    input_audio_s: float | None = None
    endpoint_ms: int | None = None
    """When the endpointer decided the turn was over (live mode)."""
    asr_ms: int | None = None
    first_token_ms: int | None = None
    """First verified answer token."""
    first_audio_ms: int | None = None
    """First synthesized audio handed to the output (speaker or file)."""
    total_ms: int | None = None
    """Last audio written, or the answer's end when nothing is spoken."""
    speculative: bool = False
    prompt_tokens: int = 0
    prefill_tokens: int = 0
    answer_tokens: int = 0
    tokens_per_s: float | None = None
    acceptance_rate: float | None = None
    """Accepted draft tokens over drafted tokens."""
    mean_accepted: float | None = None
    """Draft tokens accepted per verification step."""
    accept_counts: list[int] = field(default_factory=list)
    """accept_counts[n]: verification steps that accepted exactly n draft tokens."""
    spoken: bool = False
    """Whether the answer was synthesized; False for text-only turns."""
    audio_s: float = 0.0
    """Duration of the spoken reply."""

    def elapsed_ms(self) -> int:
        return _ms(time.perf_counter() - self.started_at)

    def summary(self) -> str:
        """Return the one-line timing summary printed after each turn."""

        def show(value: int | None, unit: str = " ms") -> str:
            return "-" if value is None else f"{value}{unit}"

        parts = []
        if self.endpoint_ms is not None:
            parts.append(f"endpoint {show(self.endpoint_ms)}")
        if self.asr_ms is not None:
            parts.append(f"asr {show(self.asr_ms)}")
        parts.append(f"first token {show(self.first_token_ms)}")
        parts.append("-" if self.tokens_per_s is None else f"{self.tokens_per_s:.1f} tok/s")
        if self.speculative and self.acceptance_rate is None:
            # Speculation was on but no token was drafted, so there is no rate to show.
            parts.append("no drafts")
        elif self.speculative:
            mean = "-" if self.mean_accepted is None else f"{self.mean_accepted:.2f}"
            parts.append(f"acceptance {self.acceptance_rate:.0%}, {mean} accepted/step")
        else:
            parts.append("speculation off")
        if self.spoken:
            parts.append(f"first audio {show(self.first_audio_ms)}")
        parts.append(f"total {show(self.total_ms)}")
        return " | ".join(parts)

    def as_dict(self) -> dict:
        data = asdict(self)
        data.pop("started_at")
        return data
