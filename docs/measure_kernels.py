"""Time the int4 target's forward passes with the native and with torch's int4 kernels.

Run from the repository root with the models in the cache (about 3 minutes):

    .venv/bin/python docs/measure_kernels.py

Both copies of the embedded 1.5B target hold the same GGUF Q4_K codes (Q6_K tensors as
int8) and run in bfloat16 where the CPU has fast bfloat16, else float32. Each pass feeds
1 to 9 tokens after a 60-token context, as decoding (1) and verification passes (2 and
more) do. The two kernels alternate pass by pass, and the script prints the median of
each, in milliseconds, and each pass's cost relative to a 1-token pass.
"""

from __future__ import annotations

import copy
import statistics
import time

import torch
from transformers import DynamicCache

from voice import models
from voice.llm.loading import load_models, resolve_dtype
from voice.llm.quant import GgufSource, quantize_model

TARGET = "qwen2.5-coder-1.5b-instruct"
CONTEXT = 60
TOKENS = (1, 2, 3, 5, 9)
REPEATS = 15


def main() -> None:
    cache = models.cache_root()
    loaded = load_models(models.resolve_llm(TARGET, cache), None, resolve_dtype("auto"), allow_download=False)
    gguf = GgufSource(models.embedded_gguf(TARGET, cache))
    copies = {}
    for kernel in ("native", "torch"):
        model = copy.deepcopy(loaded.target_model)
        quantize_model(model, "int4", gguf, kernel=kernel)
        copies[kernel] = model
    del loaded
    context = torch.arange(1000, 1000 + CONTEXT)[None]
    times: dict[tuple[str, int], list[float]] = {(kernel, tokens): [] for kernel in copies for tokens in TOKENS}
    with torch.inference_mode():
        caches = {}
        for kernel, model in copies.items():
            caches[kernel] = DynamicCache()
            model(input_ids=context, past_key_values=caches[kernel], use_cache=True)
        for _ in range(REPEATS):
            for tokens in TOKENS:
                ids = torch.arange(2000, 2000 + tokens)[None]
                for kernel, model in copies.items():
                    started = time.perf_counter()
                    model(input_ids=ids, past_key_values=caches[kernel], use_cache=True, logits_to_keep=tokens)
                    times[kernel, tokens].append(time.perf_counter() - started)
                    caches[kernel].crop(-tokens)  # back to the context
    print(f"{torch.get_num_threads()} threads, {next(iter(copies.values())).dtype}, median of {REPEATS} passes")
    for kernel in copies:
        single = statistics.median(times[kernel, 1])
        cells = [f"{tokens} tokens {1000 * statistics.median(times[kernel, tokens]):.1f} ms ({statistics.median(times[kernel, tokens]) / single:.2f}x)" for tokens in TOKENS]
        print(f"{kernel:>6}: " + ", ".join(cells))


if __name__ == "__main__":
    main()
