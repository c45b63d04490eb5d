"""The voice command as a user runs it: bad input fails fast and cleanly, good input is answered."""

from __future__ import annotations

import os
import subprocess
import sys
import wave

import numpy as np
import pytest

from tests.conftest import FIXTURES, ROOT
from voice.audio.wav import read_wav


def run_voice(*args: str, cwd=ROOT, timeout: float = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run(
        [sys.executable, "-m", "voice", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def assert_clean_failure(result: subprocess.CompletedProcess, exit_code: int, *fragments: str) -> None:
    assert result.returncode == exit_code, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def write_pcm16(path, samples: np.ndarray, rate: int = 16_000) -> None:
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes((samples * 32767).astype("<i2").tobytes())


@pytest.fixture
def truncated_wav(tmp_path):
    path = tmp_path / "truncated.wav"
    write_pcm16(path, np.sin(np.linspace(0, 2000, 32_000)).astype(np.float32) * 0.5)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.fixture
def empty_wav(tmp_path):
    path = tmp_path / "empty.wav"
    write_pcm16(path, np.zeros(0, dtype=np.float32))
    return path


@pytest.mark.parametrize(
    ("make_input", "fragments"),
    [
        (lambda tmp: tmp / "missing.wav", ["not found", "missing.wav"]),
        (lambda tmp: tmp, ["is a directory"]),
        (lambda tmp: (tmp / "notes.txt").write_text("hello") and tmp / "notes.txt", ["notes.txt", "not a WAV file", "PCM or float WAV"]),
        (lambda tmp: (tmp / "zero.wav").write_bytes(b"") or tmp / "zero.wav", ["zero.wav", "empty"]),
    ],
    ids=["missing-file", "directory", "text-file", "zero-bytes"],
)
def test_respond_rejects_unreadable_input(tmp_path, make_input, fragments):
    source = make_input(tmp_path)
    reply = tmp_path / "reply.wav"
    result = run_voice("respond", str(source), "--output", str(reply))
    assert_clean_failure(result, 4, *fragments)
    assert not reply.exists()


def test_respond_rejects_truncated_wav(tmp_path, truncated_wav):
    reply = tmp_path / "reply.wav"
    result = run_voice("respond", str(truncated_wav), "--output", str(reply))
    assert_clean_failure(result, 4, "truncated.wav", "truncated")
    assert not reply.exists()


def test_respond_rejects_wav_without_frames(tmp_path, empty_wav):
    reply = tmp_path / "reply.wav"
    result = run_voice("respond", str(empty_wav), "--output", str(reply))
    assert_clean_failure(result, 4, "empty.wav", "no audio")
    assert not reply.exists()


def test_respond_rejects_missing_output_folder(tmp_path):
    reply = tmp_path / "no" / "such" / "reply.wav"
    result = run_voice("respond", str(FIXTURES / "en_ps_goforward.wav"), "--output", str(reply))
    assert_clean_failure(result, 4, "does not exist")
    assert not reply.parent.exists()


def test_bad_config_fails_before_loading_models(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("llm:\n  draft_tokens: 99\n")
    result = run_voice("--config", str(config), "respond", str(FIXTURES / "en_ps_goforward.wav"), "-o", str(tmp_path / "r.wav"))
    assert_clean_failure(result, 2, str(config), "llm.draft_tokens", "from 1 to 16", "99")


def test_say_writes_speech(tmp_path):
    out = tmp_path / "hello.wav"
    result = run_voice("say", "Hello, this is a test of the voice.", "--output", str(out), timeout=300)
    assert result.returncode == 0, result.stderr
    samples, rate = read_wav(out)
    assert rate == 22_050
    assert len(samples) / rate > 1.0
    assert float(np.sqrt(np.mean(samples**2))) > 0.02


def test_say_rejects_unspeakable_text(tmp_path):
    result = run_voice("say", "*** --- ***", "--output", str(tmp_path / "x.wav"), timeout=300)
    assert_clean_failure(result, 1, "Nothing to say")
    assert not (tmp_path / "x.wav").exists()


@pytest.mark.slow
def test_respond_silence_gives_no_answer_and_no_file(tmp_path):
    reply = tmp_path / "reply.wav"
    result = run_voice("respond", str(FIXTURES / "silence_digital_5s.wav"), "--output", str(reply))
    assert result.returncode == 6, result.stderr
    assert "No speech detected" in result.stderr
    assert "Assistant:" not in result.stdout
    assert not reply.exists()


@pytest.mark.slow
def test_respond_answers_question_end_to_end(tmp_path):
    reply = tmp_path / "reply.wav"
    result = run_voice("respond", str(FIXTURES / "en_piper_capital_france_quiet.wav"), "--output", str(reply))
    assert result.returncode == 0, result.stderr
    assert "You: " in result.stdout
    assert "paris" in result.stdout.lower()
    assert "Timing: asr" in result.stdout
    assert "first audio" in result.stdout
    samples, rate = read_wav(reply)
    assert len(samples) / rate > 0.5
    assert [name for name in os.listdir(tmp_path) if name != "reply.wav"] == []
