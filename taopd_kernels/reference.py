"""The obvious implementation: materialise float32 logits for both models, then docs/math.md (Per-position statistics; Scores and selection; Loss and gradients).

Only for tests and tiny inputs: it holds several [N, V] float32 tensors. Gradients come from
autograd, so they are an independent check of the analytic backward of the other backends.
Top-K uses a stable descending sort, so ties go to the lower vocabulary id by construction.
``dtype=torch.float64`` gives the ground truth the tests measure every implementation against.
"""

from __future__ import annotations

from typing import Optional

import torch

from .estimators import sampled_token_loss
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
        per_row = torch.where(kept, sampled_token_loss(lp_s_y, lp_t_y), torch.zeros_like(lp_s_y))
    loss = (per_row * m).sum() / denom
    return loss.float(), {"rows": rows, "score": score, "kept": kept, "valid": valid}


# ---------------------------------------------------------------------------- sparse teacher signal
# docs/math.md, Sparse teacher signal: a row-by-row float64 twin of ``taopd_kernels.sparse`` written with
# plain Python sets and sorts, for the tests.

import math  # noqa: E402  (this section's own import; the module's head is shared)

_SPARSE_REST_SLACK_PER_TERM = 2.0 ** -23


def _known_row(ids, logps, extra_ids=(), extra_logps=(), vocab_size=None):
    """(known {id: logp}, p_min, rest) of one row: the returned top-k plus any scored ids."""
    usable = lambda i: i >= 0 and (vocab_size is None or i < vocab_size)  # noqa: E731
    known = {int(i): float(lp) for i, lp in zip(ids, logps) if usable(i)}
    p_min = min((math.exp(lp) for lp in known.values()), default=math.inf)
    for i, lp in zip(extra_ids, extra_logps):
        if usable(i) and int(i) not in known:
            known[int(i)] = float(lp)
    mass = sum(math.exp(lp) for lp in known.values())
    rest = min(1.0, max(0.0, 1.0 - mass) + len(known) * _SPARSE_REST_SLACK_PER_TERM)
    return known, p_min, rest, mass


def _ranked_row(known_returned: dict, k: int) -> list:
    return [i for i, _ in sorted(known_returned.items(), key=lambda kv: (-kv[1], kv[0]))[:k]]


def _filled_row(known: dict, p_min: float, rest: float, query: list) -> list:
    """log p at each query id: known, or log min(p_min, rest / number of unknown query ids)."""
    unknown = [i for i in query if i not in known]
    fill = min(p_min, rest / max(len(unknown), 1))
    return [known[i] if i in known else (math.log(fill) if fill > 0 else -math.inf) for i in query]


def _union_kl_row(logp_t: list, logp_s: list) -> float:
    lt, ls = torch.tensor(logp_t, dtype=torch.float64), torch.tensor(logp_s, dtype=torch.float64)
    lt, ls = lt - torch.logsumexp(lt, 0), ls - torch.logsumexp(ls, 0)
    return float(_plogq(lt.exp(), lt - ls).sum())


