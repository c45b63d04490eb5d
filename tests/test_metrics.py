"""The one-line timing summary printed after each turn."""

from __future__ import annotations

from voice.metrics import TurnMetrics


def test_summary_without_drafts():
    metrics = TurnMetrics(speculative=True, first_token_ms=120, tokens_per_s=9.5, total_ms=900)
    summary = metrics.summary()
    assert "no drafts" in summary
    assert "acceptance" not in summary


def test_summary_with_drafts():
    metrics = TurnMetrics(speculative=True, acceptance_rate=0.75, mean_accepted=2.5, total_ms=900)
    assert "acceptance 75%, 2.50 accepted/step" in metrics.summary()
