"""int8 and int4 weight layers: accuracy, GGUF Q4_K codes kept exactly, the packed cache, exact speculation."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import Q4_K

from tests.llm.tiny_models import perturbed_copy, tiny_qwen2
from voice.llm import qmatmul
from voice.llm.drafters import ModelDrafter
from voice.llm.quant import (
    GgufSource,
    Int4Linear,
    Int8Linear,
    PackedWeightCache,
    gguf_module_name,
    gguf_q4_k_codes,
    gguf_q4_k_sub_scales,
    quantize_model,
    quantize_with_cache,
)
from voice.llm.speculative import SpeculativeDecoder

NO_EOS: set[int] = set()
PROMPTS = [[1, 2, 3], [5, 17, 33, 2, 9, 41], [60, 61, 62, 63, 64, 65, 66, 67, 68, 69, 70]]


def decode(decoder: SpeculativeDecoder, prompt: list[int], max_new_tokens: int, speculative: bool = True) -> list[int]:
    return [token for step in decoder.generate(prompt, max_new_tokens, speculative=speculative) for token in step]


def random_q4_k_blocks(rows: int, columns: int, seed: int) -> np.ndarray:
    """Raw Q4_K bytes (rows, columns / 256 * 144) with random codes, sub-scales and sane float16 factors."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(rows * columns // 256, 144), dtype=np.uint8)
    blocks[:, 0:2] = np.full(len(blocks), 0.002, dtype=np.float16).view(np.uint8).reshape(-1, 2)
    blocks[:, 2:4] = np.full(len(blocks), 0.001, dtype=np.float16).view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, -1)


KERNELS = ["torch", pytest.param("native", marks=pytest.mark.skipif(not qmatmul.available(), reason="native kernels not built"))]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("layer", "bound"), [(Int8Linear, 0.01), (Int4Linear, 0.12)])
def test_quantized_layer_close_to_dense(layer, bound, dtype, kernel):
    torch.manual_seed(0)
    dense = torch.nn.Linear(256, 64, bias=True)
    quantized = layer.from_dense(dense, dtype, kernel=kernel)
    assert quantized.kernel == kernel
    x = torch.randn(5, 256)
    with torch.no_grad():
        expected = dense(x)
    actual = quantized(x.to(dtype)).float()
    assert actual.shape == expected.shape
    # Relative error of the whole product: 8 bits of the row's range, 4 bits of each group's.
    error = float((actual - expected).norm() / expected.norm())
    assert error < bound
    # Batched and flat inputs give the same rows.
    torch.testing.assert_close(quantized(x.to(dtype)[None]).float()[0], actual)


def test_int4_fits_only_supported_shapes():
    # torch's kernel: inputs a multiple of 32, outputs of 16.
    assert Int4Linear.fits(torch.nn.Linear(64, 32))
    assert not Int4Linear.fits(torch.nn.Linear(48, 32))
    # The native kernels: inputs a multiple of 128, outputs of 16.
    assert qmatmul.fits(128, 16, 4)
    assert not qmatmul.fits(64, 16, 4)
    assert not qmatmul.fits(128, 20, 4)
    assert qmatmul.fits(128, 32, 8)
    assert not qmatmul.fits(128, 20, 8)
    assert Int4Linear.fits(torch.nn.Linear(128, 48)) == qmatmul.available()
    assert Int4Linear.fits(torch.nn.Linear(128, 20), kernel="native") is False
    assert not Int4Linear.fits(torch.nn.Linear(64, 24))


def test_q4_k_codes_reproduce_gguf_dequantization():
    blocks = random_q4_k_blocks(rows=32, columns=512, seed=1)
    codes, scales, zeros = gguf_q4_k_codes(blocks, 32, 512)
    assert int(codes.min()) >= 0
    assert int(codes.max()) <= 15
    rebuilt = (codes.float() - 8).reshape(32, -1, 32) * scales[..., None] + zeros[..., None]
    expected = torch.from_numpy(Q4_K.dequantize_blocks(blocks.reshape(-1, 144)).reshape(32, 512))
    torch.testing.assert_close(rebuilt.reshape(32, 512), expected, rtol=0, atol=1e-6)
    # The two factors of each scale are Q4_K's own.
    sub_scales, block_scales = gguf_q4_k_sub_scales(blocks, 32, 512)
    assert int(sub_scales.max()) <= 63
    torch.testing.assert_close(sub_scales * block_scales.repeat_interleave(4, dim=1), scales, rtol=0, atol=0)
    # And through the torch kernel with float32 activations.
    layer = Int4Linear.from_codes(codes, scales, zeros, None, torch.float32, kernel="torch")
    x = torch.randn(3, 512)
    torch.testing.assert_close(layer(x), x @ expected.T, rtol=1e-4, atol=1e-4)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).norm() / expected.norm())


def int8_exact_inputs(rows: int, columns: int) -> torch.Tensor:
    """Multiples of 1/128 whose groups of 32 each reach 127/128: the native kernels round them to int8 without loss."""
    x = torch.randint(-127, 128, (rows, columns)).float()
    x[:, :: qmatmul.GROUP] = 127.0
    return x / 128


