"""Tests of Gemma4AssistantDrafter on tiny random Gemma 4 targets and assistants."""

from __future__ import annotations

import functools

import pytest
import torch
from transformers import (
    Gemma4AssistantConfig,
    Gemma4AssistantForCausalLM,
    Gemma4Config,
    Gemma4ForCausalLM,
    Gemma4ForConditionalGeneration,
    Gemma4TextConfig,
    Gemma4UnifiedAssistantConfig,
    Gemma4UnifiedAssistantForCausalLM,
    Gemma4UnifiedForCausalLM,
    Gemma4UnifiedTextConfig,
    GenerationConfig,
)
from transformers.generation.candidate_generator import SinglePositionMultiTokenCandidateGenerator

from tests.llm.tiny_models import tiny_qwen2
from voice.llm.cache import TokenCache
from voice.llm.gemma4 import Gemma4AssistantDrafter
from voice.llm.sampling import Sampling
from voice.llm.speculative import SpeculativeDecoder

VOCAB_SIZE = 128
TARGET_HIDDEN_SIZE = 32
HEAD_DIM = 16
PROMPTS = [[1, 2, 3], [5, 17, 33, 2, 9, 41], [7], [60, 61, 62, 63, 64, 65, 66, 67, 68, 69, 70]]
NEW_TOKENS = 24
NO_EOS: set[int] = set()
# Larger than any test sequence, so sliding layers see every position unless a test sets less.
WIDE_WINDOW = 512


def tiny_target_config(sliding_window: int = WIDE_WINDOW, **overrides) -> dict:
    """Arguments of a Gemma4TextConfig shaped like Gemma 4 E2B: per-layer inputs and KV-shared upper layers."""
    arguments = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=TARGET_HIDDEN_SIZE,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=HEAD_DIM,
        global_head_dim=HEAD_DIM,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        num_kv_shared_layers=2,
        sliding_window=sliding_window,
        hidden_size_per_layer_input=8,
        vocab_size_per_layer_input=VOCAB_SIZE,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    arguments.update(overrides)
    return arguments


def tiny_target(seed: int, sliding_window: int = WIDE_WINDOW) -> Gemma4ForCausalLM:
    torch.manual_seed(seed)
    model = Gemma4ForCausalLM(Gemma4TextConfig(**tiny_target_config(sliding_window))).eval()
    # Larger output weights spread the logits, so greedy choices are far from ties and a
    # float32 multi-token pass agrees with single-token passes.
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    return model


def tiny_assistant_config(
    sliding_window: int = WIDE_WINDOW,
    backbone_hidden_size: int = TARGET_HIDDEN_SIZE,
    vocab_size: int = VOCAB_SIZE,
    head_dim: int = HEAD_DIM,
    ordered_embeddings: bool = False,
) -> Gemma4AssistantConfig:
    text_config = Gemma4TextConfig(
        vocab_size=vocab_size,
        hidden_size=24,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=head_dim,
        global_head_dim=head_dim,
        layer_types=["sliding_attention", "full_attention"],
        sliding_window=sliding_window,
        hidden_size_per_layer_input=0,
        vocab_size_per_layer_input=0,
    )
    return Gemma4AssistantConfig(
        text_config=text_config,
        backbone_hidden_size=backbone_hidden_size,
        use_ordered_embeddings=ordered_embeddings,
        num_centroids=16,
        centroid_intermediate_top_k=4,
    )


