"""Triton kernels of the ``triton`` backend, and the pieces they share.

Two kernels, one per file, each with its launcher:

- ``stats_forward``: docs/math.md, Per-position statistics for every row in one pass over the vocabulary (GEMM tiles of both
  models folded at once into online-softmax and running top-K state), vocabulary split across programs
  when the rows alone cannot fill the GPU, partial states merged on the host in a small second step;
- ``kept_backward``: the logit gradient of docs/math.md, Loss and gradients for the kept rows, recomputed tile by tile
  into a bounded workspace, reduced into dh, dW, db by cuBLAS matmuls.

This module holds the shared ``logits_tile`` (the GEMM tile of one model) and the small host-side
choices both launchers make: interpreter or GPU, the dtype and precision of ``tl.dot``, the SM count.
It imports triton, so the backend module (``__init__.py``) imports it lazily.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Ids used inside the top-K state (all below 2**31): a masked (out-of-range) column is given the id
# MASKED_ID, placeholders of a not-yet-full top-K list the ids PLACEHOLDER_ID + k. Real ids are below
# vocab_size <= MASKED_ID, so every real entry sorts before masked columns and placeholders.
MASKED_ID = (1 << 30) - 1
PLACEHOLDER_ID = 1 << 30
NO_ID = (1 << 31) - 1


def interpreting() -> bool:
    """True when triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def dot_config(h: torch.Tensor, w: torch.Tensor):
    """(dtype both tl.dot operands are cast to, input_precision) for one model.

    bf16/fp16 pairs multiply as they are (float32 accumulation); anything else (float32, mixed)
    multiplies in float32, as 3xTF32 on the GPU (about float32 accuracy on tensor cores; override with
    TAOPD_TRITON_FP32_DOT=ieee|tf32x3|tf32). The interpreter multiplies everything in float32.
    """
    if h.dtype not in _TL_DTYPES or w.dtype not in _TL_DTYPES:
        raise TypeError(f"the triton backend supports float32, bfloat16 and float16, got {h.dtype} and {w.dtype}")
    if interpreting():
        # The interpreter's tl.dot multiplies raw bf16 bits; upcast (bf16 x bf16 products are exact in
        # float32, so this matches the GPU's float32 accumulation up to summation order).
        return tl.float32, "ieee"
    if h.dtype == w.dtype and h.dtype != torch.float32:
        return _TL_DTYPES[h.dtype], "tf32"  # precision is ignored for 16-bit operands
    return tl.float32, os.environ.get("TAOPD_TRITON_FP32_DOT", "tf32x3")


def operand_bytes(*tensors) -> int:
    """Bytes per element of the widest operand (sizes the shared-memory stages of the configs)."""
    return max(t.element_size() for t in tensors if t is not None)


def shipped(configs: list) -> list:
    """The autotune candidates to try: all of them, or only the first when TAOPD_TRITON_PIN_CONFIG=1
    (first contact with a GPU: no autotuning, one compile per kernel and shape class)."""
    return configs[:1] if os.environ.get("TAOPD_TRITON_PIN_CONFIG") == "1" else configs


def sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def l2_bytes(device: torch.device) -> int:
    """The GPU's L2 cache size in bytes (0 when unknown: no L2 term in the split choice)."""
    if device.type != "cuda":
        return 0
    return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 0)


def is_hopper(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def rows_bucket(rows: int) -> int:
    """Autotune key for the row count: powers of two, so tuning happens once per size class."""
    return triton.next_power_of_2(max(int(rows), 1))


def device_guard(device: torch.device):
    """Launch on the tensors' GPU, not the current one."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    import contextlib
    return contextlib.nullcontext()


@triton.jit
def logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, D: tl.constexpr, stride_hm, stride_hd, stride_wv, stride_wd, inv_tau,
                HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                EVEN_D: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """float32 [BLOCK_M, BLOCK_V] tile (h[rows] @ w[cols]^T + b[cols]) * inv_tau.

    ``rows`` and ``cols`` must already be in range (callers clamp them and mask the results), so the
    hidden-size loop loads without row/column masks; only the hidden-size tail is masked (EVEN_D off).
    Offsets are int64: rows * stride and cols * stride can pass 2**31.
    """
    offs_d = tl.arange(0, BLOCK_D)
    h_ptrs = h_ptr + rows.to(tl.int64)[:, None] * stride_hm + offs_d[None, :] * stride_hd
    w_ptrs = w_ptr + cols.to(tl.int64)[None, :] * stride_wv + offs_d[:, None] * stride_wd
    acc = tl.zeros([BLOCK_M, BLOCK_V], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        if EVEN_D:
            h = tl.load(h_ptrs)
            w = tl.load(w_ptrs)
        else:
            d_ok = offs_d < D - d0
            h = tl.load(h_ptrs, mask=d_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=d_ok[:, None], other=0.0)
        acc = tl.dot(h.to(DOT_DTYPE), w.to(DOT_DTYPE), acc, input_precision=PRECISION)
        h_ptrs += BLOCK_D * stride_hd
        w_ptrs += BLOCK_D * stride_wd
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols).to(tl.float32)[None, :]
    return acc * inv_tau
