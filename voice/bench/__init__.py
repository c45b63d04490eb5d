"""Benchmarks of the language-model stage: fixed prompts and reference decoders.

The mode names live here, free of torch imports, so the command line can check them
before any model loads.
"""

OUR_MODES = ("plain", "draft", "draft-int8-vocab", "lookup")
TRANSFORMERS_MODES = ("transformers-assisted", "transformers-lookup")
ALL_MODES = OUR_MODES + TRANSFORMERS_MODES
