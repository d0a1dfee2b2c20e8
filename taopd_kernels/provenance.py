"""Fingerprints of the loss head's inputs, so that statistics reused with ``stats=`` are refused when they
were computed from other tensors (another teacher, another batch, an earlier step), whichever rows differ.

A matrix ``x [R, D]`` is fingerprinted by ``x @ r`` ([R] float32) for a fixed random vector ``r [D]``:
O(R * D), against O(N * V * D) for the statistics. Every row is covered, so a change in any row (beyond
the tolerance) shows. A bias ``b [V]`` is its own fingerprint. Two fingerprints of the same values may
differ by float32 rounding (another device, another chunking), so they are compared with the tolerance
of the backward's log-sum-exp check: ``|f - f'| <= 1e-4 (1 + |x| @ |r|)``, the scale being the size of
the dot product's terms. The comparison is a device flag read with the call's deferred checks (no sync).
"""

from __future__ import annotations

from typing import Dict, Optional

import torch

from .options import DeferredChecks

# Names of the inputs whose fingerprint is one number per position (compared at valid positions only).
PER_POSITION = ("student_hidden", "teacher_hidden")
RELATIVE_TOLERANCE = 1e-4  # as ``api._check_reused_lse``
_ROWS_PER_CHUNK_ELEMENTS = 1 << 24  # float32 copies of bf16 / fp16 matrices are made this many elements at a time
_PROBES: Dict[tuple, torch.Tensor] = {}


def _probe(dim: int, device) -> torch.Tensor:
    """The fixed random vector r [dim] (float32, the same on every device and process)."""
    key = (dim, str(device))
    if key not in _PROBES:
        gen = torch.Generator(device="cpu").manual_seed(0x7A0D + dim)
        _PROBES[key] = torch.randn(dim, generator=gen, dtype=torch.float32).to(device)
    return _PROBES[key]


def _project(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    x = x.reshape(-1, x.shape[-1])
    if x.dtype == torch.float32:
        return x @ r
    rows = max(1, _ROWS_PER_CHUNK_ELEMENTS // max(x.shape[1], 1))
    return torch.cat([c.float() @ r for c in x.split(rows)]) if x.shape[0] else x.new_zeros(0, dtype=torch.float32)


def fingerprint(x: torch.Tensor) -> torch.Tensor:
    """float32 [R]: ``x @ r`` for a matrix [..., D] (rows flattened), a float32 copy for a vector."""
    x = x.detach()
    if x.dim() == 1:
        return x.float().clone()
    return _project(x, _probe(x.shape[-1], x.device))


def _scale(x: torch.Tensor) -> torch.Tensor:
    x = x.detach()
    if x.dim() == 1:
        return x.float().abs()
    return _project(x.abs(), _probe(x.shape[-1], x.device).abs())


def fingerprints(**tensors: Optional[torch.Tensor]) -> dict:
    """{name: fingerprint} of the tensors given (None skipped)."""
    return {name: fingerprint(t) for name, t in tensors.items() if t is not None}


def check_same_inputs(before: Optional[dict], checks: DeferredChecks, valid: torch.Tensor,
                      **tensors: Optional[torch.Tensor]) -> None:
    """Adds to ``checks`` one flag per input: its fingerprint now differs from ``before`` beyond the tolerance
    (at ``valid`` positions for the hidden states); the error names the input."""
    if before is None:
        raise ValueError("stats carry no fingerprints of the inputs they were computed from (made by hand, by "
                         "TeachabilityStats.concat or by an older version); pass the TeachabilityStats that "
                         "teachability_stats / fused_teachability_kl returned for these inputs")
    for name, x in tensors.items():
        if x is None:
            continue
        old = before.get(name)
        if old is None or old.shape[0] != (x.shape[0] if x.dim() == 1 else x.numel() // x.shape[-1]):
            raise ValueError(f"stats were computed without {name} or with another shape of it; recompute them")
        now = fingerprint(x)
        close = (now == old) | ((now - old).abs() <= RELATIVE_TOLERANCE * (1 + _scale(x)))
        if name in PER_POSITION:
            close = close | ~valid
        checks.add(~close.all(), lambda name=name: ValueError(
            f"stats were computed from another {name} than this call's (another batch, model or step: its "
            f"fingerprint differs); recompute them (teachability_stats) for these inputs"))
