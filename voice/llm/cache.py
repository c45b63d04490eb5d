"""A model's KV cache together with the token ids it covers, so it can be rolled back and reused."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from transformers import DynamicCache, PreTrainedModel

from voice.llm import direct


class TokenCache:
    """KV cache of one model plus the ids of the tokens whose keys and values it holds.

    Invariant: ``self.kv.get_seq_length() == len(self.ids)``. Tokens past ``ids`` that the
    decoder knows but has not fed yet are the model's pending tokens.

    Qwen2 and Llama models run through ``voice.llm.direct`` with a preallocated
    ``KeyValueBuffer``; other models through transformers with a ``DynamicCache``.
    """

    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model
        self._direct = None
        # The direct pass is built at the first forward pass, after the loader has
        # quantized the model's layers. Until then a model that takes it has no cache.
        self.kv = None if direct.applies(model) else _new_cache(model)
        self.ids: list[int] = []

    def __len__(self) -> int:
        return len(self.ids)

    def rollback(self, length: int) -> None:
        """Drop every cached position at or after ``length``."""
        removed = len(self.ids) - length
        if removed < 0:
            raise ValueError(f"cannot roll back to {length}: the cache contains only {len(self.ids)} tokens")
        limit = self._rollback_limit()
        if limit is not None and removed > limit:
            # A full sliding-window layer keeps only its window plus the positions fed
            # since its last crop, so it cannot go back further. Start over: the caller
            # feeds ids[len(self):] again, as for any prompt the cache does not contain.
            self.clear()
            return
        if removed and self.kv is not None:
            # transformers 5 takes the number of positions to remove, as a negative count.
            self.kv.crop(-removed)
            del self.ids[length:]

    @torch.inference_mode()
    def forward(self, input_ids: list[int], logits_to_keep: int, **options):
        """Run ``input_ids`` through the model on top of the cache; return the model output.

        The output keeps the logits (1, logits_to_keep, vocab) of the last positions.
        ``options`` are extra keyword arguments of transformers' forward pass; a model that
        runs the direct pass takes none.
        """
        if self.kv is None:
            # Options (such as hidden states for a drafter) need transformers' output.
            self._direct = None if options else direct.direct_forward(self.model)
            self.kv = self._direct.new_buffer() if self._direct is not None else _new_cache(self.model)
        if self._direct is not None:
            if options:
                raise ValueError(f"the direct forward pass takes no options, got {sorted(options)}")
            # A pass that fails midway leaves the length unchanged: the keys and values it
            # wrote lie past the end and the next pass overwrites them.
            logits = self._direct(input_ids, self.kv, logits_to_keep)
            self.ids.extend(input_ids)
            return SimpleNamespace(logits=logits[None])
        output = self.model(
            input_ids=torch.tensor([input_ids], dtype=torch.long),
            cache=self.kv,
            use_cache=True,
            logits_to_keep=logits_to_keep,
            **options,
        )
        self.ids.extend(input_ids)
        return output

    def reuse_prefix(self, ids: list[int], keep_input: bool = True) -> None:
        """Keep the longest cached prefix of ``ids`` and drop the rest.

        A new turn of a conversation repeats the whole history, so only the new tokens
        need a forward pass. With ``keep_input``, at least one token of ``ids`` stays
        unfed, because the next forward pass needs an input to produce logits from.
        """
        self.rollback(min(self.common_prefix_length(ids), len(ids) - 1 if keep_input else len(ids)))

    def common_prefix_length(self, ids: list[int]) -> int:
        """Return how many leading ``ids`` the cache contains already."""
        limit = min(len(self.ids), len(ids))
        common = 0
        while common < limit and self.ids[common] == ids[common]:
            common += 1
        return common

    def _rollback_limit(self) -> int | None:
        """Return how many positions every full sliding-window layer can still remove, or None without such layers."""
        limits = [
            layer.keys.shape[-2] - (layer.sliding_window - 1)
            for layer in getattr(self.kv, "layers", ())
            if getattr(layer, "is_sliding", False)
            and layer.is_initialized
            and layer.get_seq_length() >= layer.sliding_window
        ]
        return min(limits) if limits else None

    def clear(self) -> None:
        if self._direct is not None:
            self.kv = self._direct.new_buffer()
        elif self.kv is not None:
            self.kv = _new_cache(self.model)
        self.ids = []


# NOTE: with past recording on, a sliding-window layer shrinks back to its window only
# when crop() runs on a rollback. Long runs of fully accepted or plain steps let it grow
# past the window, costing memory and copy time. Qwen 2.5 has no such layers; Gemma has.
def _new_cache(model: PreTrainedModel) -> DynamicCache:
    cache = DynamicCache(config=model.config)
    # Sliding-window layers (Gemma, Mistral) can be cropped after they reach their window
    # only while they record past states; other layers ignore the setting.
    cache.activate_past_recording()
    return cache
