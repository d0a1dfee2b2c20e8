"""The CUDA C++ backend: fused statistics and logit-gradient kernels from csrc/ (extension ``taopd_kernels._C``).

Logits path (``logits_forward_stats``, ``logits_grad_kept``): one kernel reads each student and teacher
logit row once (bf16, fp16 or fp32; any row stride, unit column stride) and writes every statistic of
docs/math.md, Per-position statistics with float32 accumulation; top-K (K <= 64) is exact with ties to the lower id. The
gradient kernel writes d loss / d student logits for the rows given (the kept ones).

Hidden-state path (``forward_stats``, ``backward_kept``): per chunk of ``chunk_rows`` rows the logits
[R, V] are formed by one cuBLAS GEMM, then handed to the same kernels. Precision: for bf16/fp16 inputs
the GEMM multiplies in the input dtype with float32 accumulation and a float32 result
(``aten::mm.dtype``, torch >= 2.8); where that overload is missing it falls back to a float32 GEMM over
tiles of W upcast ``chunk_vocab`` rows at a time (exact products, much slower). float32 inputs use a
float32 GEMM (TF32 only if the caller enabled ``torch.backends.cuda.matmul.allow_tf32``). The
backward's GEMMs into dh, dW, db are float32 on vocabulary tiles of W upcast to float32.
Memory held: the forward keeps two chunks of both models' float32 logits, within ``WORKSPACE_BYTES``
(256 MiB: 110 rows at V = 151,936), the GEMMs of one chunk overlapping the statistics kernel of the
previous one on a second stream; the backward the [chunk_rows, V] logits and gradient of one chunk.

Build: ``TAOPD_BUILD_CUDA=1 pip install -e . --no-build-isolation`` (or ``build_jit()`` for a JIT build).
"""

from __future__ import annotations

import importlib
import os
import struct
from typing import Callable, Optional

import torch

from ..options import ESTIMATORS
from ..stats import RowStats
from ._tiles import (KeptGrads, _OnlineSoftmax, accumulate_head_grads, head_grad_buffers, mm_float32, row_chunks,
                     vocab_tiles)

BUILD_HINT = ("build it with `TAOPD_BUILD_CUDA=1 pip install -e . --no-build-isolation` "
              "(needs nvcc and a CUDA build of torch; TORCH_CUDA_ARCH_LIST picks the GPU architectures), "
              "or call taopd_kernels.backends.cuda.build_jit()")
MAX_TOP_K = 64
DEFAULT_CHUNK_ROWS = 1024  # backward: kept rows per chunk
WORKSPACE_BYTES = 256 << 20  # forward: two chunks of both models' float32 logits
DEFAULT_CHUNK_VOCAB = 16384  # W rows upcast at a time where a float32 GEMM is needed

_ext = None
_ext_error: Optional[str] = None
_fakes_registered = False


def _register_fakes() -> None:
    """Shapes of the ops for torch.compile / meta tensors (torch.library.register_fake, torch >= 2.4)."""
    global _fakes_registered
    if _fakes_registered:
        return
    register = getattr(torch.library, "register_fake", None) or getattr(torch.library, "impl_abstract")

    @register("taopd::teachability_stats")
    def _stats_fake(zs, zt, vocab_size, top_k, temperature, sampled_ids=None):
        rows = zs.shape[0]
        f = lambda n: zs.new_empty((n,), dtype=torch.float32)  # noqa: E731
        ids = lambda: zs.new_empty((rows, top_k), dtype=torch.long)  # noqa: E731
        ny = rows if sampled_ids is not None else 0
        return (f(rows), f(rows), f(rows), f(rows), f(rows), ids(), ids(), f(rows), f(rows), f(rows), f(ny), f(ny))

    @register("taopd::teachability_logit_grad")
    def _grad_fake(zs, zt, vocab_size, temperature, sampled_estimator, row_max, log_s0, expected_gap, row_coef,
                   sampled_ids=None, sampled_weight=None):
        return zs.new_empty(zs.shape, dtype=torch.float32)

    _fakes_registered = True


def _load():
    """The extension module, or None (the reason in _ext_error)."""
    global _ext, _ext_error
    if _ext is not None:
        return _ext
    try:
        _ext = importlib.import_module("taopd_kernels._C")
    except ImportError as exc:
        _ext_error = f"the CUDA extension taopd_kernels._C is not built ({exc})"
        return None
    _register_fakes()
    return _ext


