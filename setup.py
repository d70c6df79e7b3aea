"""Only the native CPU kernel lives here; everything else is in pyproject.toml.

The extension is optional: without a C compiler (or OpenMP) the install still succeeds and the
CPU backend falls back to ONNX Runtime.
"""

import sys

from setuptools import Extension, setup

flags = ["-O3", "-std=c11"]
link = []
if sys.platform.startswith("linux") or sys.platform == "win32" and "gcc" in sys.version.lower():
    flags.append("-fopenmp")
    link.append("-fopenmp")

setup(ext_modules=[Extension("lowvram.kernels._lvq", ["kernels/native/lvq.c"], extra_compile_args=flags,
                             extra_link_args=link, optional=True)])
