"""Build bsam-fast; the fused kernels (``bsam_fast._C``) are optional.

The package itself is pure Python. When torch and a C++ compiler are present, the CPU
kernels in ``csrc/`` are built as a torch extension; without them the package installs
anyway and runs on the ``foreach`` backend.
"""
from setuptools import find_packages, setup

setup(packages=find_packages(include=["bsam_fast", "bsam_fast.*"]))