def build_jit(verbose: bool = False, extra_cuda_cflags=None):
    """Compile csrc/ now with torch.utils.cpp_extension.load (ninja) and register the ops; returns the module.

    For development and tests when the package was installed without the extension. Respects
    TORCH_CUDA_ARCH_LIST like the setup.py build.
    """
    global _ext, _ext_error
    if _load() is not None:
        return _ext
    from torch.utils.cpp_extension import load

    csrc = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "csrc")
    sources = [os.path.join(csrc, f) for f in ("bindings.cpp", "teachability_stats.cu", "teachability_grad.cu")]
    missing = [s for s in sources if not os.path.exists(s)]
    if missing:
        raise RuntimeError(f"build_jit needs the source tree (missing {missing}); {BUILD_HINT}")
    _ext = load(name="taopd_kernels_C_jit", sources=sources, extra_include_paths=[csrc],
                extra_cflags=["-O3"], extra_cuda_cflags=["-O3", "-lineinfo"] + list(extra_cuda_cflags or []),
                verbose=verbose)
    _ext_error = None
    _register_fakes()
    return _ext


def is_available(device) -> tuple[bool, str]:
    device = torch.device(device)
    problems = []
    if device.type != "cuda":
        problems.append(f"it runs on CUDA tensors only (got device {device})")
    elif not torch.cuda.is_available():
        problems.append(f"torch {torch.__version__} sees no CUDA device")
    if _load() is None:
        problems.append(f"{_ext_error}; {BUILD_HINT}")
    return (not problems), "; ".join(problems)


def supports(top_k: int) -> tuple[bool, str]:
    """Whether the kernels cover this call's options (their top-K lists hold at most MAX_TOP_K ids)."""
    if top_k > MAX_TOP_K:
        return False, f"the CUDA kernels support top_k <= {MAX_TOP_K}, got top_k={top_k}"
    return True, ""


def _require(device, top_k: Optional[int] = None) -> None:
    ok, reason = is_available(device)
    if not ok:
        raise RuntimeError(f"the taopd CUDA kernels cannot run: {reason}")
    if top_k is not None:
        ok, reason = supports(top_k)
        if not ok:
            raise ValueError(f"backend='cuda': {reason}; use backend='torch', 'triton' or 'auto'")


# ---- logits path ---------------------------------------------------------------------------------

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _prepare_logits(zs: torch.Tensor, zt: Optional[torch.Tensor]):
    """One supported dtype for both, unit stride in the last dim (the kernels read any row stride)."""
    if zt is not None and (zs.dtype != zt.dtype or zs.dtype not in _KERNEL_DTYPES):
        zs, zt = zs.float(), zt.float()
    elif zs.dtype not in _KERNEL_DTYPES:
        zs = zs.float()
    unit = lambda z: z if (z is None or z.shape[-1] <= 1 or z.stride(-1) == 1) else z.contiguous()  # noqa: E731
    return unit(zs), unit(zt)


def _row_stats(out, with_sampled: bool) -> RowStats:
    lse_s, lse_t, ent, kl_rev, kl_fwd, ids_s, ids_t, mass, dis, gap, lp_s, lp_t = out
    return RowStats(lse_student=lse_s, lse_teacher=lse_t, entropy_student=ent, kl_reverse=kl_rev,
                    kl_forward=kl_fwd, topk_ids_student=ids_s, topk_ids_teacher=ids_t, teacher_mass=mass,
                    disagreement=dis, expected_gap=gap, logp_student_sampled=lp_s if with_sampled else None,
                    logp_teacher_sampled=lp_t if with_sampled else None)


def _stats_op(zs, zt, vocab_size, top_k, temperature, sampled_ids) -> RowStats:
    y = None if sampled_ids is None else sampled_ids.reshape(-1).long().contiguous()
    out = torch.ops.taopd.teachability_stats(zs, zt, int(vocab_size), int(top_k), float(temperature), y)
    return _row_stats(out, y is not None)


def logits_forward_stats(zs, zt, *, vocab_size: int, top_k: int, temperature: float,
                         sampled_ids: Optional[torch.Tensor] = None,
                         chunk_rows: Optional[int] = None, chunk_vocab: Optional[int] = None) -> RowStats:
    """RowStats for every row of zs [R, V_s], zt [R, V_t]; only the first ``vocab_size`` columns are used.

    One kernel launch over all rows (the outputs are [R] and [R, K]; no temporaries), so ``chunk_rows``
    and ``chunk_vocab`` are accepted for interface compatibility and ignored. ``top_k`` > 64 is a
    ValueError (``backend="auto"`` picks another backend for it).
    """
    _require(zs.device, top_k)
    with torch.no_grad():
        zs, zt = _prepare_logits(zs.detach(), zt.detach())
        return _stats_op(zs, zt, vocab_size, top_k, temperature, sampled_ids)