@pytest.mark.skipif(not qmatmul.available(), reason="native kernels not built")
def test_q4_k_codes_through_native_kernel():
    blocks = random_q4_k_blocks(rows=32, columns=512, seed=2)
    codes, scales, zeros = gguf_q4_k_codes(blocks, 32, 512)
    layer = Int4Linear.from_codes(codes, scales, zeros, None, torch.float32, kernel="native", sub_scales=gguf_q4_k_sub_scales(blocks, 32, 512))
    expected = torch.from_numpy(Q4_K.dequantize_blocks(blocks.reshape(-1, 144)).reshape(32, 512))
    assert torch.equal(qmatmul.unpack_int4(layer.codes), codes.to(torch.uint8))
    # The kernel rounds each group's zero (the weight code 8 stands for) to float16. That
    # is its only change to the Q4_K weights, and these inputs round to int8 exactly.
    rounded = (codes.float() - 8).reshape(32, -1, 32) * scales[..., None] + zeros.half().float()[..., None]
    x = int8_exact_inputs(3, 512)
    torch.testing.assert_close(layer(x), x @ rounded.reshape(32, 512).T, rtol=1e-5, atol=1e-5)
    assert relative_error(x @ rounded.reshape(32, 512).T, x @ expected.T) < 1e-3


@pytest.mark.parametrize(
    ("gguf_name", "module"),
    [
        ("blk.3.ffn_up.weight", "model.layers.3.mlp.up_proj"),
        ("blk.0.attn_output.weight", "model.layers.0.self_attn.o_proj"),
        ("output.weight", "lm_head"),
        ("blk.0.attn_q.bias", None),
        ("token_embd.weight", None),
    ],
)
def test_gguf_module_names(gguf_name, module):
    assert gguf_module_name(gguf_name) == module


def write_gguf(path, tensors: dict[str, np.ndarray]) -> None:
    writer = GGUFWriter(str(path), "qwen2")
    for name, blocks in tensors.items():
        writer.add_tensor(name, blocks, raw_dtype=GGMLQuantizationType.Q4_K)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def tiny_with_gguf_layer(tmp_path, seed: int):
    """A tiny Qwen2 whose first up-projection contains dequantized Q4_K weights, and a GGUF file with that tensor."""
    model = tiny_qwen2(seed)
    blocks = random_q4_k_blocks(rows=64, columns=256, seed=seed)
    # The tiny model's up-projection is 64 x 32; a wider one holds a whole 256-value block.
    wide = torch.nn.Linear(256, 64, bias=False)
    with torch.no_grad():
        wide.weight.copy_(torch.from_numpy(Q4_K.dequantize_blocks(blocks.reshape(-1, 144)).reshape(64, 256)))
    model.model.layers[0].mlp.up_proj = wide
    model.model.layers[0].mlp.down_proj = torch.nn.Linear(64, 32, bias=False)
    model.model.layers[0].mlp.gate_proj = torch.nn.Linear(32, 64, bias=False)
    path = tmp_path / "tiny.gguf"
    write_gguf(path, {"blk.0.ffn_up.weight": blocks})
    return model, path, wide.weight.detach().clone()


def test_gguf_q4_k_layer_keeps_its_codes(tmp_path):
    model, path, dense = tiny_with_gguf_layer(tmp_path, seed=50)
    report = quantize_model(model, "int4", GgufSource(path))
    assert report.int4_from_gguf == 1
    assert report.exact_layers == {"model.layers.0.mlp.up_proj"}
    layer = model.model.layers[0].mlp.up_proj
    assert isinstance(layer, Int4Linear)
    x = int8_exact_inputs(2, 256)
    # float16 zeros are the only rounding (see test_q4_k_codes_through_native_kernel).
    assert relative_error(layer(x), x @ dense.T) < 1e-3
    assert not any(type(module) is torch.nn.Linear for module in model.modules())


def test_mismatched_gguf_tensor_requantized(tmp_path, caplog):
    model, path, _ = tiny_with_gguf_layer(tmp_path, seed=51)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.mul_(-1)  # what a permuting converter would do
    report = quantize_model(model, "int4", GgufSource(path))
    assert report.int4_from_gguf == 0
    assert report.int4_requantized >= 1
    assert "does not match" in caplog.text


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_packed_cache_round_trip(tmp_path, weights):
    source = tmp_path / "model"
    source.mkdir()
    original = tiny_qwen2(seed=52)
    fresh = perturbed_copy(original, 0.0, seed=0)
    ids = torch.tensor([PROMPTS[1]])
    first = quantize_with_cache(original, weights, str(source), tmp_path)
    assert not first.from_cache
    cache = PackedWeightCache(tmp_path, str(source), weights, torch.float32)
    assert cache.path.is_file()
    second = quantize_with_cache(fresh, weights, str(source), tmp_path)
    assert second.from_cache
    with torch.inference_mode():
        torch.testing.assert_close(fresh(input_ids=ids).logits, original(input_ids=ids).logits, rtol=0, atol=0)
    # Another format or dtype never reads this file.
    other = "int4" if weights == "int8" else "int8"
    assert PackedWeightCache(tmp_path, str(source), other, torch.float32).path != cache.path
    assert PackedWeightCache(tmp_path, str(source), weights, torch.bfloat16).path != cache.path


