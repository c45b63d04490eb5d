"""Python side of the native int4 and int8 matrix products in ``voice/_native/qmatmul.c``.

The C kernels quantize each activation row to int8 (one scale per 32 values) and take
integer dot products with AVX512-VNNI or AVX2, choosing the instruction set at run time.
They read each block of weights once for all the rows of a call. The weights are stored
in tiles of 16 output rows (``pack_int4``, ``pack_int8`` and ``tile_rows``), one row per
vector lane. docs/measure_kernels.py times the int4 target's passes against torch's int4
kernel. The extension is built at install when a C compiler is present. Without it ``available()`` is False and the layers in
``voice.llm.quant`` use torch's kernels.

Set ``VOICE_NATIVE_KERNELS=0`` to use torch's kernels even when the extension is built,
and ``VOICE_NATIVE_ISA`` to ``avx2`` or ``scalar`` to try a slower instruction set than the
CPU's best (for comparing machines).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
from pathlib import Path

import torch

try:
    from voice._native import qmatmul as _extension
except ImportError:  # built without a C compiler, or on another platform
    _extension = None

logger = logging.getLogger(__name__)

NATIVE_KERNELS_ENV = "VOICE_NATIVE_KERNELS"
NATIVE_ISA_ENV = "VOICE_NATIVE_ISA"
# Inputs per activation scale and int4 sub-scale, inputs per int4 block scale, and
# output rows per tile (both kernels take outputs in whole tiles).
GROUP = 32
BLOCK = 128
TILE = 16
# The largest int4 sub-scale: the kernels store sub-scales as uint8.
MAX_SUB_SCALE = 255

_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}
_threads = 0


def set_threads(threads: int) -> None:
    """Set the threads each product uses; 0 follows ``torch.get_num_threads()``."""
    global _threads
    _threads = threads


def _share_torch_openmp() -> bool:
    """Run the kernels on torch's OpenMP threads; return False where torch has no libgomp.

    The Linux wheels of torch carry libgomp in torch/lib, and loading that path again
    returns the copy torch already uses. Kernels on threads of their own competed with
    torch's OpenMP workers, which spin for a while after each op.
    """
    library = Path(torch.__file__).parent / "lib" / "libgomp.so.1"
    if _extension is None or not library.is_file():
        return False
    try:
        gomp = ctypes.CDLL(str(library))
        names = ("GOMP_parallel", "omp_get_thread_num", "omp_get_num_threads")
        addresses = [ctypes.cast(getattr(gomp, name), ctypes.c_void_p).value for name in names]
    except (OSError, AttributeError) as error:
        logger.debug("torch's libgomp not usable (%s); the native kernels start their own threads", error)
        return False
    _extension.use_openmp(*addresses)
    return True


SHARES_TORCH_THREADS = _share_torch_openmp()
if _extension is not None and os.environ.get(NATIVE_ISA_ENV):
    try:
        _extension.set_isa(os.environ[NATIVE_ISA_ENV])
    except ValueError as error:
        logger.warning("%s: %s; using %s", NATIVE_ISA_ENV, error, _extension.isa())
"""True when the kernels run on torch's OpenMP threads, so ``route_threads`` is not needed."""


def available() -> bool:
    """Return True when the native kernels are built and not switched off by the environment."""
    return _extension is not None and os.environ.get(NATIVE_KERNELS_ENV, "1") != "0"


def instruction_set() -> str:
    """Name of the instruction set the kernels use (``avx512_vnni``, ``avx2`` or ``scalar``), or ``none``."""
    return _extension.isa() if _extension is not None else "none"


def supported_instruction_sets() -> list[str]:
    """Instruction sets this CPU can run the kernels with, slowest first."""
    return list(_extension.supported_isas()) if _extension is not None else []


def use_instruction_set(name: str) -> None:
    """Make the kernels use ``name``, which must be in ``supported_instruction_sets()``."""
    if _extension is None:
        raise RuntimeError("the native kernels are not built; reinstall voice with a C compiler present")
    _extension.set_isa(name)


