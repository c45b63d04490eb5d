"""``voice bench voice`` on two fixtures with the real models: every report field filled and plausible."""

from __future__ import annotations

import asyncio
import json
import re

import numpy as np
import pytest

from tests.conftest import FIXTURES
from voice.audio.wav import load_speech
from voice.bench import voice as bench_voice
from voice.config import Config, ListenConfig
from voice.cli import main


def test_turn_audio_starts_at_the_last_pause():
    audio = load_speech(FIXTURES / "en_piper_capital_france_quiet.wav")
    listen = ListenConfig(silence_ms=600, early_start_ms=200, preroll_ms=500)
    recording, speech_end, start_ms = bench_voice.turn_audio(audio, listen)
    assert start_ms == 200
    assert 0.5 < speech_end < len(audio) / 16_000
    # From the pre-roll before the speech to 200 ms after its end.
    assert len(recording) / 16_000 == pytest.approx(speech_end + 0.2 - (0.4 - 0.5), abs=0.2)
    assert float(np.abs(recording).max()) > 0.01


def test_turn_audio_without_early_start_ends_at_endpoint():
    audio = load_speech(FIXTURES / "en_sr_one_two_three.wav")
    early, early_end, _ = bench_voice.turn_audio(audio, ListenConfig(silence_ms=600, early_start_ms=200))
    late, late_end, start_ms = bench_voice.turn_audio(audio, ListenConfig(silence_ms=600, early_start_ms=0))
    assert start_ms == 600
    # The pauses between the numbers do not end the turn: both cover the last word.
    assert early_end == late_end
    # 400 ms apart, in whole 30 ms frames.
    assert (len(late) - len(early)) / 16_000 == pytest.approx(0.4, abs=0.031)
    assert np.array_equal(late[: len(early)], early)


def test_turn_audio_of_silence_is_the_whole_recording():
    silence = np.zeros(16_000, dtype=np.float32)
    recording, speech_end, _ = bench_voice.turn_audio(silence, ListenConfig())
    assert len(recording) == len(silence)
    assert speech_end == 1.0


def test_manifest_lists_spoken_fixtures_only():
    fixtures = bench_voice.read_manifest(FIXTURES)
    kinds = {fixture.kind for fixture in fixtures}
    assert kinds == set(bench_voice.SPOKEN_KINDS)
    assert all(fixture.transcript for fixture in fixtures)


def test_missing_fixture_folder_fails_before_loading_models(tmp_path, capsys):
    assert main(["bench", "voice", "--fixtures", str(tmp_path / "nowhere")]) == 4
    assert "--fixtures" in capsys.readouterr().err


def test_settings_resolve_auto_draft_weights():
    settings = bench_voice.settings_of(Config())
    assert settings["draft_weights"] in ("int4", "int8")
    assert settings["target"] == Config().llm.target


@pytest.mark.slow
def test_voice_benchmark_report_has_every_figure(assistant, tmp_path):
    chosen = {"en_espeak_tallest_mountain.wav", "en_espeak_followup_how_tall.wav"}
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
    # The follow-up was asked after the question it follows, so "it" is Mount Everest.
    assert all(re.search(r"\bmeters?\b|\bfeet\b", turn["answer"]) for turn in followups), [(turn["transcript"], turn["answer"]) for turn in followups]
    markdown = (tmp_path / "out" / "bench-voice.md").read_text()
    assert "| first audio (ms) |" in markdown
    assert saved["machine"]["cpu"] in markdown
    assert f"native int4/int8 kernels {saved['machine']['native_kernels']}" in markdown
