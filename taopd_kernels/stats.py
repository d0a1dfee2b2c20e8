"""Plain-data containers for the per-position statistics of SPEC section 2.

``RowStats`` is the contract between the API and every backend (torch, triton, cuda): tensors over the
rows a backend was given, flattened to [R]. ``TeachabilityStats`` is what users get back: the same
numbers reshaped to the caller's leading dimensions, plus the selection (score, kept mask).
Everything is detached; positions that are not valid hold NaN (floats) or -1 (ids), so that a mean
over the wrong positions shows up as NaN instead of a plausible number.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

import torch


@dataclass
class RowStats:
    """Per-row statistics as a backend returns them (float32 [R], int64 [R, K])."""

    lse_student: torch.Tensor
    lse_teacher: torch.Tensor
    entropy_student: torch.Tensor
    kl_reverse: torch.Tensor
    kl_forward: torch.Tensor
    topk_ids_student: torch.Tensor
    topk_ids_teacher: torch.Tensor
    teacher_mass: torch.Tensor  # C: sum of p_t over the student's top-K ids
    disagreement: torch.Tensor  # D: forward KL of the renormalised p_t, p_s on the union of top-K
    logp_student_sampled: Optional[torch.Tensor] = None
    logp_teacher_sampled: Optional[torch.Tensor] = None


@dataclass
class TeachabilityStats:
    """Detached per-position statistics, shaped like the caller's leading dimensions.

    Float fields are float32 and NaN at positions that are not valid; id fields are int64 [..., K] and
    -1 there. ``lse_*`` are log-sum-exps of the temperature-scaled logits (log p = z / tau - lse).
    ``score`` is the selection score of the chosen strategy (NaN where not valid), ``kept`` the
    positions that carry loss, ``valid`` the positions that were scored.
    """

    lse_student: torch.Tensor
    lse_teacher: torch.Tensor
    entropy_student: torch.Tensor
    kl_reverse: torch.Tensor
    kl_forward: torch.Tensor
    topk_ids_student: torch.Tensor
    topk_ids_teacher: torch.Tensor
    teacher_mass: torch.Tensor
    disagreement: torch.Tensor
    valid: torch.Tensor
    score: Optional[torch.Tensor] = None
    kept: Optional[torch.Tensor] = None
    logp_student_sampled: Optional[torch.Tensor] = None
    logp_teacher_sampled: Optional[torch.Tensor] = None

    @property
    def num_valid(self) -> int:
        return int(self.valid.sum())

    @property
    def num_kept(self) -> int:
        return 0 if self.kept is None else int(self.kept.sum())

    def summary(self) -> dict:
        """Means for logging: every statistic over valid positions and over kept positions."""
        out = {"num_valid": self.num_valid, "num_kept": self.num_kept}
        out["kept_fraction"] = out["num_kept"] / max(out["num_valid"], 1)
        groups = {"all": self.valid}
        if self.kept is not None:
            groups["kept"] = self.kept
        for name in ("entropy_student", "kl_reverse", "kl_forward", "teacher_mass", "disagreement"):
            value = getattr(self, name)
            for group, mask in groups.items():
                sel = value[mask]
                out[f"{name}/{group}"] = float(sel.double().mean()) if sel.numel() else float("nan")
        return out

    def to(self, device) -> "TeachabilityStats":
        kwargs = {}
        for f in fields(self):
            v = getattr(self, f.name)
            kwargs[f.name] = v.to(device) if isinstance(v, torch.Tensor) else v
        return TeachabilityStats(**kwargs)


def scatter_rows(rows: RowStats, valid_flat: torch.Tensor, idx: torch.Tensor, leading: tuple,
                 top_k: int) -> TeachabilityStats:
    """Place backend rows (computed for the valid positions ``idx`` of ``valid_flat``) into full-size tensors."""
    n = valid_flat.numel()
    device = valid_flat.device

    def fill_float(x):
        if x is None:
            return None
        out = torch.full((n,), float("nan"), dtype=torch.float32, device=device)
        out[idx] = x.float()
        return out.view(leading)

    def fill_ids(x):
        out = torch.full((n, top_k), -1, dtype=torch.long, device=device)
        out[idx] = x.long()
        return out.view(*leading, top_k)

    return TeachabilityStats(
        lse_student=fill_float(rows.lse_student),
        lse_teacher=fill_float(rows.lse_teacher),
        entropy_student=fill_float(rows.entropy_student),
        kl_reverse=fill_float(rows.kl_reverse),
        kl_forward=fill_float(rows.kl_forward),
        topk_ids_student=fill_ids(rows.topk_ids_student),
        topk_ids_teacher=fill_ids(rows.topk_ids_teacher),
        teacher_mass=fill_float(rows.teacher_mass),
        disagreement=fill_float(rows.disagreement),
        valid=valid_flat.view(leading),
        logp_student_sampled=fill_float(rows.logp_student_sampled),
        logp_teacher_sampled=fill_float(rows.logp_teacher_sampled),
    )
