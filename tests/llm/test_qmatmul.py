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


def int4_reference(layer: Int4Linear, x: torch.Tensor) -> torch.Tensor:
    codes = qmatmul.unpack_int4(layer.codes).float()
    block_scales = qmatmul.untile_rows(layer.block_scales)
    scales = qmatmul.untile_rows(layer.sub_scales).float() * block_scales.repeat_interleave(qmatmul.BLOCK // qmatmul.GROUP, dim=1)
    mins = qmatmul.untile_rows(layer.mins).float()
    groups = codes.reshape(codes.shape[0], -1, qmatmul.GROUP) * scales[..., None] + mins[..., None]
    weight = groups.reshape(codes.shape)
    return x.float() @ weight.T + (0 if layer.bias is None else layer.bias)


def int8_reference(layer: Int8Linear, x: torch.Tensor) -> torch.Tensor:
    return x.float() @ (layer.qweight.float() * layer.scales[:, None]).T + (0 if layer.bias is None else layer.bias)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.float() - expected).norm() / expected.norm())


# (kind, out, in): the int4 kernel takes outputs in tiles of 16, the int8 kernel in blocks of 4.
KERNEL_SHAPES = [
    *[("int4", out_features, in_features) for out_features, in_features in [(16, 128), (256, 1536), (48, 896)]],
    *[("int8", out_features, in_features) for out_features, in_features in [(4, 128), (256, 1536), (36, 896)]],
]


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
    # Activations are rounded to 16 bits per block of 128 values, a few 1e-5 of the result.
    assert relative_error(layer(x), expected) < 1e-4


def test_kernel_handles_outlier_activations(instruction_set):
    # One huge value per block (as in some LLM channels) costs the others precision.
    torch.manual_seed(3)
    dense = torch.nn.Linear(256, 8)
    int8 = Int8Linear.from_dense(dense, torch.float32, kernel="native")
    x = torch.randn(2, 256)
    x[:, ::128] = 1000.0
    assert relative_error(int8(x), int8_reference(int8, x)) < 1e-3


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


def test_int4_bit_identical_across_instruction_sets():
    torch.manual_seed(5)
    layer = Int4Linear.from_dense(torch.nn.Linear(512, 32, bias=True), torch.float32, kernel="native")
    x = torch.randn(5, 512)
    outputs = outputs_per_instruction_set(layer, x)
    for output in outputs[1:]:
        assert torch.equal(output, outputs[0])


def test_int8_instruction_sets_agree():
    torch.manual_seed(5)
    layer = Int8Linear.from_dense(torch.nn.Linear(512, 32), torch.float32, kernel="native")
    x = torch.randn(5, 512)
    outputs = outputs_per_instruction_set(layer, x)
    for output in outputs[1:]:
        torch.testing.assert_close(output, outputs[0], rtol=1e-5, atol=1e-5)


def test_bfloat16_activations_and_output():
    torch.manual_seed(6)
    dense = torch.nn.Linear(256, 16)
    layer = Int4Linear.from_dense(dense, torch.bfloat16, kernel="native")
    x = torch.randn(3, 256).bfloat16()
    out = layer(x)
    assert out.dtype == torch.bfloat16
    assert relative_error(out, int4_reference(layer, x)) < 1e-2  # bfloat16 output rounding


def test_batched_input_keeps_its_shape():
    layer = Int8Linear.from_dense(torch.nn.Linear(128, 8), torch.float32, kernel="native")
    x = torch.randn(2, 3, 128)
    out = layer(x)
    assert out.shape == (2, 3, 8)
    torch.testing.assert_close(out.reshape(6, 8), layer(x.reshape(6, 128)), rtol=0, atol=0)


def test_int4_packing_round_trip():
    codes = torch.randint(0, 16, (32, 384), dtype=torch.uint8)
    packed = qmatmul.pack_int4(codes)
    assert packed.shape == (32, 192)
    assert torch.equal(qmatmul.unpack_int4(packed), codes)


def test_int4_packing_layout():
    # Load 1 of group 0 of the first tile: word w is row w // 2, nibble t input 8 + 2t + w % 2.
    codes = torch.zeros(16, 128, dtype=torch.uint8)
    codes[3, 8 + 2 * 2 + 1] = 9  # row 3, nibble 2 of word 7
    packed = qmatmul.pack_int4(codes).flatten()
    assert int(packed[64 + 2 * 7 + 1]) == 9  # bits 8 to 11 are the high byte's low nibble
    assert int(packed.sum()) == 9


def test_tile_rows_round_trip():
    values = torch.arange(32 * 3).reshape(32, 3)
    tiled = qmatmul.tile_rows(values)
    assert tiled[0].tolist() == [0, 3, 6]  # rows 0, 1 and 2 of column 0
    assert torch.equal(qmatmul.untile_rows(tiled), values)


def test_invalid_shape_rejected():
    weights = torch.zeros(4, 96, dtype=torch.int8)
    with pytest.raises(ValueError, match="multiple of 128"):
        qmatmul.int8_matmul(torch.zeros(1, 96), weights, torch.ones(4), None)


def test_unknown_instruction_set_rejected():
    with pytest.raises(ValueError, match="not supported"):
        qmatmul.use_instruction_set("avx1024")


def test_route_threads_restores_torch_threads():
    model = torch.nn.Sequential(Int8Linear.from_dense(torch.nn.Linear(128, 8), torch.float32, kernel="native"))
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
