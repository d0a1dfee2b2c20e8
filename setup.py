"""Build script. The package is pure Python; the CUDA extension in csrc/ is added by the CUDA issue."""

from setuptools import setup

setup()