def _row_softmax(zs, zt, vocab_size: int, temperature: float, full: bool, chunk_vocab: int):
    """(max, log S0, E_ps[x_s - x_t] or None) of the scaled logits x = float32(z) * float32(1 / tau) the
    kernel forms, over vocabulary tiles of these rows (bounded temporaries). The gradient kernel takes
    p_s = e^((x_s - max) - log S0) from them: consistent with its own logits, and never x_s - lse."""
    inv_tau = struct.unpack("f", struct.pack("f", 1.0 / temperature))[0]  # float32(1 / tau), as the kernel has it
    soft = _OnlineSoftmax(zs.shape[0], zs.device)
    for v0, v1 in vocab_tiles(vocab_size, chunk_vocab):
        xs = zs[:, v0:v1].float() * inv_tau
        soft.update(xs, xs - zt[:, v0:v1].float() * inv_tau if full else xs, False)
    return soft.m, soft.s0.log(), soft.expected_gap() if full else None


def _logit_grad(zs, zt, *, vocab_size: int, temperature: float, estimator: str, row_coef, sampled_ids=None,
                sampled_weight=None, chunk_vocab: Optional[int] = None):
    """(d loss / d student logits float32 [R, V_s], the rows' lse): the rows' softmax and E_ps[x_s - x_t]
    recomputed from these logits (``_row_softmax``), then one kernel launch."""
    _require(zs.device)
    sampled = estimator == "sampled"
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be 'full' or 'sampled', got {estimator!r}")
    f32 = lambda x: None if x is None else x.reshape(-1).float().contiguous()  # noqa: E731
    with torch.no_grad():
        zs, zt = _prepare_logits(zs.detach(), None if (sampled or zt is None) else zt.detach())
        row_max, log_s0, gap = _row_softmax(zs, zt, vocab_size, temperature, not sampled,
                                            chunk_vocab or DEFAULT_CHUNK_VOCAB)
        grad = torch.ops.taopd.teachability_logit_grad(
            zs, None if sampled else zt, int(vocab_size), float(temperature), sampled,
            f32(row_max), f32(log_s0), None if sampled else f32(gap), f32(row_coef),
            sampled_ids.reshape(-1).long().contiguous() if sampled else None,
            f32(sampled_weight) if sampled else None)
    return grad, row_max + log_s0


def logits_grad_kept(zs, zt, *, vocab_size: int, temperature: float, estimator: str,
                     row_coef, sampled_ids=None, sampled_weight=None,
                     chunk_rows: Optional[int] = None, chunk_vocab: Optional[int] = None) -> torch.Tensor:
    """d loss / d student logits for the rows given, float32 [R, V_s] (zero beyond vocab_size).

    ``zt`` may be None for estimator "sampled". The kernel's softmax comes from these logits (``_logit_grad``).
    """
    return _logit_grad(zs, zt, vocab_size=vocab_size, temperature=temperature, estimator=estimator,
                       row_coef=row_coef, sampled_ids=sampled_ids, sampled_weight=sampled_weight,
                       chunk_vocab=chunk_vocab)[0]


# ---- hidden-state path: cuBLAS logits per row chunk, then the kernels -------------------------------

def _logits_f32(h, w, b, vocab_size: int, chunk_vocab: int) -> torch.Tensor:
    """float32 logits h @ w[:V].T (+ b[:V]) for one row chunk h [R, D]."""
    w = w[:vocab_size]
    z = mm_float32(h, w.t(), upcast=False)
    if z is None:
        hf = h.float()
        if w.dtype == torch.float32:
            z = hf @ w.t()
        else:
            z = torch.empty((h.shape[0], vocab_size), dtype=torch.float32, device=h.device)
            for v0, v1 in vocab_tiles(vocab_size, chunk_vocab):
                torch.mm(hf, w[v0:v1].float().t(), out=z[:, v0:v1])
    if b is not None:
        z += b[:vocab_size].float()
    return z


