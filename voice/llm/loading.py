"""Load the target and draft models and check that the draft can draft for the target."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from voice.config import LlmConfig
from voice.errors import ModelError, first_line
from voice.llm.conversation import Conversation
from voice.llm.drafters import Drafter, ModelDrafter, PromptLookupDrafter, quantize_linear_int8
from voice.llm.kernels import use_skinny_linear
from voice.llm.vocab import load_draft_vocabulary

logger = logging.getLogger(__name__)


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
    target_source: str = ""
    """Folder or hub id the target was loaded from, which keys its packed weights."""
    draft_source: str = ""


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
    except Exception as error:  # safetensors and the tokenizers library raise their own classes for damaged files
        raise ModelError(
            f"{setting}: {source!r} failed to load ({type(error).__name__}: {first_line(error)}); "
            "run voice prepare to check the cached models and rebuild damaged ones"
        ) from None


def _load_model(source: str, hub: bool, allow_download: bool, dtype: torch.dtype, setting: str) -> PreTrainedModel:
    model = _from_pretrained(AutoModelForCausalLM, source, hub, allow_download, setting, dtype=dtype).eval()
    use_skinny_linear(model)
    return model


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


def load_tokenizer(source: str, hub: bool, allow_download: bool) -> PreTrainedTokenizerBase:
    """Load the target's tokenizer alone, such as for building the draft vocabulary."""
    return _load_tokenizer(source, hub, allow_download, "llm.target")


def load_models(
    target: tuple[str, bool],
    draft: tuple[str, bool] | None,
    dtype: torch.dtype,
    allow_download: bool,
    draft_dtype: torch.dtype | None = None,
    draft_has_tokenizer: bool = True,
) -> LoadedModels:
    """Load target (and draft) from resolved sources, each a (path or hub id, is_hub) pair.

    ``draft_dtype`` defaults to ``dtype``; an int8 draft is loaded in float32 first.
    ``draft_has_tokenizer`` False skips the tokenizer comparison, for drafters such as
    Gemma 4 assistants that ship no tokenizer and are checked against the target instead.
    """
    started = time.monotonic()
    tokenizer = _load_tokenizer(target[0], target[1], allow_download, "llm.target")
    target_model = _load_model(target[0], target[1], allow_download, dtype, "llm.target")
    draft_model = None
    if draft is not None:
        draft_model = _load_model(draft[0], draft[1], allow_download, draft_dtype or dtype, "llm.draft")
        if draft_has_tokenizer:
            draft_tokenizer = _load_tokenizer(draft[0], draft[1], allow_download, "llm.draft")
            check_draft_compatible(tokenizer, draft_tokenizer, target_model, draft_model, repr(draft[0]))
    logger.info("Loaded language models in %.1f s (%s)", time.monotonic() - started, str(dtype).removeprefix("torch."))
    return LoadedModels(tokenizer, target_model, draft_model, target[0], draft[0] if draft else "")


def apply_weights(model: PreTrainedModel, weights: str, name: str, source: str, cache: Path, role: str) -> None:
    """Quantize ``model`` to ``weights`` (int8 or int4) in place with packed weights kept in ``cache``.

    ``name`` is the configured model name: an embedded GGUF model gives its Q4_K codes to
    the int4 layers as they are. ``role`` is target or draft, and an int4 draft has every
    layer that fits in int4, whatever its GGUF format.
    """
    from voice.llm.quant import GgufSource, quantize_with_cache
    from voice.models import embedded_gguf

    gguf_path = embedded_gguf(name, cache) if weights == "int4" else None
    gguf = GgufSource(gguf_path) if gguf_path is not None else None
    from voice.llm import qmatmul
    from voice.llm.quant import uses_native_kernels

    # The draft's Q5_0 and Q6_K tensors become int4 as well: a draft only proposes, so
    # fewer bytes per step count for more than its last bits.
    other_formats = "int4" if role == "draft" else "int8"
    report = quantize_with_cache(model, weights, source, cache, gguf, other_formats)
    logger.info("%s weights %s: %s", role.capitalize(), weights, report.describe())
    if uses_native_kernels(model) and not qmatmul.SHARES_TORCH_THREADS:
        qmatmul.route_threads(model)


def resolve_target_weights(setting: str, dtype: torch.dtype) -> str:
    """Map ``llm.target_weights`` to a format; ``auto`` is int4 where an int4 kernel is fast.

    The native kernels (AVX2 or AVX512-VNNI) are fast with any activation dtype. torch's
    own int4 kernel is fast with bf16 activations (3.7 times dense bf16 decoding on 2
    Zen 4 cores) and slower than dense float32 with float32 ones.
    """
    from voice.llm import qmatmul

    if setting == "auto":
        native = qmatmul.available() and qmatmul.instruction_set() != "scalar"
        return "int4" if native or dtype == torch.bfloat16 else "dense"
    return setting


