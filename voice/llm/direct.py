"""A direct forward pass for Qwen2 and Llama models, without transformers' per-layer wrappers.

A decoding step of a small model on a CPU spends part of its time outside the weights,
because transformers builds attention masks, position embeddings, cache updates and
output objects in Python for every layer and every pass. This module runs the same
layers (the model's own linear modules, quantized or not, and its norm weights) with a
short, fixed sequence of torch calls per layer. Keys and values live in preallocated
buffers, so a rollback only changes a length. On 2 Zen 4 cores a decoding step of the
int4 1.5B target took 50 ms against 55 ms through transformers, with the same logits
(``docs/measure_forward.py``).

Where it applies: decoder-only models whose layers are Qwen2's or Llama's (RMSNorm,
rotary positions, grouped-query attention, SwiGLU), with no sliding window and rotary
frequencies that do not depend on the sequence length. ``unsupported_reason`` returns
the reason another model keeps transformers' forward pass.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM, Qwen2ForCausalLM

from voice.llm.quant import Int4Linear, Int8Linear

# Exactly these classes: a subclass may change the forward pass that this one replaces.
SUPPORTED_CLASSES = (Qwen2ForCausalLM, LlamaForCausalLM)
# Rotary variants whose frequencies are fixed at load (the scaling lives in inv_freq).
FIXED_ROPE_TYPES = ("default", "linear", "llama3")
# Passes over at most this many tokens (verification passes) attend query by query.
ROW_BY_ROW_MAX_QUERIES = 16
# Keys and values grow in steps of this many positions, so a long conversation copies
# its buffers only every few hundred tokens.
GROWTH = 256


def enabled() -> bool:
    """Return False when ``VOICE_DIRECT_FORWARD=0`` sends every model through transformers, for comparison."""
    return os.environ.get("VOICE_DIRECT_FORWARD", "1") != "0"


def applies(model: torch.nn.Module) -> bool:
    """Return True when the direct pass is enabled and runs ``model``."""
    return enabled() and unsupported_reason(model) is None


def direct_forward(model: torch.nn.Module) -> DirectForward | None:
    """Return the model's direct forward pass, built once per model, or None where it does not apply.

    Call it after the model's layers are quantized: the pass keeps the modules it finds.
    """
    if not applies(model):
        return None
    direct = getattr(model, "_voice_direct_forward", None)
    # A model whose modules were replaced since (quantized again, or given a reduced
    # output layer) gets a new pass over its current modules.
    if direct is None or direct.modules != _modules(model):
        direct = DirectForward(model)
        model._voice_direct_forward = direct
    return direct


def _modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Return the modules whose weights the direct pass reads, in a fixed order."""
    inner = model.model
    found = [inner.embed_tokens, inner.norm, model.get_output_embeddings()]
    for layer in inner.layers:
        attention, mlp = layer.self_attn, layer.mlp
        found += [layer.input_layernorm, layer.post_attention_layernorm, attention.q_proj, attention.k_proj]
        found += [attention.v_proj, attention.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj]
    return found


def unsupported_reason(model: torch.nn.Module) -> str | None:
    """Return why ``model`` needs transformers' forward pass, or None when this one runs it."""
    if type(model) not in SUPPORTED_CLASSES:
        return f"{type(model).__name__} is not one of {', '.join(c.__name__ for c in SUPPORTED_CLASSES)}"
    config = model.config
    if getattr(config, "use_sliding_window", False) and getattr(config, "sliding_window", None):
        return "sliding-window attention"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act!r}"
    if getattr(config, "mlp_bias", False):
        return "biases in the MLP"
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if rope_type not in FIXED_ROPE_TYPES:
        return f"rotary type {rope_type!r}"
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(inner, "rotary_emb"):
        return "no decoder layers where Qwen2 and Llama keep them"
    for layer in inner.layers:
        attention, mlp = layer.self_attn, layer.mlp
        if hasattr(attention, "q_norm") or not all(
            hasattr(attention, name) for name in ("q_proj", "k_proj", "v_proj", "o_proj")
        ):
            return "attention layers unlike Qwen2's"
        if not all(hasattr(mlp, name) for name in ("gate_proj", "up_proj", "down_proj")):
            return "MLP layers unlike Qwen2's"
    return None


