"""Engine tests of SpeculativeDecoder on tiny random models: exactness, acceptance, rollback, stops."""

from __future__ import annotations

import threading

import pytest
import torch
from transformers import DynamicCache

from tests.llm.tiny_models import ForcedTokenDraft, forced_draft_and_target, perturbed_copy, tiny_qwen2
from voice.llm.direct import KeyValueBuffer
from voice.llm.speculative import SpeculativeDecoder

PROMPTS = [[1, 2, 3], [5, 17, 33, 2, 9, 41], [7], [60, 61, 62, 63, 64, 65, 66, 67, 68, 69, 70]]
NO_EOS: set[int] = set()


def plain_greedy(target, prompt: list[int], max_new_tokens: int, eos: set[int] = NO_EOS) -> list[int]:
    decoder = SpeculativeDecoder(target, None, eos)
    return [token for step in decoder.generate(prompt, max_new_tokens, speculative=False) for token in step]


def speculative_greedy(decoder: SpeculativeDecoder, prompt: list[int], max_new_tokens: int) -> list[int]:
    return [token for step in decoder.generate(prompt, max_new_tokens, speculative=True) for token in step]


def assert_cache_matches_fresh_prefill(decoder: SpeculativeDecoder) -> None:
    """The rolled-back cache must equal a cache built from scratch over the same ids."""
    for cache in (decoder.target, decoder.draft):
        if cache.kv is None:  # no pass yet
            assert cache.ids == []
            continue
        assert cache.kv.get_seq_length() == len(cache.ids)
        if not cache.ids:
            continue
        fresh = DynamicCache(config=cache.model.config)
        with torch.inference_mode():
            cache.model(input_ids=torch.tensor([cache.ids]), cache=fresh, use_cache=True)
        for (keys, values), fresh_layer in zip(cached_states(cache), fresh.layers, strict=True):
            torch.testing.assert_close(keys, fresh_layer.keys, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(values, fresh_layer.values, rtol=1e-4, atol=1e-5)


def cached_states(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Return each layer's cached keys and values as (1, kv_heads, positions, head_dim)."""
    kv = cache.kv
    if isinstance(kv, KeyValueBuffer):
        return [(k[None, :, : kv.length], v[None, :, : kv.length]) for k, v in zip(kv.keys, kv.values)]
    return [(layer.keys, layer.values) for layer in kv.layers]


def test_plain_decoding_matches_transformers_generate():
    target = tiny_qwen2(seed=1)
    prompt = PROMPTS[1]
    expected = target.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert plain_greedy(target, prompt, 20) == expected[0, len(prompt) :].tolist()


@pytest.mark.parametrize("draft_tokens", [1, 2, 4, 7])
@pytest.mark.parametrize("noise", [0.0, 0.3, 2.0], ids=["same-weights", "perturbed", "unrelated"])
def test_speculative_equals_plain_greedy(draft_tokens, noise):
    target = tiny_qwen2(seed=2)
    draft = perturbed_copy(target, noise, seed=3) if noise else perturbed_copy(target, 0.0, seed=3)
    decoder = SpeculativeDecoder(target, draft, NO_EOS, draft_tokens=draft_tokens)
    for prompt in PROMPTS:
        assert speculative_greedy(decoder, prompt, 40) == plain_greedy(target, prompt, 40), f"prompt {prompt}"


def test_identical_draft_accepts_every_token():
    target = tiny_qwen2(seed=4)
    decoder = SpeculativeDecoder(target, perturbed_copy(target, 0.0, seed=0), NO_EOS, draft_tokens=4)
    output = speculative_greedy(decoder, PROMPTS[0], 25)
    stats = decoder.stats
    assert output == plain_greedy(target, PROMPTS[0], 25)
    assert stats.accepted == stats.drafted > 0
    assert stats.acceptance_rate == 1.0
    # The first pass yields 1 token; then 4 passes of 5 (4 drafts + 1 bonus), and a last
    # pass of 4 whose 3 drafts fill the budget exactly.
    assert stats.steps == 6
    assert stats.accept_counts[4] == 4
    assert stats.accept_counts[3] == 1
    assert stats.draft_steps == 5
    assert stats.mean_accepted == pytest.approx(19 / 5)
    assert_cache_matches_fresh_prefill(decoder)


def test_forced_wrong_draft_accepts_nothing():
    target, draft = forced_draft_and_target(seed=5)
    expected = plain_greedy(target, PROMPTS[1], 20)
    assert ForcedTokenDraft.forced_id not in expected
    decoder = SpeculativeDecoder(target, draft, NO_EOS, draft_tokens=3)
    assert speculative_greedy(decoder, PROMPTS[1], 20) == expected
    stats = decoder.stats
    assert stats.accepted == 0
    assert stats.drafted > 0
    assert stats.steps == 20  # one correction token per target pass
    # Neither the first pass (prefill) nor the last (no budget left) drafts.
    assert stats.accept_counts[0] == stats.steps - 2
    assert_cache_matches_fresh_prefill(decoder)


def test_perturbed_draft_accepts_some_tokens():
    target = tiny_qwen2(seed=6)
    decoder = SpeculativeDecoder(target, perturbed_copy(target, 0.5, seed=7), NO_EOS, draft_tokens=4)
    outputs = [speculative_greedy(decoder, prompt, 40) for prompt in PROMPTS]
    assert outputs == [plain_greedy(target, prompt, 40) for prompt in PROMPTS]
    stats = decoder.stats
    assert 0 < stats.accepted < stats.drafted
    assert_cache_matches_fresh_prefill(decoder)


@pytest.mark.parametrize("eos_index", [1, 2, 6, 7])
def test_eos_inside_accepted_run_ends_output(eos_index):
    target = tiny_qwen2(seed=8)
    reference = plain_greedy(target, PROMPTS[0], 30)
    eos = reference[eos_index]
    first = reference.index(eos)
    decoder = SpeculativeDecoder(target, perturbed_copy(target, 0.0, seed=0), {eos}, draft_tokens=4)
    steps = list(decoder.generate(PROMPTS[0], 30, speculative=True))
    output = [token for step in steps for token in step]
    assert output == reference[:first]
    assert eos not in output
    assert decoder.stats.stop_reason == "eos"
    assert decoder.stats.new_tokens == first


@pytest.mark.parametrize("max_new_tokens", [1, 2, 5, 7, 13])
def test_max_new_tokens_is_exact(max_new_tokens):
    target = tiny_qwen2(seed=9)
    decoder = SpeculativeDecoder(target, perturbed_copy(target, 0.0, seed=0), NO_EOS, draft_tokens=4)
    output = speculative_greedy(decoder, PROMPTS[1], max_new_tokens)
    assert output == plain_greedy(target, PROMPTS[1], max_new_tokens)
    assert len(output) == max_new_tokens
    assert decoder.stats.stop_reason == "max_tokens"


def test_cache_reused_across_turns():
    target = tiny_qwen2(seed=10)
    decoder = SpeculativeDecoder(target, perturbed_copy(target, 0.4, seed=11), NO_EOS, draft_tokens=3)
    first_answer = speculative_greedy(decoder, PROMPTS[1], 12)
    follow_up = PROMPTS[1] + first_answer + [3, 4, 5]
    second_answer = speculative_greedy(decoder, follow_up, 12)
    # Fed now: the first answer's last token (emitted, never fed) and the three new ones.
    assert decoder.stats.prefill_tokens == 4
    assert second_answer == plain_greedy(target, follow_up, 12)
    assert_cache_matches_fresh_prefill(decoder)


def test_diverging_prompt_rolls_cache_back():
    target = tiny_qwen2(seed=12)
    decoder = SpeculativeDecoder(target, perturbed_copy(target, 0.4, seed=13), NO_EOS, draft_tokens=3)
    speculative_greedy(decoder, [1, 2, 3, 4, 5, 6], 10)
    other = [1, 2, 3, 50, 51]
    assert speculative_greedy(decoder, other, 10) == plain_greedy(target, other, 10)
    assert decoder.stats.prefill_tokens == 2  # 50 and 51 after the common prefix [1, 2, 3]
    assert_cache_matches_fresh_prefill(decoder)


def test_cancel_stops_between_steps_and_keeps_caches_consistent():
    target = tiny_qwen2(seed=14)
    decoder = SpeculativeDecoder(target, perturbed_copy(target, 0.3, seed=15), NO_EOS, draft_tokens=3)
    cancel = threading.Event()
    received = []
    for step in decoder.generate(PROMPTS[3], 50, speculative=True, cancel=cancel):
        received.extend(step)
        cancel.set()
    assert decoder.stats.stop_reason == "cancelled"
    assert 1 <= len(received) <= 4
    assert received == plain_greedy(target, PROMPTS[3], 50)[: len(received)]
    assert_cache_matches_fresh_prefill(decoder)
    # The next call continues from a consistent state.
    follow_up = PROMPTS[3] + received
    assert speculative_greedy(decoder, follow_up, 10) == plain_greedy(target, follow_up, 10)


def test_draft_tokens_below_one_rejected():
    target = tiny_qwen2(seed=16)
    with pytest.raises(ValueError, match="draft_tokens"):
        SpeculativeDecoder(target, target, NO_EOS, draft_tokens=0)


def test_speculative_without_draft_rejected():
    decoder = SpeculativeDecoder(tiny_qwen2(seed=17), None, NO_EOS)
    with pytest.raises(ValueError, match="needs a drafter"):
        list(decoder.generate([1, 2], 5, speculative=True))


def test_prefill_ahead_leaves_only_new_tokens():
    target = tiny_qwen2(seed=18)
    decoder = SpeculativeDecoder(target, perturbed_copy(target, 0.3, seed=19), NO_EOS, draft_tokens=2)
    prefix = [4, 8, 15, 16, 23, 42]
    decoder.prefill(prefix)
    assert decoder.target.ids == prefix
    assert decoder.draft.ids == prefix
    prompt = prefix + [7, 9]
    assert speculative_greedy(decoder, prompt, 12) == plain_greedy(target, prompt, 12)
    assert decoder.stats.prefill_tokens == 2
    assert_cache_matches_fresh_prefill(decoder)


def test_prefill_rolls_back_to_shorter_prefix():
    target = tiny_qwen2(seed=20)
    decoder = SpeculativeDecoder(target, perturbed_copy(target, 0.3, seed=21), NO_EOS, draft_tokens=2)
    prefix = [4, 8, 15]
    decoder.prefill(prefix)
    speculative_greedy(decoder, prefix + [16, 23, 42], 8)
    decoder.prefill(prefix)
    assert decoder.target.ids == prefix
    assert decoder.draft.ids == prefix
    assert_cache_matches_fresh_prefill(decoder)
