"""Build script for the optional C extensions; all metadata lives in pyproject.toml."""

import platform

from setuptools import Extension, setup

extensions = []
if platform.system() == "Linux" and platform.machine() in ("x86_64", "AMD64"):
    # optional=True: without a C compiler the install still succeeds; voice then runs
    # with MKL's default dispatch and torch's own int4 and int8 kernels.
    extensions.append(Extension("voice._native.mkl_amd", ["voice/_native/mkl_amd.c"], optional=True))
    # The kernels pick AVX512-VNNI, AVX2 or plain C at run time, so the build itself
    # targets any x86-64 CPU. -ffp-contract=off keeps GCC from fusing a multiply and an
    # add in some inlined copies and not others, which made a row's result depend on
    # how many rows were computed with it.
    extensions.append(
        Extension(
            "voice._native.qmatmul",
            ["voice/_native/qmatmul.c"],
            extra_compile_args=["-O3", "-std=gnu11", "-ffp-contract=off"],
            extra_link_args=["-pthread"],
            optional=True,
        )
    )

setup(ext_modules=extensions)
