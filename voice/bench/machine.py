"""The machine a benchmark ran on: CPU, cores, memory and package versions."""

from __future__ import annotations

import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

# Packages whose version changes the numbers, in the order a report lists them.
PACKAGES = ("torch", "transformers", "faster-whisper", "ctranslate2", "piper-tts", "onnxruntime", "webrtcvad-wheels", "aiomqtt")


def _native_kernels() -> str:
    """Instruction set of voice's int4 and int8 kernels, or why they are not used."""
    from voice.llm import qmatmul

    if not qmatmul.available():
        return "off (torch's kernels)"
    return qmatmul.instruction_set()


def machine_description() -> dict[str, Any]:
    """Return the CPU model, core count, memory, SIMD flags, native kernels and package versions."""
    cpu = platform.processor() or platform.machine()
    flags: list[str] = []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu in ("", platform.machine()):
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = line.split(":", 1)[1].split()
                break
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else None
    description: dict[str, Any] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_bytes": memory,
        "simd": [flag for flag in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16") if flag in flags],
        "python": platform.python_version(),
        "native_kernels": _native_kernels(),
    }
    for package in PACKAGES:
        try:
            description[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            description[package] = None
    return description