def workspace_rows(vocab_size: int, budget: int = WORKSPACE_BYTES) -> int:
    """Rows per chunk such that two chunks of float32 logits of both models fit in ``budget`` bytes."""
    return max(1, budget // (2 * 2 * 4 * max(vocab_size, 1)))


def overlapped_chunks(rows: int, chunk_rows: int, device, produce: Callable, consume: Callable) -> list:
    """``consume(sl, produce(sl))`` for every row chunk, with chunk i+1's ``produce`` (the GEMMs, on the
    current stream) overlapping chunk i's ``consume`` (the statistics kernel, on a side stream) on a GPU.

    At most two chunks' buffers are alive: before producing chunk i the current stream waits until the
    side stream has finished chunk i-2 (an event, no host sync), and every buffer is recorded on the side
    stream so that the allocator does not hand its memory out before the side stream is done with it.
    Elsewhere (the CPU) it is the plain loop. Returns the ``consume`` results in chunk order.
    """
    chunks = list(row_chunks(rows, chunk_rows))
    if torch.device(device).type != "cuda":
        return [consume(sl, produce(sl)) for sl in chunks]
    main = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device)
    consumed, results = [], []
    for sl in chunks:
        if len(consumed) == 2:
            main.wait_event(consumed.pop(0))  # chunk i-2's buffers may be reused now
        buffers = produce(sl)
        ready = torch.cuda.Event()
        ready.record(main)
        with torch.cuda.stream(side):
            side.wait_event(ready)
            results.append(consume(sl, buffers))
            for b in buffers:
                if b is not None:
                    b.record_stream(side)
            done = torch.cuda.Event()
            done.record(side)
        consumed.append(done)
        del buffers
    main.wait_stream(side)
    return results


def forward_stats(h_s, w_s, b_s, h_t, w_t, b_t, *, vocab_size: int, top_k: int, temperature: float,
                  sampled_ids: Optional[torch.Tensor] = None,
                  chunk_rows: Optional[int] = None, chunk_vocab: Optional[int] = None) -> RowStats:
    """RowStats for every row of h_s [R, D_s], h_t [R, D_t], decoupled: per row chunk a cuBLAS GEMM per model
    writes float32 logits, and the statistics kernel reads the previous chunk's on a second stream
    (``overlapped_chunks``). ``chunk_rows`` default: what keeps the two chunks' logits within
    ``WORKSPACE_BYTES`` (256 MB)."""
    _require(h_s.device, top_k)
    chunk_rows = chunk_rows or workspace_rows(vocab_size)
    chunk_vocab = chunk_vocab or DEFAULT_CHUNK_VOCAB

    def produce(sl):
        return (_logits_f32(h_s[sl], w_s, b_s, vocab_size, chunk_vocab),
                _logits_f32(h_t[sl], w_t, b_t, vocab_size, chunk_vocab))

    def consume(sl, logits):
        y = None if sampled_ids is None else sampled_ids[sl]
        return _stats_op(*logits, vocab_size, top_k, temperature, y)

    with torch.no_grad():
        parts = overlapped_chunks(h_s.shape[0], chunk_rows, h_s.device, produce, consume)
    return RowStats.concat(parts, h_s.device, top_k, sampled_ids is not None)


def backward_kept(h_s, w_s, b_s, h_t, w_t, b_t, *, vocab_size: int, temperature: float, estimator: str,
                  row_coef, sampled_ids=None, sampled_weight=None,
                  need_bias_grad: bool = False, chunk_rows: Optional[int] = None,
                  chunk_vocab: Optional[int] = None):
    """(dh float32 [R, D_s], dW float32 [V_s, D_s], db float32 [V_s] | None) for the kept rows given.

    Per row chunk: recompute the logits (GEMM), the gradient kernel, then float32 GEMMs into dh, dW, db
    over vocabulary tiles (rows of W beyond vocab_size get zero).
    """
    _require(h_s.device)
    chunk_rows = chunk_rows or DEFAULT_CHUNK_ROWS
    chunk_vocab = chunk_vocab or DEFAULT_CHUNK_VOCAB
    d_h, d_w, d_b = head_grad_buffers(h_s, w_s, need_bias_grad)
    sampled = estimator == "sampled"
    lse = []
    with torch.no_grad():
        for sl in row_chunks(h_s.shape[0], chunk_rows):
            hs = h_s[sl]
            zs = _logits_f32(hs, w_s, b_s, vocab_size, chunk_vocab)
            zt = None if sampled else _logits_f32(h_t[sl], w_t, b_t, vocab_size, chunk_vocab)
            pick = lambda x: None if x is None else x[sl]  # noqa: E731
            g, lse_rows = _logit_grad(zs, zt, vocab_size=vocab_size, temperature=temperature, estimator=estimator,
                                      row_coef=row_coef[sl], sampled_ids=pick(sampled_ids),
                                      sampled_weight=pick(sampled_weight), chunk_vocab=chunk_vocab)
            lse.append(lse_rows)
            del zs, zt
            hs32 = hs.float()
            for v0, v1 in vocab_tiles(vocab_size, chunk_vocab):
                accumulate_head_grads(g[:, v0:v1], hs32, w_s, v0, v1, d_h[sl], d_w, d_b)
            del g
    return KeptGrads(d_h, d_w, d_b, torch.cat(lse) if lse else h_s.new_zeros(0, dtype=torch.float32))
