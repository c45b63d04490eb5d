"""The voice command as a user runs it: bad input fails fast and cleanly, good input is answered."""

from __future__ import annotations

import asyncio
import io
import os
import re
import subprocess
import sys
import wave

import numpy as np
import pytest

from tests.conftest import FIXTURES, ROOT
from voice import cli, pipeline
from voice.audio.wav import read_wav
from voice.config import Config


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


@pytest.mark.parametrize("text", ["", "   ", "*** --- ***"], ids=["empty", "spaces", "symbols"])
def test_say_rejects_unspeakable_text(tmp_path, text):
    result = run_voice("say", text, "--output", str(tmp_path / "x.wav"), timeout=300)
    assert_clean_failure(result, 2, "Nothing to say", repr(text), "Pass the words to speak")
    assert not (tmp_path / "x.wav").exists()


def test_respond_silence_gives_no_answer_and_no_file(tmp_path):
    reply = tmp_path / "reply.wav"
    result = run_voice("respond", str(FIXTURES / "silence_digital_5s.wav"), "--output", str(reply), timeout=120)
    assert result.returncode == 6, result.stderr
    assert "No speech detected" in result.stderr
    assert "asr.min_speech_ms" in result.stderr
    assert "Assistant:" not in result.stdout
    assert not reply.exists()
    # webrtcvad rejects it before any model loads.
    assert "Loaded" not in result.stderr


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


