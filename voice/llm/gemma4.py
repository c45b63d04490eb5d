"""Drafter for Gemma 4 assistant models, which predict several tokens from the target's own state.

A Gemma 4 assistant (``Gemma4AssistantForCausalLM`` or ``Gemma4UnifiedAssistantForCausalLM``
in transformers 5.25) has no KV cache and no token embedding of its own. Each of its draft
steps takes:

- an input of width ``2 * backbone_hidden_size``: the target's input embedding of the last
  token, followed by a hidden state. The first step takes the target's final (normed) hidden
  state at the position whose logits chose the last token. Later steps take the assistant's
  own ``last_hidden_state`` output, which it already projects to the target's width;
- ``shared_kv_states``: the target's keys and values of its last non-shared layer of each
  attention type (sliding and full), which every assistant layer attends to;
- one position id, the last token's position, which stays the same for all steps.

transformers drives these models in ``SinglePositionMultiTokenCandidateGenerator``
(generation/candidate_generator.py). This drafter feeds them the same inputs from the
speculative decoder's verification passes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from voice.llm.drafters import Drafter, Proposal
from voice.llm.sampling import Sampling, distribution, sample


@dataclass
class _TargetState:
    """Target hidden state and shared keys and values for the verified ``ids``, as the assistant reads them."""

    ids: list[int]
    hidden: torch.Tensor
    """Final hidden state at the last position of ``ids``, shape (1, 1, target hidden size)."""
    shared_kv: dict[str, tuple[torch.Tensor, torch.Tensor]]
    """Keys and values per attention type, cut to the positions of ``ids`` (sliding layers may
    hold only the last window of them)."""


class Gemma4AssistantDrafter(Drafter):
    """Proposes tokens with a Gemma 4 assistant that reads the target's hidden state and KV cache.

    The target must be a Gemma 4 model (``Gemma4ForCausalLM``, ``Gemma4ForConditionalGeneration``
    or a unified variant), because only those return ``shared_kv_states``.

    The final hidden state is taken by a forward hook on the target's final norm instead of
    ``output_hidden_states``. That option makes Gemma 4 run every prompt position through its
    KV-shared layers, which otherwise only see the rows that produce logits. A prefill would
    then do up to 35 / 15 times the layer work in a 35-layer model with 20 shared layers.
    ``close`` removes the hooks.
    """

    name = "gemma4_assistant"
    target_forward_options = {"return_shared_kv_states": True}

    def __init__(self, assistant: PreTrainedModel, target: PreTrainedModel) -> None:
        check_assistant_pair(assistant, target)
        self.assistant = assistant
        self.embed_tokens = target.get_input_embeddings()
        self.vocab_size = assistant.config.get_text_config().vocab_size
        self._state: _TargetState | None = None
        self._final_hidden: torch.Tensor | None = None
        self._centroid_logits: torch.Tensor | None = None
        self._hooks = [target.get_decoder().norm.register_forward_hook(self._store_final_hidden)]
        self._masked_embedding = getattr(assistant, "masked_embedding", None)
        if self._masked_embedding is not None:
            self._hooks.append(self._masked_embedding.centroids.register_forward_hook(self._store_centroid_logits))

    def close(self) -> None:
        """Remove the forward hooks from the target and the assistant."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self.reset()

    def reset(self) -> None:
        self._state = None
        self._final_hidden = None

    def observe(self, ids: list[int], target_output=None, row: int = -1) -> None:
        """Keep the target's hidden state and shared keys and values for the positions of ``ids``.

        Must run right after the target pass that produced ``target_output``, because the
        hidden state comes from the hook on the target's final norm, which Gemma 4 may have
        cut to the rows that produce logits. That is why positions are counted from the end
        of the pass (the rejected drafts) instead of from ``row``: the target's cache and the
        full-attention keys of the pass cover the verified ids, then the rejected drafts.
        Only the verified positions are kept. transformers 5.25's generator keeps one more,
        which after a rejection contains the first rejected draft's keys and values.
        """
        if target_output is None:
            # No new pass: the state stays valid only for the ids it was computed for.
            if self._state is not None and self._state.ids != ids:
                self._state = None
            return

        shared_kv = getattr(target_output, "shared_kv_states", None)
        if shared_kv is None:
            raise ValueError(
                "the target output has no shared_kv_states: run the target with "
                "Gemma4AssistantDrafter.target_forward_options"
            )
        final_hidden, self._final_hidden = self._final_hidden, None
        if final_hidden is None:
            raise ValueError(
                "no final hidden state was captured for this target pass: call observe right after "
                "each target pass, and not after close()"
            )
        if "full_attention" not in shared_kv:
            raise ValueError(f"the target's shared_kv_states has no full_attention entry, only {sorted(shared_kv)}")

        rejected = shared_kv["full_attention"][0].shape[-2] - len(ids)
        if not 0 <= rejected < final_hidden.shape[1]:
            raise ValueError(
                f"the target pass covers {shared_kv['full_attention'][0].shape[-2]} positions and "
                f"{final_hidden.shape[1]} hidden rows, which cannot end {len(ids)} verified ids"
            )
        last = final_hidden.shape[1] - 1 - rejected
        self._state = _TargetState(
            ids=list(ids),
            hidden=final_hidden[:, last : last + 1],
            shared_kv={name: _drop_last(keys, values, rejected) for name, (keys, values) in shared_kv.items()},
        )

    def propose(self, ids: list[int], k: int, sampling: Sampling, generator: torch.Generator) -> Proposal:
        """Draft up to ``k`` tokens after ``ids``, whose last id is the token the target just chose.

        Returns no tokens unless the last ``observe`` call saw a target pass over exactly
        ``ids[:-1]`` (after a ``reset``, or for ids the target has not verified).
        """
        state = self._state
        if k < 1 or state is None or len(ids) != len(state.ids) + 1 or ids[:-1] != state.ids:
            return Proposal([])

        weight = self.embed_tokens.weight
        position_ids = torch.tensor([[len(state.ids)]], dtype=torch.long, device=weight.device)
        hidden = state.hidden
        token = ids[-1]
        tokens: list[int] = []
        rows: list[torch.Tensor] = []
        with torch.inference_mode():
            for _ in range(k):
                embedding = self.embed_tokens(torch.tensor([[token]], dtype=torch.long, device=weight.device))
                output = self.assistant(
                    inputs_embeds=torch.cat([embedding, hidden.to(embedding.dtype)], dim=-1),
                    position_ids=position_ids,
                    shared_kv_states=state.shared_kv,
                    use_cache=False,
                )
                logits = self._selected_logits(output.logits[0, -1].float())
                if sampling.greedy:
                    token = int(logits.argmax())
                else:
                    probabilities = distribution(logits[None], sampling)[0]
                    token = sample(probabilities, generator)
                    rows.append(probabilities)
                tokens.append(token)
                hidden = output.last_hidden_state
        return Proposal(tokens, torch.stack(rows) if rows else None)

    def _selected_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Set the logits of tokens outside the assistant's selected centroids to -inf.

        With ``use_ordered_embeddings`` the assistant scores only the tokens of its top
        ``centroid_intermediate_top_k`` centroids and fills the rest with a placeholder one
        below their minimum. Sampled at a temperature, the 258,048 placeholder tokens of the
        default configuration (4,096 of 262,144 tokens scored) could take most of the
        probability, so they get none here.
        """
        if self._masked_embedding is None:
            return logits
        embedder = self._masked_embedding
        centroid_logits, self._centroid_logits = self._centroid_logits, None
        if centroid_logits is None:
            raise ValueError("no centroid logits were captured for this assistant pass: the drafter was closed")
        top_centroids = torch.topk(centroid_logits[0, -1], embedder.centroid_intermediate_top_k).indices
        tokens_per_centroid = embedder.token_ordering.long().view(embedder.num_centroids, -1)
        selected = tokens_per_centroid[top_centroids].reshape(-1).to(logits.device)
        restricted = torch.full_like(logits, float("-inf"))
        restricted[selected] = logits[selected]
        return restricted

    def _store_final_hidden(self, module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        self._final_hidden = output

    def _store_centroid_logits(self, module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        self._centroid_logits = output


def _drop_last(keys: torch.Tensor, values: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the last ``count`` positions of keys and values of shape (batch, heads, positions, head_dim)."""
    end = keys.shape[-2] - count
    return keys[:, :, :end], values[:, :, :end]