def fits(in_features: int, out_features: int, bits: int) -> bool:
    """Return True when the native kernel for ``bits`` (4 or 8) takes a layer of this shape."""
    if bits not in (4, 8):
        raise ValueError(f"the native kernels take 4 or 8 bits, not {bits}")
    return in_features > 0 and in_features % BLOCK == 0 and out_features > 0 and out_features % TILE == 0


def route_threads(model: torch.nn.Module) -> None:
    """Give the kernels the model's threads and keep torch's own ops on one thread.

    For kernels on their own threads (``SHARES_TORCH_THREADS`` False). While ``model``
    runs, the kernels use the thread count torch had when the forward pass began
    (``llm.threads`` or ``llm.draft_threads``), and torch runs the rest of the model on
    the calling thread. With both on 2 threads, torch's OpenMP worker kept spinning after
    each small op while the kernel's worker needed the same core. A decoding step of the
    1.5B Qwen target then took 180 ms instead of 70 ms on 2 Zen 4 cores. Calling it twice
    on one model has no further effect.
    """
    forward = model.forward
    if getattr(forward, "_routes_threads", False):
        return

    @functools.wraps(forward)
    def forward_with_threads(*args, **kwargs):
        global _threads
        threads, kernel_threads = torch.get_num_threads(), _threads
        _threads = kernel_threads or threads
        torch.set_num_threads(1)
        try:
            return forward(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)
            _threads = kernel_threads

    forward_with_threads._routes_threads = True
    model.forward = forward_with_threads


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Pack codes (out, in) in 0..15 into the kernel's tiled (out, in / 2) bytes.

    Per tile of 16 output rows and group of 32 inputs, 256 bytes are read as 4 loads of
    64 bytes. In load L, byte 4r + j holds row r's code of input 8L + j of the group in
    its low nibble and that of input 8L + 4 + j in its high nibble. So masking a load
    gives 4 adjacent inputs of all 16 rows, one row per 32-bit lane, and shifting it by 4
    the next 4.
    """
    rows, columns = codes.shape
    # (tile, row, group, load, nibble, j) -> (tile, group, load, row, j, nibble)
    nibbles = codes.to(torch.uint8).reshape(rows // TILE, TILE, columns // GROUP, 4, 2, 4).permute(0, 2, 3, 1, 5, 4)
    return (nibbles[..., 0] | (nibbles[..., 1] << 4)).reshape(rows, columns // 2).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Return the codes (out, in) that ``pack_int4`` packed."""
    rows, half = packed.shape
    grouped = packed.reshape(rows // TILE, half * 2 // GROUP, 4, TILE, 4)
    nibbles = torch.stack([grouped & 0x0F, grouped >> 4], dim=-1)
    # (tile, group, load, row, j, nibble) -> (tile, row, group, load, nibble, j)
    return nibbles.permute(0, 3, 1, 2, 5, 4).reshape(rows, half * 2).contiguous()


def pack_int8(weights: torch.Tensor) -> torch.Tensor:
    """Pack int8 weights (out, in) into the kernel's tiled (out, in) bytes, each weight + 128.

    Per tile of 16 output rows and group of 32 inputs, 512 bytes are read as 8 loads of
    64 bytes. In load L, byte 4r + j is row r's weight of input 4L + j of the group.
    """
    rows, columns = weights.shape
    offset = (weights.to(torch.int16) + 128).to(torch.uint8)
    # (tile, row, group, load, j) -> (tile, group, load, row, j)
    return offset.reshape(rows // TILE, TILE, columns // GROUP, 8, 4).permute(0, 2, 3, 1, 4).reshape(rows, columns).contiguous()


def unpack_int8(packed: torch.Tensor) -> torch.Tensor:
    """Return the int8 weights (out, in) that ``pack_int8`` packed."""
    rows, columns = packed.shape
    tiles = packed.reshape(rows // TILE, columns // GROUP, 8, TILE, 4).permute(0, 3, 1, 2, 4).reshape(rows, columns)
    return (tiles.to(torch.int16) - 128).to(torch.int8)


def tile_rows(values: torch.Tensor) -> torch.Tensor:
    """Reorder per-row values (out, n) into the kernel's tiles: the 16 rows of a tile side by side for each column."""
    rows, columns = values.shape
    return values.reshape(rows // TILE, TILE, columns).transpose(1, 2).reshape(rows, columns).contiguous()


def untile_rows(values: torch.Tensor) -> torch.Tensor:
    """Return the per-row values (out, n) that ``tile_rows`` reordered."""
    rows, columns = values.shape
    return values.reshape(rows // TILE, columns, TILE).transpose(1, 2).reshape(rows, columns).contiguous()


def _run(
    kernel,
    x: torch.Tensor,
    in_features: int,
    out_features: int,
    weights: list[torch.Tensor],
    dtypes: tuple[torch.dtype, ...],
    bias: torch.Tensor | None,
) -> torch.Tensor:
    # The C code reads raw pointers, so every tensor must be contiguous and of the dtype
    # documented below. Module.to() or .half() on a quantized model would convert the
    # float buffers, and the kernel would then read garbage.
    for tensor, dtype in zip([*weights, bias], dtypes):
        if tensor is not None and (tensor.dtype != dtype or not tensor.is_contiguous()):
            raise TypeError(
                f"native kernel buffer is {tensor.dtype} (contiguous: {tensor.is_contiguous()}), expected contiguous {dtype}; "
                "quantize the model after converting its dtype, not before"
            )
    flat = x.reshape(-1, in_features)
    if flat.dtype not in _DTYPE_CODES:
        flat = flat.float()
    flat = flat.contiguous()
    out = torch.empty(flat.shape[0], out_features, dtype=flat.dtype)
    dtype_code = _DTYPE_CODES[flat.dtype]
    kernel(
        flat.data_ptr(),
        dtype_code,
        flat.shape[0],
        in_features,
        *(tensor.data_ptr() for tensor in weights),
        out_features,
        0 if bias is None else bias.data_ptr(),
        out.data_ptr(),
        dtype_code,
        _threads or torch.get_num_threads(),
    )
    return out.reshape(*x.shape[:-1], out_features)


def int4_matmul(
    x: torch.Tensor,
    codes: torch.Tensor,
    sub_scales: torch.Tensor,
    block_scales: torch.Tensor,
    zeros: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """Return x @ W.T + bias for W = block_scale * sub_scale * (code - 8) + zero.

    - ``codes``: ``pack_int4``'s (out, in / 2) uint8.
    - ``sub_scales`` (uint8) and ``zeros`` (float16, the weight that code 8 stands for):
      one per group of 32 inputs, (out, in / 32) in ``tile_rows`` order.
    - ``block_scales``: float32, one per 128 inputs, (out, in / 128) in ``tile_rows`` order.
    - ``bias``: float32 (out) or None.

    The output has x's dtype when that is float32 or bfloat16; other dtypes compute in
    float32.
    """
    weights = [codes, sub_scales, block_scales, zeros]
    dtypes = (torch.uint8, torch.uint8, torch.float32, torch.float16, torch.float32)
    return _run(_extension.int4_matmul, x, codes.shape[1] * 2, codes.shape[0], weights, dtypes, bias)


def int8_matmul(x: torch.Tensor, weights: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Return x @ W.T + bias for W = scales[:, None] * unpack_int8(weights).

    ``weights`` is ``pack_int8``'s (out, in) uint8; ``scales`` and ``bias`` are float32 (out).
    """
    dtypes = (torch.uint8, torch.float32, torch.float32)
    return _run(_extension.int8_matmul, x, weights.shape[1], weights.shape[0], [weights, scales], dtypes, bias)
