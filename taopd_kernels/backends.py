"""Which implementation computes the statistics and the kept-row backward.

A backend is a module with (all optional but the first two for the hidden-state path):

- ``forward_stats(h_s, w_s, b_s, h_t, w_t, b_t, *, vocab_size, top_k, temperature, sampled_ids,
  chunk_rows, chunk_vocab) -> RowStats`` for every row given;
- ``backward_kept(h_s, w_s, b_s, h_t, w_t, b_t, *, vocab_size, temperature, estimator, lse_s, lse_t,
  kl_rev, row_coef, sampled_ids, sampled_weight, need_bias_grad, chunk_rows, chunk_vocab)
  -> (dh float32 [R, D_s], dW float32 [V_s, D_s], db float32 [V_s] | None)`` for the kept rows given;
- ``logits_forward_stats(zs, zt, *, vocab_size, top_k, temperature, sampled_ids, chunk_rows,
  chunk_vocab) -> RowStats`` and ``logits_grad_kept(zs, zt, *, vocab_size, temperature, estimator,
  lse_s, lse_t, kl_rev, row_coef, sampled_ids, sampled_weight, chunk_rows, chunk_vocab)
  -> float32 [R, V]`` for callers that hold logits;
- ``is_available(device) -> (bool, reason)``.

The math contract for all of them is SPEC sections 2 and 4; ``chunked`` is the PyTorch one.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch

_MODULES = {
    "torch": "taopd_kernels.torch_backend",
    "triton": "taopd_kernels.triton_backend",
    "cuda": "taopd_kernels.cuda_backend",
}


def available(name: str, device: torch.device) -> tuple[bool, str]:
    try:
        module = importlib.import_module(_MODULES[name])
    except ImportError as exc:
        return False, f"the {name} backend could not be imported ({exc})"
    return module.is_available(device)


def resolve(name: str, device: torch.device, *, needs: str = "forward_stats") -> ModuleType:
    """The backend module for ``name`` ("auto" picks triton on CUDA when it works, else torch)."""
    if name == "auto":
        candidates = ["triton", "cuda", "torch"] if device.type == "cuda" else ["torch"]
        if os.environ.get("TAOPD_BACKEND"):
            candidates = [os.environ["TAOPD_BACKEND"]] + candidates
        for candidate in candidates:
            ok, _ = available(candidate, device)
            if ok:
                module = importlib.import_module(_MODULES[candidate])
                if hasattr(module, needs):
                    return module
        raise RuntimeError("no backend available (this should not happen: the torch backend always is)")
    ok, reason = available(name, device)
    if not ok:
        raise RuntimeError(f"backend={name!r} cannot run on {device}: {reason}")
    module = importlib.import_module(_MODULES[name])
    if not hasattr(module, needs):
        raise ValueError(f"backend={name!r} does not implement {needs}; use backend='torch' or 'auto'")
    return module
