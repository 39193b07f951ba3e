"""Builds asyncfs's own io_uring binding (asyncfs/io/_uring.c) against the system's liburing.

Everything else about the package is in pyproject.toml. The extension is optional: without a
compiler or liburing's headers the install still succeeds, and ``backend=auto`` serves
through the threads backend (saying why in the log). It is compiled for the architecture's
baseline, whatever the build machine's CPU has, so a wheel or an install copied to another
machine of the same architecture never meets an instruction that CPU lacks.
"""

import platform

from setuptools import Extension, setup

# The baseline of each architecture, stated explicitly: the interpreter's own build flags may
# carry -march=native, and the last -march on the command line wins.
BASELINE = {
    "x86_64": ["-march=x86-64", "-mtune=generic"],
    "aarch64": ["-march=armv8-a"],
}

setup(
    ext_modules=[
        Extension(
            "asyncfs.io._uring",
            sources=["asyncfs/io/_uring.c"],
            libraries=["uring"],
            extra_compile_args=["-O2", "-std=gnu11", *BASELINE.get(platform.machine(), [])],
            optional=True,
        )
    ]
)
