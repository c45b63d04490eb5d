"""The native int4 and int8 kernels against a float reference, on every instruction set this CPU runs."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from voice.llm import qmatmul
from voice.llm.quant import Int4Linear, Int8Linear

pytestmark = pytest.mark.skipif(not qmatmul.available(), reason="native kernels not built (no C compiler at install)")


@pytest.fixture(params=qmatmul.supported_instruction_sets() or ["none"])
def instruction_set(request):
    best = qmatmul.supported_instruction_sets()[-1]
    qmatmul.use_instruction_set(request.param)
    yield request.param
    qmatmul.use_instruction_set(best)


def quantized_activations(x: torch.Tensor) -> torch.Tensor:
    """Return x as the kernels see it: rounded to int8 with one scale (amax / 127) per group of 32."""
    groups = x.float().reshape(x.shape[0], -1, qmatmul.GROUP)
    amax = groups.abs().amax(dim=-1, keepdim=True)
    codes = torch.round(groups * torch.where(amax > 0, 127.0 / amax, 0.0))
    return (codes * (amax / 127.0)).reshape(x.shape)


def int4_weight(layer: Int4Linear) -> torch.Tensor:
    codes = qmatmul.unpack_int4(layer.codes).double()
    block_scales = qmatmul.untile_rows(layer.block_scales).double()
    scales = qmatmul.untile_rows(layer.sub_scales).double() * block_scales.repeat_interleave(qmatmul.BLOCK // qmatmul.GROUP, dim=1)
    zeros = qmatmul.untile_rows(layer.zeros).double()
    return ((codes - 8).reshape(codes.shape[0], -1, qmatmul.GROUP) * scales[..., None]).reshape(codes.shape), zeros


def int4_reference(layer: Int4Linear, x: torch.Tensor, quantized: bool = True) -> torch.Tensor:
    """x @ W.T in float64; the zeros multiply the float activations, the codes the rounded ones."""
    steps, zeros = int4_weight(layer)
    rounded = quantized_activations(x) if quantized else x.float()
    sums = x.double().reshape(x.shape[0], -1, qmatmul.GROUP).sum(dim=-1)
    return rounded.double() @ steps.T + sums @ zeros.T + (0 if layer.bias is None else layer.bias.double())


def int8_reference(layer: Int8Linear, x: torch.Tensor, quantized: bool = True) -> torch.Tensor:
    weight = qmatmul.unpack_int8(layer.qweight).double() * layer.scales.double()[:, None]
    rounded = quantized_activations(x) if quantized else x.float()
    return rounded.double() @ weight.T + (0 if layer.bias is None else layer.bias.double())


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected).norm() / expected.norm())


# (kind, out, in): both kernels take outputs in tiles of 16 and inputs in blocks of 128.
KERNEL_SHAPES = [(kind, out_features, in_features) for kind in ("int4", "int8") for out_features, in_features in [(16, 128), (256, 1536), (48, 896)]]


@pytest.mark.parametrize(("kind", "out_features", "in_features"), KERNEL_SHAPES)
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 9, 17])
def test_kernels_match_float_reference(instruction_set, kind, out_features, in_features, rows):
    torch.manual_seed(rows)
    dense = torch.nn.Linear(in_features, out_features)
    x = torch.randn(rows, in_features)
    if kind == "int4":
        layer = Int4Linear.from_dense(dense, torch.float32, kernel="native")
        expected = int4_reference(layer, x)
    else:
        layer = Int8Linear.from_dense(dense, torch.float32, kernel="native")
        expected = int8_reference(layer, x)
    # Against the same rounded activations only float32 rounding remains.
    assert relative_error(layer(x), expected) < 1e-5
    # Rounding the activations to 8 bits per group of 32 costs about 0.5% of the result
    # for int8 weights and 1% for int4, whose codes span twice the weights' range.
    reference = int4_reference if kind == "int4" else int8_reference
    assert relative_error(layer(x), reference(layer, x, quantized=False)) < (4e-2 if kind == "int4" else 2e-2)


def test_kernel_handles_outlier_activations(instruction_set):
    # One huge value per group (as in some LLM channels) costs only its own group precision.
    torch.manual_seed(3)
    dense = torch.nn.Linear(256, 16)
    int8 = Int8Linear.from_dense(dense, torch.float32, kernel="native")
    x = torch.randn(2, 256)
    x[:, ::128] = 1000.0
    assert relative_error(int8(x), int8_reference(int8, x, quantized=False)) < 1e-2


def test_rows_bit_identical_whatever_the_batch(instruction_set):
    torch.manual_seed(4)
    dense = torch.nn.Linear(384, 64)
    for layer in (Int4Linear.from_dense(dense, torch.float32, kernel="native"), Int8Linear.from_dense(dense, torch.float32, kernel="native")):
        x = torch.randn(11, 384)
        batch = layer(x)
        for rows in range(1, 11):
            assert torch.equal(layer(x[:rows]), batch[:rows])
        # The split over threads does not change a row either.
        qmatmul.set_threads(1)
        try:
            single = layer(x)
        finally:
            qmatmul.set_threads(0)
        assert torch.equal(single, batch)


def outputs_per_instruction_set(layer: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    best = qmatmul.supported_instruction_sets()[-1]
    outputs = []
    try:
        for name in qmatmul.supported_instruction_sets():
            qmatmul.use_instruction_set(name)
            outputs.append(layer(x))
    finally:
        qmatmul.use_instruction_set(best)
    return outputs


@pytest.mark.parametrize("layer_class", [Int4Linear, Int8Linear])
def test_bit_identical_across_instruction_sets(layer_class):
    torch.manual_seed(5)
    layer = layer_class.from_dense(torch.nn.Linear(512, 32, bias=True), torch.float32, kernel="native")
    x = torch.randn(5, 512)
    outputs = outputs_per_instruction_set(layer, x)
    for output in outputs[1:]:
        assert torch.equal(output, outputs[0])


def test_bfloat16_activations_and_output():
    torch.manual_seed(6)
    dense = torch.nn.Linear(256, 16)
    layer = Int4Linear.from_dense(dense, torch.bfloat16, kernel="native")
    x = torch.randn(3, 256).bfloat16()
    out = layer(x)
    assert out.dtype == torch.bfloat16
    assert relative_error(out, int4_reference(layer, x)) < 1e-2  # bfloat16 output rounding


def test_batched_input_keeps_its_shape():
    layer = Int8Linear.from_dense(torch.nn.Linear(128, 16), torch.float32, kernel="native")
    x = torch.randn(2, 3, 128)
    out = layer(x)
    assert out.shape == (2, 3, 16)
    torch.testing.assert_close(out.reshape(6, 16), layer(x.reshape(6, 128)), rtol=0, atol=0)


def test_int4_packing_round_trip():
    codes = torch.randint(0, 16, (32, 384), dtype=torch.uint8)
    packed = qmatmul.pack_int4(codes)
    assert packed.shape == (32, 192)
    assert torch.equal(qmatmul.unpack_int4(packed), codes)


def test_int4_packing_layout():
    # Load 1 of group 0 of the first tile: byte 4r + j contains inputs 8 + j and 12 + j of row r.
    codes = torch.zeros(16, 128, dtype=torch.uint8)
    codes[3, 8 + 2] = 9  # row 3, low nibble of byte 14
    codes[3, 12 + 2] = 5  # row 3, high nibble of byte 14
    packed = qmatmul.pack_int4(codes).flatten()
    assert int(packed[64 + 4 * 3 + 2]) == 9 + (5 << 4)
    assert int(packed.sum()) == 9 + (5 << 4)


def test_int8_packing_round_trip_and_layout():
    weights = torch.randint(-128, 128, (32, 256), dtype=torch.int8)
    packed = qmatmul.pack_int8(weights)
    assert packed.dtype == torch.uint8
    assert packed.shape == (32, 256)
    assert torch.equal(qmatmul.unpack_int8(packed), weights)
    # Load 2 of group 1 of the first tile: byte 4r + j is input 32 + 8 + j of row r, plus 128.
    assert int(packed.flatten()[512 + 2 * 64 + 4 * 5 + 3]) == int(weights[5, 32 + 8 + 3]) + 128


def test_tile_rows_round_trip():
    values = torch.arange(32 * 3).reshape(32, 3)
    tiled = qmatmul.tile_rows(values)
    assert tiled[0].tolist() == [0, 3, 6]  # rows 0, 1 and 2 of column 0
    assert torch.equal(qmatmul.untile_rows(tiled), values)


def test_invalid_shape_rejected():
    weights = torch.zeros(16, 96, dtype=torch.uint8)
    with pytest.raises(ValueError, match="multiple of 128"):
        qmatmul.int8_matmul(torch.zeros(1, 96), weights, torch.ones(16), None)


def test_unknown_instruction_set_rejected():
    with pytest.raises(ValueError, match="not supported"):
        qmatmul.use_instruction_set("avx1024")


def test_route_threads_restores_torch_threads():
    model = torch.nn.Sequential(Int8Linear.from_dense(torch.nn.Linear(128, 16), torch.float32, kernel="native"))
    seen = []
    inner = model[0].forward

    def spy(x):
        seen.append((torch.get_num_threads(), qmatmul._threads))
        return inner(x)

    model[0].forward = spy
    qmatmul.route_threads(model)
    qmatmul.route_threads(model)  # a second call changes nothing
    before = torch.get_num_threads()
    model(torch.randn(1, 128))
    assert seen == [(1, before)]
    assert torch.get_num_threads() == before
    assert qmatmul._threads == 0


def test_converted_buffers_rejected():
    layer = Int4Linear.from_dense(torch.nn.Linear(128, 16), torch.float32, kernel="native")
    layer.half()  # converts the float buffers, which the kernel reads as raw memory
    with pytest.raises(TypeError, match="quantize the model after converting its dtype"):
        layer(torch.randn(1, 128))


def test_instruction_set_from_environment():
    slowest = qmatmul.supported_instruction_sets()[0]
    code = "from voice.llm import qmatmul; print(qmatmul.instruction_set())"
    env = {**os.environ, qmatmul.NATIVE_ISA_ENV: slowest}
    chosen = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert chosen.stdout.strip() == slowest
    env[qmatmul.NATIVE_ISA_ENV] = "avx1024"
    unknown = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert unknown.stdout.strip() == qmatmul.supported_instruction_sets()[-1]
