"""The PyTorch backend: ``chunked`` for the hidden-state path, and the same streaming code on slices of
logits the caller already holds. Runs everywhere; the default on the CPU and the GPU fallback.

On a CUDA device with the extension built (and K <= 64), the per-chunk statistics come from the CUDA
statistics kernel instead (``cuda_backend``: a cuBLAS GEMM per row chunk, then one read of the logits);
backward stays the chunked PyTorch code."""

from __future__ import annotations

from typing import Optional

import torch

from .chunked import (
    DEFAULT_CHUNK_ROWS,
    chunked_backward_kept,
    chunked_forward_stats,
    concat_row_stats,
    default_chunk_vocab,
    logit_grad_tile,
    logits_tile_fn,
    stream_row_stats,
)
from .stats import RowStats

backward_kept = chunked_backward_kept


def _cuda_kernels(device, top_k: int):
    """The CUDA backend module when its statistics kernel can serve this call, else None."""
    if torch.device(device).type != "cuda":
        return None
    from . import cuda_backend

    ok, _ = cuda_backend.is_available(device)
    return cuda_backend if ok and top_k <= cuda_backend.MAX_TOP_K else None


def forward_stats(h_s, w_s, b_s, h_t, w_t, b_t, **kwargs) -> RowStats:
    kernels = _cuda_kernels(h_s.device, kwargs["top_k"])
    if kernels is not None:
        return kernels.forward_stats(h_s, w_s, b_s, h_t, w_t, b_t, **kwargs)
    return chunked_forward_stats(h_s, w_s, b_s, h_t, w_t, b_t, **kwargs)


def is_available(device: torch.device):
    return True, ""


def logits_forward_stats(zs, zt, *, vocab_size: int, top_k: int, temperature: float,
                         sampled_ids: Optional[torch.Tensor] = None,
                         chunk_rows: Optional[int] = None, chunk_vocab: Optional[int] = None) -> RowStats:
    kernels = _cuda_kernels(zs.device, top_k)
    if kernels is not None:
        return kernels.logits_forward_stats(zs, zt, vocab_size=vocab_size, top_k=top_k, temperature=temperature,
                                            sampled_ids=sampled_ids, chunk_rows=chunk_rows, chunk_vocab=chunk_vocab)
    chunk_rows = chunk_rows or DEFAULT_CHUNK_ROWS
    chunk_vocab = chunk_vocab or default_chunk_vocab(min(chunk_rows, zs.shape[0]))
    parts = []
    with torch.no_grad():
        for r0 in range(0, zs.shape[0], chunk_rows):
            r1 = min(r0 + chunk_rows, zs.shape[0])
            rows_s, rows_t = zs[r0:r1, :vocab_size], zt[r0:r1, :vocab_size]
            finite = bool(torch.isfinite(rows_s).all() and torch.isfinite(rows_t).all())
            tile_fn = logits_tile_fn(rows_s, rows_t, temperature)
            y = None if sampled_ids is None else sampled_ids[r0:r1]
            parts.append(stream_row_stats(tile_fn, r1 - r0, vocab_size, top_k, chunk_vocab, zs.device, y,
                                          finite=finite))
    return concat_row_stats(parts, zs.device, top_k, sampled_ids is not None)


def logits_grad_kept(zs, zt, *, vocab_size: int, temperature: float, estimator: str,
                     lse_s, lse_t, kl_rev, row_coef, sampled_ids=None, sampled_weight=None,
                     chunk_rows: Optional[int] = None, chunk_vocab: Optional[int] = None) -> torch.Tensor:
    """d loss / d student logits for the kept rows given, float32 [R, V_s] (zero beyond vocab_size)."""
    chunk_vocab = chunk_vocab or default_chunk_vocab(zs.shape[0])
    grad = torch.zeros(zs.shape, dtype=torch.float32, device=zs.device)
    need_teacher = estimator == "full"
    with torch.no_grad():
        tile_fn = logits_tile_fn(zs, zt, temperature, need_teacher)
        for v0 in range(0, vocab_size, chunk_vocab):
            v1 = min(v0 + chunk_vocab, vocab_size)
            tile_s, tile_t = tile_fn(v0, v1)
            grad[:, v0:v1] = logit_grad_tile(
                tile_s, tile_t, v0, estimator=estimator, lse_s=lse_s, lse_t=lse_t, kl_rev=kl_rev,
                row_coef=row_coef, sampled_ids=sampled_ids, sampled_weight=sampled_weight)
    return grad