def tiny_assistant(seed: int, model_class=Gemma4AssistantForCausalLM, **config) -> Gemma4AssistantForCausalLM:
    torch.manual_seed(seed)
    model = model_class(tiny_assistant_config(**config)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
        if model.masked_embedding is not None:
            # Initialised to zeros, which would put every centroid on token 0.
            model.masked_embedding.token_ordering.copy_(torch.randperm(model.vocab_size))
    return model


class ScriptedAssistant(Gemma4AssistantForCausalLM):
    """An assistant that proposes a known continuation, wrong at every fourth position.

    It runs the real forward pass, then replaces the logits. Step j of the proposal made at
    position p (the last token's position) proposes script[p + 1 + j]. Where p + 1 + j is a
    multiple of 4, it proposes the next token id instead, so proposals mix accepted and
    rejected drafts.
    """

    script: list[int] = []
    _position = -1
    _step = 0

    def follow(self, script: list[int]) -> None:
        self.script = script
        self._position = -1

    def forward(self, *args, position_ids=None, **kwargs):
        output = super().forward(*args, position_ids=position_ids, **kwargs)
        position = int(position_ids[0, 0])
        self._step = self._step + 1 if position == self._position else 0
        self._position = position
        index = position + 1 + self._step
        token = self.script[index] if index < len(self.script) else 0
        if index % 4 == 0:
            token = (token + 1) % self.vocab_size
        output.logits = torch.full_like(output.logits, -100.0)
        output.logits[..., token] = 100.0
        return output


class CheckedDrafter(Gemma4AssistantDrafter):
    """A drafter that compares its stored target state with a fresh target pass after every observe."""

    def __init__(self, assistant, target) -> None:
        super().__init__(assistant, target)
        self.target = target
        self.checks = 0

    def observe(self, ids, target_output=None, row=-1) -> None:
        super().observe(ids, target_output, row)
        if target_output is not None:
            assert_state_matches_fresh_pass(self, self.target, ids)
            self.checks += 1


def fresh_pass(target, ids: list[int]):
    """Run the target over ``ids`` without a cache and return the output with hidden and shared KV states."""
    with torch.inference_mode():
        return target(input_ids=torch.tensor([ids]), output_hidden_states=True, return_shared_kv_states=True)


def assert_state_matches_fresh_pass(drafter: Gemma4AssistantDrafter, target, ids: list[int]) -> None:
    state = drafter._state
    assert state is not None
    assert state.ids == ids
    reference = fresh_pass(target, ids)
    torch.testing.assert_close(state.hidden, reference.hidden_states[-1][:, -1:], rtol=1e-4, atol=1e-5)
    window = target.config.sliding_window
    for layer_type, (keys, values) in state.shared_kv.items():
        length = keys.shape[-2]
        if layer_type == "full_attention":
            assert length == len(ids)
        else:
            assert min(len(ids), window) <= length <= len(ids)
        reference_keys, reference_values = reference.shared_kv_states[layer_type]
        # Both end at the last verified position. A sliding layer past its window keeps only the latest positions.
        torch.testing.assert_close(keys, reference_keys[:, :, -length:], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(values, reference_values[:, :, -length:], rtol=1e-4, atol=1e-5)


def reference_proposal(target, assistant, ids: list[int], k: int) -> list[int]:
    """Greedy drafts after ``ids`` from a fresh target pass over ``ids[:-1]``, with no cache to roll back."""
    reference = fresh_pass(target, ids[:-1])
    hidden = reference.hidden_states[-1][:, -1:]
    shared_kv = dict(reference.shared_kv_states)
    token = ids[-1]
    tokens = []
    with torch.inference_mode():
        for _ in range(k):
            embedding = target.get_input_embeddings()(torch.tensor([[token]]))
            output = assistant(
                inputs_embeds=torch.cat([embedding, hidden], dim=-1),
                position_ids=torch.tensor([[len(ids) - 1]]),
                shared_kv_states=shared_kv,
            )
            token = int(output.logits[0, -1].argmax())
            tokens.append(token)
            hidden = output.last_hidden_state
    return tokens


def generated(decoder: SpeculativeDecoder, prompt: list[int], speculative: bool = True, **options) -> list[int]:
    steps = decoder.generate(prompt, NEW_TOKENS, speculative=speculative, **options)
    return [token for step in steps for token in step]


def observed_drafter(assistant, target, prompt: list[int]) -> tuple[Gemma4AssistantDrafter, list[int]]:
    """Return a drafter that has observed a plain pass over ``prompt``, and the ids to propose after."""
    drafter = Gemma4AssistantDrafter(assistant, target)
    decoder = SpeculativeDecoder(target, drafter, NO_EOS)
    first_token = [token for step in decoder.generate(prompt, 1, speculative=False) for token in step][0]
    return drafter, prompt + [first_token]


@functools.cache
def plain_greedy(seed: int, prompt: tuple[int, ...], sliding_window: int = WIDE_WINDOW) -> list[int]:
    decoder = SpeculativeDecoder(tiny_target(seed, sliding_window), None, NO_EOS)
    return generated(decoder, list(prompt), speculative=False)


@pytest.fixture(autouse=True, scope="module")
def single_torch_thread():
    """Run these tiny models on one thread, about 5 times faster than two on a shared 2-core machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.mark.parametrize("draft_tokens", [1, 2, 4])
def test_greedy_speculative_equals_plain_greedy(draft_tokens):
    target = tiny_target(1)
    decoder = SpeculativeDecoder(target, Gemma4AssistantDrafter(tiny_assistant(2), target), NO_EOS, draft_tokens)
    for prompt in PROMPTS:
        assert generated(decoder, prompt) == plain_greedy(1, tuple(prompt)), f"prompt {prompt}"
        assert decoder.stats.drafted > 0


@pytest.mark.parametrize("draft_tokens", [2, 4])
def test_partly_accepted_drafts_keep_target_state(draft_tokens):
    target = tiny_target(3)
    assistant = tiny_assistant(4, model_class=ScriptedAssistant)
    drafter = CheckedDrafter(assistant, target)
    decoder = SpeculativeDecoder(target, drafter, NO_EOS, draft_tokens)
    for prompt in PROMPTS[:2]:
        expected = plain_greedy(3, tuple(prompt))
        assistant.follow(prompt + expected)
        assert generated(decoder, prompt) == expected
        assert 0 < decoder.stats.accepted < decoder.stats.drafted
    assert drafter.checks > 0


def test_drafts_past_sliding_window(monkeypatch):
    window = 8
    # DynamicCache can crop a sliding layer that has reached its window only while it
    # records past states. TokenCache does not turn that on, so this test does.
    original_init = TokenCache.__init__

    def init_recording_past(self, model):
        original_init(self, model)
        self.kv.activate_past_recording()

    monkeypatch.setattr(TokenCache, "__init__", init_recording_past)
    target = tiny_target(5, window)
    assistant = tiny_assistant(6, model_class=ScriptedAssistant, sliding_window=window)
    drafter = CheckedDrafter(assistant, target)
    decoder = SpeculativeDecoder(target, drafter, NO_EOS, draft_tokens=3)
    prompt = PROMPTS[3]
    expected = plain_greedy(5, tuple(prompt), window)
    assistant.follow(prompt + expected)
    assert generated(decoder, prompt) == expected
    assert 0 < decoder.stats.accepted < decoder.stats.drafted
    assert len(prompt) + NEW_TOKENS > 3 * window


def test_proposals_match_fresh_pass_reference():
    target = tiny_target(1)
    assistant = tiny_assistant(2)
    drafter = Gemma4AssistantDrafter(assistant, target)
    proposals = []
    propose = drafter.propose

    def recording_propose(ids, k, sampling, generator):
        proposal = propose(ids, k, sampling, generator)
        proposals.append((list(ids), k, proposal.tokens))
        return proposal

    drafter.propose = recording_propose
    decoder = SpeculativeDecoder(target, drafter, NO_EOS, draft_tokens=3)
    generated(decoder, PROMPTS[1])
    assert len(proposals) > 5
    for ids, k, tokens in proposals:
        assert tokens == reference_proposal(target, assistant, ids, k), f"after {len(ids)} ids"


def test_first_proposal_matches_transformers_generator():
    target = tiny_target(1)
    assistant = tiny_assistant(2)
    prompt = PROMPTS[3]
    drafter, ids = observed_drafter(assistant, target, prompt)
    ours = drafter.propose(ids, 4, Sampling(), torch.Generator())

    assistant.generation_config.num_assistant_tokens = 4
    generator = SinglePositionMultiTokenCandidateGenerator(
        assistant, target.get_input_embeddings(), GenerationConfig(max_length=100)
    )
    prompt_output = fresh_pass(target, prompt)
    with torch.inference_mode():
        candidates, _ = generator.get_candidates(
            input_ids=torch.tensor([ids]),
            model_kwargs={},
            model_outputs=prompt_output,
            is_first_iteration=False,
            n_last_matches=0,
        )
    assert ours.tokens == candidates[0, len(ids) :].tolist()


def test_conditional_generation_target():
    torch.manual_seed(7)
    config = Gemma4Config(text_config=tiny_target_config(), vision_config=None, audio_config=None)
    target = Gemma4ForConditionalGeneration(config).eval()
    with torch.no_grad():
        target.lm_head.weight.mul_(20.0)
    decoder = SpeculativeDecoder(target, Gemma4AssistantDrafter(tiny_assistant(8), target), NO_EOS, draft_tokens=2)
    plain = SpeculativeDecoder(target, None, NO_EOS)
    assert generated(decoder, PROMPTS[1]) == generated(plain, PROMPTS[1], speculative=False)
    assert decoder.stats.drafted > 0


def test_unified_target_and_assistant():
    shapes = dict(
        vocab_size=VOCAB_SIZE, num_attention_heads=2, num_key_value_heads=1, head_dim=HEAD_DIM, global_head_dim=HEAD_DIM
    )
    torch.manual_seed(10)
    target_config = Gemma4UnifiedTextConfig(
        hidden_size=TARGET_HIDDEN_SIZE,
        intermediate_size=64,
        num_hidden_layers=4,
        layer_types=["sliding_attention", "full_attention"] * 2,
        num_kv_shared_layers=2,
        tie_word_embeddings=False,
        **shapes,
    )
    target = Gemma4UnifiedForCausalLM(target_config).eval()
    with torch.no_grad():
        target.lm_head.weight.mul_(20.0)
    assistant_text = Gemma4UnifiedTextConfig(
        hidden_size=24,
        intermediate_size=48,
        num_hidden_layers=2,
        layer_types=["sliding_attention", "full_attention"],
        **shapes,
    )
    assistant_config = Gemma4UnifiedAssistantConfig(text_config=assistant_text, backbone_hidden_size=TARGET_HIDDEN_SIZE)
    assistant = Gemma4UnifiedAssistantForCausalLM(assistant_config).eval()
    decoder = SpeculativeDecoder(target, Gemma4AssistantDrafter(assistant, target), NO_EOS, draft_tokens=3)
    plain = SpeculativeDecoder(target, None, NO_EOS)
    assert generated(decoder, PROMPTS[1]) == generated(plain, PROMPTS[1], speculative=False)
    assert decoder.stats.drafted > 0


@pytest.mark.parametrize(
    ("assistant_config", "message"),
    [
        ({"backbone_hidden_size": 48}, "backbone_hidden_size 48 != target hidden_size 32"),
        ({"vocab_size": 96}, "assistant vocab_size 96 != target vocab_size 128"),
        ({"head_dim": 8}, r"full_attention \(head_dim, num_key_value_heads\): assistant \(8, 1\) != target \(16, 1\)"),
    ],
    ids=["hidden-size", "vocabulary", "head-dim"],
)
def test_mismatched_pair_rejected(assistant_config, message):
    assistant = Gemma4AssistantForCausalLM(tiny_assistant_config(**assistant_config))
    with pytest.raises(ValueError, match=message):
        Gemma4AssistantDrafter(assistant, tiny_target(1))


def test_pair_with_different_dtypes_rejected():
    assistant = tiny_assistant(2).to(torch.bfloat16)
    with pytest.raises(ValueError, match="assistant dtype torch.bfloat16 != target dtype torch.float32"):
        Gemma4AssistantDrafter(assistant, tiny_target(1))


def test_non_gemma4_models_rejected():
    with pytest.raises(ValueError, match="Qwen2ForCausalLM is not a Gemma 4 assistant"):
        Gemma4AssistantDrafter(tiny_qwen2(seed=0), tiny_target(1))
    with pytest.raises(ValueError, match="only Gemma 4 targets return shared_kv_states"):
        Gemma4AssistantDrafter(tiny_assistant(2), tiny_qwen2(seed=0))


def test_seeded_sampling_is_reproducible():
    target = tiny_target(1)
    assistant = tiny_assistant(2)
    sampling = Sampling(temperature=0.9, top_k=50, top_p=0.95, seed=1234)
    runs = []
    for _ in range(2):
        decoder = SpeculativeDecoder(target, Gemma4AssistantDrafter(assistant, target), NO_EOS, draft_tokens=3)
        runs.append(generated(decoder, PROMPTS[0], sampling=sampling))
        assert decoder.stats.drafted > 0
    assert runs[0] == runs[1]
    assert len(runs[0]) == NEW_TOKENS


def test_sampled_proposal_returns_full_vocabulary_rows():
    drafter, ids = observed_drafter(tiny_assistant(2), tiny_target(1), PROMPTS[1])
    proposal = drafter.propose(ids, 3, Sampling(temperature=1.0, seed=5), torch.Generator().manual_seed(5))
    assert len(proposal.tokens) == 3
    assert proposal.probabilities.shape == (3, VOCAB_SIZE)
    torch.testing.assert_close(proposal.probabilities.sum(dim=-1), torch.ones(3))
    for row, token in zip(proposal.probabilities, proposal.tokens):
        assert row[token] > 0


def test_ordered_embeddings_sample_only_selected_centroids():
    assistant = tiny_assistant(9, ordered_embeddings=True)
    drafter, ids = observed_drafter(assistant, tiny_target(1), PROMPTS[1])
    # A high temperature would spread probability over the placeholder logits if they were kept.
    proposal = drafter.propose(ids, 4, Sampling(temperature=5.0, seed=3), torch.Generator().manual_seed(3))
    tokens_per_centroid = VOCAB_SIZE // 16
    for row, token in zip(proposal.probabilities, proposal.tokens):
        assert int((row > 0).sum()) == 4 * tokens_per_centroid
        assert row[token] > 0


def test_ordered_embeddings_greedy_equals_plain_greedy():
    target = tiny_target(1)
    assistant = tiny_assistant(9, ordered_embeddings=True)
    decoder = SpeculativeDecoder(target, Gemma4AssistantDrafter(assistant, target), NO_EOS, draft_tokens=3)
    for prompt in PROMPTS[:2]:
        assert generated(decoder, prompt) == plain_greedy(1, tuple(prompt))


def test_propose_before_and_after_prefill():
    target = tiny_target(1)
    drafter = Gemma4AssistantDrafter(tiny_assistant(2), target)
    assert drafter.propose([1, 2, 3], 4, Sampling(), torch.Generator()).tokens == []

    decoder = SpeculativeDecoder(target, drafter, NO_EOS, draft_tokens=2)
    decoder.prefill(PROMPTS[1])
    # The prefill pass is observed, so the drafter can propose right after it.
    assert len(drafter.propose(PROMPTS[1] + [4], 2, Sampling(), torch.Generator()).tokens) == 2
    prompt = PROMPTS[1] + [4]
    assert generated(decoder, prompt) == plain_greedy(1, tuple(prompt))


def test_observe_without_output_checks_ids():
    drafter, ids = observed_drafter(tiny_assistant(2), tiny_target(1), PROMPTS[1])
    drafter.observe(ids[:-1])
    assert len(drafter.propose(ids, 2, Sampling(), torch.Generator()).tokens) == 2
    drafter.observe(ids[:-2])
    assert drafter.propose(ids, 2, Sampling(), torch.Generator()).tokens == []


def test_target_output_without_shared_kv_rejected():
    target = tiny_target(1)
    drafter = Gemma4AssistantDrafter(tiny_assistant(2), target)
    with torch.inference_mode():
        output = target(input_ids=torch.tensor([PROMPTS[0]]))
    with pytest.raises(ValueError, match="no shared_kv_states"):
        drafter.observe(PROMPTS[0], output, len(PROMPTS[0]) - 1)


def test_close_removes_hooks():
    target = tiny_target(1)
    drafter = Gemma4AssistantDrafter(tiny_assistant(9, ordered_embeddings=True), target)
    hooks_before = len(target.get_decoder().norm._forward_hooks)
    drafter.close()
    assert len(target.get_decoder().norm._forward_hooks) == hooks_before - 1
    assert not drafter.assistant.masked_embedding.centroids._forward_hooks
