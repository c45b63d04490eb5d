"""Tiny randomly initialised Qwen2 models for fast engine tests."""

from __future__ import annotations

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

VOCAB_SIZE = 96


def tiny_qwen2(seed: int, vocab_size: int = VOCAB_SIZE) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    model = Qwen2ForCausalLM(config).eval()
    # Larger output weights spread the logits, so greedy choices are far from ties and
    # a float32 multi-token pass agrees with single-token passes.
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    return model


def perturbed_copy(model: Qwen2ForCausalLM, scale: float, seed: int) -> Qwen2ForCausalLM:
    """Return a copy of ``model`` with Gaussian noise of relative size ``scale`` on every weight."""
    copy = tiny_qwen2(seed=0, vocab_size=model.config.vocab_size)
    copy.load_state_dict(model.state_dict())
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in copy.parameters():
            noise = torch.randn(parameter.shape, generator=generator) * parameter.std().clamp_min(1e-3)
            parameter.add_(noise * scale)
    return copy


class ForcedTokenDraft(Qwen2ForCausalLM):
    """A draft that always proposes ``forced_id``, which the target never picks."""

    forced_id = VOCAB_SIZE - 1

    def forward(self, *args, **kwargs):
        output = super().forward(*args, **kwargs)
        output.logits.fill_(-1e9)
        output.logits[..., self.forced_id] = 0.0
        return output


def forced_draft_and_target(seed: int) -> tuple[Qwen2ForCausalLM, ForcedTokenDraft]:
    target = tiny_qwen2(seed)
    with torch.no_grad():
        # The target scores forced_id at exactly 0, below its best token at every step
        # in practice (the tests check that plain decoding never emits it).
        target.lm_head.weight[ForcedTokenDraft.forced_id].zero_()
    draft = ForcedTokenDraft(target.config).eval()
    return target, draft
