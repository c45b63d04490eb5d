"""Drafters: prompt lookup, a draft model with a reduced vocabulary, int8 weights and early stops."""

from __future__ import annotations

import pytest
import torch

from tests.llm.tiny_models import VOCAB_SIZE, perturbed_copy, tiny_qwen2
from voice.llm.drafters import ModelDrafter, PromptLookupDrafter, lookup_continuation, quantize_linear_int8
from voice.llm.sampling import Sampling
from voice.llm.speculative import SpeculativeDecoder

NO_EOS: set[int] = set()
PROMPTS = [[1, 2, 3], [5, 17, 33, 2, 9, 41], [60, 61, 62, 63, 64, 65, 66, 67, 68, 69, 70]]


def plain_greedy(target, prompt: list[int], max_new_tokens: int) -> list[int]:
    decoder = SpeculativeDecoder(target, None, NO_EOS)
    return [token for step in decoder.generate(prompt, max_new_tokens, speculative=False) for token in step]


def decode(decoder: SpeculativeDecoder, prompt: list[int], max_new_tokens: int) -> list[int]:
    return [token for step in decoder.generate(prompt, max_new_tokens) for token in step]


@pytest.mark.parametrize(
    ("ids", "k", "expected"),
    [
        ([1, 2, 3, 4, 1, 2, 3], 2, [4, 1]),  # longest suffix [1, 2, 3] matched
        ([1, 2, 9, 5, 2, 7, 1, 2], 3, [9, 5, 2]),  # [1, 2] beats the later single 2
        ([4, 5, 6, 4, 5, 7, 4, 5], 2, [7, 4]),  # the latest occurrence wins
        ([1, 2, 3, 4], 2, []),  # no earlier occurrence of any suffix
        ([8, 8, 8], 4, [8]),  # the continuation stops at the end of the text
        ([3], 2, []),
    ],
)
def test_lookup_continuation(ids, k, expected):
    assert lookup_continuation(ids, k, max_ngram=3, min_ngram=1) == expected


def test_lookup_respects_min_ngram():
    assert lookup_continuation([1, 9, 5, 2, 1], 2, max_ngram=3, min_ngram=2) == []
    assert lookup_continuation([1, 9, 5, 2, 1], 2, max_ngram=3, min_ngram=1) == [9, 5]


def test_lookup_rejects_bad_ngram_range():
    with pytest.raises(ValueError, match="min_ngram"):
        PromptLookupDrafter(max_ngram=2, min_ngram=3)


@pytest.mark.parametrize("adaptive", [False, True], ids=["fixed-k", "adaptive-k"])
def test_prompt_lookup_equals_plain_greedy(adaptive):
    target = tiny_qwen2(seed=40)
    # A prompt that repeats itself gives lookup something to match.
    prompt = [7, 8, 9, 10, 11, 12, 7, 8, 9, 10, 11, 12, 7, 8]
    decoder = SpeculativeDecoder(target, PromptLookupDrafter(max_ngram=3), NO_EOS, draft_tokens=4, adaptive=adaptive)
    assert decode(decoder, prompt, 30) == plain_greedy(target, prompt, 30)
    assert decoder.stats.drafted > 0


def test_reduced_vocabulary_draft_exact_and_in_table():
    target = tiny_qwen2(seed=41)
    draft = perturbed_copy(target, 0.2, seed=42)
    vocab_ids = torch.arange(0, VOCAB_SIZE, 2)  # even ids only
    drafter = ModelDrafter(draft, vocab_ids)
    assert draft.get_output_embeddings().weight.shape[0] == len(vocab_ids)
    decoder = SpeculativeDecoder(target, drafter, NO_EOS, draft_tokens=3)
    for prompt in PROMPTS:
        assert decode(decoder, prompt, 25) == plain_greedy(target, prompt, 25)
        proposal = drafter.propose(prompt, 3, Sampling(), torch.Generator())
        assert proposal.tokens
        assert all(token % 2 == 0 for token in proposal.tokens)
        drafter.observe(prompt)


def test_reduced_vocabulary_draft_scores_like_full_output_layer():
    draft = tiny_qwen2(seed=43)
    full = perturbed_copy(draft, 0.0, seed=0)
    vocab_ids = torch.tensor([3, 10, 11, 50, 95])
    restricted = ModelDrafter(draft, vocab_ids)
    with torch.inference_mode():
        expected = full(input_ids=torch.tensor([PROMPTS[1]])).logits[0, -1, vocab_ids]
        actual = draft(input_ids=torch.tensor([PROMPTS[1]])).logits[0, -1]
    torch.testing.assert_close(actual, expected)
    # Sampled proposals report probabilities over the whole vocabulary, zero outside the table.
    proposal = restricted.propose(PROMPTS[1], 2, Sampling(temperature=1.0, seed=1), torch.Generator().manual_seed(1))
    assert proposal.probabilities.shape == (2, VOCAB_SIZE)
    outside = torch.ones(VOCAB_SIZE, dtype=torch.bool)
    outside[vocab_ids] = False
    assert float(proposal.probabilities[:, outside].abs().sum()) == 0.0
    torch.testing.assert_close(proposal.probabilities.sum(dim=-1), torch.ones(2))