def check_assistant_pair(assistant: PreTrainedModel, target: PreTrainedModel) -> None:
    """Raise ValueError, naming every mismatch, unless ``assistant`` can draft for ``target``.

    The assistant must have been trained for the target's hidden size and vocabulary, and
    both models must use the same dtype. Its attention reads the target's shared keys and
    values, so each attention type needs the same head size and key/value head count.
    """
    backbone_hidden_size = getattr(assistant.config, "backbone_hidden_size", None)
    if backbone_hidden_size is None:
        raise ValueError(
            f"{type(assistant).__name__} is not a Gemma 4 assistant: its config has no backbone_hidden_size"
        )
    target_text = target.config.get_text_config()
    if not hasattr(target_text, "kv_sharing_modes"):
        raise ValueError(
            f"{type(target).__name__} cannot serve a Gemma 4 assistant: only Gemma 4 targets return shared_kv_states"
        )
    assistant_text = assistant.config.get_text_config()

    problems = []
    if backbone_hidden_size != target_text.hidden_size:
        problems.append(
            f"assistant backbone_hidden_size {backbone_hidden_size} != target hidden_size {target_text.hidden_size}"
        )
    if assistant_text.vocab_size != target_text.vocab_size:
        problems.append(
            f"assistant vocab_size {assistant_text.vocab_size} != target vocab_size {target_text.vocab_size}"
        )
    if assistant.dtype != target.dtype:
        problems.append(f"assistant dtype {assistant.dtype} != target dtype {target.dtype}")

    target_geometry = _shared_kv_geometry(target_text)
    for layer_type, assistant_shape in _attention_geometry(assistant_text).items():
        target_shape = target_geometry.get(layer_type)
        if target_shape is None:
            problems.append(f"the target shares no {layer_type} keys and values, which the assistant reads")
        elif assistant_shape != target_shape:
            problems.append(
                f"{layer_type} (head_dim, num_key_value_heads): assistant {assistant_shape} != target {target_shape}"
            )

    if problems:
        raise ValueError(
            f"{type(assistant).__name__} does not match the target {type(target).__name__}: " + "; ".join(problems)
        )


def _attention_geometry(text_config) -> dict[str, tuple[int, int]]:
    """Map each attention type of a Gemma 4 text config to (head_dim, num_key_value_heads) of its layers."""
    return {
        layer_type: _layer_geometry(text_config, index)
        for index, layer_type in enumerate(text_config.layer_types)
    }


def _shared_kv_geometry(text_config) -> dict[str, tuple[int, int]]:
    """Like ``_attention_geometry``, for the target layers whose keys and values go to ``shared_kv_states``."""
    return {
        text_config.layer_types[index]: _layer_geometry(text_config, index)
        for index, mode in enumerate(text_config.kv_sharing_modes)
        if mode == "store"
    }


def _layer_geometry(text_config, index: int) -> tuple[int, int]:
    layer = text_config.per_layer_config[index]
    return layer.head_dim, layer.num_key_value_heads
