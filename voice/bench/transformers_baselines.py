"""Reference decoding with transformers' own ``generate``, for comparison with our decoder.

Three greedy modes run on the same models as ``voice.llm.speculative``:

- plain: one target forward pass per token.
- assisted: transformers' assisted generation, in which ``assistant_model`` drafts tokens
  and the target verifies them (``AssistedCandidateGenerator``).
- prompt lookup: candidates are copied from earlier n-grams of the prompt and output
  (``PromptLookupCandidateGenerator``), with no draft model.

All three are greedy, so each returns the target's plain greedy tokens; only the time
differs. Facts below about ``generate`` are from the transformers 5.25.0 sources
(``generation/utils.py``, ``generation/candidate_generator.py``).
"""

from __future__ import annotations

import copy
import os
import resource
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import transformers
from transformers import GenerationConfig, PreTrainedModel
from transformers.generation.streamers import BaseStreamer
from transformers.utils import is_sklearn_available


@dataclass
class BaselineResult:
    """New tokens and timings of one ``run_generate`` call."""

    token_ids: list[int]
    """New tokens only, cut before the first end-of-sequence token."""
    first_token_s: float
    """Seconds from the call to the first new token.

    In assisted mode the first target pass already verifies a draft, so this includes the
    assistant's prefill and first draft.
    """
    total_s: float
    steps: int
    """Target forward passes that produced tokens (streamer ``put`` calls after the prompt)."""
    first_step_tokens: int
    """Tokens the first target pass produced, an end-of-sequence token included."""
    settings: dict[str, Any] = field(default_factory=dict)
    """Decoding mode and the draft settings that ``generate`` used."""

    @property
    def tokens_per_s(self) -> float | None:
        """Tokens after the first, per second after the first token, as ``DecodeStats.tokens_per_s`` counts them.

        NOTE: where the first pass produces several tokens (assisted and prompt-lookup
        modes), the tokens after the first one count without the time they took, so the
        rate is higher than the rate of the later passes alone.
        """
        decode_s = self.total_s - self.first_token_s
        if len(self.token_ids) < 2 or decode_s <= 0:
            return None
        return (len(self.token_ids) - 1) / decode_s


class _FirstTokenTimer(BaseStreamer):
    """Streamer that records when the first new tokens arrive and counts the calls that deliver tokens.

    ``generate`` calls ``put`` once with the prompt, then once per target pass with that
    pass's new tokens: one token in plain decoding, one or more in assisted decoding.
    """

    def __init__(self) -> None:
        self.prompt_seen = False
        self.first_token_at: float | None = None
        self.first_put_tokens = 0
        self.puts = 0

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        if value.numel() == 0:
            return
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
            self.first_put_tokens = value.numel()
        self.puts += 1

    def end(self) -> None:
        pass


def greedy_generation_config(
    max_new_tokens: int, eos_token_ids: list[int], prompt_lookup_num_tokens: int | None = None
) -> GenerationConfig:
    """Build a greedy ``GenerationConfig`` whose sampling and penalty settings the model's own cannot override.

    ``generate`` fills every field left at ``None`` from ``model.generation_config``, so
    the fields that change greedy output or warn under greedy decoding are set to their
    neutral values here. Chat checkpoints often set sampling values in their
    generation_config.json: a ``repetition_penalty`` other than 1 changes the greedy
    tokens, and ``temperature``, ``top_p`` and ``top_k`` log "generation flags are not
    valid and may be ignored" when ``do_sample`` is false.
    """
    # NOTE: bad_words_ids, suppress_tokens, sequence_bias and forced_bos/eos_token_id are
    # not reset, so a model whose generation_config sets them still has them applied.
    return GenerationConfig(
        do_sample=False,
        num_beams=1,
        temperature=1.0,
        top_p=1.0,
        top_k=50,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        min_new_tokens=0,
        use_cache=True,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos_token_ids,
        pad_token_id=eos_token_ids[0],
        prompt_lookup_num_tokens=prompt_lookup_num_tokens,
        # transformers' own fallback, set here so a model's generation_config cannot change it.
        max_matching_ngram_size=2 if prompt_lookup_num_tokens is not None else None,
    )


def assistant_settings(assistant_model: PreTrainedModel) -> dict[str, Any]:
    """Return the draft settings that assisted ``generate`` reads from ``assistant_model.generation_config``.

    ``AssistedCandidateGenerator`` takes the draft length from the assistant's
    generation_config, with transformers 5.25.0 defaults where it sets none:
    ``num_assistant_tokens=20``, ``num_assistant_tokens_schedule="constant"`` and
    ``assistant_confidence_threshold=0.4``. The threshold ends a draft early once the
    assistant's probability for its own token falls below it. The threshold adapts
    during a call only where scikit-learn is installed.
    """
    config = copy.deepcopy(assistant_model.generation_config)
    # AssistedCandidateGenerator.__init__ runs the same merge. The defaults table is a
    # private transformers method.
    config.update(**GenerationConfig._get_default_generation_params(), defaults_only=True)
    return {
        "num_assistant_tokens": config.num_assistant_tokens,
        "num_assistant_tokens_schedule": config.num_assistant_tokens_schedule,
        "assistant_confidence_threshold": config.assistant_confidence_threshold,
        "assistant_confidence_threshold_adaptive": is_sklearn_available(),
    }


