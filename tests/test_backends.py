"""The one backend dispatch (taopd_kernels.backends.resolve): a name means that backend, only "auto"
chooses, and the statistics record which backend ran. Also: no import cycles in the packages."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from taopd_kernels import fused_teachability_kl, teachability_kl_from_logits, teachability_stats
from taopd_kernels import backends
from taopd_kernels.backends import autotune
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
import importlib, importlib.util, pkgutil, sys
import torch  # noqa: F401 (kept loaded: only our modules are re-imported)
# Optional integrations and the package each needs: without it, an ImportError is their documented refusal.
OPTIONAL = {"taopd_kernels.integrations.verl": "verl"}
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
            if name in OPTIONAL and importlib.util.find_spec(OPTIONAL[name]) is None:
                continue
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


# ---------------------------------------------------------------------------------------------------
# backend="auto" on a GPU: the measured choice (fake CUDA device, fake timer).

SHAPE = backends.ShapeClass(rows=8192, vocab=262144, d_s=2048, d_t=4096, dtypes=("bfloat16",) * 4, top_k=16)


@pytest.fixture
def fake_gpu(fake_cuda_extension, monkeypatch, tmp_path):
    """triton and cuda usable on a fake CUDA device, a cache directory of the test's own, and a timer that
    records which backends it timed (cuda fastest, then triton, then torch)."""
    from taopd_kernels.backends import triton as triton_backend

    monkeypatch.setattr(triton_backend, "is_available", lambda device: (True, ""))
    monkeypatch.setattr(autotune, "_device_key", lambda device: "Fake H200|torch=x|triton=y|taopd=z")
    monkeypatch.setattr(autotune, "_CHOICES", {})
    monkeypatch.setenv("TAOPD_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("TAOPD_BACKEND", raising=False)
    monkeypatch.delenv("TAOPD_AUTO_MEASURE", raising=False)
    timed = []
    ms = {"cuda": 1.0, "triton": 2.0, "torch": 9.0}

    def fake_time(name, shape, device):
        timed.append(name)
        return ms[name]

    monkeypatch.setattr(autotune, "_time_backend", fake_time)
    return dict(timed=timed, ms=ms, path=tmp_path / "auto_backend.json", triton=triton_backend)


def test_auto_measures_once_and_takes_the_fastest(fake_gpu):
    assert backends.resolve("auto", CUDA, top_k=16, shape=SHAPE)[0] == "cuda"
    assert fake_gpu["timed"] == ["triton", "cuda", "torch"]
    data = json.loads(fake_gpu["path"].read_text())
    entry = data["entries"]["Fake H200|torch=x|triton=y|taopd=z"][SHAPE.key()]
    assert entry == {"backend": "cuda", "ms": fake_gpu["ms"]}
    assert [p.name for p in fake_gpu["path"].parent.iterdir() if p.suffix == ".tmp"] == []  # replaced, not left
    # Same process: from memory. A new process (memory cleared): from the file. Neither measures again.
    assert backends.resolve("auto", CUDA, top_k=16, shape=SHAPE)[0] == "cuda"
    autotune._CHOICES.clear()
    assert backends.resolve("auto", CUDA, top_k=16, shape=SHAPE)[0] == "cuda"
    assert fake_gpu["timed"] == ["triton", "cuda", "torch"]
    # Another shape class is measured on its own, and added to the same file.
    other = backends.ShapeClass(**{**SHAPE.__dict__, "rows": 1024})
    fake_gpu["ms"]["triton"] = 0.5
    assert backends.resolve("auto", CUDA, top_k=16, shape=other)[0] == "triton"
    assert len(json.loads(fake_gpu["path"].read_text())["entries"]["Fake H200|torch=x|triton=y|taopd=z"]) == 2


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"version": 1, "entries": {"gpu": 3}}'])
def test_corrupt_cache_is_ignored_with_a_warning_and_rewritten(fake_gpu, content):
    fake_gpu["path"].write_text(content)
    with pytest.warns(RuntimeWarning, match="ignoring the backend cache"):
        assert backends.resolve("auto", CUDA, top_k=16, shape=SHAPE)[0] == "cuda"
    assert fake_gpu["timed"] == ["triton", "cuda", "torch"]
    data = json.loads(fake_gpu["path"].read_text())
    assert data["version"] == 1 and SHAPE.key() in data["entries"]["Fake H200|torch=x|triton=y|taopd=z"]


def test_unusable_candidates_are_never_measured(fake_gpu, monkeypatch):
    # top_k beyond the CUDA kernels' 64: cuda is not a candidate.
    big_k = backends.ShapeClass(**{**SHAPE.__dict__, "top_k": 100})
    assert backends.resolve("auto", CUDA, top_k=100, shape=big_k)[0] == "triton"
    assert fake_gpu["timed"] == ["triton", "torch"]
    # Without triton: cuda and torch only. When triton becomes usable, the cached entry (which never timed
    # it) is not trusted: measured again, with triton.
    fake_gpu["timed"].clear()
    monkeypatch.setattr(fake_gpu["triton"], "is_available", lambda device: (False, "no triton here"))
    fake_gpu["ms"]["cuda"] = 5.0
    assert backends.resolve("auto", CUDA, top_k=16, shape=SHAPE)[0] == "cuda"
    assert fake_gpu["timed"] == ["cuda", "torch"]
    monkeypatch.setattr(fake_gpu["triton"], "is_available", lambda device: (True, ""))
    autotune._CHOICES.clear()
    assert backends.resolve("auto", CUDA, top_k=16, shape=SHAPE)[0] == "triton"
    assert fake_gpu["timed"] == ["cuda", "torch", "triton", "cuda", "torch"]


def test_fixed_order_without_measuring(fake_gpu, monkeypatch):
    monkeypatch.setenv("TAOPD_AUTO_MEASURE", "0")
    assert backends.resolve("auto", CUDA, top_k=16, shape=SHAPE)[0] == "triton"
    monkeypatch.delenv("TAOPD_AUTO_MEASURE")
    # No shape class (logits path, direct callers), the logits path, a CPU device: the fixed order.
    assert backends.resolve("auto", CUDA, top_k=16)[0] == "triton"
    assert backends.resolve("auto", CUDA, path="logits", top_k=16, shape=SHAPE)[0] == "cuda"  # triton: no logits
    assert backends.resolve("auto", torch.device("cpu"), top_k=16, shape=SHAPE)[0] == "torch"
    # TAOPD_BACKEND keeps its meaning: that name first, taken without measuring.
    monkeypatch.setenv("TAOPD_BACKEND", "torch")
    assert backends.resolve("auto", CUDA, top_k=16, shape=SHAPE)[0] == "torch"
    assert fake_gpu["timed"] == [] and not fake_gpu["path"].exists()


def test_failed_measurement_keeps_the_fixed_order(fake_gpu, monkeypatch):
    def broken(name, shape, device):
        fake_gpu["timed"].append(name)
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(autotune, "_time_backend", broken)
    with pytest.warns(RuntimeWarning, match="out of memory"):
        assert backends.resolve("auto", CUDA, top_k=16, shape=SHAPE)[0] == "triton"
    assert backends.resolve("auto", CUDA, top_k=16, shape=SHAPE)[0] == "triton"  # not retried each call
    assert fake_gpu["timed"] == ["triton"] and not fake_gpu["path"].exists()


@pytest.mark.parametrize("name", ["torch", "triton"])
def test_time_backend_runs_a_forward_and_kept_backward(name):
    """The real timing step (synthetic input of the class, the backend's own forward + kept backward), on
    the CPU with a timer that just runs it."""
    if not backends.available(name, torch.device("cpu"))[0]:
        pytest.skip(f"{name} cannot run on this device")
    shape = backends.ShapeClass(rows=40, vocab=300, d_s=16, d_t=24, dtypes=("float32",) * 4, top_k=4)
    ran = []

    def timer(step, device):
        step()
        ran.append(device)
        return 1.5

    assert autotune._time_backend(name, shape, torch.device("cpu"), timer=timer) == 1.5 and len(ran) == 1


def test_shape_class_buckets_and_api_passes_it(monkeypatch):
    h = torch.zeros(8000, 16, dtype=torch.bfloat16)
    a = backends.ShapeClass.of(h, torch.zeros(151936, 16), h, torch.zeros(10, 16), vocab_size=151936, top_k=16)
    b = backends.ShapeClass.of(h[:5000], torch.zeros(1, 16), h, torch.zeros(1, 16), vocab_size=152064, top_k=16)
    assert a == b and (a.rows, a.vocab) == (8192, 262144)
    assert a.key() == "rows=8192,vocab=262144,d_s=16,d_t=16,dtype=bfloat16+float32+bfloat16+float32,top_k=16"
    seen = []
    original = backends.resolve

    def spy(*args, **kwargs):
        seen.append(kwargs.get("shape"))
        return original(*args, **kwargs)

    monkeypatch.setattr(backends, "resolve", spy)
    inputs = make_inputs(n=12, v_s=300)
    teachability_stats(**inputs, top_k=4, backend="auto")
    teachability_kl_from_logits(torch.randn(6, 50), torch.randn(6, 50), top_k=4)
    assert seen[0] == backends.ShapeClass(rows=16, vocab=512, d_s=16, d_t=24, dtypes=("float32",) * 4, top_k=4)
    assert seen[1] is None


def test_kept_row_gradients_take_exactly_what_the_api_passes():
    """The backend contract has nothing dead in it: the API passes each kept-row backward exactly the
    keyword arguments it declares (the module docstring's list), in every backend."""
    import inspect

    from taopd_kernels import api
    from taopd_kernels.backends import triton as triton_backend

    plan = api._BackwardPlan(head=None, backend=None, kept_idx=torch.tensor([0]), normalizer=1.0, estimator="full",
                             opts=api.check_head_options(top_k=1, estimator="full", temperature=1.0, vocab_size=None,
                                                         max_vocab=4, backend="torch"),
                             lse_s=torch.zeros(1), sampled_ids=None, sampled_weight=None, num_student=3)
    passed = set(plan.row_args(torch.ones(())))
    # Optional in the contract, passed only by vocab_parallel.ShardedBackend (vocabulary shards).
    shards_only = {"softmax_reduce"}
    for mod in (torch_backend, triton_backend, cuda_backend):
        hidden = inspect.signature(mod.backward_kept).parameters
        declared = {n for n, p in hidden.items() if p.kind == p.KEYWORD_ONLY}
        assert declared - shards_only == passed | {"need_bias_grad"}, mod
        if hasattr(mod, "logits_grad_kept"):
            logits = inspect.signature(mod.logits_grad_kept).parameters
            assert {n for n, p in logits.items() if p.kind == p.KEYWORD_ONLY} - shards_only == passed, mod
    doc = backends.__doc__
    for name in passed | {"need_bias_grad"} | shards_only:
        assert name in doc, name
    for dead in ("lse_s", "lse_t", "kl_rev", "expected_gap"):
        assert dead not in doc and dead not in passed, dead
