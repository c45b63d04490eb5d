"""The adaptive draft length: choices from costs and acceptance, probes, and exact output."""

from __future__ import annotations

import pytest

from tests.llm.tiny_models import perturbed_copy, tiny_qwen2
from voice.llm.adaptive import DraftLengthController
from voice.llm.speculative import SpeculativeDecoder

NO_EOS: set[int] = set()


def controller_with(acceptance_steps: list[tuple[int, int]], single: float, full: float, draft: float, max_tokens: int = 4):
    controller = DraftLengthController(max_tokens)
    controller.calibrate(single, full, draft)
    for drafted, accepted in acceptance_steps:
        controller.record_draft(drafted, accepted, draft * drafted)
    return controller


def test_cheap_draft_and_high_acceptance_drafts_max():
    controller = controller_with([(4, 4)] * 20, single=0.3, full=0.35, draft=0.01)
    assert controller.acceptance > 0.9
    assert controller.choose(remaining=100) == 4


def test_expensive_verification_and_low_acceptance_drafts_nothing():
    controller = controller_with([(2, 0)] * 20, single=0.3, full=1.0, draft=0.15)
    assert controller.acceptance < 0.1
    assert controller.choose(remaining=100) == 0


def test_unpaid_catch_up_skips_drafting():
    # Drafting pays per step here (60% acceptance, cheap drafts), but answers are 8
    # tokens long and the draft must first feed 40 unseen tokens at 5 ms each.
    controller = controller_with([(2, 1)] * 10, single=0.075, full=0.1, draft=0.02)
    for _ in range(3):
        controller.record_answer(8)
    controller.record_catch_up(40, 0.2)
    assert controller.choose(remaining=40) > 0  # nothing to catch up on
    assert controller.choose(remaining=40, unseen=40, generated=2) == 0
    # The same catch-up pays for an answer that has already run long.
    assert controller.choose(remaining=40, unseen=40, generated=30) > 0


def test_catch_up_unmeasured_allows_drafting():
    controller = controller_with([(2, 1)] * 10, single=0.075, full=0.1, draft=0.02)
    assert controller.choose(remaining=40, unseen=40, generated=1) > 0


def test_budget_limits_draft_length():
    controller = controller_with([(4, 4)] * 20, single=0.3, full=0.35, draft=0.01)
    assert controller.choose(remaining=3) == 2
    assert controller.choose(remaining=1) == 0


def test_fixed_length_without_adaptation():
    controller = DraftLengthController(5, adaptive=False)
    assert controller.choose(remaining=100) == 5
    assert controller.choose(remaining=3) == 2


def test_probes_back_off_while_drafting_does_not_pay():
    # Nothing is accepted, but cheap drafts would pay at a high acceptance: probes run.
    controller = controller_with([(2, 0)] * 20, single=0.3, full=0.4, draft=0.05)
    choices = [controller.choose(remaining=1000) for _ in range(60)]
    probes = [index for index, k in enumerate(choices) if k]
    assert all(choices[index] == 1 for index in probes)
    # Probes after 4, then 8, 16 and 32 skipped steps.
    assert probes == [3, 3 + 8, 3 + 8 + 16, 3 + 8 + 16 + 32]


def test_no_probe_when_draft_cost_alone_loses():
    # A target pass costs 50 ms for 1 token and 100 ms for 5, a draft token 30 ms: even
    # at 80% acceptance no draft length beats plain decoding, so no probe runs.
    controller = controller_with([(2, 0)] * 20, single=0.05, full=0.1, draft=0.03)
    assert not any(controller.choose(remaining=1000) for _ in range(200))


def test_no_probe_when_catch_up_too_costly():
    # Drafting would pay at a high acceptance, but the probe would first feed 40 unseen
    # tokens (0.2 s) into the draft for an answer expected to be 8 tokens long.
    controller = controller_with([(2, 0)] * 20, single=0.075, full=0.1, draft=0.02)
    for _ in range(3):
        controller.record_answer(8)
    controller.record_catch_up(40, 0.2)
    assert not any(controller.choose(remaining=40, unseen=40, generated=2) for _ in range(100))
    # With nothing to catch up on, the probes run.
    assert any(controller.choose(remaining=40) for _ in range(10))


def test_acceptance_rises_again_after_good_probes():
    controller = controller_with([(2, 0)] * 20, single=0.3, full=0.4, draft=0.02)
    assert controller.choose(remaining=100) == 0
    for _ in range(30):
        controller.record_draft(4, 4, 0.08)
    assert controller.choose(remaining=100) > 0


def test_verify_cost_interpolates_between_measurements():
    controller = DraftLengthController(4)
    controller.calibrate(single_s=0.3, full_s=0.7, draft_token_s=0.05)
    assert controller.verify_seconds(1) == pytest.approx(0.3)
    assert controller.verify_seconds(3) == pytest.approx(0.5)
    assert controller.verify_seconds(5) == pytest.approx(0.7)
    controller.record_verify(3, 0.9)  # a measurement replaces the interpolated estimate
    assert controller.verify_seconds(3) == pytest.approx(0.9)
    controller.record_verify(3, 0.5)  # later ones are averaged in
    assert 0.5 < controller.verify_seconds(3) < 0.9
    assert controller.verify_seconds(2) == pytest.approx((0.3 + controller.verify_seconds(3)) / 2)


def test_invalid_max_tokens_rejected():
    with pytest.raises(ValueError, match="at least 1"):
        DraftLengthController(0)


@pytest.mark.parametrize("noise", [0.0, 0.5, 3.0], ids=["same-weights", "perturbed", "unrelated"])
def test_adaptive_decoder_equals_plain_greedy(noise):
    target = tiny_qwen2(seed=50)
    decoder = SpeculativeDecoder(target, perturbed_copy(target, noise, seed=51), NO_EOS, draft_tokens=4, adaptive=True)
    decoder.prefill([1, 2, 3])
    decoder.calibrate()
    assert decoder.target.ids == [1, 2, 3]
    assert decoder.draft.ids == [1, 2, 3]
    plain = SpeculativeDecoder(target, None, NO_EOS)
    for prompt in ([1, 2, 3, 9, 8], [1, 2, 3, 40, 41, 42]):
        output = [token for step in decoder.generate(prompt, 40) for token in step]
        expected = [token for step in plain.generate(prompt, 40, speculative=False) for token in step]
        assert output == expected


def test_catch_up_cost_per_token():
    controller = controller_with([(2, 1)] * 10, single=0.075, full=0.1, draft=0.02)
    # Catch-ups of 1 to 3 tokens add too little to a draft pass to teach a cost per token.
    for tokens in (1, 2, 3):
        controller.record_catch_up(tokens, 0.004)
    assert controller.catch_up_token_s.value is None
    controller.record_catch_up(40, 0.12)
    assert controller.catch_up_seconds(40) == pytest.approx(0.12)
    assert controller.catch_up_seconds(10) == pytest.approx(0.03)
