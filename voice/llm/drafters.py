"""Drafters: what proposes the tokens that the target model verifies.

Every drafter implements ``Drafter``. The decoder calls ``start`` at the beginning of a
generation, ``propose`` before each verification pass and ``observe`` after every target
pass, with the ids the target has verified so far. Drafters never decide a token: the
target's verification does, so any drafter keeps the output exact and only changes how
many target passes it takes.

- ``ModelDrafter``: a small causal language model with the target's vocabulary, optionally
  scoring only a frequency-ranked subset of the vocabulary in its output layer and
  optionally with int8 weights in its linear layers;
- ``PromptLookupDrafter``: copies the tokens that followed the latest earlier occurrence
  of the text's last n-gram (Saxena, 2023, "Prompt Lookup Decoding"); no model at all.
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from voice.llm.adaptive import RunningAverage
from voice.llm.cache import TokenCache
from voice.llm.sampling import Sampling, distribution

logger = logging.getLogger(__name__)


@dataclass
class Proposal:
    """Draft tokens for one verification pass."""

    tokens: list[int]
    probabilities: torch.Tensor | None = None
    """Row i is the distribution (vocab,) that tokens[i] was sampled from. None means each
    token was chosen deterministically, which the acceptance test treats as a one-hot
    distribution."""
    seconds: float = 0.0
    """Time the drafter took, set by the decoder."""
    catch_up_seconds: float = 0.0
    """Part of ``seconds`` spent feeding tokens the drafter had not seen, which the
    adaptive draft length does not count as the cost of the proposed tokens."""
    catch_up_tokens: int = 0
    """How many tokens that catch-up fed."""


class Drafter:
    """Interface of everything that proposes tokens to the speculative decoder."""

    name = "drafter"
    target_forward_options: dict = {}
    """Extra keyword arguments of every target forward pass, such as
    ``output_hidden_states=True`` for a drafter that reads the target's hidden states."""

    def reset(self) -> None:
        """Forget all cached state."""

    def prefill(self, ids: list[int]) -> None:
        """Process ``ids`` ahead of time, such as the system prompt at start."""

    def start(self, prompt_ids: list[int]) -> None:
        """Prepare for a generation that continues ``prompt_ids``; keep what is still valid."""

    def propose(self, ids: list[int], k: int, sampling: Sampling, generator: torch.Generator) -> Proposal:
        """Propose up to ``k`` tokens that follow ``ids`` (all of them verified). May return none."""
        raise NotImplementedError

    def unseen_tokens(self, ids: list[int]) -> int:
        """Return how many of ``ids`` the next proposal would first have to feed (catch up on)."""
        return 0

    def observe(self, ids: list[int], target_output=None, row: int = -1) -> None:
        """Take note that the target verified ``ids``; drop any state past them.

        ``target_output`` is the target's last forward output, and ``row`` the index of the
        input position in that pass whose logits chose the token that follows ``ids``.
        """


@contextlib.contextmanager
def _torch_threads(threads: int):
    """Run the block with ``threads`` torch threads (0 leaves the setting alone)."""
    previous = torch.get_num_threads()
    if not threads or threads == previous:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class ModelDrafter(Drafter):
    """A small language model that decodes ``k`` tokens, one forward pass each.

    ``vocab_ids`` restricts the output layer to those token ids, so the draft computes
    logits for them only and can never propose another token. The 151,936-row output
    layer costs the float32 0.5B Qwen draft about a fifth of its pass on 2 AMD EPYC cores. ``threads`` sets torch's thread count while the
    draft runs (0 keeps the target's). A proposal ends early after a token whose draft
    probability is below ``min_confidence``.
    """

    name = "model"

    def __init__(
        self, model: PreTrainedModel, vocab_ids: torch.Tensor | None = None, threads: int = 0, min_confidence: float = 0.0
    ) -> None:
        self.cache = TokenCache(model)
        self.threads = threads
        self.min_confidence = min_confidence
        self._single_pass = RunningAverage()
        """Seconds of a 1-token draft pass."""
        # Width of the probability rows handed to the acceptance test: the draft's full
        # output layer, which the loader checks against the target's.
        # Quantized output layers (dynamic int8, packed int8 and int4) have no weight tensor.
        self.vocab_size = model.get_output_embeddings().out_features
        self.vocab_ids = None
        if vocab_ids is not None:
            self.vocab_ids = vocab_ids.to(torch.long)
            restrict_output_layer(model, self.vocab_ids)

    def reset(self) -> None:
        self.cache.clear()

    def prefill(self, ids: list[int]) -> None:
        self.cache.reuse_prefix(ids, keep_input=False)
        missing = ids[len(self.cache) :]
        if missing:
            with _torch_threads(self.threads):
                forward_logits(self.cache, missing, logits_to_keep=1)

    def start(self, prompt_ids: list[int]) -> None:
        self.cache.reuse_prefix(prompt_ids)

    def unseen_tokens(self, ids: list[int]) -> int:
        # The last id is fed by the first draft pass itself.
        return max(0, len(ids) - self.cache.common_prefix_length(ids) - 1)

    def propose(self, ids: list[int], k: int, sampling: Sampling, generator: torch.Generator) -> Proposal:
        tokens: list[int] = []
        rows: list[torch.Tensor] = []
        # Normally a no-op after observe(); it also keeps a call with other ids correct.
        self.cache.reuse_prefix(ids)
        pending = ids[len(self.cache) :]
        # Tokens the draft has not seen go into the first draft pass with the last one. They
        # are the new prompt, the target's token after a fully accepted proposal, or tokens
        # decoded while drafting was off. Such a pass costs little more than a 1-token pass.
        catch_up_tokens = max(0, len(pending) - 1)
        first_pass_s = 0.0
        with _torch_threads(self.threads):
            while len(tokens) < k:
                started = time.perf_counter()
                logits = forward_logits(self.cache, pending, logits_to_keep=1)[-1]
                elapsed = time.perf_counter() - started
                if len(pending) == 1:
                    self._single_pass.add(elapsed)
                else:
                    first_pass_s = elapsed
                if sampling.greedy:
                    index = int(logits.argmax())
                    confidence = float(logits.softmax(dim=-1)[index]) if self.min_confidence else 1.0
                else:
                    probabilities = distribution(logits[None], sampling)[0]
                    index = int(torch.multinomial(probabilities, 1, generator=generator))
                    rows.append(self._full_vocabulary(probabilities))
                    confidence = float(probabilities[index])
                token = index if self.vocab_ids is None else int(self.vocab_ids[index])
                tokens.append(token)
                pending = [token]
                # A token the draft itself doubts is likely rejected, and so is all that
                # would follow it: stop drafting after it.
                if confidence < self.min_confidence:
                    break
        # The first pass's time beyond a 1-token pass is the catch-up's, not a draft token's.
        catch_up_seconds = max(0.0, first_pass_s - (self._single_pass.value or 0.0)) if catch_up_tokens else 0.0
        return Proposal(tokens, torch.stack(rows) if rows else None, catch_up_seconds=catch_up_seconds, catch_up_tokens=catch_up_tokens)

    def observe(self, ids: list[int], target_output=None, row: int = -1) -> None:
        # The draft cache contains the verified ids plus every proposal but the last; keep the verified part.
        self.cache.reuse_prefix(ids, keep_input=False)

    def _full_vocabulary(self, probabilities: torch.Tensor) -> torch.Tensor:
        if self.vocab_ids is None:
            return probabilities
        full = torch.zeros(self.vocab_size, dtype=probabilities.dtype)
        full[self.vocab_ids] = probabilities
        return full


