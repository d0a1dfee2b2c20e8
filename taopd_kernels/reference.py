"""The obvious implementation: materialise float32 logits for both models, then docs/math.md (Per-position statistics; Scores and selection; Loss and gradients).

Only for tests and tiny inputs: it holds several [N, V] float32 tensors. Gradients come from
autograd, so they are an independent check of the analytic backward of the other backends.
Top-K uses a stable descending sort, so ties go to the lower vocabulary id by construction.
``dtype=torch.float64`` gives the ground truth the tests measure every implementation against.
"""

from __future__ import annotations

from typing import Optional

import torch

from .options import DEFAULTS, default_vocab_size
from .selection import default_sequence_ids, score_and_select
from .stats import RowStats


def reference_logits(hidden, weight, bias, vocab_size: int, temperature: float,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """z[:, :V] / tau computed in ``dtype`` (inputs upcast first), shape [N, V]."""
    h = hidden.reshape(-1, hidden.shape[-1]).to(dtype)
    z = h @ weight[:vocab_size].to(dtype).T
    if bias is not None:
        z = z + bias[:vocab_size].to(dtype)
    return z / temperature


def _plogq(p: torch.Tensor, log_ratio: torch.Tensor) -> torch.Tensor:
    """p * log_ratio with 0 where p == 0 (so -inf logits contribute nothing)."""
    return torch.where(p > 0, p * log_ratio, torch.zeros_like(p))


def reference_row_stats(
    zs: torch.Tensor,
    zt: torch.Tensor,
    top_k: int,
    sampled_ids: Optional[torch.Tensor] = None,
) -> RowStats:
    """docs/math.md, Per-position statistics from scaled logits [R, V] of both models, computed in their dtype."""
    logp_s = torch.log_softmax(zs, dim=-1)
    logp_t = torch.log_softmax(zt, dim=-1)
    p_s, p_t = logp_s.exp(), logp_t.exp()
    ids_s = torch.sort(zs, dim=-1, descending=True, stable=True).indices[:, :top_k].clone()  # frees [R, V]
    ids_t = torch.sort(zt, dim=-1, descending=True, stable=True).indices[:, :top_k].clone()
    mass = p_t.gather(1, ids_s).sum(-1)
    in_union = torch.zeros_like(zs, dtype=torch.bool)
    in_union.scatter_(1, ids_s, True)
    in_union.scatter_(1, ids_t, True)
    neg_inf = torch.full_like(zs, -torch.inf)
    logpb_s = torch.log_softmax(torch.where(in_union, zs, neg_inf), dim=-1)
    logpb_t = torch.log_softmax(torch.where(in_union, zt, neg_inf), dim=-1)
    disagreement = _plogq(logpb_t.exp(), logpb_t - logpb_s).sum(-1)
    out = RowStats(
        lse_student=torch.logsumexp(zs, -1).float(),
        lse_teacher=torch.logsumexp(zt, -1).float(),
        entropy_student=(-_plogq(p_s, logp_s).sum(-1)).float(),
        kl_reverse=_plogq(p_s, logp_s - logp_t).sum(-1).float(),
        kl_forward=_plogq(p_t, logp_t - logp_s).sum(-1).float(),
        topk_ids_student=ids_s,
        topk_ids_teacher=ids_t,
        teacher_mass=mass.float(),
        disagreement=disagreement.float(),
        expected_gap=_plogq(p_s, zs - zt).sum(-1).float(),
    )
    if sampled_ids is not None:
        y = sampled_ids.reshape(-1, 1).long().clamp(0, zs.shape[-1] - 1)
        out.logp_student_sampled = logp_s.gather(1, y).squeeze(1).float()
        out.logp_teacher_sampled = logp_t.gather(1, y).squeeze(1).float()
    return out


def reference_teachability_kl(
    student_hidden,
    student_weight,
    teacher_hidden,
    teacher_weight,
    *,
    student_bias=None,
    teacher_bias=None,
    valid_mask=None,
    sequence_ids=None,
    sampled_ids=None,
    top_k: int = DEFAULTS.top_k,
    keep_ratio: float = DEFAULTS.keep_ratio,
    strategy: str = DEFAULTS.strategy,
    estimator: str = DEFAULTS.estimator,
    temperature: float = DEFAULTS.temperature,
    vocab_size: Optional[int] = DEFAULTS.vocab_size,
    min_per_sequence: int = DEFAULTS.min_per_sequence,
    seed: int = DEFAULTS.seed,
    keep_mask=None,
    dtype: torch.dtype = torch.float32,
):
    """Loss (differentiable w.r.t. the student's hidden, weight and bias) and a dict of statistics.

    Inputs are [N, D] (or [B, T, D], flattened). Autograd runs through logits of ``dtype``.
    ``keep_mask`` replaces the selection (to compare losses and gradients on one kept set).
    """
    if vocab_size is None:
        vocab_size = default_vocab_size(student_weight.shape[0], teacher_weight.shape[0])
    n = student_hidden.reshape(-1, student_hidden.shape[-1]).shape[0]
    valid = torch.ones(n, dtype=torch.bool) if valid_mask is None else valid_mask.reshape(-1).bool()
    if sequence_ids is None:
        sequence_ids = default_sequence_ids(student_hidden.shape[:-1], student_hidden.device)
    seq = None if sequence_ids is None else sequence_ids.reshape(-1)

    zs = reference_logits(student_hidden, student_weight, student_bias, vocab_size, temperature, dtype)
    with torch.no_grad():
        zt = reference_logits(teacher_hidden, teacher_weight, teacher_bias, vocab_size, temperature, dtype)
        rows = reference_row_stats(zs.detach(), zt, top_k, sampled_ids)
    score, kept = score_and_select(strategy, entropy=rows.entropy_student, disagreement=rows.disagreement,
                                   teacher_mass=rows.teacher_mass, valid=valid, keep_ratio=keep_ratio,
                                   sequence_ids=seq, min_per_sequence=min_per_sequence, seed=seed)
    if keep_mask is not None:
        kept = keep_mask.reshape(-1).bool() & valid
    m = kept.to(dtype)
    denom = m.sum().clamp_min(1.0)
    logp_s = torch.log_softmax(zs, -1)
    if estimator == "full":
        logp_t = torch.log_softmax(zt, -1)
        p_s = logp_s.exp()
        kl = torch.where(p_s > 0, p_s * (logp_s - logp_t), torch.zeros_like(p_s)).sum(-1)
        per_row = torch.where(kept, kl, torch.zeros_like(kl))
    else:
        y = sampled_ids.reshape(-1, 1).long().clamp(0, vocab_size - 1)
        lp_s_y = logp_s.gather(1, y).squeeze(1)
        lp_t_y = torch.log_softmax(zt, -1).gather(1, y).squeeze(1)
        advantage = -(lp_s_y - lp_t_y).detach()
        per_row = torch.where(kept, -advantage * lp_s_y, torch.zeros_like(lp_s_y))
    loss = (per_row * m).sum() / denom
    return loss.float(), {"rows": rows, "score": score, "kept": kept, "valid": valid}
