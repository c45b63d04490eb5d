"""Embedded model assembly: package lookup, SHA-256 checks, cache markers and clear errors."""

from __future__ import annotations

import hashlib
import json

import pytest

from tests.conftest import ROOT
from voice import models
from voice.errors import ConfigError, ModelError

# Small files inside this repository's own package stand in for model package parts.
PART_A = models.PackagePart("voice", "0.1.0", "voice", "errors.py")
PART_B = models.PackagePart("voice", "0.1.0", "voice", "metrics.py")


def sha256_of(*relative_paths: str) -> str:
    digest = hashlib.sha256()
    for relative_path in relative_paths:
        digest.update((ROOT / "voice" / relative_path).read_bytes())
    return digest.hexdigest()


def fake_model(sha256: str, parts=(PART_A, PART_B)) -> models.EmbeddedModel:
    return models.EmbeddedModel(
        name="fake", kind="whisper", description="test model", parts=parts, sha256=sha256, file_name="model.bin"
    )


def test_missing_package_names_pip_command():
    missing = models.PackagePart("voice-no-such-part7", "1.2.3", "voice_no_such_part7", "data/part07.bin")
    with pytest.raises(ModelError) as error:
        models.check_packages(fake_model("0" * 64, parts=(PART_A, missing)))
    message = str(error.value)
    assert "'voice-no-such-part7' is not installed" in message
    assert "pip install voice-no-such-part7==1.2.3" in message


def test_missing_file_in_package_suggests_reinstall():
    broken = models.PackagePart("voice", "0.1.0", "voice", "data/absent.bin")
    with pytest.raises(ModelError, match=r"incomplete .*absent.bin is missing.*--force-reinstall"):
        models.check_packages(fake_model("0" * 64, parts=(broken,)))


def test_parts_concatenated_in_order_and_verified(tmp_path):
    model = fake_model(sha256_of("errors.py", "metrics.py"))
    folder = models._prepared_folder(model, tmp_path)
    expected = (ROOT / "voice" / "errors.py").read_bytes() + (ROOT / "voice" / "metrics.py").read_bytes()
    assert (folder / "model.bin").read_bytes() == expected
    assert models._is_current(folder, model)
    # A second call finds the marker and returns the same folder without rebuilding.
    marker = (folder / "voice-cache.json").stat().st_mtime_ns
    assert models._prepared_folder(model, tmp_path) == folder
    assert (folder / "voice-cache.json").stat().st_mtime_ns == marker


def test_checksum_mismatch_rejected_and_nothing_cached(tmp_path):
    model = fake_model(sha256_of("metrics.py", "errors.py"))  # the parts in the wrong order
    with pytest.raises(ModelError, match="failed its SHA-256 check.*pip install --force-reinstall voice"):
        models._prepared_folder(model, tmp_path)
    folder = tmp_path / "models" / "whisper" / "fake"
    assert not folder.exists()
    assert not [path for path in folder.parent.iterdir() if path.name.startswith(".fake.")]


def test_embedded_registry_is_consistent():
    for name, model in models.EMBEDDED.items():
        assert model.name == name
        assert model.kind in ("llm", "whisper", "piper")
        assert len(model.sha256) == 64
        assert model.parts


def test_local_llm_folder_without_config_rejected(tmp_path):
    with pytest.raises(ModelError, match="has no config.json"):
        models.resolve_llm(str(tmp_path), tmp_path / "cache")


def test_hub_id_passed_through_when_downloads_allowed(tmp_path):
    assert models.resolve_llm("Qwen/Qwen2.5-0.5B-Instruct", tmp_path, allow_download=True) == ("Qwen/Qwen2.5-0.5B-Instruct", True)


@pytest.mark.parametrize(
    ("resolve", "setting"),
    [
        (lambda spec, cache: models.resolve_llm(spec, cache, setting="llm.draft"), "llm.draft"),
        (lambda spec, cache: models.resolve_whisper(spec, cache), "asr.model"),
    ],
    ids=["llm", "whisper"],
)
def test_uncached_hub_id_rejected_before_loading(tmp_path, monkeypatch, resolve, setting):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelError) as error:
        resolve("voice-tests/no-such-model", tmp_path)
    assert f"{setting}: 'voice-tests/no-such-model' is not an embedded name" in str(error.value)
    assert "allow_download: true" in str(error.value)


def test_uncached_hub_id_fails_offline_with_hint(monkeypatch):
    import torch

    from voice.llm.loading import load_models

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="not in the local Hugging Face cache.*allow_download: true"):
        load_models(("voice-tests/no-such-model", True), None, torch.float32, allow_download=False)


def test_piper_voice_must_be_onnx_file(tmp_path):
    with pytest.raises(ModelError, match="not an embedded voice nor an existing .onnx file"):
        models.resolve_piper(str(tmp_path / "voice.bin"), tmp_path)


def test_unusable_cache_folder_named_with_fix(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    model = fake_model(sha256_of("errors.py"))
    with pytest.raises(ConfigError, match=r"Cannot use the cache folder .*file.* set cache_dir in config.yaml, or XDG_CACHE_HOME"):
        models._prepared_folder(model, blocker / "cache")


def test_damaged_file_found_and_model_built_again(tmp_path):
    model = fake_model(sha256_of("errors.py", "metrics.py"))
    folder = models._prepared_folder(model, tmp_path)
    assert models.verify_prepared_model(model, tmp_path) is None
    (folder / "model.bin").write_bytes(b"cut short")
    problem = models.verify_prepared_model(model, tmp_path)
    assert problem == f"{folder / 'model.bin'} is damaged or missing"
    assert not folder.exists()
    rebuilt = models._prepared_folder(model, tmp_path)
    assert (rebuilt / "model.bin").read_bytes() == (ROOT / "voice" / "errors.py").read_bytes() + (ROOT / "voice" / "metrics.py").read_bytes()


def test_folder_without_recorded_sums_checked_against_package_sum(tmp_path):
    model = fake_model(sha256_of("errors.py", "metrics.py"))
    folder = models._prepared_folder(model, tmp_path)
    marker = json.loads((folder / "voice-cache.json").read_text())
    del marker["files"]  # as folders built by earlier versions
    (folder / "voice-cache.json").write_text(json.dumps(marker))
    assert models.verify_prepared_model(model, tmp_path) is None
    assert "files" in json.loads((folder / "voice-cache.json").read_text())
    (folder / "voice-cache.json").write_text(json.dumps(marker))
    (folder / "model.bin").write_bytes(b"cut short")
    assert models.verify_prepared_model(model, tmp_path) is not None
