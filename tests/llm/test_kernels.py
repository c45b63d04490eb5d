"""The few-row linear product used for verification passes."""

from __future__ import annotations

import pytest
import torch

from tests.llm.tiny_models import perturbed_copy, tiny_qwen2
from voice.llm.kernels import MAX_SKINNY_ROWS, use_skinny_linear
from voice.llm.speculative import SpeculativeDecoder


@pytest.mark.parametrize("rows", [1, 2, 5, MAX_SKINNY_ROWS, MAX_SKINNY_ROWS + 1])
@pytest.mark.parametrize("bias", [False, True])
def test_skinny_linear_matches_linear(rows, bias):
    layer = torch.nn.Linear(48, 80, bias=bias)
    reference = torch.nn.Linear(48, 80, bias=bias)
    reference.load_state_dict(layer.state_dict())
    assert use_skinny_linear(layer) == 1
    x = torch.randn(1, rows, 48)
    with torch.no_grad():
        output = layer(x)
        expected = reference(x)
    assert output.shape == expected.shape
    assert output.is_contiguous()
    torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-5)


def test_skinny_linear_accepts_transposed_input():
    """An elementwise op on a transposed view hands the next layer column-major rows."""
    layer = torch.nn.Linear(32, 16)
    reference = torch.nn.Linear(32, 16)
    reference.load_state_dict(layer.state_dict())
    use_skinny_linear(layer)
    x = torch.randn(32, 4).T  # (4, 32), not contiguous
    with torch.no_grad():
        torch.testing.assert_close(layer(x), reference(x), rtol=1e-5, atol=1e-5)


def test_skinny_linear_skips_other_dtypes_and_subclasses():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4).to(torch.bfloat16), torch.nn.Linear(4, 4))
    assert use_skinny_linear(model) == 1
    assert "forward" not in model[0].__dict__


def test_speculative_with_skinny_target_equals_plain_greedy():
    target = tiny_qwen2(seed=80)
    use_skinny_linear(target)
    decoder = SpeculativeDecoder(target, perturbed_copy(target, 0.3, seed=81), set(), draft_tokens=5)
    plain = SpeculativeDecoder(target, None, set())
    for prompt in ([1, 2, 3], [9, 8, 7, 6, 5, 4]):
        output = [token for step in decoder.generate(prompt, 30) for token in step]
        expected = [token for step in plain.generate(prompt, 30, speculative=False) for token in step]
        assert output == expected
    assert decoder.stats.drafted > 0
