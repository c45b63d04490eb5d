"""Benchmarks of the language-model stage: fixed prompts and reference decoders.

The mode names live here, free of torch imports, so the command line can check them
before any model loads.
"""

OUR_MODES = ("plain", "draft", "draft-int8-vocab", "draft-int4-vocab", "lookup")
# Modes whose draft scores only the most frequent tokens (``--draft-vocab``).
REDUCED_VOCAB_MODES = ("draft-int8-vocab", "draft-int4-vocab")
TRANSFORMERS_MODES = ("transformers-assisted", "transformers-lookup")
ALL_MODES = OUR_MODES + TRANSFORMERS_MODES
LLAMACPP_MODES = ("llamacpp-plain", "llamacpp-speculative")
WEIGHT_FORMATS = ("dense", "int8", "int4")


def weight_modes(weights: str) -> tuple[str, str]:
    """Return the names of the plain and speculative modes that run the target with ``weights`` (int8 or int4)."""
    return f"plain@{weights}", f"draft@{weights}"


def baseline_of(mode: str) -> str:
    """Return the mode whose speed ``mode`` is compared with: plain decoding with the same weights."""
    return mode.replace("draft@", "plain@") if "@" in mode else "plain"