def test_respond_rejects_output_inside_a_file(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    result = run_voice("respond", str(FIXTURES / "en_ps_goforward.wav"), "--output", str(blocker / "reply.wav"))
    assert_clean_failure(result, 4, "is a file, not a folder")


@pytest.mark.parametrize(
    ("input_name", "output_name"),
    [("same.wav", "same.wav"), ("same.wav", "link.wav"), ("link.wav", "same.wav")],
    ids=["same-path", "output-links-to-input", "input-links-to-output"],
)
def test_respond_rejects_output_that_is_input(tmp_path, input_name, output_name):
    recording = tmp_path / "same.wav"
    recording.write_bytes((FIXTURES / "en_ps_goforward.wav").read_bytes())
    (tmp_path / "link.wav").symlink_to(recording)
    original = recording.read_bytes()

    result = run_voice("respond", str(tmp_path / input_name), "--output", str(tmp_path / output_name), timeout=60)

    assert_clean_failure(result, 4, output_name, "is the input recording", "Choose another --output path")
    assert "Loaded" not in result.stderr
    assert recording.read_bytes() == original
    assert (tmp_path / "link.wav").is_symlink()


@pytest.mark.parametrize(
    "command",
    [("respond", str(FIXTURES / "en_ps_goforward.wav")), ("say", "Hello there.")],
    ids=["respond", "say"],
)
def test_output_without_wav_suffix_rejected(tmp_path, command):
    output = tmp_path / "r1.txt"
    result = run_voice(*command, "--output", str(output), timeout=60)
    assert_clean_failure(result, 4, str(output), ".wav", "reply.wav")
    assert "Loaded" not in result.stderr
    assert not output.exists()


def test_say_accepts_uppercase_wav_suffix(tmp_path):
    output = tmp_path / "HELLO.WAV"
    result = run_voice("say", "Hello there.", "--output", str(output), timeout=300)
    assert result.returncode == 0, result.stderr
    assert read_wav(output)[1] == 22_050


def test_respond_rejects_empty_output_path(tmp_path):
    result = run_voice("respond", str(FIXTURES / "en_ps_goforward.wav"), "--output", "")
    assert_clean_failure(result, 4, "Output path is empty")


def test_respond_without_sound_device_fails_before_loading(tmp_path):
    # The test machines have no sound card, so the speaker is missing; the check must
    # come before the models load (seconds, not a minute).
    result = run_voice("respond", str(FIXTURES / "en_ps_goforward.wav"), timeout=120)
    if result.returncode == 0:
        pytest.skip("this machine has a default output device")
    assert_clean_failure(result, 5, "output device", "voice devices", "--output")
    assert "Loaded" not in result.stderr


def test_config_option_accepted_after_command(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("llm:\n  draft_tokens: 99\n")
    result = run_voice("respond", str(FIXTURES / "en_ps_goforward.wav"), "--config", str(config), "-o", str(tmp_path / "r.wav"))
    assert_clean_failure(result, 2, "llm.draft_tokens")


@pytest.mark.slow
def test_sigterm_discards_partial_reply(tmp_path):
    import signal
    import time

    reply = tmp_path / "reply.wav"
    process = subprocess.Popen(
        [sys.executable, "-m", "voice", "respond", str(FIXTURES / "en_piper_boil_egg_pinknoise.wav"), "--output", str(reply)],
        cwd=ROOT, env=dict(os.environ, HF_HUB_OFFLINE="1"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    # The transcript line comes right before decoding starts; a moment later the reply
    # file is being written.
    deadline = time.monotonic() + 600
    line = ""
    while time.monotonic() < deadline and not line.startswith("You:"):
        line = process.stdout.readline()
        assert line or process.poll() is None, process.stderr.read()
    time.sleep(2.0)
    assert process.poll() is None
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr
    assert "Terminated." in stderr
    assert "Traceback" not in stderr
    assert os.listdir(tmp_path) == []


def test_say_long_unpunctuated_text_in_chunks(tmp_path):
    out = tmp_path / "long.wav"
    words = " ".join(["lights"] * 150)
    result = run_voice("say", words, "--output", str(out), timeout=300)
    assert result.returncode == 0, result.stderr
    samples, rate = read_wav(out)
    assert len(samples) / rate > 20.0


@pytest.mark.slow
def test_prepare_packs_quantized_target_weights(tmp_path):
    from voice import models

    config = tmp_path / "config.yaml"
    config.write_text("llm:\n  dtype: float32\n  target_weights: int8\n")
    result = run_voice("--config", str(config), "prepare")
    assert result.returncode == 0, result.stderr
    assert "target weights: int8, packed in" in result.stdout
    from voice.llm.loading import resolve_draft_weights

    # llm.draft_weights is auto: int4, packed too, where the native kernels run.
    if resolve_draft_weights("auto") == "int4":
        assert "draft weights: int4, packed in" in result.stdout
    packed = list((models.cache_root() / "packed").glob("qwen2.5-coder-1.5b-instruct-int8-float32-*.safetensors"))
    assert packed and packed[0].stat().st_size > 1_000_000_000  # 1.5B one-byte weights
    # A second start loads them instead of packing again.
    again = run_voice("--config", str(config), "prepare")
    assert again.returncode == 0, again.stderr
    assert "loaded packed weights" in again.stderr


@pytest.mark.parametrize("stdin_errors", ["strict", "surrogateescape"])
def test_chat_skips_invalid_utf8_line(qwen_tokenizer, monkeypatch, capsys, stdin_errors):
    from tests.mqtt.conftest import tiny_assistant

    assistant = tiny_assistant(qwen_tokenizer)

    async def load_tiny_assistant(config, **options):
        return assistant

    monkeypatch.setattr(pipeline, "load_assistant", load_tiny_assistant)
    # Python's stdin uses surrogateescape under the C locale and in UTF-8 mode and is
    # strict otherwise, so the chat loop must handle both.
    stdin = io.TextIOWrapper(io.BytesIO(b"\xff\xfe bad bytes?\nHello\n"), encoding="utf-8", errors=stdin_errors)
    monkeypatch.setattr(sys, "stdin", stdin)
    args = cli.build_parser().parse_args(["chat"])

    exit_code = asyncio.run(cli._chat(Config(llm=assistant.llm.config), args))

    output = capsys.readouterr()
    assert exit_code == 0
    errors = [line for line in output.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output.err
    assert "line 1" in errors[0]
    assert "UTF-8" in errors[0]
    assert output.out.count("Timing:") == 1


@pytest.mark.slow
def test_listen_replay_writes_replies_to_folder(tmp_path):
    from voice.audio.wav import read_wav

    # The follow-up waits for the first reply, as a person would, so the loop replies to both.
    question = FIXTURES / "en_espeak_tallest_mountain.wav"
    followup = FIXTURES / "en_espeak_followup_how_tall.wav"
    result = run_voice("listen", "--replay", str(question), str(followup), "--output-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    answers = [line for line in result.stdout.splitlines() if line.startswith("Assistant:")]
    assert len(answers) == 2, result.stdout
    assert "everest" in answers[0].lower()
    # "it" is the mountain of the first question: the answer gives a height.
    assert re.search(r"\bmeters?\b|\bfeet\b", answers[1]), result.stdout
    for name in ("reply-001.wav", "reply-002.wav"):
        samples, rate = read_wav(tmp_path / name)
        assert len(samples) / rate > 0.5
    assert not (tmp_path / "reply-003.wav").exists()


def test_listen_output_dir_must_exist(tmp_path):
    missing = tmp_path / "missing"
    result = run_voice("listen", "--replay", str(FIXTURES / "silence_digital_5s.wav"), "--output-dir", str(missing), timeout=120)
    assert_clean_failure(result, 4, str(missing), "--output-dir")


def test_version_printed(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exited:
        cli.main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.strip() == f"voice {version('voice')}"