def run_generate(
    model: PreTrainedModel,
    prompt_ids: list[int],
    max_new_tokens: int,
    eos_token_ids: set[int],
    assistant_model: PreTrainedModel | None = None,
    prompt_lookup_num_tokens: int | None = None,
) -> BaselineResult:
    """Decode greedily with ``model.generate`` and time it.

    Plain decoding runs when neither ``assistant_model`` nor ``prompt_lookup_num_tokens`` is
    given. Assisted generation keeps transformers' defaults for the draft length and
    records them in ``settings``. With the ``"heuristic"`` schedule, ``generate`` writes the
    adapted ``num_assistant_tokens`` back into ``assistant_model.generation_config``, so
    the next call starts from it. ``settings`` then also records the value after the call.
    """
    if not prompt_ids:
        raise ValueError("prompt_ids is empty")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if not eos_token_ids:
        raise ValueError("eos_token_ids is empty, but generate needs an end-of-sequence id, which also serves as padding")
    if assistant_model is not None and prompt_lookup_num_tokens is not None:
        # generate picks prompt lookup first and would silently ignore the assistant.
        raise ValueError("assistant_model and prompt_lookup_num_tokens are both set: pass only one of them")
    if prompt_lookup_num_tokens is not None and prompt_lookup_num_tokens < 1:
        raise ValueError(f"prompt_lookup_num_tokens must be at least 1, got {prompt_lookup_num_tokens}")

    eos_list = sorted(eos_token_ids)
    generation_config = greedy_generation_config(max_new_tokens, eos_list, prompt_lookup_num_tokens)
    settings = _settings(max_new_tokens, eos_list, assistant_model, prompt_lookup_num_tokens)

    input_ids = torch.tensor([prompt_ids], dtype=torch.long, device=model.device)
    timer = _FirstTokenTimer()
    started = time.perf_counter()
    with torch.inference_mode():
        output = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            generation_config=generation_config,
            streamer=timer,
            assistant_model=assistant_model,
        )
    total_s = time.perf_counter() - started

    if timer.first_token_at is None:
        raise RuntimeError("generate returned without streaming a new token")
    if assistant_model is not None and settings["num_assistant_tokens_schedule"] == "heuristic":
        settings["num_assistant_tokens_after"] = assistant_model.generation_config.num_assistant_tokens

    new_ids = output[0, len(prompt_ids) :].tolist()
    return BaselineResult(
        token_ids=_cut_at_eos(new_ids, eos_token_ids),
        first_token_s=timer.first_token_at - started,
        total_s=total_s,
        steps=timer.puts,
        first_step_tokens=timer.first_put_tokens,
        settings=settings,
    )


def _settings(
    max_new_tokens: int,
    eos_token_ids: list[int],
    assistant_model: PreTrainedModel | None,
    prompt_lookup_num_tokens: int | None,
) -> dict[str, Any]:
    settings: dict[str, Any] = {
        "transformers": transformers.__version__,
        "do_sample": False,
        "max_new_tokens": max_new_tokens,
        "eos_token_ids": eos_token_ids,
    }
    if assistant_model is not None:
        settings["mode"] = "assisted"
        settings.update(assistant_settings(assistant_model))
    elif prompt_lookup_num_tokens is not None:
        settings["mode"] = "prompt_lookup"
        settings["prompt_lookup_num_tokens"] = prompt_lookup_num_tokens
        settings["max_matching_ngram_size"] = 2
    else:
        settings["mode"] = "plain"
    return settings


def _cut_at_eos(token_ids: list[int], eos_token_ids: set[int]) -> list[int]:
    for index, token in enumerate(token_ids):
        if token in eos_token_ids:
            return token_ids[:index]
    return token_ids


def peak_rss_bytes() -> int:
    """Return the peak resident set size of this process so far, in bytes.

    ``ru_maxrss`` is in KiB on Linux and in bytes on macOS.
    """
    # NOTE: Linux 6.2 and later sum RSS in per-CPU batches, so this can read a few hundred
    # KiB below a current_rss_bytes() taken just before it.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def current_rss_bytes() -> int:
    """Return the resident set size of this process now, in bytes (Linux only: reads /proc/self/statm).

    The second field of ``/proc/self/statm`` is the resident size in pages.
    """
    with open("/proc/self/statm", encoding="ascii") as statm:
        resident_pages = int(statm.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE")