def test_int8_draft_equals_plain_greedy():
    target = tiny_qwen2(seed=44)
    draft = perturbed_copy(target, 0.0, seed=0)
    seconds = quantize_linear_int8(draft)
    assert seconds >= 0
    assert not any(type(module) is torch.nn.Linear for module in draft.modules())
    decoder = SpeculativeDecoder(target, ModelDrafter(draft), NO_EOS, draft_tokens=4)
    for prompt in PROMPTS:
        assert decode(decoder, prompt, 25) == plain_greedy(target, prompt, 25)
    # int8 weights of an identical copy still agree with the target on most tokens.
    assert decoder.stats.accepted > 0


def test_int8_needs_float32_model():
    draft = tiny_qwen2(seed=45).to(torch.bfloat16)
    with pytest.raises(ValueError, match="float32"):
        quantize_linear_int8(draft)


def test_min_confidence_ends_proposal_early():
    draft = tiny_qwen2(seed=46)
    with torch.no_grad():
        draft.lm_head.weight.mul_(0.001)  # nearly uniform: every token has probability about 1/96
    confident = ModelDrafter(perturbed_copy(draft, 0.0, seed=0), min_confidence=0.0)
    doubtful = ModelDrafter(draft, min_confidence=0.5)
    assert len(confident.propose(PROMPTS[0], 4, Sampling(), torch.Generator()).tokens) == 4
    assert len(doubtful.propose(PROMPTS[0], 4, Sampling(), torch.Generator()).tokens) == 1


def test_draft_threads_restored_after_proposal():
    before = torch.get_num_threads()
    drafter = ModelDrafter(tiny_qwen2(seed=47), threads=1)
    drafter.propose(PROMPTS[0], 2, Sampling(), torch.Generator())
    assert torch.get_num_threads() == before


def test_target_forward_options_reach_target_and_observe():
    """A drafter that asks for hidden states receives them after every target pass."""
    target = tiny_qwen2(seed=48)

    class RecordingLookup(PromptLookupDrafter):
        target_forward_options = {"output_hidden_states": True}

        def __init__(self):
            super().__init__(max_ngram=2)
            self.seen: list[tuple[int, int]] = []

        def observe(self, ids, target_output=None, row=-1):
            assert target_output is not None and target_output.hidden_states is not None
            assert 0 <= row < target_output.hidden_states[-1].shape[1]
            self.seen.append((len(ids), row))

    drafter = RecordingLookup()
    decoder = SpeculativeDecoder(target, drafter, NO_EOS, draft_tokens=3)
    prompt = [1, 2, 3, 1, 2, 3, 1, 2]
    assert decode(decoder, prompt, 12) == plain_greedy(target, prompt, 12)
    assert len(drafter.seen) == decoder.stats.steps


def test_catch_up_time_reported_apart_from_draft_tokens():
    drafter = ModelDrafter(tiny_qwen2(seed=49))
    proposal = drafter.propose(list(range(1, 40)), 2, Sampling(), torch.Generator())
    assert len(proposal.tokens) == 2
    assert proposal.catch_up_seconds > 0
    drafter.observe(list(range(1, 40)))
    following = drafter.propose(list(range(1, 40)) + [proposal.tokens[0]], 2, Sampling(), torch.Generator())
    assert following.catch_up_seconds == 0.0


def test_failed_forward_pass_resets_caches():
    target = tiny_qwen2(seed=52)
    decoder = SpeculativeDecoder(target, perturbed_copy(target, 0.3, seed=53), NO_EOS, draft_tokens=3)
    decoder.prefill([1, 2, 3])
    calls = {"count": 0}
    # The last layer's last projection runs once per pass, after the earlier layers have
    # stored their keys and values.
    projection = target.model.layers[-1].mlp.down_proj
    original = projection.forward

    def failing_forward(*args, **kwargs):
        calls["count"] += 1
        if calls["count"] == 3:
            raise RuntimeError("simulated failure inside the model")
        return original(*args, **kwargs)

    projection.forward = failing_forward
    with pytest.raises(RuntimeError, match="simulated"):
        decode(decoder, [1, 2, 3, 4, 5], 20)
    assert calls["count"] == 3
    assert decoder.target.ids == []
    assert decoder.draft.ids == []
    projection.forward = original
    assert decode(decoder, [1, 2, 3, 4, 5], 20) == plain_greedy(target, [1, 2, 3, 4, 5], 20)
