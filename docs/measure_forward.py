"""Time forward passes through transformers and through voice's direct forward pass.

Run from the repository root with the models in the cache (about 3 minutes):

    .venv/bin/python docs/measure_forward.py

Loads the embedded target and draft. The target has int4 weights (the GGUF Q4_K codes,
Q6_K tensors as int8) and computes in bfloat16 where the CPU has fast bfloat16, else
float32. The draft computes in float32, once with int8 weights (torch's dynamic
quantization) and once with int4 weights in every layer (the native kernels), both with
the full output layer. Each pass feeds 1 or 5 tokens after a 60-token context, as
decoding and a verification pass of 4 drafts do. transformers and the direct pass alternate pass by
pass on the same weights, and the script prints the median of each in milliseconds and
the largest difference between their logits.
"""

from __future__ import annotations

import copy
import statistics
import time

import torch
from transformers import DynamicCache

from voice import models
from voice.llm.direct import DirectForward
from voice.llm.drafters import quantize_linear_int8
from voice.llm.loading import load_models, resolve_dtype
from voice.llm.quant import GgufSource, quantize_model

TARGET = "qwen2.5-coder-1.5b-instruct"
DRAFT = "qwen2.5-coder-0.5b-instruct"
CONTEXT = 60
TOKENS = (1, 5)
REPEATS = 15


def load() -> dict[str, torch.nn.Module]:
    cache = models.cache_root()
    target = load_models(models.resolve_llm(TARGET, cache), None, resolve_dtype("auto"), allow_download=False).target_model
    quantize_model(target, "int4", GgufSource(models.embedded_gguf(TARGET, cache)))
    draft = load_models(models.resolve_llm(DRAFT, cache), None, torch.float32, allow_download=False).target_model
    draft_int4 = copy.deepcopy(draft)
    quantize_linear_int8(draft)
    quantize_model(draft_int4, "int4")  # without a GGUF source, every layer that fits is int4
    return {"target int4": target, "draft int8": draft, "draft int4": draft_int4}


def main() -> None:
    loaded = load()
    context = list(range(1000, 1000 + CONTEXT))
    times: dict[tuple[str, str, int], list[float]] = {}
    with torch.inference_mode():
        for name, model in loaded.items():
            direct = DirectForward(model)
            buffer = direct.new_buffer()
            direct(context, buffer, 1)
            hf_cache = DynamicCache(config=model.config)
            model(input_ids=torch.tensor([context]), cache=hf_cache, use_cache=True, logits_to_keep=1)
            largest = 0.0
            for _ in range(REPEATS):
                for tokens in TOKENS:
                    ids = list(range(2000, 2000 + tokens))
                    started = time.perf_counter()
                    hf_logits = model(input_ids=torch.tensor([ids]), cache=hf_cache, use_cache=True, logits_to_keep=tokens).logits[0]
                    times.setdefault((name, "transformers", tokens), []).append(time.perf_counter() - started)
                    started = time.perf_counter()
                    direct_logits = direct(ids, buffer, tokens)
                    times.setdefault((name, "direct", tokens), []).append(time.perf_counter() - started)
                    largest = max(largest, float((hf_logits.float() - direct_logits.float()).abs().max()))
                    hf_cache.crop(-tokens)
                    buffer.crop(-tokens)
            print(f"{name} ({model.dtype}, {torch.get_num_threads()} threads, median of {REPEATS} passes; largest logit difference {largest:.3g})")
            for path in ("transformers", "direct"):
                cells = [f"{tokens} tokens {1000 * statistics.median(times[name, path, tokens]):.1f} ms" for tokens in TOKENS]
                print(f"  {path:>12}: " + ", ".join(cells))


if __name__ == "__main__":
    main()
