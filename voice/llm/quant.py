"""Weight-only int8 and int4 linear layers for CPU decoding, and a cache of packed weights.

Decoding one token reads every weight of the model once, so on a CPU its speed is set by
how many bytes the weights take. These layers keep the weights as 8- or 4-bit integers.
Each layer computes with one of two kernels:

- native (``voice.llm.qmatmul``, built at install): int8 activations and integer dot
  products; a verification pass of several tokens reads the weights once for all of
  them. It is the default wherever it is built and the layer's shape fits.
- torch's packed CPU kernels (``_weight_int8pack_mm``, ``_weight_int4pack_mm_for_cpu``)
  with activations in the model's dtype, whose time grows with every row.

Formats:

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
import glob
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from voice.llm import qmatmul

logger = logging.getLogger(__name__)

WEIGHT_FORMATS = ("dense", "int8", "int4")
# Input values that share one int4 scale and zero: a GGUF Q4_K sub-block.
INT4_GROUP = 32
# torch's int4 packing interleaves output rows in blocks of 16.
_INT4_ROW_BLOCK = 16
# Bumped when the layout of saved packed weights changes.
_PACKED_FORMAT = 6


def _flatten(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    flat = x.reshape(-1, x.shape[-1])
    return flat if flat.dtype == dtype else flat.to(dtype)


def _default_kernel(in_features: int, out_features: int, bits: int) -> str:
    return "native" if qmatmul.available() and qmatmul.fits(in_features, out_features, bits) else "torch"


class _PackedLinear(torch.nn.Module):
    """A linear layer whose weights live in buffers in the layout of one kernel."""

    def __init__(self, buffers: dict[str, torch.Tensor | None], in_features: int, out_features: int, kernel: str) -> None:
        super().__init__()
        if kernel not in ("native", "torch"):
            raise ValueError(f"kernel must be native or torch, got {kernel!r}")
        self.in_features = in_features
        self.out_features = out_features
        self.kernel = kernel
        for name, tensor in buffers.items():
            self.register_buffer(name, tensor)

    def packed_tensors(self) -> dict[str, torch.Tensor]:
        """Return the buffers that ``__init__`` takes back, for saving."""
        return {name: tensor for name, tensor in self.named_buffers(recurse=False) if tensor is not None}

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, kernel={self.kernel}"


class Int8Linear(_PackedLinear):
    """A linear layer with int8 weights and one scale per output row.

    Buffers of the native kernel: ``qweight`` (``qmatmul.pack_int8``), ``scales`` and
    ``bias`` float32. Of torch's ``_weight_int8pack_mm``: ``qweight`` int8, ``scales``
    and ``bias`` in the model's dtype.
    """

    @classmethod
    def from_dense(cls, linear: torch.nn.Linear, dtype: torch.dtype, kernel: str | None = None) -> Int8Linear:
        out_features, in_features = linear.weight.shape
        kernel = kernel or _default_kernel(in_features, out_features, 8)
        weight = linear.weight.detach().float()
        scales = weight.abs().amax(dim=1).clamp(min=1e-12) / 127
        qweight = torch.round(weight / scales[:, None]).clamp(-127, 127)
        if kernel == "native":
            buffers = {"qweight": qmatmul.pack_int8(qweight.to(torch.int8)), "scales": scales, "bias": _bias(linear, torch.float32)}
        else:
            buffers = {"qweight": qweight.to(torch.int8), "scales": scales.to(dtype), "bias": _bias(linear, dtype)}
        return cls(buffers, in_features, out_features, kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == "native":
            return qmatmul.int8_matmul(x, self.qweight, self.scales, self.bias)
        out = torch._weight_int8pack_mm(_flatten(x, self.scales.dtype), self.qweight, self.scales)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)


class Int4Linear(_PackedLinear):
    """A linear layer with 4-bit weight codes, one scale and zero per 32 inputs of a row.

    Buffers of the native kernel: ``codes`` (``qmatmul.pack_int4``), ``sub_scales``
    uint8 and ``zeros`` float16 per group (out, in / 32), ``block_scales`` float32 per 128
    inputs (out, in / 128), the last three in ``qmatmul.tile_rows`` order, with
    w = block_scale * sub_scale * (code - 8) + zero, and ``bias`` float32. Of torch's
    ``_weight_int4pack_mm_for_cpu``: ``packed``, ``scales_and_zeros`` (in / 32, out, 2)
    and ``bias`` in the model's dtype.
    """

    @staticmethod
    def fits(linear: torch.nn.Linear, kernel: str | None = None) -> bool:
        """Return True when ``kernel`` (by default either) takes the layer's int4 shape."""
        out_features, in_features = linear.weight.shape
        torch_fits = in_features % INT4_GROUP == 0 and out_features % _INT4_ROW_BLOCK == 0
        native_fits = qmatmul.available() and qmatmul.fits(in_features, out_features, 4)
        return {"torch": torch_fits, "native": native_fits}.get(kernel, torch_fits or native_fits)

    @classmethod
    def from_codes(
        cls,
        codes: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor,
        bias: torch.Tensor | None,
        dtype: torch.dtype,
        kernel: str | None = None,
        sub_scales: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> Int4Linear:
        """Build from codes (out, in) in 0..15 and per-group scales and zeros (out, in / 32).

        ``sub_scales`` is the exact factoring of ``scales`` that the native kernel takes:
        integer sub-scales (out, in / 32) and block scales (out, in / 128), as GGUF Q4_K
        stores them. Without it the factoring is rounded (``_factor_scales``).
        """
        out_features, in_features = codes.shape
        kernel = kernel or _default_kernel(in_features, out_features, 4)
        if kernel == "native":
            integer_scales, block_scales = sub_scales if sub_scales is not None else _factor_scales(scales)
            buffers = {
                "codes": qmatmul.pack_int4(codes),
                "sub_scales": qmatmul.tile_rows(integer_scales.to(torch.uint8)),
                "block_scales": qmatmul.tile_rows(block_scales.float()),
                # float16 keeps 11 significant bits of each zero.
                "zeros": qmatmul.tile_rows(zeros.to(torch.float16)),
                "bias": None if bias is None else bias.float().contiguous(),
            }
        else:
            buffers = {
                "packed": torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1),
                "scales_and_zeros": torch.stack([scales.T, zeros.T], dim=-1).to(dtype).contiguous(),
                "bias": None if bias is None else bias.to(dtype),
            }
        return cls(buffers, in_features, out_features, kernel)

    @classmethod
    def from_dense(cls, linear: torch.nn.Linear, dtype: torch.dtype, kernel: str | None = None) -> Int4Linear:
        """Quantize each group of 32 weights to 16 evenly spaced levels from its minimum up."""
        out_features, in_features = linear.weight.shape
        kernel = kernel or _default_kernel(in_features, out_features, 4)
        weight = linear.weight.detach().float()
        groups = weight.reshape(weight.shape[0], -1, INT4_GROUP)
        low = groups.amin(dim=-1)
        scales = ((groups.amax(dim=-1) - low) / 15).clamp(min=1e-12)
        sub_scales = None
        if kernel == "native":
            # Round the step up to what the integer sub-scales can express, so that the
            # group's range still fits in 16 levels, and start from the stored minimum.
            integer_scales, block_scales = _factor_scales(scales, round_up=True)
            scales = integer_scales * block_scales.repeat_interleave(qmatmul.BLOCK // INT4_GROUP, dim=1)
            low = low.half().float()
            sub_scales = (integer_scales, block_scales)
        codes = torch.round((groups - low[..., None]) / scales[..., None]).clamp(0, 15).reshape(weight.shape)
        return cls.from_codes(codes, scales, low + 8 * scales, _bias(linear, dtype), dtype, kernel, sub_scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == "native":
            return qmatmul.int4_matmul(x, self.codes, self.sub_scales, self.block_scales, self.zeros, self.bias)
        flat = _flatten(x, self.scales_and_zeros.dtype)
        # NOTE: torch's kernel takes longer with every row: 0.73 ms for 1 row and 1.33 ms
        # for 5 on an 8960x1536 layer, so a verification pass costs far more than one token.
        # With float32 activations it is slower than a dense float32 layer.
        out = torch._weight_int4pack_mm_for_cpu(flat, self.packed, INT4_GROUP, self.scales_and_zeros)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)


def _factor_scales(scales: torch.Tensor, round_up: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Factor per-group scales (out, in / 32) into integer sub-scales and one float per 128 inputs.

    The block scale is the block's largest scale / 255, so sub-scales use the whole uint8
    range. A group whose scale is far below its block's largest loses precision, as in
    GGUF's Q4_K. ``round_up`` rounds sub-scales up instead of to nearest.
    """
    blocks = scales.float().reshape(scales.shape[0], -1, qmatmul.BLOCK // INT4_GROUP)
    block_scales = (blocks.amax(dim=-1) / qmatmul.MAX_SUB_SCALE).clamp(min=1e-30)
    ratio = blocks / block_scales[..., None]
    integer_scales = (torch.ceil(ratio - 1e-4) if round_up else torch.round(ratio)).clamp(1, qmatmul.MAX_SUB_SCALE)
    return integer_scales.reshape(scales.shape), block_scales


def _bias(linear: torch.nn.Linear, dtype: torch.dtype) -> torch.Tensor | None:
    return None if linear.bias is None else linear.bias.detach().to(dtype).clone()


QUANTIZED_LINEAR = (Int8Linear, Int4Linear)


def uses_native_kernels(model: torch.nn.Module) -> bool:
    """Return True when any linear layer of ``model`` computes with the native kernels."""
    return any(isinstance(module, QUANTIZED_LINEAR) and module.kernel == "native" for module in model.modules())


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


def gguf_q4_k_sub_scales(blocks: np.ndarray, out_features: int, in_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return a Q4_K tensor's 6-bit sub-scales (out, in / 32) and its d per 128 inputs (out, in / 128).

    Their product is the scale ``gguf_q4_k_codes`` returns; the native int4 kernel takes
    the two factors as they are.
    """
    from gguf.quants import Q4_K

    data = np.ascontiguousarray(blocks, dtype=np.uint8).reshape(-1, 144)
    d = data[:, 0:2].view(np.float16).astype(np.float32).reshape(out_features, in_features // 256)
    sub_scales, _ = Q4_K.get_scale_min(data[:, 4:16])
    halves = 256 // qmatmul.BLOCK
    return (
        torch.from_numpy(sub_scales.astype(np.int32).reshape(out_features, in_features // INT4_GROUP)),
        torch.from_numpy(d).repeat_interleave(halves, dim=1),
    )


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


def quantize_model(
    model: torch.nn.Module, weights: str, gguf: GgufSource | None = None, kernel: str | None = None, other_formats: str = "int8"
) -> QuantizeReport:
    """Replace the model's linear layers with ``weights`` (int8 or int4) layers in place.

    With ``gguf``, int4 layers stored as Q4_K there keep their codes exactly. Layers the
    int4 kernel cannot take become int8 from the dense weights. So do int4 layers stored
    in other GGUF formats (Q6_K, Q5_0 ...) unless ``other_formats`` is int4: int8 keeps
    their 5 to 6 bits with little loss, and int4 reads fewer bytes, which suits a draft.
    Embeddings and norms stay dense. ``kernel`` (native or torch) overrides the default
    kernel, the native one wherever it is built and fits.
    """
    if weights not in ("int8", "int4"):
        raise ValueError(f"weights must be int8 or int4, got {weights!r}")
    if other_formats not in ("int8", "int4"):
        raise ValueError(f"other_formats must be int8 or int4, got {other_formats!r}")
    started = time.perf_counter()
    dtype = model.dtype
    report = QuantizeReport(weights)
    q4_k = _gguf_q4_k_tensors(gguf.path) if gguf is not None and weights == "int4" else {}
    for name, module in _linear_layers(model).items():
        if not isinstance(module, torch.nn.Linear):
            continue
        replacement: torch.nn.Module
        from_gguf = name in q4_k and q4_k[name][1:] == tuple(module.weight.shape)
        if weights == "int4" and Int4Linear.fits(module, kernel) and (gguf is None or from_gguf or other_formats == "int4"):
            if from_gguf:
                blocks, out_features, in_features = q4_k[name]
                codes, scales, zeros = gguf_q4_k_codes(blocks, out_features, in_features)
                if _matches_dense(codes, scales, zeros, module):
                    sub_scales = gguf_q4_k_sub_scales(blocks, out_features, in_features)
                    replacement = Int4Linear.from_codes(codes, scales, zeros, _bias(module, dtype), dtype, kernel, sub_scales)
                    report.int4_from_gguf += 1
                    report.exact_layers.add(name)
                else:
                    logger.warning("GGUF tensor for %s does not match the model's weights; quantizing it again", name)
                    replacement = Int4Linear.from_dense(module, dtype, kernel)
                    report.int4_requantized += 1
            else:
                replacement = Int4Linear.from_dense(module, dtype, kernel)
                report.int4_requantized += 1
        else:
            int8_kernel = kernel
            if kernel == "native" and not qmatmul.fits(module.in_features, module.out_features, 8):
                int8_kernel = "torch"  # torch's int8 kernel takes any shape
            replacement = Int8Linear.from_dense(module, dtype, int8_kernel)
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

    def __init__(
        self, cache_dir: Path, source: str, weights: str, dtype: torch.dtype, from_gguf: bool = False, other_formats: str = "int8"
    ) -> None:
        self.weights = weights
        self.dtype = dtype
        self.other_formats = other_formats
        key = {
            "source": str(Path(source).resolve()) if Path(source).exists() else source,
            "files": _weight_files_signature(source),
            "weights": weights,
            "dtype": str(dtype),
            "torch": torch.__version__,
            "format": _PACKED_FORMAT,
            "gguf": from_gguf,
            "other_formats": other_formats,
            "native_kernels": qmatmul.available(),
        }
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        self.prefix = f"{Path(source).name}-{weights}-{str(dtype).removeprefix('torch.')}-"
        self.path = cache_dir / "packed" / f"{self.prefix}f{_PACKED_FORMAT}-{digest}.safetensors"

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
                tensors.setdefault("bias", None)
                out_features, in_features = entry["shape"]
                if entry["kind"] == "int4":
                    layer = Int4Linear(tensors, in_features, out_features, entry["kernel"])
                    report.int4_from_gguf += entry.get("from_gguf", False)
                    report.int4_requantized += not entry.get("from_gguf", False)
                else:
                    layer = Int8Linear(tensors, in_features, out_features, entry["kernel"])
                    report.int8 += 1
                _replace(model, name, layer)
        # Layers not in the file (or of another shape) are packed now.
        if any(isinstance(module, torch.nn.Linear) for module in _linear_layers(model).values()):
            rest = quantize_model(model, self.weights, other_formats=self.other_formats)
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
            if not isinstance(module, QUANTIZED_LINEAR):
                continue
            own = module.packed_tensors()
            for key, tensor in own.items():
                tensors[f"{name}.{key}"] = tensor.contiguous()
            index[name] = {
                "kind": "int4" if isinstance(module, Int4Linear) else "int8",
                "kernel": module.kernel,
                "shape": [module.out_features, module.in_features],
                "tensors": sorted(own),
                "from_gguf": name in from_gguf,
            }
        staging = self.path.with_suffix(".partial")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            save_file(tensors, str(staging), metadata={"layers": json.dumps(index)})
            staging.replace(self.path)
        except OSError as error:
            logger.warning("Could not save packed weights to %s: %s", self.path, error)
            with contextlib.suppress(OSError):
                staging.unlink(missing_ok=True)
            return
        self._remove_older_formats()

    def _remove_older_formats(self) -> None:
        """Delete this model's packed files in layouts that this version no longer reads.

        Each change of layout would otherwise leave a file of up to 1.5 GB behind. Files of
        the current layout stay, also those saved with other settings (with or without the
        GGUF codes, another torch version).
        """
        current = f"{self.prefix}f{_PACKED_FORMAT}-"
        for old in self.path.parent.glob(f"{glob.escape(self.prefix)}*.safetensors"):
            if old.name.startswith(current):
                continue
            try:
                old.unlink()
                logger.info("Removed packed weights in an older layout: %s", old)
            except OSError as error:
                logger.warning("Could not remove packed weights in an older layout %s: %s", old, error)


def _weight_files_signature(source: str) -> list:
    """Name, size and modification time of each weight file in a model folder."""
    folder = Path(source)
    if not folder.is_dir():
        return []
    return sorted([f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in folder.glob("*.safetensors"))


def quantize_with_cache(
    model: torch.nn.Module, weights: str, source: str, cache_dir: Path, gguf: GgufSource | None = None, other_formats: str = "int8"
) -> QuantizeReport:
    """Quantize ``model`` (loaded from ``source``) to ``weights``, loading or saving packed layers in ``cache_dir``.

    ``gguf`` and ``other_formats`` are as in ``quantize_model``.
    """
    cache = PackedWeightCache(cache_dir, source, weights, model.dtype, gguf is not None, other_formats)
    report = cache.load_into(model)
    if report is not None:
        return report
    logger.info("Packing %s weights as %s once (up to a minute); later starts load them from %s", Path(source).name, weights, cache.path.parent)
    report = quantize_model(model, weights, gguf, other_formats=other_formats)
    cache.save(model, report.exact_layers)
    return report
