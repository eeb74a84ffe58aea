"""Build script: the metadata lives in pyproject.toml; this file adds the cffi-built C match core."""
from setuptools import setup

setup(cffi_modules=["csrc/build_core.py:ffibuilder"])
