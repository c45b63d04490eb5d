"""How far each weight format moves the embedded target's logits from the dense model.

Run from the repository root with the models in the cache:

    .venv/bin/python docs/measure_quant.py

The dense model is the GGUF file dequantized to float32 (through the bf16 safetensors
copy in the cache), so it is the reference every format approximates. Each format runs
the same four chat prompts in float32 and is compared position by position: largest and
mean absolute logit difference, mean relative difference of a position's logit vector,
and how often the most likely token stays the same.
"""

from __future__ import annotations

import copy

import torch

from voice import models
from voice.llm.loading import load_models
from voice.llm.quant import GgufSource, quantize_model

TARGET = "qwen2.5-coder-1.5b-instruct"
QUESTIONS = [
    "What is the capital of France?",
    "How do I boil an egg?",
    "What is twelve times fifteen?",
    "Turn on the kitchen lights.",
]


def main() -> None:
    torch.set_num_threads(2)
    cache = models.cache_root()
    source = models.resolve_llm(TARGET, cache)
    loaded = load_models(source, None, torch.float32, allow_download=False)
    batches = []
    for question in QUESTIONS:
        ids = loaded.tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True, tokenize=True)
        batches.append(torch.tensor([list(ids["input_ids"] if hasattr(ids, "keys") else ids)]))
    gguf = GgufSource(models.embedded_gguf(TARGET, cache))
    choices = [
        ("int8 (every layer, from the dense weights)", "int8", None),
        ("int4 with the GGUF Q4_K codes, int8 for the Q6_K tensors", "int4", gguf),
        ("int4 quantized again from the dense weights", "int4", None),
    ]
    with torch.inference_mode():
        reference = [loaded.target_model(input_ids=batch).logits.float()[0] for batch in batches]
        for label, weights, source_file in choices:
            model = copy.deepcopy(loaded.target_model)
            report = quantize_model(model, weights, source_file)
            outputs = [model(input_ids=batch).logits.float()[0] for batch in batches]
            difference = torch.cat([(out - ref).abs().flatten() for out, ref in zip(outputs, reference)])
            relative = torch.cat([(out - ref).norm(dim=-1) / ref.norm(dim=-1) for out, ref in zip(outputs, reference)])
            same_top = torch.cat([out.argmax(-1) == ref.argmax(-1) for out, ref in zip(outputs, reference)]).float()
            print(
                f"{label}: max |diff| {difference.max():.3f}, mean |diff| {difference.mean():.4f}, "
                f"relative {relative.mean():.4f}, same top token {same_top.mean():.1%} of {len(same_top)} positions "
                f"({report.describe()})",
                flush=True,
            )
            del model


if __name__ == "__main__":
    main()