class KeyValueBuffer:
    """Keys and values of every layer in preallocated buffers of shape (kv_heads, capacity, head_dim).

    Positions past ``length`` hold stale values that the next pass overwrites, so rolling
    back is setting ``length``.
    """

    def __init__(self, layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.keys = [torch.empty((kv_heads, 0, head_dim), dtype=dtype) for _ in range(layers)]
        self.values = [torch.empty((kv_heads, 0, head_dim), dtype=dtype) for _ in range(layers)]
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[1] if self.keys else 0

    def get_seq_length(self) -> int:
        return self.length

    def crop(self, length: int) -> None:
        """Keep the first ``length`` positions; a negative ``length`` drops that many from the end."""
        keep = self.length + length if length < 0 else length
        if not 0 <= keep <= self.length:
            raise ValueError(f"invalid crop length {length}: the buffer contains {self.length} positions")
        self.length = keep

    def reserve(self, length: int) -> None:
        """Make room for ``length`` positions, keeping the ones stored."""
        if length <= self.capacity:
            return
        capacity = -(-length // GROWTH) * GROWTH
        for buffers in (self.keys, self.values):
            for index, old in enumerate(buffers):
                new = torch.empty((old.shape[0], capacity, old.shape[2]), dtype=self.dtype)
                new[:, : self.length] = old[:, : self.length]
                buffers[index] = new


class _Layer:
    """One decoder layer's modules and weights, with q/k/v and gate/up fused where they share a kernel."""

    def __init__(self, layer: torch.nn.Module) -> None:
        attention, mlp = layer.self_attn, layer.mlp
        self.input_norm = layer.input_layernorm.weight
        self.input_eps = _epsilon(layer.input_layernorm)
        self.post_norm = layer.post_attention_layernorm.weight
        self.post_eps = _epsilon(layer.post_attention_layernorm)
        self.qkv = _fuse([attention.q_proj, attention.k_proj, attention.v_proj])
        self.o_proj = attention.o_proj
        self.gate_up = _fuse([mlp.gate_proj, mlp.up_proj])
        self.gate_size = mlp.gate_proj.out_features
        self.down_proj = mlp.down_proj


class DirectForward:
    """Runs a Qwen2 or Llama model's layers directly on a ``KeyValueBuffer``.

    Construct it after the model's linear layers are quantized: it fuses the quantized
    q/k/v and gate/up projections into one kernel call each, and keeps references to the
    modules it found.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"the direct forward pass does not run this model: {reason}")
        config = model.config
        inner = model.model
        self.modules = _modules(model)
        self.dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.scale = self.head_dim**-0.5
        self.embed = inner.embed_tokens
        self.norm = inner.norm.weight
        self.norm_eps = _epsilon(inner.norm)
        self.lm_head = model.get_output_embeddings()
        self.layers = [_Layer(layer) for layer in inner.layers]
        rotary = inner.rotary_emb
        self.inv_freq = rotary.inv_freq.detach().float()
        self.rotary_scaling = float(getattr(rotary, "attention_scaling", 1.0))
        self._cos = self._sin = torch.empty(0, self.head_dim, dtype=self.dtype)

    def new_buffer(self) -> KeyValueBuffer:
        return KeyValueBuffer(len(self.layers), self.kv_heads, self.head_dim, self.dtype)

    def _rotary_tables(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Return cos and sin of the first ``length`` positions, (length, head_dim), in the model's dtype."""
        if self._cos.shape[0] < length:
            # Computed as transformers' rotary embedding computes them, in float32, then rounded.
            positions = torch.arange(-(-length // GROWTH) * GROWTH, dtype=torch.float32)
            frequencies = positions[:, None] * self.inv_freq[None, :]
            angles = torch.cat((frequencies, frequencies), dim=-1)
            self._cos = (angles.cos() * self.rotary_scaling).to(self.dtype)
            sin = (angles.sin() * self.rotary_scaling).to(self.dtype)
            # The first half negated: x * cos + roll(x) * sin then equals transformers'
            # x * cos + cat(-x2, x1) * sin exactly, in one op fewer.
            half = self.head_dim // 2
            self._sin = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)
        return self._cos, self._sin

    @torch.inference_mode()
    def __call__(self, input_ids: list[int], kv: KeyValueBuffer, logits_to_keep: int) -> torch.Tensor:
        """Run ``input_ids`` after the ``kv.length`` cached positions; return logits (logits_to_keep, vocab)."""
        count = len(input_ids)
        start = kv.length
        end = start + count
        kv.reserve(end)
        cos_table, sin_table = self._rotary_tables(end)
        cos = cos_table[start:end][None]  # (1, count, head_dim), broadcast over heads
        sin = sin_table[start:end][None]
        # One query attends to every cached position; a prefill needs the causal mask.
        mask = None
        if count > ROW_BY_ROW_MAX_QUERIES:
            mask = torch.ones(count, end, dtype=torch.bool).tril(diagonal=start)

        hidden = self.embed(torch.tensor(input_ids, dtype=torch.long))
        q_size = self.heads * self.head_dim
        qk_size = q_size + self.kv_heads * self.head_dim
        half = self.head_dim // 2
        for index, layer in enumerate(self.layers):
            x = _rms_norm(hidden, layer.input_norm, layer.input_eps)
            if isinstance(layer.qkv, list):
                q, k, v = (projection(x) for projection in layer.qkv)
                qk = torch.cat((q, k), dim=-1)
            else:
                qkv = layer.qkv(x)
                qk, v = qkv[:, :qk_size], qkv[:, qk_size:]
            # Queries and keys rotate together: (heads + kv_heads, count, head_dim).
            qk = qk.view(count, -1, self.head_dim).transpose(0, 1)
            qk = qk * cos + qk.roll(half, dims=-1) * sin
            q, k = qk[: self.heads], qk[self.heads :]

            keys, values = kv.keys[index], kv.values[index]
            keys[:, start:end] = k
            values[:, start:end] = v.view(count, self.kv_heads, self.head_dim).transpose(0, 1)
            attended = self._attention(q, keys, values, start, mask)
            hidden = hidden + layer.o_proj(attended.transpose(0, 1).reshape(count, q_size))

            x = _rms_norm(hidden, layer.post_norm, layer.post_eps)
            if isinstance(layer.gate_up, list):
                gate, up = (projection(x) for projection in layer.gate_up)
            else:
                gate, up = layer.gate_up(x).split([layer.gate_size, layer.gate_size], dim=-1)
            hidden = hidden + layer.down_proj(F.silu(gate) * up)

        kv.length = end
        hidden = _rms_norm(hidden[-logits_to_keep:], self.norm, self.norm_eps)
        return self.lm_head(hidden)

    def _attention(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int, mask: torch.Tensor | None) -> torch.Tensor:
        """Attend queries q (heads, count, head_dim) at positions start.. to the cached keys and values.

        A verification pass attends query by query, each as a 1-token pass would. The
        masked kernel for several queries sums in another order, and on the int4 1.5B Qwen
        target its logits differed from 1-token passes by up to 0.004 in float32 and 0.2 in
        bfloat16. With the native kernels the rest of the pass gives a row the same values
        whatever the number of rows, so each verified token is exactly the one plain
        decoding would choose. Longer passes (prefills) use the masked kernel.
        """
        count = q.shape[1]
        gqa = self.kv_heads != self.heads
        if count == 1 or count > ROW_BY_ROW_MAX_QUERIES:
            end = start + count
            out = F.scaled_dot_product_attention(
                q[None], keys[None, :, :end], values[None, :, :end], attn_mask=mask, scale=self.scale, enable_gqa=gqa
            )
            return out[0]
        rows = [
            F.scaled_dot_product_attention(
                q[None, :, row : row + 1], keys[None, :, : start + row + 1], values[None, :, : start + row + 1], scale=self.scale, enable_gqa=gqa
            )[0]
            for row in range(count)
        ]
        return torch.cat(rows, dim=1)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # As transformers' Qwen2 and Llama norms: normalize in float32, round, then scale.
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


def _epsilon(norm: torch.nn.Module) -> float:
    return float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))


def _fuse(modules: list[torch.nn.Module]) -> torch.nn.Module | list[torch.nn.Module]:
    """Concatenate layers that read the same input into one along their outputs, where the kernel allows.

    Native-kernel int4 and int8 layers store every buffer in whole tiles of 16 output
    rows, so their buffers stack. The layers' own buffers become views of the fused ones,
    so fusing takes no extra memory and the model's modules still work. Other layers stay
    a list and run one by one.
    """
    first = modules[0]
    kinds = {(type(m), getattr(m, "kernel", None)) for m in modules}
    if len(kinds) != 1 or type(first) not in (Int4Linear, Int8Linear) or first.kernel != "native":
        return list(modules)
    if len({m.in_features for m in modules}) != 1:
        return list(modules)
    # _buffers also lists the buffers set to None, such as a missing bias.
    names = list(dict.fromkeys(name for m in modules for name in m._buffers))
    buffers = {}
    for name in names:
        parts = [m._buffers.get(name) for m in modules]
        if all(part is None for part in parts):
            buffers[name] = None
            continue
        # Some layers have a bias and others not: give the others zeros.
        parts = [part if part is not None else torch.zeros(m.out_features, dtype=torch.float32) for part, m in zip(parts, modules)]
        buffers[name] = torch.cat(parts, dim=0).contiguous()
    for name, fused in buffers.items():
        if fused is None:
            continue
        offset = 0
        for module in modules:
            # Rows [offset, offset + out) of a row-major buffer are a contiguous view.
            module._buffers[name] = fused[offset : offset + module.out_features]
            offset += module.out_features
    return type(first)(buffers, first.in_features, sum(m.out_features for m in modules), "native")
