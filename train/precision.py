"""Precision of the student's training: what bf16 would round away, and the fraction of weights a step
changed (train/README.md, Precision)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch

from .config import DTYPES, Config, student_dtypes, student_precision

if TYPE_CHECKING:
    from .run import Models


def report_precision(cfg: Config, models: Models, log=print) -> Optional[dict]:
    """Log the student's precision and its memory cost; for pure low-precision students, estimate how
    many AdamW updates of size lr round away (and warn). Returns a sample to measure after one step."""
    p = student_precision(cfg)
    n = sum(t.numel() for t in models.student.parameters())
    how = "FSDP2 MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)" if models.autocast_dtype is None \
        else "torch.autocast(bfloat16)"
    if p == "bf16-mixed":
        log(f"[precision] bf16-mixed: student weights and AdamW moments in float32 (master copy), forwards in "
            f"bfloat16 ({how}); teacher in {cfg.teacher.dtype}. Student training state: {n * 16 / 2**30:.2f} GiB "
            f"for {n:,} parameters (4 + 4 grad + 8 AdamW bytes each; bf16-pure: {n * 8 / 2**30:.2f} GiB)")
        return None
    if p == "fp32":
        log(f"[precision] fp32: student weights, AdamW moments and forwards in float32; teacher in {cfg.teacher.dtype}")
        return None
    dtype = DTYPES[student_dtypes(cfg)[0]]
    frac = rounded_away_fraction(models.student, cfg.optim.lr, dtype)
    msg = (f"[precision] {p}: student weights and AdamW moments in {dtype}; an AdamW update of lr={cfg.optim.lr:g} "
           f"is below half a {dtype} step for {frac:.1%} of the trainable weights (sampled) and rounds away")
    log(msg + ("" if frac < 0.01 else "; warning: use precision=bf16-mixed (fp32 master weights) to train them"))
    return sample_weights(models.student)


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def rounded_away_fraction(model, lr: float, dtype: torch.dtype, per_tensor: int = 65536) -> float:
    """Fraction of (a sample of) the trainable weights w whose dtype spacing/2 exceeds lr: an update of
    size lr leaves them unchanged."""
    eps = torch.finfo(dtype).eps
    lost = total = 0
    for t in model.parameters():
        if not t.requires_grad:
            continue
        w = _local(t).detach().reshape(-1)[:per_tensor].float().abs()
        if not w.numel():
            continue
        spacing = torch.exp2(torch.floor(torch.log2(w.clamp_min(torch.finfo(torch.float32).tiny)))) * eps
        lost += int((spacing / 2 > lr).sum())
        total += w.numel()
    return lost / max(total, 1)


def sample_weights(model, per_tensor: int = 65536) -> dict:
    return {n: _local(t).detach().reshape(-1)[:per_tensor].clone() for n, t in model.named_parameters()
            if t.requires_grad}


def changed_fraction(model, before: dict) -> float:
    changed = total = 0
    for n, t in model.named_parameters():
        if n in before:
            now = _local(t).detach().reshape(-1)[:before[n].numel()]
            changed += int((now != before[n]).sum())
            total += now.numel()
    return changed / max(total, 1)
