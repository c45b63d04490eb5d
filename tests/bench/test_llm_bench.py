"""``voice bench llm`` end to end on tiny random models with the real Qwen tokenizer and chat template."""

from __future__ import annotations

import json

import pytest
import torch

from tests.llm.tiny_models import perturbed_copy, tiny_qwen2
from voice.bench import llm as bench_llm
from voice.cli import main
from voice.config import Config
from voice.llm.kernels import use_skinny_linear
from voice.llm.loading import LoadedModels


@pytest.mark.slow
def test_benchmark_report_has_every_figure(qwen_tokenizer, tmp_path):
    vocab_size = len(qwen_tokenizer)
    target = tiny_qwen2(seed=70, vocab_size=vocab_size)
    use_skinny_linear(target)
    draft = perturbed_copy(target, 0.05, seed=71)
    models = LoadedModels(qwen_tokenizer, target, draft)
    prompts = bench_llm.select_prompts(2)
    vocab_ids = torch.arange(0, vocab_size, 2)
    lines: list[str] = []
    config = Config()
    config.llm.target = "tiny"  # no embedded GGUF file: int4 layers are quantized from the dense weights
    # The tiny draft costs as much as the tiny target, so the adaptive length would never
    # draft, and the acceptance figures need drafts.
    config.llm.adaptive_draft = False
    report = bench_llm.run_benchmark(
        models, config, list(bench_llm.ALL_MODES), prompts, 6, vocab_ids, lines.append, weights=("dense", "int4"), cache=tmp_path
    )

    all_modes = [*bench_llm.ALL_MODES, "plain@int4", "draft@int4"]
    assert len(lines) == 2
    assert set(report["modes"]) == set(all_modes)
    for mode, row in report["modes"].items():
        assert row["tokens_per_s_median"] and row["tokens_per_s_median"] > 0, mode
        assert row["first_token_ms_median"] > 0, mode
        assert row["identical_greedy"] == 1.0, mode
    assert report["modes"]["draft"]["acceptance_rate"] is not None
    assert sum(report["modes"]["draft"]["accepted_length_histogram"]) > 0
    assert report["best_mode"] in ("draft", "draft-int8-vocab", "lookup")
    assert report["speedup_vs_plain"] > 0
    assert report["speedup_vs_transformers"] > 0
    assert report["identical_greedy"] == 1.0
    assert report["memory"]["peak_rss_bytes"] > 0
    assert report["machine"]["cores"] >= 1
    assert len(report["runs"]) == 2 * len(all_modes)
    # Quantized modes are compared with plain decoding in the same format.
    assert report["modes"]["draft@int4"]["baseline"] == "plain@int4"
    assert report["speedup_by_weights"]["int4"] > 0
    assert report["best_configuration"] in all_modes
    assert report["tokens_per_s_best"] == max(row["tokens_per_s_median"] for row in report["modes"].values())
    assert report["tokens_per_s_llamacpp"] is None  # no llama.cpp programs given

    json_path, png_path = bench_llm.write_report(report, tmp_path)
    stored = json.loads(json_path.read_text())
    for key in ("speedup_vs_plain", "speedup_vs_transformers", "identical_greedy"):
        assert stored[key] == report[key]
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "draft-int8-vocab" in bench_llm.format_table(report)


def test_select_prompts_covers_categories():
    chosen = bench_llm.select_prompts(5)
    assert len({prompt.category for prompt in chosen}) == 5
    assert len(bench_llm.select_prompts(None)) >= 30


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        (["--modes", "plain,medusa"], "unknown mode 'medusa'"),
        (["--prompts", "0"], "--prompts must be at least 1"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be from 1 to 4096"),
        (["--weights", "dense,int3"], "--weights: unknown format 'int3'"),
        (["--llama-cpp", "/no/such/folder"], "--llama-cpp: /no/such/folder is not a folder"),
    ],
)
def test_bench_rejects_bad_options_before_loading(arguments, expected, capsys):
    assert main(["bench", "llm", *arguments]) == 2
    assert expected in capsys.readouterr().err