def reference_sparse_stats(*, teacher_topk_ids, teacher_topk_logprobs, top_k: int, student_logits=None,
                           student_topk_ids=None, student_topk_logprobs=None, teacher_scored_ids=None,
                           teacher_scored_logprobs=None, sampled_ids=None, teacher_logprob_sampled=None,
                           temperature: float = DEFAULTS.temperature, vocab_size: Optional[int] = None) -> dict:
    """float64 statistics of docs/math.md, Sparse teacher signal, for inputs flattened to [N, ...]: a dict of
    [N] tensors (teacher_mass, teacher_mass_upper, teacher_mass_exact, disagreement, entropy_student,
    logp_student_sampled, kl_sampled) and lists of the top-K ids."""
    t_ids, t_lp = teacher_topk_ids.reshape(-1, teacher_topk_ids.shape[-1]), teacher_topk_logprobs.double()
    t_lp = t_lp.reshape(t_ids.shape).clamp(max=0.0)
    n = t_ids.shape[0]
    if student_logits is not None:
        z = student_logits.reshape(n, -1).double()
        vocab_size = z.shape[1] if vocab_size is None else vocab_size
        logp_s = torch.log_softmax(z[:, :vocab_size] / temperature, 1)
    out = {k: [] for k in ("teacher_mass", "teacher_mass_upper", "teacher_mass_exact", "disagreement",
                           "entropy_student", "logp_student_sampled", "kl_sampled", "ids_s", "ids_t")}
    for r in range(n):
        extra = ((), ())
        if teacher_scored_ids is not None:
            extra = (teacher_scored_ids.reshape(n, -1)[r].tolist(),
                     teacher_scored_logprobs.reshape(n, -1)[r].double().clamp(max=0.0).tolist())
        t_known, t_pmin, t_rest, _ = _known_row(t_ids[r].tolist(), t_lp[r].tolist(), *extra, vocab_size=vocab_size)
        returned, _, _, _ = _known_row(t_ids[r].tolist(), t_lp[r].tolist(), vocab_size=vocab_size)
        ids_t = _ranked_row(returned, top_k)
        if student_logits is not None:
            order = torch.sort(-(z[r, :vocab_size] / temperature), stable=True).indices[:top_k].tolist()
            ids_s, row = order, logp_s[r]
            s_at = lambda q: [float(row[i]) for i in q]  # noqa: E731
            out["entropy_student"].append(float(-_plogq(row.exp(), row).sum()))
            lp_y = float(row[int(sampled_ids.reshape(-1)[r])]) if sampled_ids is not None else math.nan
        else:
            s_known, s_pmin, s_rest, _ = _known_row(student_topk_ids.reshape(n, -1)[r].tolist(),
                                                     student_topk_logprobs.reshape(n, -1)[r].double()
                                                     .clamp(max=0.0).tolist(), vocab_size=vocab_size)
            ids_s = _ranked_row(s_known, top_k)
            s_at = lambda q: _filled_row(s_known, s_pmin, s_rest, q)  # noqa: E731
            out["entropy_student"].append(math.nan)
            lp_y = math.nan
        unknown_s = [i for i in ids_s if i not in t_known]
        c_lb = sum(math.exp(t_known[i]) for i in ids_s if i in t_known)
        union = ids_s + [i for i in ids_t if i not in ids_s]
        out["teacher_mass"].append(c_lb)
        out["teacher_mass_upper"].append(c_lb + min(t_rest, len(unknown_s) * t_pmin) if unknown_s else c_lb)
        out["teacher_mass_exact"].append(not unknown_s)
        out["disagreement"].append(_union_kl_row(_filled_row(t_known, t_pmin, t_rest, union), s_at(union)))
        lp_t_y = float(teacher_logprob_sampled.reshape(-1)[r]) if teacher_logprob_sampled is not None else math.nan
        out["logp_student_sampled"].append(lp_y)
        out["kl_sampled"].append(lp_y - lp_t_y)
        out["ids_s"].append(ids_s)
        out["ids_t"].append(ids_t)
    result = {k: torch.tensor(v, dtype=torch.float64) for k, v in out.items() if k not in ("ids_s", "ids_t")}
    result["teacher_mass_exact"] = result["teacher_mass_exact"].bool()
    return {**result, "ids_s": out["ids_s"], "ids_t": out["ids_t"]}


def reference_sparse_loss(student_logits, sampled_ids, teacher_logprob_sampled, kept, *,
                          temperature: float = DEFAULTS.temperature, normalizer: Optional[float] = None):
    """The sampled-token loss over the kept rows in float64 with autograd (docs/math.md, Loss and gradients,
    estimator "sampled"): sum_kept (logp_s(y) - logp_t(y)).detach() * logp_s(y) / normalizer."""
    z = student_logits.reshape(-1, student_logits.shape[-1]).double() / temperature
    lp_y = torch.log_softmax(z, 1).gather(1, sampled_ids.reshape(-1, 1).long()).squeeze(1)
    per_row = sampled_token_loss(lp_y, teacher_logprob_sampled.reshape(-1).double())
    kept = kept.reshape(-1).bool()
    norm = float(kept.sum()) if normalizer is None else normalizer
    return torch.where(kept, per_row, torch.zeros_like(lp_y)).sum() / max(norm, 1.0)


def reference_topk_forward_kl(student_logits, teacher_topk_ids, teacher_topk_logprobs, *,
                              log_prob_min_clamp: Optional[float] = None):
    """float64 top-K forward KL as verl 0.9.1's ``forward_kl_topk`` defines it (the per-token loss the verl
    plugin masks; docs/integrations.md): sum_k p_t,k (l_t,k - log p_s(id_k)) over the teacher's returned
    entries, each log-prob clamped below at ``log_prob_min_clamp`` when given, then clamped at 0 below.
    Rows [N, V], [N, K_t]; returns [N] with autograd to ``student_logits``."""
    logp_s = torch.log_softmax(student_logits.double(), -1).gather(-1, teacher_topk_ids.long())
    logp_t = teacher_topk_logprobs.double()
    if log_prob_min_clamp is not None:
        logp_s, logp_t = logp_s.clamp_min(log_prob_min_clamp), logp_t.clamp_min(log_prob_min_clamp)
    return (logp_t.exp() * (logp_t - logp_s)).sum(-1).clamp_min(0.0)
