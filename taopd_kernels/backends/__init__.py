"""The backends and the one place that chooses between them (``resolve``).

A backend is a module of this package with exactly this interface (all keyword arguments required
unless marked optional; float32 results; the math contract is docs/math.md, Per-position statistics
and Loss and gradients):

- ``is_available(device) -> (bool, reason)``; optional ``supports(top_k) -> (bool, reason)``.
- Hidden-state path:
  ``forward_stats(h_s, w_s, b_s, h_t, w_t, b_t, *, vocab_size, top_k, temperature, sampled_ids,
  chunk_rows, chunk_vocab) -> RowStats`` for every row given;
  ``backward_kept(h_s, w_s, b_s, h_t, w_t, b_t, *, vocab_size, temperature, estimator, row_coef,
  sampled_ids, sampled_weight, need_bias_grad, chunk_rows, chunk_vocab) -> KeptGrads`` for the kept
  rows given: the tuple (dh [R, D_s], dW [V_s, D_s], db [V_s] or None) with ``.lse``, the rows'
  log-sum-exps recomputed from the backward's own logits (the API checks reused statistics with it).
  ``row_coef`` [R] = grad_output * row weight / (normalizer * tau); estimator "sampled" reads
  ``sampled_ids`` and ``sampled_weight`` [R] (w = logp_s(y) - logp_t(y)) and not the teacher.
- Logits path (optional):
  ``logits_forward_stats(zs, zt, *, vocab_size, top_k, temperature, sampled_ids, chunk_rows,
  chunk_vocab) -> RowStats`` and ``logits_grad_kept(zs, zt, *, vocab_size, temperature, estimator,
  row_coef, sampled_ids, sampled_weight, chunk_rows, chunk_vocab) -> [R, V_s]`` (zero beyond
  vocab_size; ``zt`` None for estimator "sampled").
- Vocabulary shards (optional; ``vocab_parallel=`` needs them, ``vocab_parallel.ShardedBackend`` calls
  them): ``forward_partial(h_s, w_s, b_s, h_t, w_t, b_t, *, vocab_size, top_k, temperature, id_offset,
  sampled_ids, chunk_rows, chunk_vocab) -> PartialRowState`` (``_tiles.py``) over the first ``vocab_size``
  rows of the heads given, a column's id being ``id_offset`` + its index (``sampled_ids`` in those columns;
  a token outside them contributes nothing), and ``logits_forward_partial(zs, zt, ...)`` likewise; then
  ``forward_stats`` must equal ``forward_partial(..., id_offset=0).finish()``. ``backward_kept`` and
  ``logits_grad_kept`` take ``softmax_reduce`` (optional, default None): called with each row chunk's
  (max, S0, Q) of the columns given, between the backend's softmax pass and its gradient pass, it returns
  the whole vocabulary's, so each rank forms its columns' gradient against the whole row's softmax.

| name | module | runs on |
| --- | --- | --- |
| ``torch`` | ``pytorch.py`` | everywhere |
| ``triton`` | ``triton/`` | CUDA; the CPU with ``TRITON_INTERPRET=1`` |
| ``cuda`` | ``cuda.py`` (extension ``taopd_kernels._C``) | CUDA with the extension built; top_k <= 64 |

A backend name means that backend: it runs, or the call fails with the reason. Only ``"auto"``
chooses (``resolve``), and it is the only fallback. The fixed order is: on a CUDA device triton, then
cuda, then torch, the first that is available and supports the call; on any other device torch.
``TAOPD_BACKEND=<name>`` puts one name first in that order (and, usable, it is taken unmeasured).
On CUDA, given the call's shape class, ``"auto"`` takes the fastest usable backend as measured once
per device and class (``autotune.py``: the measuring and its cache file).
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Optional

import torch

from ..options import BACKENDS, DEFAULTS
from . import autotune
from .autotune import ShapeClass

_MODULES = {
    "torch": "taopd_kernels.backends.pytorch",
    "triton": "taopd_kernels.backends.triton",
    "cuda": "taopd_kernels.backends.cuda",
}
assert set(_MODULES) == set(BACKENDS) - {"auto"}

_PATHS = {"hidden": ("forward_stats", "backward_kept"), "logits": ("logits_forward_stats", "logits_grad_kept")}


_LOADED: dict = {}  # name -> module, imported once (no per-call import: torch.compile traces a dict lookup)


def module(name: str) -> ModuleType:
    mod = _LOADED.get(name)
    if mod is None:
        mod = _LOADED[name] = _import(name)
    return mod


def _import(name: str) -> ModuleType:
    return importlib.import_module(_MODULES[name])


def available(name: str, device) -> tuple[bool, str]:
    """(True, "") when backend ``name`` can run on ``device``, else (False, the reason)."""
    try:
        mod = module(name)
    except ImportError as exc:
        return False, f"the {name} backend could not be imported ({exc})"
    return mod.is_available(torch.device(device))


def _usable(name: str, device, path: str, top_k: int) -> tuple[bool, str]:
    ok, reason = available(name, device)
    if not ok:
        return False, reason
    mod = module(name)
    missing = [fn for fn in _PATHS[path] if not hasattr(mod, fn)]
    if missing:
        what = "logits" if path == "logits" else "hidden-state"
        return False, f"the {name} backend has no {what} path ({', '.join(missing)})"
    if hasattr(mod, "supports"):
        return mod.supports(top_k)
    return True, ""


def auto_order(device) -> list[str]:
    """The order in which ``"auto"`` tries the backends on ``device``."""
    order = ["triton", "cuda", "torch"] if torch.device(device).type == "cuda" else ["torch"]
    first = os.environ.get("TAOPD_BACKEND")
    if first:
        if first not in _MODULES:
            raise ValueError(f"TAOPD_BACKEND={first!r}: must be one of {tuple(_MODULES)}")
        order = [first] + [n for n in order if n != first]
    return order


def resolve(name: str, device, *, path: str = "hidden", top_k: int = DEFAULTS.top_k,
            shape: Optional[ShapeClass] = None) -> tuple[str, ModuleType]:
    """(backend name, module) for a call on ``device``; ``path`` is "hidden" or "logits". ``shape`` (the call's
    ``ShapeClass``, hidden-state path) lets ``"auto"`` choose by measurement on CUDA (``autotune``)."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    if name != "auto":
        ok, reason = _usable(name, device, path, top_k)
        if not ok:
            error = RuntimeError if not available(name, device)[0] else ValueError
            raise error(f"backend={name!r} cannot run this call on {torch.device(device)}: {reason}")
        return name, module(name)
    measure = path == "hidden" and shape is not None and autotune.can_measure(device)
    usable, reasons = [], []
    for candidate in auto_order(device):
        ok, reason = _usable(candidate, device, path, top_k)
        if ok:
            usable.append(candidate)
            if not measure:
                break  # the fixed order: the first usable one
        else:
            reasons.append(f"{candidate}: {reason}")
    if not usable:
        raise RuntimeError("no backend can run this call: " + "; ".join(reasons))
    choice = usable[0]
    # A usable TAOPD_BACKEND leads the order and is taken unmeasured.
    if measure and len(usable) > 1 and os.environ.get("TAOPD_BACKEND") not in usable:
        choice = autotune.measured_choice(usable, device, shape) or choice
    return choice, module(choice)
