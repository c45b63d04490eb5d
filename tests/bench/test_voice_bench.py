"""``voice bench voice`` on two fixtures with the real models: every report field filled and plausible."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from tests.conftest import FIXTURES
from voice.audio.wav import load_speech
from voice.bench import voice as bench_voice
from voice.cli import main


def test_end_of_speech_ignores_trailing_silence():
    audio = load_speech(FIXTURES / "en_piper_capital_france_quiet.wav")
    padded = np.concatenate([audio, np.zeros(16_000, dtype=np.float32)])
    end = bench_voice.end_of_speech_s(audio, 3)
    assert 0.5 < end < len(audio) / 16_000
    assert bench_voice.end_of_speech_s(padded, 3) == end


def test_end_of_speech_of_silence_is_its_length():
    silence = np.zeros(16_000, dtype=np.float32)
    assert bench_voice.end_of_speech_s(silence, 3) == 1.0


def test_manifest_lists_spoken_fixtures_only():
    fixtures = bench_voice.read_manifest(FIXTURES)
    kinds = {fixture.kind for fixture in fixtures}
    assert kinds == set(bench_voice.SPOKEN_KINDS)
    assert all(fixture.transcript for fixture in fixtures)


def test_missing_fixture_folder_fails_before_loading_models(tmp_path, capsys):
    assert main(["bench", "voice", "--fixtures", str(tmp_path / "nowhere")]) == 4
    assert "--fixtures" in capsys.readouterr().err


@pytest.mark.slow
def test_voice_benchmark_report_has_every_figure(assistant, tmp_path):
    chosen = {"en_piper_romeo_juliet_author.wav", "en_piper_followup_when_born.wav"}
    fixtures = [fixture for fixture in bench_voice.read_manifest(FIXTURES) if fixture.file in chosen]
    seen = []
    # With the int4 target a draft token costs more than half a target token, so the
    # adaptive length may draft nothing, and the acceptance figures need drafts.
    controller = assistant.llm.decoder.controller
    adaptive, controller.adaptive = controller.adaptive, False
    try:
        turns = asyncio.run(bench_voice.run_voice_benchmark(assistant, FIXTURES, fixtures, tmp_path, seen.append))
    finally:
        controller.adaptive = adaptive
    assert len(turns) == 4
    assert len(seen) == 4
    report = bench_voice.build_report(turns, {"target": assistant.config.llm.target}, "voice bench voice")
    paths = bench_voice.write_report(report, turns, tmp_path / "out")
    assert all(path.stat().st_size > 0 for path in paths)

    saved = json.loads((tmp_path / "out" / "bench-voice.json").read_text())
    assert 0 < saved["first_audio_ms_p50"] <= saved["first_audio_ms_p95"] < 120_000
    assert 0.2 < saved["first_audio_speedup"] < 5
    assert 0 <= saved["wer"] < 0.5
    assert saved["identical_answers"] == 1.0
    assert saved["machine"]["cores"] >= 1
    assert saved["machine"]["torch"]
    assert saved["machine"]["native_kernels"] in ("avx512_vnni", "avx2", "scalar", "off (torch's kernels)")
    for field, entry in saved["figures"].items():
        assert entry["on"]["p50"] is not None, field
        if field not in ("acceptance_rate", "mean_accepted"):
            assert entry["off"]["p50"] is not None, field
    for turn in saved["turns"]:
        assert 0 < turn["start_ms"] <= turn["endpoint_ms"] < 2000
        assert turn["start_ms"] <= turn["asr_ms"] <= turn["first_token_ms"] <= turn["first_audio_ms"] <= turn["total_ms"]
        # No audio before the endpoint, also when the turn started early.
        assert turn["endpoint_ms"] <= turn["first_audio_ms"]
        assert turn["tokens_per_s"] > 0
        assert turn["answer"]
    followups = [turn for turn in saved["turns"] if turn["kind"] == "followup"]
    # The follow-up was asked after the question it follows, so "he" is Shakespeare.
    assert all("15" in turn["answer"] or "fifteen" in turn["answer"].lower() for turn in followups)
    markdown = (tmp_path / "out" / "bench-voice.md").read_text()
    assert "| first audio (ms) |" in markdown
    assert saved["machine"]["cpu"] in markdown
    assert f"native int4/int8 kernels {saved['machine']['native_kernels']}" in markdown