def resolve_draft_weights(setting: str) -> str:
    """Map ``llm.draft_weights`` to a format; ``auto`` is int4 where the native kernels run, else int8.

    On 2 Xeon cores a 1-token pass of the 0.5B Qwen draft took 24 ms with native int4
    weights and 40 ms with torch's dynamic int8 quantization. torch's own int4 kernel is
    slower than dynamic int8 with float32 activations.
    """
    from voice.llm import qmatmul

    if setting == "auto":
        # NOTE: timed with AVX512-VNNI only. On an AVX2-only CPU the int4 draft has not
        # been compared with dynamic int8.
        native = qmatmul.available() and qmatmul.instruction_set() != "scalar"
        return "int4" if native else "int8"
    return setting


def quantize_target(config: LlmConfig, models: LoadedModels, cache: Path) -> None:
    """Apply ``llm.target_weights`` to the loaded target."""
    weights = resolve_target_weights(config.target_weights, models.target_model.dtype)
    if weights != "dense":
        apply_weights(models.target_model, weights, config.target, models.target_source, cache, "target")


def draft_vocabulary(config: LlmConfig, tokenizer: PreTrainedTokenizerBase, size: int, cache: Path) -> torch.Tensor:
    """Return the ``size`` token ids a reduced draft vocabulary keeps, from the table in ``cache``.

    The table always contains the tokens of the chat template around the system prompt.
    """
    sample_prompt = Conversation(config.system_prompt, 0).prompt_ids(tokenizer, "a", 1_000_000)
    try:
        return load_draft_vocabulary(tokenizer, size, [tokenizer.decode(sample_prompt)], cache)
    except ValueError as error:
        raise ModelError(f"llm.draft_vocab: {error}") from None


def build_drafter(config: LlmConfig, models: LoadedModels, cache: Path) -> Drafter | None:
    """Return the drafter that ``config.drafter`` names, or None when speculation is off.

    ``cache`` is the folder that contains the reduced draft vocabulary's table.
    """
    if not config.speculative:
        return None
    if config.drafter == "prompt_lookup":
        return PromptLookupDrafter(config.lookup_max_ngram, config.lookup_min_ngram)
    if models.draft_model is None:
        raise ModelError(f"llm.drafter: {config.drafter} needs a draft model in llm.draft")
    if config.drafter == "gemma4_assistant":
        from voice.llm.gemma4 import Gemma4AssistantDrafter

        try:
            return Gemma4AssistantDrafter(models.draft_model, models.target_model)
        except ValueError as error:
            raise ModelError(f"llm.draft: {error}") from None
    return _model_drafter(config, models.draft_model, models.tokenizer, models.draft_source, cache)


def _model_drafter(
    config: LlmConfig, draft_model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, source: str, cache: Path
) -> ModelDrafter:
    """Build the draft model's drafter: its output layer cut to ``llm.draft_vocab``, then its weights quantized."""
    vocab_ids = None
    if config.draft_vocab:
        full_size = draft_model.get_output_embeddings().weight.shape[0]
        if config.draft_vocab >= full_size:
            raise ModelError(
                f"llm.draft_vocab: {config.draft_vocab} is not below the draft's {full_size} output tokens; "
                "use a smaller number or 0 for the whole vocabulary"
            )
        vocab_ids = draft_vocabulary(config, tokenizer, config.draft_vocab, cache)
    drafter = ModelDrafter(draft_model, vocab_ids, config.draft_threads, config.draft_min_confidence)
    # After the output layer was cut to the reduced vocabulary, which slices dense rows.
    quantize_draft(draft_model, config, source, cache)
    return drafter


def pack_draft_weights(config: LlmConfig, draft: tuple[str, bool], dtype: torch.dtype, allow_download: bool, cache: Path) -> None:
    """Pack the draft's int4 layers into ``cache`` as ``build_drafter`` would, for ``voice prepare``.

    Loads the draft alone: its tokenizer equals the target's (checked whenever both load),
    and a second copy of the target would double the peak memory.
    """
    tokenizer = _load_tokenizer(draft[0], draft[1], allow_download, "llm.draft")
    draft_model = _load_model(draft[0], draft[1], allow_download, dtype, "llm.draft")
    _model_drafter(config, draft_model, tokenizer, draft[0], cache)


def quantize_draft(draft_model: PreTrainedModel, config: LlmConfig, source: str, cache: Path) -> None:
    """Apply ``llm.draft_weights``.

    int8 on a float32 draft uses torch's dynamic quantization: a token of the 0.5B Qwen
    draft took 28 ms that way on 2 Zen 4 cores, 33 ms with the native int8 kernel and
    more with torch's packed int8 kernel.
    """
    weights = resolve_draft_weights(config.draft_weights)
    if weights == "int8" and draft_model.dtype == torch.float32:
        seconds = quantize_linear_int8(draft_model)
        logger.info("Quantized the draft's linear layers to int8 in %.1f s", seconds)
    elif weights != "dense":
        apply_weights(draft_model, weights, config.draft, source, cache, "draft")


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
