"""Offline voice assistant whose language-model stage uses speculative decoding."""

from voice._native import enable_mkl_kernels_on_amd

__version__ = "0.1.0"

# Must run before torch makes its first MKL call: see voice/_native/mkl_amd.c.
MKL_KERNELS_ON_AMD = enable_mkl_kernels_on_amd()
