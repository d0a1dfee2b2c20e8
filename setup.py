"""Build script. Metadata lives in pyproject.toml; this file adds the package layout and the optional
CUDA extension.

Packages: ``taopd_kernels`` (every subpackage found under taopd_kernels/) and the training driver,
installed as ``taopd_train`` from the folder train/ (with its bundled configs, train/configs/), and its
experiments ``taopd_train.experiments`` (train/experiments/: the comparison and the diagnostic).

The extension ``taopd_kernels._C`` (csrc/: fused statistics and logit-gradient kernels for callers that
hold logits) is built when a CUDA toolkit (nvcc) and a CUDA build of torch are both present, and
skipped otherwise: the package is fully usable without it (torch and triton backends).

Environment:
    TAOPD_BUILD_CUDA=1     build it, and fail with a clear error if that is impossible
    TAOPD_BUILD_CUDA=0     never build it
    (unset)                build it when possible, else skip with a note
    TORCH_CUDA_ARCH_LIST   architectures, e.g. "9.0" or "8.0;9.0" (torch's own convention; default:
                           the visible GPUs, or torch's list when none is visible)

Typical developer build:  TAOPD_BUILD_CUDA=1 pip install -e . --no-build-isolation
(--no-build-isolation so that the build sees the installed CUDA build of torch).
"""

import os
import sys

from setuptools import find_packages, setup

_HERE = os.path.dirname(os.path.abspath(__file__))
_SOURCES = ["csrc/bindings.cpp", "csrc/teachability_stats.cu", "csrc/teachability_grad.cu"]


def _note(msg: str) -> None:
    print(f"taopd-kernels setup: {msg}", file=sys.stderr)


def _cuda_extension():
    """([ext_modules], {cmdclass}) for the CUDA extension, or ([], {}) when it is skipped."""
    switch = os.environ.get("TAOPD_BUILD_CUDA", "").strip().lower()
    if switch in ("0", "false", "no", "off"):
        _note("TAOPD_BUILD_CUDA=0: not building the CUDA extension")
        return [], {}
    forced = switch in ("1", "true", "yes", "on")

    def unavailable(reason: str):
        if forced:
            raise RuntimeError(f"TAOPD_BUILD_CUDA=1 but the CUDA extension cannot be built: {reason}")
        _note(f"skipping the CUDA extension ({reason}); set TAOPD_BUILD_CUDA=1 to require it")
        return [], {}

    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError as exc:
        return unavailable(f"torch is not importable in the build environment ({exc}); "
                           "install torch first and build with --no-build-isolation")
    if torch.version.cuda is None:
        return unavailable(f"torch {torch.__version__} is not a CUDA build")
    if CUDA_HOME is None:
        return unavailable("no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)")

    nvcc_flags = ["-O3", "-lineinfo"]  # no --use_fast_math: the kernels rely on IEEE expf/logf
    ext = CUDAExtension(
        name="taopd_kernels._C",
        sources=_SOURCES,  # relative paths: setuptools requires them
        include_dirs=[os.path.join(_HERE, "csrc")],
        extra_compile_args={"cxx": ["-O3"], "nvcc": nvcc_flags},
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _cuda_extension()
setup(
    packages=find_packages(include=["taopd_kernels", "taopd_kernels.*"]) + ["taopd_train", "taopd_train.experiments"],
    package_dir={"taopd_train": "train"},
    package_data={"taopd_train": ["configs/*.json", "configs/*.yaml", "prepared/*.safetensors"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
