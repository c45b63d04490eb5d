"""Time single forward passes: target passes by input length, and one draft token per draft variant.

Usage (models already in the cache):

    .venv/bin/python docs/measure_passes.py [--repeats 5]

Target passes run with the few-row product of voice/llm/kernels.py and with plain
F.linear, alternating, after a 100-token context. Draft variants: float32 with the full
vocabulary, the 32768-token vocabulary, int8 weights, and both. Prints medians in ms.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import types

import torch

import voice  # noqa: F401  (loads the MKL vendor shim before torch's first MKL call)
from voice.config import LlmConfig
from voice.llm.cache import TokenCache
from voice.llm.drafters import ModelDrafter, forward_logits, quantize_linear_int8
from voice.llm.kernels import _skinny_linear_forward
from voice.llm.loading import draft_vocabulary, load_models
from voice.models import cache_root, resolve_llm


def time_pass(cache: TokenCache, ids: list[int], tokens: int) -> float:
    length = len(cache)
    started = time.perf_counter()
    forward_logits(cache, ids[-tokens:], tokens)
    elapsed = time.perf_counter() - started
    cache.rollback(length)
    return elapsed


def set_linear_forward(model: torch.nn.Module, skinny: bool) -> None:
    for module in model.modules():
        if type(module) is torch.nn.Linear:
            if skinny:
                module.forward = types.MethodType(_skinny_linear_forward, module)
            else:
                module.__dict__.pop("forward", None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    cache = cache_root()
    config = LlmConfig()
    target = resolve_llm(config.target, cache)
    draft = resolve_llm(config.draft, cache)
    models = load_models(target, draft, torch.float32, allow_download=False)
    context = list(range(1000, 1100))

    target_cache = TokenCache(models.target_model)
    forward_logits(target_cache, context, 1)
    lengths = (1, 2, 3, 5, 8)
    timings: dict[tuple[str, int], list[float]] = {}
    for _ in range(args.repeats):
        for kernel in ("F.linear", "W @ x.T"):
            set_linear_forward(models.target_model, skinny=kernel == "W @ x.T")
            for tokens in lengths:
                timings.setdefault((kernel, tokens), []).append(time_pass(target_cache, context, tokens))
    print("target pass (ms)   " + "".join(f"{tokens:>8} tok" for tokens in lengths))
    for kernel in ("F.linear", "W @ x.T"):
        row = "".join(f"{1000 * statistics.median(timings[(kernel, tokens)]):>12.0f}" for tokens in lengths)
        print(f"{kernel:<19}{row}")

    vocab_ids = draft_vocabulary(config, models.tokenizer, 32768, cache)
    variants = {}
    for name, reduced, int8 in (("float32", False, False), ("32768 tokens", True, False), ("int8", False, True), ("int8 + 32768 tokens", True, True)):
        model = copy.deepcopy(models.draft_model)
        ModelDrafter(model, vocab_ids if reduced else None)
        if int8:
            quantize_linear_int8(model)
        variant_cache = TokenCache(model)
        forward_logits(variant_cache, context, 1)
        variants[name] = variant_cache
    draft_timings: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, variant_cache in variants.items():
            draft_timings[name].append(time_pass(variant_cache, context, 1))
    single = statistics.median(timings[("W @ x.T", 1)])
    print("draft token (ms)     median   / target 1-token pass")
    for name, values in draft_timings.items():
        median = statistics.median(values)
        print(f"{name:<20}{1000 * median:>8.0f}{median / single:>10.2f}")


if __name__ == "__main__":
    main()
