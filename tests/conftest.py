"""Shared fixtures: the fixture manifest and the real models, loaded once per test session."""

from __future__ import annotations

import asyncio
import csv
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "audio_fixtures"


def fixture_rows() -> list[dict[str, str]]:
    with open(FIXTURES / "MANIFEST.tsv", newline="", encoding="utf-8") as manifest:
        return list(csv.DictReader(manifest, delimiter="\t"))


def fixtures_of_kind(*kinds: str) -> list[dict[str, str]]:
    return [row for row in fixture_rows() if row["kind"] in kinds]


@pytest.fixture(scope="session")
def assistant():
    """The real assistant with the default embedded models (minutes on first run)."""
    from voice.config import Config
    from voice.pipeline import load_assistant

    config = Config()
    # Exactness is checked in float32 (see test_models_run_in_float32); dtype auto would
    # pick bf16 on a CPU with AVX512-BF16 or AMX.
    config.llm.dtype = "float32"
    return asyncio.run(load_assistant(config))


@pytest.fixture(scope="session")
def qwen_tokenizer():
    """The embedded target's tokenizer (assembles and converts the target on first use)."""
    from transformers import AutoTokenizer

    from voice import models

    path, _ = models.resolve_llm("qwen2.5-coder-1.5b-instruct", models.cache_root())
    return AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def pulse_device(tmp_path_factory):
    """A real PortAudio device for the module's tests: a PulseAudio null sink named "pulse".

    Starts its own PulseAudio server in a private runtime folder; PortAudio reaches it
    through ALSA's pulse plugin. What is played to the sink comes back on its monitor,
    the device's input side.
    """
    if shutil.which("pulseaudio") is None:
        pytest.fail("pulseaudio is not installed; install it with: apt-get install pulseaudio pulseaudio-utils libasound2-plugins")
    runtime = tmp_path_factory.mktemp("pulse-runtime")
    runtime.chmod(0o700)
    saved = {key: os.environ.get(key) for key in ("XDG_RUNTIME_DIR", "PULSE_SERVER")}
    os.environ["XDG_RUNTIME_DIR"] = str(runtime)
    os.environ["PULSE_SERVER"] = f"unix:{runtime}/pulse/native"
    subprocess.run(
        ["pulseaudio", "--daemonize=yes", "--exit-idle-time=-1", "-n", "--load=module-native-protocol-unix", "--load=module-null-sink sink_name=voice_test"],
        check=True,
        capture_output=True,
        timeout=30,
    )
    deadline = time.monotonic() + 10
    while subprocess.run(["pactl", "info"], capture_output=True).returncode != 0:
        if time.monotonic() > deadline:
            pytest.fail("the test's PulseAudio server did not start within 10 s")
        time.sleep(0.1)
    import sounddevice

    # PortAudio lists devices once, when it starts: start it again to see the new server.
    sounddevice._terminate()
    sounddevice._initialize()
    yield "pulse"
    subprocess.run(["pactl", "exit"], capture_output=True)
    sounddevice._terminate()
    sounddevice._initialize()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
