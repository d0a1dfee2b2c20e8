"""The Triton backend: fused kernels for the hidden-state path (``backend="triton"``; first in "auto"'s
fixed order on CUDA, where "auto" otherwise measures: ``taopd_kernels.backends``).

Forward (``stats_forward.py``): one kernel computes both models' logits tile by tile with
``tl.dot`` and folds them at once into the statistics of docs/math.md, Per-position statistics (both log-sum-exps, the
student's entropy, both KLs, each model's running top-K with the other model's logit carried, the
sampled-token logits). Rows x vocabulary splits make the grid (split-major, so the rows of the programs
in flight stay in L2); the splits' partial states are merged
on the host on [R, K]-sized tensors. Nothing of size positions x vocabulary is ever allocated.

Backward (``kept_backward.py``): for the kept rows only, a kernel recomputes the logit
tiles and writes the logit gradient of docs/math.md, Loss and gradients into a workspace of [R_kept, chunk] columns;
cuBLAS matmuls reduce each chunk into dh (float32), dW (float32, each row written once) and the kernel
also reduces db. The workspace is bounded (``WORKSPACE_BYTES``), never [N, V].

``chunk_vocab`` sets the forward's vocabulary split size and the backward's column chunk (tests use it
to exercise the multi-split / multi-chunk paths); ``chunk_rows`` bounds the backward's row chunk; both
default to sizes chosen from the GPU and the workspace budget. The logits path
(``teachability_kl_from_logits``) is not implemented here: ``backend="triton"`` there is an error,
``"auto"`` picks another backend.

Triton is imported lazily: ``taopd_kernels`` imports without it, and ``is_available`` reports why not.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from ...stats import RowStats
from .._tiles import KeptGrads


def is_available(device: torch.device):
    """(True, "") when triton is importable and the device can run it (CUDA, or the CPU interpreter)."""
    device = torch.device(device)
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return False, f"triton cannot be imported ({exc}); pip install 'taopd-kernels[triton]'"
    if device.type == "cuda":
        return True, ""
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return True, ""
    return False, (f"the triton backend runs on CUDA devices (or on the CPU with TRITON_INTERPRET=1), "
                   f"not on {device}")


def forward_stats(h_s, w_s, b_s, h_t, w_t, b_t, *, vocab_size: int, top_k: int, temperature: float,
                  sampled_ids: Optional[torch.Tensor] = None, chunk_rows: Optional[int] = None,
                  chunk_vocab: Optional[int] = None) -> RowStats:
    """RowStats for every row of h_s [R, D_s], h_t [R, D_t] (docs/math.md, Per-position statistics). ``chunk_rows`` is unused."""
    from .stats_forward import launch_stats_forward, merge_partials

    if h_s.shape[0] == 0:
        return RowStats.concat([], h_s.device, top_k, sampled_ids is not None)
    with torch.no_grad():
        partial = launch_stats_forward(h_s, w_s, b_s, h_t, w_t, b_t, vocab_size=vocab_size, top_k=top_k,
                                       temperature=temperature, sampled_ids=sampled_ids, split_size=chunk_vocab)
        return merge_partials(*partial, top_k=top_k, with_sampled=sampled_ids is not None)


def backward_kept(h_s, w_s, b_s, h_t, w_t, b_t, *, vocab_size: int, temperature: float, estimator: str,
                  row_coef: torch.Tensor, sampled_ids: Optional[torch.Tensor] = None,
                  sampled_weight: Optional[torch.Tensor] = None, need_bias_grad: bool = False,
                  chunk_rows: Optional[int] = None, chunk_vocab: Optional[int] = None):
    """(dh float32 [R, D_s], dW float32 [V_s, D_s], db float32 [V_s] or None) for the kept rows given.

    ``row_coef`` = grad_output / normalizer / tau per row; estimator "sampled" needs ``sampled_ids`` and
    ``sampled_weight`` (= logp_s(y) - logp_t(y)) and ignores the teacher (h_t may be None).
    """
    from .kept_backward import kept_backward

    with torch.no_grad():
        # The kept rows' softmax (maximum, log S0, E_ps[z_s - z_t]) is recomputed by the backward kernel's
        # own first pass, from the very logits its gradient pass forms: p_s then sums to 1 and p_s * (g - E[g])
        # to 0 on them, as in the PyTorch backend.
        d_h, d_w, d_b, lse = kept_backward(h_s, w_s, b_s, h_t, w_t, b_t, vocab_size=vocab_size,
                                           temperature=temperature, estimator=estimator, row_coef=row_coef,
                                           sampled_ids=sampled_ids, sampled_weight=sampled_weight,
                                           need_bias_grad=need_bias_grad, chunk_rows=chunk_rows,
                                           chunk_vocab=chunk_vocab)
        return KeptGrads(d_h, d_w, d_b, lse=lse)
