"""The direct forward pass: the same logits as transformers, fused quantized layers, its key-value buffer."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from tests.llm.tiny_models import ForcedTokenDraft, tiny_qwen2
from voice.llm import direct, qmatmul
from voice.llm.cache import TokenCache
from voice.llm.direct import GROWTH, DirectForward, KeyValueBuffer, unsupported_reason
from voice.llm.drafters import restrict_output_layer
from voice.llm.quant import Int4Linear, Int8Linear, quantize_model
from voice.llm.speculative import SpeculativeDecoder

# Prefill, single tokens, a verification-sized pass, then a rollback and new tokens.
STEPS = [list(range(5, 40)), [7], [8, 9, 10, 11, 12], [13]]


def tiny_llama(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, max_position_embeddings=512,
    )
    return LlamaForCausalLM(config).eval()


def native_sized_qwen2(seed: int) -> Qwen2ForCausalLM:
    """A Qwen2 model whose layers the native kernels take: inputs a multiple of 128, outputs of 16."""
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
    )
    return Qwen2ForCausalLM(config).eval()


def transformers_logits(model, cache: DynamicCache, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids]), cache=cache, use_cache=True, logits_to_keep=len(ids)).logits[0]


def assert_same_logits_as_transformers(model, atol: float) -> None:
    forward = DirectForward(model)
    buffer = forward.new_buffer()
    reference = DynamicCache(config=model.config)
    for ids in STEPS:
        torch.testing.assert_close(forward(ids, buffer, len(ids)), transformers_logits(model, reference, ids), rtol=0, atol=atol)
        assert buffer.length == reference.get_seq_length()
    buffer.crop(-4)
    reference.crop(-4)
    ids = [20, 21, 22]
    torch.testing.assert_close(forward(ids, buffer, 3), transformers_logits(model, reference, ids), rtol=0, atol=atol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("build", [tiny_qwen2, tiny_llama])
def test_logits_match_transformers(build, dtype):
    assert_same_logits_as_transformers(build(3).to(dtype), atol=1e-4 if dtype == torch.float32 else 0.05)


@pytest.mark.skipif(not qmatmul.available(), reason="native kernels not built")
@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_fused_quantized_projections_match_separate_ones(weights):
    model = native_sized_qwen2(4)
    quantize_model(model, weights)
    attention = model.model.layers[0].self_attn
    before = [p.qweight if weights == "int8" else p.codes for p in (attention.q_proj, attention.k_proj, attention.v_proj)]
    before = [tensor.clone() for tensor in before]
    forward = DirectForward(model)
    layer = forward.layers[0]
    expected_class = Int8Linear if weights == "int8" else Int4Linear
    assert isinstance(layer.qkv, expected_class) and isinstance(layer.gate_up, expected_class)
    assert layer.qkv.out_features == 128 + 64 + 64
    # The separate layers now read views of the fused buffers: same values, no copy.
    fused = layer.qkv.qweight if weights == "int8" else layer.qkv.codes
    for projection, old in zip((attention.q_proj, attention.k_proj, attention.v_proj), before):
        now = projection.qweight if weights == "int8" else projection.codes
        assert torch.equal(now, old)
        assert now.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr()
    # Each output row is computed alone, so fusing changes no logit.
    separate = DirectForward(model)
    for direct_layer, layer in zip(separate.layers, model.model.layers):
        direct_layer.qkv = [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj]
        direct_layer.gate_up = [layer.mlp.gate_proj, layer.mlp.up_proj]
    fused_buffer, separate_buffer = forward.new_buffer(), separate.new_buffer()
    for ids in STEPS:
        assert torch.equal(forward(ids, fused_buffer, len(ids)), separate(ids, separate_buffer, len(ids)))
    # transformers' pass attends all queries at once, the direct pass query by query.
    # The kernels round activations to 8 bits, which turns those float differences into
    # whole rounding steps: about 1% of the logits of this small random model.
    assert_same_logits_as_transformers(model, atol=0.05)


@pytest.mark.skipif(not qmatmul.available(), reason="native kernels not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_verification_pass_bit_identical_to_single_tokens(weights, dtype):
    model = native_sized_qwen2(11).to(dtype)
    quantize_model(model, weights)
    forward = DirectForward(model)
    buffer = forward.new_buffer()
    forward(list(range(5, 40)), buffer, 1)
    ids = [8, 9, 10, 11, 12]
    verified = forward(ids, buffer, len(ids))
    buffer.crop(-len(ids))
    singles = torch.cat([forward([token], buffer, 1) for token in ids])
    assert torch.equal(verified, singles)


def test_buffer_grows_and_keeps_positions():
    model = tiny_qwen2(5)
    forward = DirectForward(model)
    buffer = forward.new_buffer()
    reference = DynamicCache(config=model.config)
    ids = [(7 * i) % 90 + 1 for i in range(GROWTH + 40)]
    forward(ids[:GROWTH - 2], buffer, 1)
    transformers_logits(model, reference, ids[:GROWTH - 2])
    assert buffer.capacity == GROWTH
    for start in range(GROWTH - 2, len(ids), 3):
        chunk = ids[start : start + 3]
        torch.testing.assert_close(forward(chunk, buffer, len(chunk)), transformers_logits(model, reference, chunk), rtol=0, atol=1e-4)
    assert buffer.length == len(ids)
    assert buffer.capacity == 2 * GROWTH


def test_crop_rejects_lengths_outside_the_buffer():
    buffer = KeyValueBuffer(layers=1, kv_heads=1, head_dim=4, dtype=torch.float32)
    buffer.reserve(8)
    buffer.length = 6
    buffer.crop(-2)
    assert buffer.get_seq_length() == 4
    with pytest.raises(ValueError, match="invalid crop length 5: the buffer contains 4 positions"):
        buffer.crop(5)
    with pytest.raises(ValueError, match="invalid crop length -5"):
        buffer.crop(-5)


def test_models_it_does_not_run():
    assert unsupported_reason(tiny_qwen2(6)) is None
    # A subclass may change the forward pass, as this one does.
    assert "ForcedTokenDraft" in unsupported_reason(ForcedTokenDraft(tiny_qwen2(6).config))
    windowed = Qwen2Config(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, use_sliding_window=True, sliding_window=16, max_window_layers=0,
    )
    assert unsupported_reason(Qwen2ForCausalLM(windowed)) == "sliding-window attention"
    gemma = Gemma3ForCausalLM(Gemma3TextConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8,
    ))
    assert "Gemma3ForCausalLM" in unsupported_reason(gemma)
    with pytest.raises(ValueError, match="does not run this model"):
        DirectForward(gemma)


def test_token_cache_direct_pass_switch(monkeypatch):
    model = tiny_qwen2(7)
    cache = TokenCache(model)
    direct_logits = cache.forward([1, 2, 3], 1).logits
    assert isinstance(cache.kv, KeyValueBuffer)
    # One pass per model, shared by every cache of it.
    assert direct.direct_forward(model) is direct.direct_forward(model)
    monkeypatch.setenv("VOICE_DIRECT_FORWARD", "0")
    other = TokenCache(model)
    assert isinstance(other.kv, DynamicCache)
    torch.testing.assert_close(other.forward([1, 2, 3], 1).logits, direct_logits, rtol=0, atol=1e-4)


def test_greedy_decoding_same_with_either_pass(monkeypatch):
    target = tiny_qwen2(8)
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]

    def greedy(speculative: bool) -> list[int]:
        decoder = SpeculativeDecoder(target, tiny_qwen2(9), set(), draft_tokens=3)
        return [token for step in decoder.generate(prompt, 24, speculative=speculative) for token in step]

    with_direct = greedy(speculative=True)
    monkeypatch.setenv("VOICE_DIRECT_FORWARD", "0")
    assert greedy(speculative=True) == with_direct
    assert greedy(speculative=False) == with_direct


def test_replaced_output_layer_rebuilds_pass():
    model = tiny_qwen2(10)
    first = direct.direct_forward(model)
    restrict_output_layer(model, torch.tensor([4, 8, 15, 16, 23, 42]))
    second = direct.direct_forward(model)
    assert second is not first
    logits = second([1, 2, 3], second.new_buffer(), 1)
    assert logits.shape == (1, 6)
