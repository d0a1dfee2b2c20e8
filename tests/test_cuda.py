"""The CUDA C++ extension (csrc/, taopd_kernels.backends.cuda).

CPU machines: the kernels are compiled with nvcc (compile only) for sm_80 and sm_90a, the torch
binding is syntax-checked with the host compiler, and the backend's error messages are checked.
GPU machines (@pytest.mark.gpu): every statistic and the gradient against the float64 reference.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

import taopd_kernels as tk
from taopd_kernels import backends
from taopd_kernels.estimators import sampled_weight
from taopd_kernels.backends import cuda as cuda_backend
from taopd_kernels.backends import pytorch as torch_backend
from taopd_kernels.reference import reference_row_stats, reference_teachability_kl

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
NVCC = shutil.which("nvcc")
GENCODES = {"sm_80": "arch=compute_80,code=sm_80", "sm_90a": "arch=compute_90a,code=sm_90a"}
KERNEL_SOURCES = ("teachability_stats.cu", "teachability_grad.cu")


def _cuda_home():
    for env in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(env):
            return Path(os.environ[env])
    if NVCC:
        home = Path(os.path.realpath(NVCC)).parents[1]
        if (home / "include" / "cuda_runtime_api.h").exists():
            return home
    for guess in ("/usr/local/cuda",):
        if Path(guess, "include", "cuda_runtime_api.h").exists():
            return Path(guess)
    return None


def _torch_includes():
    from torch.utils.cpp_extension import include_paths
    return [f"-I{p}" for p in include_paths()]


# ---- compile checks (no GPU needed) ------------------------------------------------------------------

def _binding_cmd():
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    home = _cuda_home()
    if cxx is None or home is None:
        return None
    std = "-std=c++20" if tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 10) else "-std=c++17"
    return [cxx, std, "-fsyntax-only", "-DTORCH_EXTENSION_NAME=_C", "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE",
            f"-I{CSRC}", *_torch_includes(), f"-I{home / 'include'}", f"-I{sysconfig.get_paths()['include']}",
            str(CSRC / "bindings.cpp")]


@pytest.fixture(scope="module")
def compile_results(tmp_path_factory):
    """All compile jobs at once (each kernel source for each arch, and the binding's syntax check), once
    per module: {(arch, source) or "binding": (rc, log)}. About a minute on 2 cores."""
    if NVCC is None:
        pytest.skip("nvcc not found on PATH")
    out = tmp_path_factory.mktemp("nvcc")
    jobs = {}
    for arch, gencode in GENCODES.items():
        for src in KERNEL_SOURCES:
            jobs[(arch, src)] = [NVCC, "-std=c++17", "-O3", "-gencode", gencode, "-Xptxas", "-v", f"-I{CSRC}",
                                 *_torch_includes(), "-c", str(CSRC / src), "-o", str(out / f"{src}.{arch}.o")]
    if _binding_cmd() is not None:
        jobs["binding"] = _binding_cmd()
    procs = {key: subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for key, cmd in jobs.items()}
    results = {}
    for key, proc in procs.items():
        log, _ = proc.communicate(timeout=900)
        results[key] = (proc.returncode, log)
    return results


@pytest.mark.parametrize("arch", sorted(GENCODES))
@pytest.mark.parametrize("source", KERNEL_SOURCES)
def test_kernels_compile(compile_results, arch, source):
    rc, log = compile_results[(arch, source)]
    assert rc == 0, f"nvcc failed for {source} ({arch}):\n{log}"
    assert "error" not in log.lower(), log


@pytest.mark.parametrize("arch", sorted(GENCODES))
def test_kernels_do_not_spill(compile_results, arch):
    """Register arrays must stay in registers (indexed by compile-time constants): no local memory."""
    for src in KERNEL_SOURCES:
        rc, log = compile_results[(arch, src)]
        assert rc == 0, log
        spills = [int(n) for n in re.findall(r"(\d+) bytes spill stores", log)]
        frames = [int(n) for n in re.findall(r"(\d+) bytes stack frame", log)]
        assert spills and max(spills) == 0, f"{src} ({arch}) spills registers:\n{log}"
        assert max(frames) == 0, f"{src} ({arch}) uses a stack frame (local memory):\n{log}"


def test_binding_syntax(compile_results):
    """bindings.cpp against the installed torch headers (host compiler, syntax only: no CUDA libs here)."""
    if "binding" not in compile_results:
        pytest.skip("needs a host C++ compiler and the CUDA headers")
    rc, log = compile_results["binding"]
    assert rc == 0, log[-5000:]


# ---- behaviour without the extension ------------------------------------------------------------------

def _ext_missing():
    return cuda_backend._load() is None


@pytest.mark.skipif(torch.cuda.is_available() and not _ext_missing(), reason="the extension is built here")
def test_cuda_backend_explains_how_to_build():
    ok, reason = cuda_backend.is_available(torch.device("cpu"))
    assert not ok and "CUDA tensors" in reason and "TAOPD_BUILD_CUDA=1" in reason
    ok, reason = backends.available("cuda", torch.device("cuda"))
    assert not ok and "TAOPD_BUILD_CUDA=1 pip install -e . --no-build-isolation" in reason
    z = torch.randn(3, 40)
    with pytest.raises(RuntimeError, match="TAOPD_BUILD_CUDA=1"):
        tk.teachability_kl_from_logits(z, z + 0.5, top_k=4, backend="cuda")
    h, w = torch.randn(3, 8), torch.randn(40, 8)
    with pytest.raises(RuntimeError, match="backend='cuda'"):
        tk.fused_teachability_kl(h, w, h, w, top_k=4, backend="cuda")
    # "auto" falls back silently
    loss, _ = tk.teachability_kl_from_logits(z, z + 0.5, top_k=4, backend="auto")
    assert torch.isfinite(loss)


def test_setup_force_switch_fails_cleanly_without_cuda_torch():
    if torch.version.cuda is not None:
        pytest.skip("torch is a CUDA build here")
    env = dict(os.environ, TAOPD_BUILD_CUDA="1")
    proc = subprocess.run([sys.executable, "setup.py", "--version"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode != 0 and "TAOPD_BUILD_CUDA=1" in proc.stderr and "not a CUDA build" in proc.stderr
    env["TAOPD_BUILD_CUDA"] = "0"
    proc = subprocess.run([sys.executable, "setup.py", "--version"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr


def test_bench_fails_cleanly_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("has CUDA")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "cuda_stats_bench.py"), "--n", "8"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "needs a CUDA device" in (proc.stderr + proc.stdout)
    assert "Traceback" not in proc.stderr


# ---- GPU: against the float64 reference --------------------------------------------------------------

@pytest.fixture(scope="module")
def ext():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if cuda_backend._load() is None:
        cuda_backend.build_jit()  # the package was installed without the extension: build it now
    return cuda_backend._load() or cuda_backend._ext


DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FLOAT_FIELDS = ("lse_student", "lse_teacher", "entropy_student", "kl_reverse", "kl_forward", "teacher_mass",
                "disagreement")


def _logits(rows, width, dtype, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(rows, width, generator=g) * scale
    z[:, :: max(width // 50, 1)] += 4.0  # a few strong tokens
    return z.to(dtype).cuda()


def _scaled(z, vocab_size, temperature):
    """The float32 logits the kernel sees: z[:, :V].float() * float32(1 / tau)."""
    return z[:, :vocab_size].float() * (1.0 / temperature)


def _naive_low_precision(zs, zt, vocab_size, temperature, top_k):
    """The obvious computation in the logits' own dtype (the bar for bf16/fp16 accuracy)."""
    zs = zs[:, :vocab_size] / temperature
    zt = zt[:, :vocab_size] / temperature
    lps, lpt = torch.log_softmax(zs, -1), torch.log_softmax(zt, -1)
    ps, pt = lps.exp(), lpt.exp()
    ids_s = torch.topk(zs, top_k, -1).indices
    out = {
        "lse_student": torch.logsumexp(zs, -1), "lse_teacher": torch.logsumexp(zt, -1),
        "entropy_student": -(ps * lps).sum(-1), "kl_reverse": (ps * (lps - lpt)).sum(-1),
        "kl_forward": (pt * (lpt - lps)).sum(-1), "teacher_mass": pt.gather(1, ids_s).sum(-1),
    }
    return {k: v.float().cpu() for k, v in out.items()}


def _check_rows(got, zs, zt, vocab_size, top_k, temperature, sampled=None, *, atol=2e-4, rtol=2e-4,
                naive=None, check_ids=True):
    ref = reference_row_stats(_scaled(zs, vocab_size, temperature).cpu(), _scaled(zt, vocab_size, temperature).cpu(),
                              top_k, None if sampled is None else sampled.cpu())
    if check_ids:
        assert torch.equal(got.topk_ids_student.cpu(), ref.topk_ids_student), "student top-K ids"
        assert torch.equal(got.topk_ids_teacher.cpu(), ref.topk_ids_teacher), "teacher top-K ids"
    for name in FLOAT_FIELDS + (("logp_student_sampled", "logp_teacher_sampled") if sampled is not None else ()):
        g, r = getattr(got, name).cpu().double(), getattr(ref, name).double()
        tol = atol + rtol * r.abs()
        if naive is not None and name in naive:
            tol = tol + (naive[name].double() - r).abs().max()
        finite = torch.isfinite(r)
        assert torch.equal(torch.isfinite(g), finite) or name == "disagreement", name
        err = (g - r).abs()[finite]
        assert bool((err <= tol[finite]).all()), f"{name}: max err {float(err.max()):.3e}"
    return ref


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("top_k", [1, 16, 32])
@pytest.mark.parametrize("widths,vocab_size", [((1000, 1000), 1000), ((1001, 1003), 1001),
                                                ((151936, 151936), 151936), ((152064, 151936), 151936)])
def test_stats_match_reference(ext, dtype, top_k, widths, vocab_size):
    rows = 6 if vocab_size > 10000 else 40
    zs = _logits(rows, widths[0], dtype, 1)
    zt = _logits(rows, widths[1], dtype, 2)
    y = torch.randint(0, vocab_size, (rows,), generator=torch.Generator().manual_seed(3)).cuda()
    got = cuda_backend.logits_forward_stats(zs, zt, vocab_size=vocab_size, top_k=top_k, temperature=1.0,
                                            sampled_ids=y)
    naive = None if dtype == torch.float32 else _naive_low_precision(zs, zt, vocab_size, 1.0, top_k)
    _check_rows(got, zs, zt, vocab_size, top_k, 1.0, y, naive=naive)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_stats_temperature_strided_and_misaligned(ext, dtype):
    base_s = _logits(12, 2051, dtype, 4)
    base_t = _logits(12, 2050, dtype, 5)
    for zs, zt in ((base_s[:, 1:], base_t[:, 2:]),  # misaligned row starts: scalar-load path
                   (base_s[:, :2048], base_t[:, :2048])):  # row stride > width
        got = cuda_backend.logits_forward_stats(zs, zt, vocab_size=2047, top_k=16, temperature=0.7)
        _check_rows(got, zs, zt, 2047, 16, 0.7, naive=None if dtype == torch.float32 else
                    _naive_low_precision(zs, zt, 2047, 0.7, 16))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("top_k", [1, 16, 32, 64])
def test_topk_ties_go_to_lower_id(ext, dtype, top_k):
    rows, width = 8, 5000
    zs = torch.randint(-3, 4, (rows, width), generator=torch.Generator().manual_seed(6)).float()  # massive ties
    zt = zs.clone()
    zt[:, 4000:] = zs[:, 100:1100]  # duplicated columns
    zs[1] = 0.0  # a constant row: top-K = ids 0..K-1
    zs[2, 4990:] = 10.0  # tied maxima at the end of the row
    zs, zt = zs.to(dtype).cuda(), zt.to(dtype).cuda()
    got = cuda_backend.logits_forward_stats(zs, zt, vocab_size=width, top_k=top_k, temperature=1.0)
    _check_rows(got, zs, zt, width, top_k, 1.0, atol=1e-3, rtol=1e-3)
    assert torch.equal(got.topk_ids_student[1].cpu(), torch.arange(top_k))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_neg_inf_logits(ext, dtype):
    rows, width = 10, 3000
    zs = _logits(rows, width, dtype, 7).float()
    zt = _logits(rows, width, dtype, 8).float()
    g = torch.Generator().manual_seed(9)
    mask = (torch.rand(rows, width, generator=g) < 0.6).cuda()
    zs[mask] = -torch.inf  # masked vocabulary: both models
    zt[mask] = -torch.inf
    zs[0, 20:] = -torch.inf  # fewer finite logits than K: -inf ids by lower id
    zt[0, 20:] = -torch.inf
    zs, zt = zs.to(dtype), zt.to(dtype)
    got = cuda_backend.logits_forward_stats(zs, zt, vocab_size=width, top_k=32, temperature=1.0)
    _check_rows(got, zs, zt, width, 32, 1.0, atol=1e-3, rtol=1e-3,
                naive=None if dtype == torch.float32 else _naive_low_precision(zs, zt, width, 1.0, 32))
    # teacher -inf where the student has mass: KL_rev = inf, like the reference
    zt2 = zt.clone()
    zt2[:, 5] = -torch.inf
    zs2 = zs.clone()
    zs2[:, 5] = 1.0
    got = cuda_backend.logits_forward_stats(zs2, zt2, vocab_size=width, top_k=8, temperature=1.0)
    assert bool(torch.isinf(got.kl_reverse).all()) and bool(torch.isfinite(got.kl_forward).all())


def _grad_case(dtype, estimator, vocab_size=3001, width=3005, rows=9, temperature=1.3):
    zs = _logits(rows, width, dtype, 10)
    zt = _logits(rows, width + 4, dtype, 11)
    y = torch.randint(0, vocab_size, (rows,), generator=torch.Generator().manual_seed(12)).cuda()
    stats = torch_backend.logits_forward_stats(zs, zt, vocab_size=vocab_size, top_k=4, temperature=temperature,
                                               sampled_ids=y)
    coef = torch.linspace(0.1, 1.0, rows, device="cuda")
    kw = dict(vocab_size=vocab_size, temperature=temperature, estimator=estimator, row_coef=coef, sampled_ids=y,
              sampled_weight=sampled_weight(stats.logp_student_sampled, stats.logp_teacher_sampled))
    return zs, zt, kw


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("estimator", ["full", "sampled"])
def test_logit_grad_matches_torch_backend(ext, dtype, estimator):
    zs, zt, kw = _grad_case(dtype, estimator)
    got = cuda_backend.logits_grad_kept(zs, None if estimator == "sampled" else zt, **kw)
    want = torch_backend.logits_grad_kept(zs, zt, **kw)
    assert got.dtype == torch.float32 and got.shape == zs.shape
    assert bool((got[:, kw["vocab_size"]:] == 0).all())
    torch.testing.assert_close(got, want, atol=1e-6 * float(want.abs().max()) + 1e-9, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("estimator", ["full", "sampled"])
def test_api_from_logits_with_masks(ext, estimator):
    rows, width = 64, 4099
    zs = _logits(rows, width, torch.bfloat16, 13).requires_grad_(True)
    zt = _logits(rows, width, torch.bfloat16, 14)
    g = torch.Generator().manual_seed(15)
    valid = (torch.rand(rows, generator=g) < 0.8).cuda()
    keep = (torch.rand(rows, generator=g) < 0.3).cuda()  # fixed kept set: no near-tie selection flips
    y = torch.randint(0, width, (rows,), generator=g).cuda()
    out = {}
    for backend in ("torch", "cuda"):
        z = zs.detach().clone().requires_grad_(True)
        loss, stats = tk.teachability_kl_from_logits(z, zt, valid_mask=valid, sampled_ids=y, top_k=16,
                                                     keep_mask=keep, estimator=estimator, backend=backend)
        loss.backward()
        out[backend] = (loss, stats, z.grad)
    (l0, s0, g0), (l1, s1, g1) = out["torch"], out["cuda"]
    assert torch.equal(s0.kept, s1.kept)
    assert torch.equal(s0.topk_ids_student, s1.topk_ids_student)
    for name in FLOAT_FIELDS:
        torch.testing.assert_close(getattr(s1, name), getattr(s0, name), atol=1e-4, rtol=1e-4, equal_nan=True)
    torch.testing.assert_close(l1, l0, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(g1.float(), g0.float(), atol=1e-5, rtol=1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("estimator", ["full", "sampled"])
def test_hidden_path_matches_reference(ext, dtype, estimator):
    n, d, v_s, v_t = 48, 64, 1030, 1024
    g = torch.Generator().manual_seed(16)
    h_s = (torch.randn(n, d, generator=g)).to(dtype)
    h_t = (torch.randn(n, d, generator=g)).to(dtype)
    w_s = (torch.randn(v_s, d, generator=g) / 4).to(dtype)
    w_t = (torch.randn(v_t, d, generator=g) / 4).to(dtype)
    b_s = (torch.randn(v_s, generator=g) / 4).to(dtype)
    y = torch.randint(0, v_t, (n,), generator=g)
    keep = torch.rand(n, generator=g) < 0.3
    ref_loss, ref = None, None
    hs_r, ws_r, bs_r = (x.clone().requires_grad_(True) for x in (h_s, w_s, b_s))
    ref_loss, ref = reference_teachability_kl(hs_r, ws_r, h_t, w_t, student_bias=bs_r, sampled_ids=y, top_k=8,
                                              estimator=estimator, keep_mask=keep, temperature=0.9)
    ref_loss.backward()
    hs_c, ws_c, bs_c = (x.cuda().requires_grad_(True) for x in (h_s, w_s, b_s))
    loss, stats = tk.fused_teachability_kl(hs_c, ws_c, h_t.cuda(), w_t.cuda(), student_bias=bs_c,
                                           sampled_ids=y.cuda(), top_k=8, estimator=estimator,
                                           keep_mask=keep.cuda(), temperature=0.9, backend="cuda")
    loss.backward()
    rows = ref["rows"]
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-3, rtol=2e-3)
    for name in FLOAT_FIELDS:
        torch.testing.assert_close(getattr(stats, name).cpu(), getattr(rows, name), **tol)
    torch.testing.assert_close(loss.cpu(), ref_loss, **tol)
    for got, want in ((hs_c.grad, hs_r.grad), (ws_c.grad, ws_r.grad), (bs_c.grad, bs_r.grad)):
        scale = float(want.float().abs().max())
        torch.testing.assert_close(got.float().cpu(), want.float(), atol=2e-2 * scale + 1e-6, rtol=2e-2)


@pytest.mark.gpu
def test_ops_are_traceable(ext):
    """Fake implementations: the ops run on meta tensors and under torch.compile."""
    zs = torch.empty(5, 300, device="meta", dtype=torch.bfloat16)
    out = torch.ops.taopd.teachability_stats(zs, zs, 300, 16, 1.0, None)
    assert out[5].shape == (5, 16) and out[9].shape == (0,)
    z = _logits(5, 300, torch.bfloat16, 17)

    def f(a, b):
        return torch.ops.taopd.teachability_stats(a, b, 300, 16, 1.0, None)[3].sum()

    torch.testing.assert_close(torch.compile(f, fullgraph=True)(z, z), f(z, z))


@pytest.mark.gpu
def test_launch_checks_are_actionable(ext):
    z = _logits(4, 100, torch.float32, 18)
    with pytest.raises(RuntimeError, match="unit stride"):
        torch.ops.taopd.teachability_stats(z.t().contiguous().t(), z, 100, 4, 1.0, None)
    with pytest.raises(RuntimeError, match="top_k must be in"):
        torch.ops.taopd.teachability_stats(z, z, 100, 65, 1.0, None)
    with pytest.raises(RuntimeError, match="one dtype"):
        torch.ops.taopd.teachability_stats(z, z.half(), 100, 4, 1.0, None)
    with pytest.raises(RuntimeError, match="vocab_size"):
        torch.ops.taopd.teachability_stats(z, z, 101, 4, 1.0, None)


def test_decoupled_forward_on_cpu_with_pytorch_statistics_standing_in(monkeypatch):
    """The decoupled hidden-state path (GEMM per row chunk, statistics kernel on the previous chunk) with the
    PyTorch logits statistics standing in for the kernel: chunking, the workspace bound and the chunk
    order give the PyTorch backend's statistics exactly (the stream logic itself needs a GPU: below)."""
    from helpers import assert_stats_close, make_inputs, truth_rows

    monkeypatch.setattr(cuda_backend, "_require", lambda device, top_k=None: None)
    monkeypatch.setattr(cuda_backend, "_stats_op", lambda zs, zt, v, k, tau, y: torch_backend.logits_forward_stats(
        zs, zt, vocab_size=v, top_k=k, temperature=tau, sampled_ids=y))
    inputs = make_inputs(n=37, v_s=300, v_t=310, seed=3)
    args = [inputs[k] for k in ("student_hidden", "student_weight")] + [None] + \
        [inputs[k] for k in ("teacher_hidden", "teacher_weight")] + [None]
    y = torch.randint(0, 300, (37,), generator=torch.Generator().manual_seed(1))
    got = cuda_backend.forward_stats(*args, vocab_size=300, top_k=8, temperature=0.7, sampled_ids=y, chunk_rows=8)
    truth = truth_rows(inputs, vocab_size=300, top_k=8, temperature=0.7, sampled_ids=y)
    assert_stats_close(got, truth)
    torch.testing.assert_close(got.logp_student_sampled.double(), truth.logp_student_sampled.double(), atol=2e-5, rtol=0)

    # The workspace: two chunks of both models' float32 logits within 256 MB at Qwen's vocabulary.
    rows = cuda_backend.workspace_rows(151_936)
    assert rows == 110 and 2 * 2 * 4 * 151_936 * rows <= cuda_backend.WORKSPACE_BYTES

    order = []
    out = cuda_backend.overlapped_chunks(10, 3, torch.device("cpu"),
                                         lambda sl: order.append(("gemm", sl.start)) or (None,),
                                         lambda sl, bufs: order.append(("stats", sl.start)) or sl.start)
    assert out == [0, 3, 6, 9] and len(order) == 8 and order[0] == ("gemm", 0)


@pytest.mark.gpu
def test_decoupled_forward_overlaps_and_matches_torch(ext):
    """On a GPU: the two-stream decoupled forward at N=2048, V=151,936 gives the torch backend's statistics,
    and its extra memory stays near the 256 MB workspace (plus the outputs)."""
    from helpers import assert_stats_close

    g = torch.Generator(device="cuda").manual_seed(0)
    n, d_s, d_t, v = 2048, 1024, 2048, 151_936
    h_s = torch.randn(n, d_s, device="cuda", generator=g).bfloat16()
    w_s = (torch.randn(v, d_s, device="cuda", generator=g) * (3 / d_s ** 0.5)).bfloat16()
    h_t = torch.randn(n, d_t, device="cuda", generator=g).bfloat16()
    w_t = (torch.randn(v, d_t, device="cuda", generator=g) * (3 / d_t ** 0.5)).bfloat16()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    got = cuda_backend.forward_stats(h_s, w_s, None, h_t, w_t, None, vocab_size=v, top_k=16, temperature=1.0)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    want = torch_backend.forward_stats(h_s, w_s, None, h_t, w_t, None, vocab_size=v, top_k=16, temperature=1.0)
    assert_stats_close(got, want, atol=2e-3, rtol=2e-3, check_ids=False)
    assert extra <= cuda_backend.WORKSPACE_BYTES + (64 << 20), extra
