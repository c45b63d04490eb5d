"""Weight-only int8 and int4 linear layers for CPU decoding, and a cache of packed weights.

Decoding one token reads every weight of the model once, so on a CPU its speed is set by
how many bytes the weights take. These layers keep the weights as 8- or 4-bit integers
and compute with torch's packed CPU kernels (``_weight_int8pack_mm`` and
``_weight_int4pack_mm_for_cpu``); activations stay in the model's dtype. On 2 AMD EPYC
(Zen 4, AVX512-BF16) cores, one row through the 1.5B Qwen target's 8960x1536 layer took
0.73 ms in int4, 0.94 ms in int8 and 1.9 ms in dense bf16.

- int8: one scale per output row, symmetric.
- int4: groups of 32 input values, each with a scale and a zero (the value that code 8
  stands for), so that w = (code - 8) * scale + zero. A GGUF Q4_K block has the same
  shape: 32-value sub-blocks with a scale and a minimum each, so ``gguf_q4_k_codes`` keeps
  their 4-bit codes exactly instead of quantizing the dequantized weights a second time.

Packing the weights of a 1.5B model takes tens of seconds; ``PackedWeightCache`` saves
the packed layers once so that later starts load them in seconds.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

WEIGHT_FORMATS = ("dense", "int8", "int4")
# Input values that share one int4 scale and zero: a GGUF Q4_K sub-block.
INT4_GROUP = 32
# torch's int4 packing interleaves output rows in blocks of 16.
_INT4_ROW_BLOCK = 16
# Bumped when the layout of saved packed weights changes.
_PACKED_FORMAT = 1


def _flatten(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    flat = x.reshape(-1, x.shape[-1])
    return flat if flat.dtype == dtype else flat.to(dtype)


class Int8Linear(torch.nn.Module):
    """A linear layer with int8 weights and one scale per output row."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("bias", bias)

    @classmethod
    def from_dense(cls, linear: torch.nn.Linear, dtype: torch.dtype) -> Int8Linear:
        weight = linear.weight.detach().float()
        scales = weight.abs().amax(dim=1).clamp(min=1e-12) / 127
        qweight = torch.round(weight / scales[:, None]).clamp(-127, 127).to(torch.int8)
        return cls(qweight, scales.to(dtype), _bias(linear, dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch._weight_int8pack_mm(_flatten(x, self.scales.dtype), self.qweight, self.scales)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int4Linear(torch.nn.Module):
    """A linear layer with 4-bit weight codes, one scale and zero per 32 inputs of a row."""

    def __init__(self, packed: torch.Tensor, scales_and_zeros: torch.Tensor, bias: torch.Tensor | None, in_features: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = packed.shape[0]
        self.register_buffer("packed", packed)
        # (in_features / 32, out_features, 2): scale and zero of each group.
        self.register_buffer("scales_and_zeros", scales_and_zeros)
        self.register_buffer("bias", bias)

    @staticmethod
    def fits(linear: torch.nn.Linear) -> bool:
        """Return True when torch's int4 kernel takes the layer's shape."""
        out_features, in_features = linear.weight.shape
        return in_features % INT4_GROUP == 0 and out_features % _INT4_ROW_BLOCK == 0

    @classmethod
    def from_codes(
        cls, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype
    ) -> Int4Linear:
        """Build from codes (out, in) in 0..15 and per-group scales and zeros (out, in / 32)."""
        packed = torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)
        scales_and_zeros = torch.stack([scales.T, zeros.T], dim=-1).to(dtype).contiguous()
        return cls(packed, scales_and_zeros, bias, codes.shape[1])

    @classmethod
    def from_dense(cls, linear: torch.nn.Linear, dtype: torch.dtype) -> Int4Linear:
        """Quantize each group of 32 weights to 16 evenly spaced levels between its minimum and maximum."""
        weight = linear.weight.detach().float()
        groups = weight.reshape(weight.shape[0], -1, INT4_GROUP)
        low = groups.amin(dim=-1)
        scales = ((groups.amax(dim=-1) - low) / 15).clamp(min=1e-12)
        codes = torch.round((groups - low[..., None]) / scales[..., None]).clamp(0, 15).reshape(weight.shape)
        return cls.from_codes(codes, scales, low + 8 * scales, _bias(linear, dtype), dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = _flatten(x, self.scales_and_zeros.dtype)
        # NOTE: this kernel's time grows with the rows: 0.73 ms for 1 row and 1.33 ms for 5
        # on an 8960x1536 layer. A verification pass so costs far more than one token, and
        # speculation over an int4 target barely pays. With float32 activations the kernel
        # is slower than a dense float32 layer.
        out = torch._weight_int4pack_mm_for_cpu(flat, self.packed, INT4_GROUP, self.scales_and_zeros)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def _bias(linear: torch.nn.Linear, dtype: torch.dtype) -> torch.Tensor | None:
    return None if linear.bias is None else linear.bias.detach().to(dtype).clone()


QUANTIZED_LINEAR = (Int8Linear, Int4Linear)


def gguf_q4_k_codes(blocks: np.ndarray, out_features: int, in_features: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split a Q4_K tensor's raw bytes into codes, scales and zeros for ``Int4Linear.from_codes``.

    Each 144-byte block holds 256 weights of one row: two float16 factors d and dmin,
    twelve bytes of 6-bit sub-block scales and minimums, and 128 bytes of 4-bit codes.
    Weight i of sub-block j is d * scale_j * code_i - dmin * min_j, so with
    scale = d * scale_j the value for code 8 is 8 * scale - dmin * min_j. The codes are
    kept as they are; scales and zeros are exact in float32.
    """
    from gguf.quants import Q4_K

    data = np.ascontiguousarray(blocks, dtype=np.uint8).reshape(-1, 144)
    d = data[:, 0:2].view(np.float16).astype(np.float32)
    dmin = data[:, 2:4].view(np.float16).astype(np.float32)
    sub_scales, sub_mins = Q4_K.get_scale_min(data[:, 4:16])
    scales = d * sub_scales.astype(np.float32)
    mins = dmin * sub_mins.astype(np.float32)
    # 32 bytes give sub-block 2c in their low nibbles and sub-block 2c + 1 in their high ones.
    quads = data[:, 16:].reshape(-1, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    codes = (quads & 0x0F).reshape(out_features, in_features)
    groups = in_features // INT4_GROUP
    scales_t = torch.from_numpy(scales.reshape(out_features, groups))
    zeros_t = torch.from_numpy((8 * scales - mins).reshape(out_features, groups))
    return torch.from_numpy(codes.astype(np.int32)), scales_t, zeros_t


@dataclass
class GgufSource:
    """The GGUF file a model was converted from, for taking its Q4_K codes as they are."""

    path: Path
    # HF module name (such as ``model.layers.0.mlp.up_proj``) -> GGUF tensor name.
    names: dict[str, str] = field(default_factory=dict)


# GGUF tensor names of the linear layers of llama-style models (Qwen2, Llama).
_GGUF_LAYER_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def gguf_module_name(gguf_name: str) -> str | None:
    """Map a GGUF tensor name (``blk.3.ffn_up.weight``) to the transformers module it fills."""
    if gguf_name == "output.weight":
        return "lm_head"
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[3] == "weight":
        for module, short in _GGUF_LAYER_NAMES.items():
            if parts[2] == short:
                return f"model.layers.{parts[1]}.{module}"
    return None


def _gguf_q4_k_tensors(path: Path) -> dict[str, tuple[np.ndarray, int, int]]:
    """Return {module name: (raw blocks, out_features, in_features)} of the Q4_K tensors in ``path``."""
    from gguf import GGMLQuantizationType, GGUFReader

    tensors = {}
    for tensor in GGUFReader(path).tensors:
        module = gguf_module_name(tensor.name)
        if module is None or tensor.tensor_type != GGMLQuantizationType.Q4_K:
            continue
        in_features, out_features = (int(n) for n in tensor.shape[:2])
        tensors[module] = (np.asarray(tensor.data), out_features, in_features)
    return tensors


@dataclass
class QuantizeReport:
    """Counts of the layers ``quantize_model`` replaced, by kind."""

    weights: str
    int4_from_gguf: int = 0
    int4_requantized: int = 0
    int8: int = 0
    dense: int = 0
    from_cache: bool = False
    seconds: float = 0.0
    exact_layers: set[str] = field(default_factory=set)
    """Layers that kept their GGUF Q4_K codes."""

    def describe(self) -> str:
        parts = [
            f"{count} {what}"
            for count, what in (
                (self.int4_from_gguf, "int4 layers with their GGUF Q4_K codes"),
                (self.int4_requantized, "int4 layers quantized from dense weights"),
                (self.int8, "int8 layers"),
                (self.dense, "dense layers"),
            )
            if count
        ]
        source = "loaded packed weights" if self.from_cache else "packed weights"
        return f"{source} in {self.seconds:.1f} s: " + ", ".join(parts)


def _linear_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {name: module for name, module in model.named_modules() if isinstance(module, (torch.nn.Linear, *QUANTIZED_LINEAR))}


def _replace(model: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _matches_dense(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, dense: torch.nn.Linear) -> bool:
    """Return True when GGUF codes reproduce the dense weights they would replace, within 1%.

    The dense weights were dequantized from the same GGUF tensor, so a mismatch means a
    layout this loader does not know, such as the row permutation some converters apply.
    """
    rebuilt = (codes.float() - 8).reshape(codes.shape[0], -1, INT4_GROUP) * scales[..., None] + zeros[..., None]
    reference = dense.weight.detach().float()
    tolerance = 0.01 * reference.abs().amax().item() + 1e-6
    return (rebuilt.reshape(reference.shape) - reference).abs().amax().item() <= tolerance


def quantize_model(model: torch.nn.Module, weights: str, gguf: GgufSource | None = None) -> QuantizeReport:
    """Replace the model's linear layers with ``weights`` (int8 or int4) layers in place.

    With ``gguf``, int4 layers stored as Q4_K there keep their codes exactly; layers the
    int4 kernel cannot take, and int4 layers stored in other GGUF formats (Q6_K, Q5_0 ...),
    become int8 from the dense weights: int8 keeps their 5 to 6 bits with little loss.
    Embeddings and norms stay dense.
    """
    if weights not in ("int8", "int4"):
        raise ValueError(f"weights must be int8 or int4, got {weights!r}")
    started = time.perf_counter()
    dtype = model.dtype
    report = QuantizeReport(weights)
    q4_k = _gguf_q4_k_tensors(gguf.path) if gguf is not None and weights == "int4" else {}
    for name, module in _linear_layers(model).items():
        if not isinstance(module, torch.nn.Linear):
            continue
        replacement: torch.nn.Module
        from_gguf = name in q4_k and q4_k[name][1:] == tuple(module.weight.shape)
        if weights == "int4" and Int4Linear.fits(module) and (gguf is None or from_gguf):
            if from_gguf:
                blocks, out_features, in_features = q4_k[name]
                codes, scales, zeros = gguf_q4_k_codes(blocks, out_features, in_features)
                if _matches_dense(codes, scales, zeros, module):
                    replacement = Int4Linear.from_codes(codes, scales, zeros, _bias(module, dtype), dtype)
                    report.int4_from_gguf += 1
                    report.exact_layers.add(name)
                else:
                    logger.warning("GGUF tensor for %s does not match the model's weights; quantizing it again", name)
                    replacement = Int4Linear.from_dense(module, dtype)
                    report.int4_requantized += 1
            else:
                replacement = Int4Linear.from_dense(module, dtype)
                report.int4_requantized += 1
        else:
            replacement = Int8Linear.from_dense(module, dtype)
            report.int8 += 1
        _replace(model, name, replacement)
    report.seconds = time.perf_counter() - started
    return report


class PackedWeightCache:
    """Packed layers of one model, saved once in a safetensors file in the cache folder.

    The file name is a digest of the model folder's weights, the format, the dtype and the
    torch version, so a changed model or an upgrade builds a new file instead of loading a
    stale one. Each layer is stored with its shape: a layer whose shape changed since (a
    draft output layer cut to a smaller vocabulary) is quantized again at load.
    """

    def __init__(self, cache_dir: Path, source: str, weights: str, dtype: torch.dtype, from_gguf: bool = False) -> None:
        self.weights = weights
        self.dtype = dtype
        key = {
            "source": str(Path(source).resolve()) if Path(source).exists() else source,
            "files": _weight_files_signature(source),
            "weights": weights,
            "dtype": str(dtype),
            "torch": torch.__version__,
            "format": _PACKED_FORMAT,
            "gguf": from_gguf,
        }
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        self.path = cache_dir / "packed" / f"{Path(source).name}-{weights}-{str(dtype).removeprefix('torch.')}-{digest}.safetensors"

    def load_into(self, model: torch.nn.Module) -> QuantizeReport | None:
        """Replace the model's layers with the saved ones; return None when nothing is saved."""
        if not self.path.is_file():
            return None
        from safetensors import safe_open

        started = time.perf_counter()
        report = QuantizeReport(self.weights, from_cache=True)
        layers = _linear_layers(model)
        with safe_open(str(self.path), framework="pt") as saved:
            index = json.loads(saved.metadata()["layers"])
            for name, entry in index.items():
                module = layers.get(name)
                if not isinstance(module, torch.nn.Linear) or list(module.weight.shape) != entry["shape"]:
                    continue
                # The int4 kernel crashed (a segmentation fault) on a tensor as read from the
                # file; a clone() in fresh memory works.
                tensors = {key: saved.get_tensor(f"{name}.{key}").clone() for key in entry["tensors"]}
                bias = tensors.get("bias")
                if entry["kind"] == "int4":
                    layer = Int4Linear(tensors["packed"], tensors["scales_and_zeros"], bias, entry["shape"][1])
                    report.int4_from_gguf += entry.get("from_gguf", False)
                    report.int4_requantized += not entry.get("from_gguf", False)
                else:
                    layer = Int8Linear(tensors["qweight"], tensors["scales"], bias)
                    report.int8 += 1
                _replace(model, name, layer)
        # Layers not in the file (or of another shape) are packed now.
        if any(isinstance(module, torch.nn.Linear) for module in _linear_layers(model).values()):
            rest = quantize_model(model, self.weights)
            report.int4_requantized += rest.int4_requantized
            report.int8 += rest.int8
        report.seconds = time.perf_counter() - started
        return report

    def save(self, model: torch.nn.Module, from_gguf: set[str]) -> None:
        """Write every packed layer of ``model``; a failed write only costs the next start time."""
        from safetensors.torch import save_file

        tensors: dict[str, torch.Tensor] = {}
        index: dict[str, dict] = {}
        for name, module in _linear_layers(model).items():
            if isinstance(module, Int4Linear):
                kind = "int4"
                own = {"packed": module.packed, "scales_and_zeros": module.scales_and_zeros}
                shape = [module.out_features, module.in_features]
            elif isinstance(module, Int8Linear):
                kind = "int8"
                own = {"qweight": module.qweight, "scales": module.scales}
                shape = list(module.qweight.shape)
            else:
                continue
            if module.bias is not None:
                own["bias"] = module.bias
            for key, tensor in own.items():
                tensors[f"{name}.{key}"] = tensor.contiguous()
            index[name] = {"kind": kind, "shape": shape, "tensors": sorted(own), "from_gguf": name in from_gguf}
        staging = self.path.with_suffix(".partial")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            save_file(tensors, str(staging), metadata={"layers": json.dumps(index)})
            staging.replace(self.path)
        except OSError as error:
            logger.warning("Could not save packed weights to %s: %s", self.path, error)
            with contextlib.suppress(OSError):
                staging.unlink(missing_ok=True)


def _weight_files_signature(source: str) -> list:
    """Name, size and modification time of each weight file in a model folder."""
    folder = Path(source)
    if not folder.is_dir():
        return []
    return sorted([f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in folder.glob("*.safetensors"))


def quantize_with_cache(
    model: torch.nn.Module, weights: str, source: str, cache_dir: Path, gguf: GgufSource | None = None
) -> QuantizeReport:
    """Quantize ``model`` (loaded from ``source``) to ``weights``, loading or saving packed layers in ``cache_dir``."""
    cache = PackedWeightCache(cache_dir, source, weights, model.dtype, gguf is not None)
    report = cache.load_into(model)
    if report is not None:
        return report
    logger.info("Packing %s weights as %s once (up to a minute); later starts load them from %s", Path(source).name, weights, cache.path.parent)
    report = quantize_model(model, weights, gguf)
    cache.save(model, report.exact_layers)
    return report