def restrict_output_layer(model: PreTrainedModel, vocab_ids: torch.Tensor) -> None:
    """Replace the model's output layer by one that scores only ``vocab_ids``, in that order.

    The new layer owns a copy of those rows, so a tied input embedding stays whole.
    """
    head = model.get_output_embeddings()
    weight = head.weight.detach()[vocab_ids].clone()
    bias = getattr(head, "bias", None)
    subset = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype)
    with torch.no_grad():
        subset.weight.copy_(weight)
        if bias is not None:
            subset.bias.copy_(bias.detach()[vocab_ids])
    model.set_output_embeddings(subset)


def quantize_linear_int8(model: PreTrainedModel) -> float:
    """Quantize every linear layer's weights to int8 in place (activations stay float); return seconds taken.

    torch's dynamic quantization keeps one scale per output row and quantizes activations
    on the fly, using fbgemm's AVX2/AVX512 kernels. Only float32 models can be quantized.
    """
    if model.dtype != torch.float32:
        raise ValueError(f"int8 weights need a float32 model, got {model.dtype}")
    started = time.perf_counter()
    # NOTE: torch 2.13 marks quantized tensors as deprecated in favour of torchao. The
    # dynamic int8 linear kernels still work, and they were the fastest int8 path measured here.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*", category=UserWarning)
        warnings.filterwarnings("ignore", message=".*torch.ao.quantization is deprecated.*", category=DeprecationWarning)
        torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)
    return time.perf_counter() - started


class PromptLookupDrafter(Drafter):
    """Proposes the continuation of the latest earlier match of the text's last n-gram.

    Answers often repeat words of the question or of earlier turns (names, numbers,
    phrases), and those repeats cost nothing to draft. ``max_ngram`` is the longest suffix
    tried, ``min_ngram`` the shortest; longer matches are tried first.
    """

    name = "prompt_lookup"

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram} and {max_ngram}")
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram

    def propose(self, ids: list[int], k: int, sampling: Sampling, generator: torch.Generator) -> Proposal:
        return Proposal(lookup_continuation(ids, k, self.max_ngram, self.min_ngram))


def lookup_continuation(ids: list[int], k: int, max_ngram: int, min_ngram: int) -> list[int]:
    """Return up to ``k`` tokens that followed the latest earlier occurrence of ``ids``' last n-gram."""
    length = len(ids)
    for size in range(min(max_ngram, length - 1), min_ngram - 1, -1):
        suffix = ids[length - size :]
        # Scan backwards from the latest possible start, which must leave at least one
        # token after the match and must not be the suffix itself.
        for start in range(length - size - 1, -1, -1):
            if ids[start : start + size] == suffix:
                follow = start + size
                return ids[follow : follow + k]
    return []


def forward_logits(cache: TokenCache, input_ids: list[int], logits_to_keep: int) -> torch.Tensor:
    """Run ``input_ids`` through the cache's model; return the last ``logits_to_keep`` rows of logits."""
    return cache.forward(input_ids, logits_to_keep).logits[0].float()
