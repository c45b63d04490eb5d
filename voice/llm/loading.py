"""Load the target and draft models and check that the draft can draft for the target."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from voice.errors import ModelError

logger = logging.getLogger(__name__)

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase


def cpu_has_fast_bf16() -> bool:
    """Return True where the CPU multiplies bf16 natively (AMX or AVX512-BF16)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("amx_bf16", "avx512_bf16"))


def resolve_dtype(name: str) -> torch.dtype:
    """Map the ``dtype`` setting to a torch dtype; ``auto`` is bf16 only where it is fast."""
    if name == "auto":
        return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


@dataclass
class LoadedModels:
    tokenizer: PreTrainedTokenizerBase
    target_model: PreTrainedModel
    draft_model: PreTrainedModel | None


def _from_pretrained(loader, source: str, hub: bool, allow_download: bool, setting: str, **options):
    """Call ``loader.from_pretrained`` and turn a missing or unreadable model into ModelError."""
    try:
        return loader.from_pretrained(source, local_files_only=hub and not allow_download, **options)
    except OSError as error:
        if hub and not allow_download:
            raise ModelError(
                f"{setting}: {source!r} is not in the local Hugging Face cache; download it first "
                "or set allow_download: true in config.yaml"
            ) from None
        raise ModelError(f"{setting}: cannot load {source!r}: {error}") from None


def _load_model(source: str, hub: bool, allow_download: bool, dtype: torch.dtype, setting: str) -> PreTrainedModel:
    return _from_pretrained(AutoModelForCausalLM, source, hub, allow_download, setting, dtype=dtype).eval()


def _load_tokenizer(source: str, hub: bool, allow_download: bool, setting: str) -> PreTrainedTokenizerBase:
    return _from_pretrained(AutoTokenizer, source, hub, allow_download, setting)


def check_draft_compatible(
    target_tokenizer: PreTrainedTokenizerBase,
    draft_tokenizer: PreTrainedTokenizerBase,
    target_model: PreTrainedModel,
    draft_model: PreTrainedModel,
    draft_name: str = "the draft model",
) -> None:
    """Raise ModelError unless the draft maps every id to the same token as the target.

    A draft with another vocabulary would propose ids that mean something else to the
    target: output would stay correct, but acceptance would collapse silently.
    """
    if target_tokenizer.get_vocab() != draft_tokenizer.get_vocab():
        raise ModelError(f"llm.draft: the tokenizer of {draft_name} differs from the target's; choose a draft from the target's model family")
    target_size = target_model.get_output_embeddings().weight.shape[0]
    draft_size = draft_model.get_output_embeddings().weight.shape[0]
    if target_size != draft_size:
        raise ModelError(
            f"llm.draft: {draft_name} scores {draft_size} tokens and the target {target_size}; "
            "choose a draft with the same vocabulary size"
        )


def load_models(
    target: tuple[str, bool],
    draft: tuple[str, bool] | None,
    dtype: torch.dtype,
    allow_download: bool,
) -> LoadedModels:
    """Load target (and draft) from resolved sources, each a (path or hub id, is_hub) pair."""
    started = time.monotonic()
    tokenizer = _load_tokenizer(target[0], target[1], allow_download, "llm.target")
    target_model = _load_model(target[0], target[1], allow_download, dtype, "llm.target")
    draft_model = None
    if draft is not None:
        draft_tokenizer = _load_tokenizer(draft[0], draft[1], allow_download, "llm.draft")
        draft_model = _load_model(draft[0], draft[1], allow_download, dtype, "llm.draft")
        check_draft_compatible(tokenizer, draft_tokenizer, target_model, draft_model, repr(draft[0]))
    logger.info("Loaded language models in %.1f s (%s)", time.monotonic() - started, str(dtype).removeprefix("torch."))
    return LoadedModels(tokenizer, target_model, draft_model)


def eos_token_ids(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel) -> set[int]:
    """Return every id that ends an answer: the tokenizer's and the generation config's."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    configured = getattr(model.generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(configured)
    # Chat models end a turn with their end-of-turn token, which some GGUF conversions
    # leave out of the generation config.
    for token in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<end_of_turn>"):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id and token_id >= 0:
            ids.add(token_id)
    return ids
