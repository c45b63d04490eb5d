"""Build script for the one optional C extension; all metadata lives in pyproject.toml."""

import platform

from setuptools import Extension, setup

extensions = []
if platform.system() == "Linux" and platform.machine() in ("x86_64", "AMD64"):
    # optional=True: without a C compiler the install still succeeds, and voice runs
    # with MKL's default dispatch.
    extensions.append(Extension("voice._native.mkl_amd", ["voice/_native/mkl_amd.c"], optional=True))

setup(ext_modules=extensions)
