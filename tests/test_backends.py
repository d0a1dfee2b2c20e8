"""The one backend dispatch (taopd_kernels.backends.resolve): a name means that backend, only "auto"
chooses, and the statistics record which backend ran. Also: no import cycles in the packages."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from taopd_kernels import fused_teachability_kl, teachability_kl_from_logits, teachability_stats
from taopd_kernels import backends
from taopd_kernels.backends import cuda as cuda_backend
from taopd_kernels.backends import pytorch as torch_backend

from helpers import make_inputs

CUDA = torch.device("cuda")


@pytest.fixture
def fake_cuda_extension(monkeypatch):
    """As if the CUDA extension were built and a GPU present: the cuda backend reports itself available,
    and any call into its kernels fails the test (so a path that should not use them is caught)."""
    monkeypatch.setattr(cuda_backend, "is_available", lambda device: (True, ""))

    def forbidden(*args, **kwargs):
        raise AssertionError("the CUDA kernels were called")

    for name in ("forward_stats", "backward_kept", "logits_forward_stats", "logits_grad_kept"):
        monkeypatch.setattr(cuda_backend, name, forbidden)


def test_torch_backend_never_calls_the_cuda_kernels(fake_cuda_extension):
    inputs = make_inputs(n=12, v_s=300)
    inputs["student_weight"].requires_grad_()
    loss, stats = fused_teachability_kl(**inputs, keep_ratio=0.25, backend="torch")
    loss.backward()
    assert stats.backend == "torch" and inputs["student_weight"].grad.abs().sum() > 0
    zs = torch.randn(6, 50)
    _, stats = teachability_kl_from_logits(zs, torch.randn(6, 50), top_k=4, backend="torch")
    assert stats.backend == "torch"
    # What "torch" names on a GPU: the PyTorch module, whatever else is available there.
    assert backends.resolve("torch", CUDA, top_k=16) == ("torch", torch_backend)


def test_cuda_with_unsupported_top_k_raises_naming_the_limit(fake_cuda_extension):
    with pytest.raises(ValueError, match=r"top_k <= 64.*top_k=65"):
        backends.resolve("cuda", CUDA, top_k=65)
    assert backends.resolve("cuda", CUDA, top_k=64)[0] == "cuda"
    # The kernel entry points check it too (a direct call is no way around the limit).
    ok, reason = cuda_backend.supports(65)
    assert not ok and "64" in reason


def test_auto_is_the_only_fallback(fake_cuda_extension, monkeypatch):
    from taopd_kernels.backends import triton as triton_backend

    monkeypatch.setattr(triton_backend, "is_available", lambda device: (False, "no triton here"))
    assert backends.resolve("auto", CUDA, top_k=16)[0] == "cuda"
    assert backends.resolve("auto", CUDA, top_k=100)[0] == "torch"  # beyond the CUDA kernels' K
    assert backends.resolve("auto", torch.device("cpu"), top_k=16)[0] == "torch"
    monkeypatch.setenv("TAOPD_BACKEND", "torch")
    assert backends.resolve("auto", CUDA, top_k=16)[0] == "torch"
    monkeypatch.setenv("TAOPD_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="TAOPD_BACKEND"):
        backends.resolve("auto", CUDA, top_k=16)


def test_named_backend_that_cannot_run_says_why():
    with pytest.raises(RuntimeError, match="cuda"):
        fused_teachability_kl(**make_inputs(n=4, v_s=64), backend="cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        fused_teachability_kl(**make_inputs(n=4, v_s=64), backend="chunked")


def test_triton_has_no_logits_path():
    pytest.importorskip("triton")
    with pytest.raises(ValueError, match="no logits path"):
        teachability_kl_from_logits(torch.randn(4, 40), torch.randn(4, 40), top_k=4, backend="triton")


@pytest.mark.parametrize("name", ["auto", "torch", "triton"])
def test_stats_record_the_backend_that_ran(name):
    if name == "triton":
        pytest.importorskip("triton")
        if not backends.available("triton", torch.device("cpu"))[0]:
            pytest.skip("triton cannot run on this device")
    stats = teachability_stats(**make_inputs(n=8, v_s=200), top_k=4, backend=name)
    assert stats.backend == ("torch" if name == "auto" else name)


_IMPORT_EACH_FIRST = r"""
import importlib, pkgutil, sys
import torch  # noqa: F401 (kept loaded: only our modules are re-imported)
failures = []
for package in sys.argv[1:]:
    names = [package] + [m.name for m in pkgutil.walk_packages(importlib.import_module(package).__path__,
                                                                 package + ".")]
    for name in names:
        for loaded in [m for m in sys.modules if m == package or m.startswith(package + ".")]:
            del sys.modules[loaded]
        try:
            importlib.import_module(name)
        except ImportError as exc:
            failures.append(f"{name}: {exc}")
print("\n".join(failures) or "ok")
"""


def test_every_module_imports_first_without_a_cycle():
    """Importing any module of the package (or the driver) as the first one must work: an import cycle
    shows as an ImportError for some order."""
    packages = ["taopd_kernels"]
    try:
        import taopd_train  # noqa: F401
        packages.append("taopd_train")
    except ImportError:
        pass
    res = subprocess.run([sys.executable, "-c", _IMPORT_EACH_FIRST, *packages], capture_output=True, text=True,
                         timeout=300, env=dict(os.environ, TRITON_INTERPRET="1"))
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stdout + res.stderr[-3000:]
