"""Optional native helpers, loaded before torch."""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import os
import platform

logger = logging.getLogger(__name__)

MKL_AMD_ENV = "VOICE_MKL_AMD"
"""Set to 0 to keep MKL's default dispatch on AMD processors."""


def _cpu_vendor() -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def enable_mkl_kernels_on_amd() -> bool:
    """Load the library that lets MKL pick its AVX2 kernels on AMD; return True if loaded.

    Only acts on Linux x86-64 with an AMD CPU, when the extension was built at install
    and the environment does not set VOICE_MKL_AMD=0. It must run before torch first
    calls into MKL, so ``voice/__init__.py`` calls it.
    """
    if os.environ.get(MKL_AMD_ENV) == "0" or platform.system() != "Linux" or _cpu_vendor() != "AuthenticAMD":
        return False
    spec = importlib.util.find_spec("voice._native.mkl_amd")
    if spec is None or not spec.origin:
        logger.debug("MKL vendor shim not built (no C compiler at install); MKL keeps its generic kernels")
        return False
    try:
        ctypes.CDLL(spec.origin, mode=ctypes.RTLD_GLOBAL)
    except OSError as error:
        logger.debug("MKL vendor shim %s failed to load: %s", spec.origin, error)
        return False
    return True