def test_packed_cache_removes_older_layouts(tmp_path):
    source = tmp_path / "model"
    source.mkdir()
    cache = PackedWeightCache(tmp_path, str(source), "int8", torch.float32)
    cache.path.parent.mkdir(parents=True)
    older = cache.path.parent / f"{cache.prefix}0123456789abcdef.safetensors"
    sibling = cache.path.parent / cache.path.name.replace(cache.path.stem[-16:], "fedcba9876543210")
    other_dtype = cache.path.parent / "model-int8-bfloat16-0123456789abcdef.safetensors"
    for path in (older, sibling, other_dtype):
        path.write_bytes(b"old")
    quantize_with_cache(tiny_qwen2(seed=57), "int8", str(source), tmp_path)
    assert cache.path.is_file()
    assert not older.exists()  # an older layout of the same model, format and dtype
    assert sibling.exists()  # the current layout with other settings
    assert other_dtype.exists()


def test_packed_cache_repacks_a_layer_whose_shape_changed(tmp_path):
    source = tmp_path / "model"
    source.mkdir()
    quantize_with_cache(tiny_qwen2(seed=53), "int4", str(source), tmp_path)
    draft = tiny_qwen2(seed=53)
    # A draft whose output layer was cut to 48 tokens, as the reduced vocabulary does.
    ModelDrafter(draft, torch.arange(0, 96, 2))
    report = quantize_with_cache(draft, "int4", str(source), tmp_path)
    assert report.from_cache
    assert draft.lm_head.out_features == 48
    assert isinstance(draft.lm_head, Int4Linear)


def test_cache_folder_that_cannot_be_written_only_warns(tmp_path, caplog):
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the cache folder should be")
    model = tiny_qwen2(seed=54)
    report = quantize_with_cache(model, "int8", "tiny", blocked)
    assert report.int8 > 0
    assert "Could not save packed weights" in caplog.text


@pytest.mark.parametrize("target_weights", ["int8", "int4"])
@pytest.mark.parametrize("draft_weights", ["dense", "int4"])
def test_speculation_exact_with_quantized_weights(target_weights, draft_weights):
    target = tiny_qwen2(seed=55)
    draft = perturbed_copy(target, 0.1, seed=56)
    quantize_model(target, target_weights)
    if draft_weights != "dense":
        quantize_model(draft, draft_weights)
    decoder = SpeculativeDecoder(target, ModelDrafter(draft), NO_EOS, draft_tokens=4, adaptive=False)
    plain = SpeculativeDecoder(target, None, NO_EOS)
    for prompt in PROMPTS:
        assert decode(decoder, prompt, 25) == decode(plain, prompt, 25, speculative=False)
    assert decoder.stats.accepted > 0


@pytest.mark.parametrize(
    ("setting", "dtype", "native", "expected"),
    [
        ("auto", torch.bfloat16, False, "int4"),
        ("auto", torch.float32, False, "dense"),
        ("auto", torch.float32, True, "int4"),
        ("int8", torch.bfloat16, True, "int8"),
        ("dense", torch.bfloat16, True, "dense"),
    ],
)
def test_target_weights_auto(setting, dtype, native, expected, monkeypatch):
    from voice.llm.loading import resolve_target_weights

    if native and qmatmul.instruction_set() in ("none", "scalar"):
        pytest.skip("no fast native kernel on this CPU")
    if not native:
        monkeypatch.setenv(qmatmul.NATIVE_KERNELS_ENV, "0")
    assert resolve_target_weights(setting, dtype) == expected


@pytest.mark.parametrize(
    ("setting", "native", "expected"),
    [("auto", True, "int4"), ("auto", False, "int8"), ("int8", True, "int8"), ("dense", True, "dense")],
)
def test_draft_weights_auto(setting, native, expected, monkeypatch):
    from voice.llm.loading import resolve_draft_weights

    if native and qmatmul.instruction_set() in ("none", "scalar"):
        pytest.skip("no fast native kernel on this CPU")
    if not native:
        monkeypatch.setenv(qmatmul.NATIVE_KERNELS_ENV, "0")
    assert resolve_draft_weights(setting) == expected


def test_int4_draft_packs_other_gguf_formats_as_int4(tmp_path):
    # One layer is stored as Q4_K: the target packs the others as int8, a draft as int4.
    target, path, _ = tiny_with_gguf_layer(tmp_path, seed=71)
    draft = copy.deepcopy(target)
    target_report = quantize_model(target, "int4", GgufSource(path))
    draft_report = quantize_model(draft, "int4", GgufSource(path), other_formats="int4")
    assert target_report.int4_from_gguf == 1
    assert draft_report.int4_from_gguf == 1
    assert target_report.int8 > 0
    assert draft_report.int4_requantized == target_report.int8
    assert draft_report.int8 == 0
