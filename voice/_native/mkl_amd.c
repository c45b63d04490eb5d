/*
 * Lets Intel MKL use its AVX2 kernels on AMD processors.
 *
 * MKL (2020.1 and later, including the copy linked into PyTorch's CPU wheels) asks
 * mkl_serv_intel_cpu_true() whether it runs on an Intel CPU and, on any other vendor,
 * falls back to generic code paths. On a 2-core AMD EPYC with AVX2 that made an fp32
 * (4 x 1536) @ (1536 x 8960) product take about 10 ms instead of 4 ms, which is the
 * shape of a speculative verification pass. Loading this library with RTLD_GLOBAL
 * before torch makes MKL's lookup find this definition first; MKL then checks the CPU's
 * feature flags (not its vendor) as usual, so it never uses an instruction the CPU lacks.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

int mkl_serv_intel_cpu_true(void) { return 1; }

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "voice._native.mkl_amd",
    "Loaded with ctypes for its exported C symbol; importing it does nothing.", -1, NULL,
};

PyMODINIT_FUNC PyInit_mkl_amd(void) { return PyModule_Create(&module); }
