"""Benchmarks of the language-model stage: fixed prompts and reference decoders."""
