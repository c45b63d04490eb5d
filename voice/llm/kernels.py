"""Faster float32 linear layers for the few-row inputs of speculative verification.

A verification pass feeds 2 to about 9 tokens through the target. For such inputs x of
shape (rows, in), ``F.linear`` computes x @ W.T, and MKL's sgemm then repacks the large
weight W on every call. On a 2-core AMD EPYC (AVX2), a 5-token pass of the 1.5B Qwen
target took 1.0 to 1.2 s against 0.35 s for one token. Computing the same product as
(W @ x.T).T, with x row-major, lets MKL pack only the small x instead: the 5-token pass
then took 0.44 to 0.45 s (``docs/measure_passes.py``). Results differ from ``F.linear``
by rounding only, so greedy choices agree except at near-exact ties.
"""

from __future__ import annotations

import types

import torch

# Inputs with more rows (a prompt prefill) keep F.linear, whose packing cost is spread
# over many rows.
MAX_SKINNY_ROWS = 17  # llm.draft_tokens allows 16 drafts plus the pending token


def _skinny_linear_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if not 2 <= rows <= MAX_SKINNY_ROWS:
        return torch.nn.functional.linear(x, self.weight, self.bias)
    # Both copies are of a few rows only. MKL is fast when x.T is a transposed view of a
    # row-major x, and about 3 times slower when x.T itself is row-major, which is what an
    # elementwise op on a transposed output would hand the next layer.
    flat = x.reshape(rows, x.shape[-1]).contiguous().T
    if self.bias is None:
        product = torch.mm(self.weight, flat)
    else:
        product = torch.addmm(self.bias.unsqueeze(1), self.weight, flat)
    return product.T.contiguous().reshape(*x.shape[:-1], self.weight.shape[0])


def use_skinny_linear(model: torch.nn.Module) -> int:
    """Route the model's float32 ``nn.Linear`` layers through the few-row product; return how many.

    Layers of other dtypes and subclasses (such as quantized linear layers) are left alone.
    """
    count = 0
    for module in model.modules():
        if type(module) is torch.nn.Linear and module.weight.dtype == torch.float32:
            module.forward = types.MethodType(_skinny_linear_forward, module)
            count += 1
    return count
