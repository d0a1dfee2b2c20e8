"""TA-OPD from the top-K log-probs that inference engines return (docs/math.md, Sparse teacher signal).

Where on-policy distillation runs at scale (verl, slime, OpenRLHF) the teacher is an inference server
and what comes back per position is its top-K_t token ids and log-probs, never hidden states or full
logits. ``teachability_from_topk`` forms every statistic that can be formed from that, runs the same
selection as the rest of the library (``selection.score_and_select``), and gives the sampled-token loss
(the k1 advantage form) over the kept positions:

    loss, stats = teachability_from_topk(
        teacher_topk_ids=ids_t, teacher_topk_logprobs=lp_t,           # [B, T, K_t] from vLLM / SGLang
        student_logits=logits,                                        # [B, T, V], the trainer's
        sampled_ids=responses, teacher_logprob_sampled=lp_t_y,        # [B, T]
        valid_mask=response_mask)
    loss.backward()            # gradient only through the kept rows

What is exact and what is a bound or an estimate is listed in docs/math.md, Sparse teacher signal; the
float64 twin used by the tests is ``reference.reference_sparse_stats``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Optional

import torch

from .backends._tiles import ordered_keys, safe_weighted
from .estimators import sampled_token_loss, sampled_weight
from .options import (
    DEFAULTS,
    DeferredChecks,
    as_int,
    check_finite,
    check_position_tensor,
    check_same_device,
    check_selection_options,
    check_tensor,
    as_float,
)
from .api import _first_true
from .selection import default_sequence_ids, score_and_select

# Strategies whose score reads the student's entropy over the whole vocabulary (docs/math.md table).
ENTROPY_STRATEGIES = ("entropy", "tip", "teachability_entropy")
# Engines return float32 (or coarser) log-probs; a log-prob above this is not one (p > 1 beyond rounding).
_LOGPROB_SLACK = 1e-3
# The rest-mass slack per known probability: the float32 rounding of summing them (docs/math.md).
_REST_SLACK_PER_TERM = 2.0 ** -23
_DEFAULT_CHUNK_ROWS = 256


@dataclass
class SparseTeachabilityStats:
    """Detached per-position statistics from a sparse teacher signal, shaped like the caller's leading dims.

    Float fields are float32, NaN where not valid; ids int64 [..., K], -1 there (docs/math.md, Conventions).
    ``teacher_mass`` is the C the selection uses: the lower bound of Eq. 17 over every id whose teacher
    log-prob is known, which is the exact C where ``teacher_mass_exact``. ``entropy_student`` is None without student logits; the sampled fields
    are None without ``sampled_ids``.
    """

    valid: torch.Tensor
    dropped: torch.Tensor  # marked valid by the caller, but a model has no usable entry there
    teacher_mass: torch.Tensor  # C_lb: exact where teacher_mass_exact
    teacher_mass_upper: torch.Tensor
    teacher_mass_exact: torch.Tensor  # bool: every id of S_s has a known teacher log-prob
    disagreement: torch.Tensor
    disagreement_exact: torch.Tensor  # bool: both models' probabilities known on all of U
    teacher_known_mass: torch.Tensor  # M: the teacher's mass on the ids whose log-prob is known
    topk_ids_student: torch.Tensor
    topk_ids_teacher: torch.Tensor
    entropy_student: Optional[torch.Tensor] = None
    logp_student_sampled: Optional[torch.Tensor] = None
    logp_teacher_sampled: Optional[torch.Tensor] = None
    kl_sampled: Optional[torch.Tensor] = None  # k1 = logp_s(y) - logp_t(y)
    score: Optional[torch.Tensor] = None
    kept: Optional[torch.Tensor] = None

    def summary(self) -> dict:
        """Means of C (lower and upper bound) and D over the valid and the kept positions, and the kept
        fraction, for logging (one host read)."""
        groups = {"all": self.valid}
        if self.kept is not None:
            groups["kept"] = self.kept
        names = ("teacher_mass", "teacher_mass_upper", "disagreement", "kl_sampled")
        parts, keys = [], []
        for name in names:
            value = getattr(self, name)
            if value is None:
                continue
            for group, mask in groups.items():
                parts += [torch.where(mask, value.double(), 0.0).sum(), mask.sum().double()]
                keys.append(f"{name}/{group}")
        parts += [m.sum().double() for m in groups.values()]
        totals = torch.stack(parts).tolist()
        out = {key: totals[2 * i] / totals[2 * i + 1] if totals[2 * i + 1] else float("nan")
               for i, key in enumerate(keys)}
        out["num_valid"] = int(totals[2 * len(keys)])
        if self.kept is not None:
            out["num_kept"] = int(totals[2 * len(keys) + 1])
            out["kept_fraction"] = out["num_kept"] / max(out["num_valid"], 1)
        return out


# ---------------------------------------------------------------------------- argument checks


def _pair(ids_name, ids, lp_name, lp, leading, device, checks, valid, *, min_entries=1, ranked=True):
    """A (ids [..., k], log-probs [..., k]) pair of one engine answer, flattened to [N, k]; ids < 0 are
    empty slots. In a returned top-k (``ranked``) an id appears once per position. Values are checked at
    the ``valid`` positions only (engines fill the others with dummies, e.g. verl's last row)."""
    if ids is None or lp is None:
        if ids is not None or lp is not None:
            raise ValueError(f"{ids_name} and {lp_name} come together: got only "
                             f"{ids_name if ids is not None else lp_name}")
        return None
    check_tensor(lp_name, lp, min_dims=1)
    if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.dtype == torch.bool:
        raise TypeError(f"{ids_name} must be an integer torch.Tensor, got "
                        f"{ids.dtype if isinstance(ids, torch.Tensor) else type(ids).__name__}")
    if ids.shape != lp.shape:
        raise ValueError(f"{ids_name} and {lp_name} must have one shape, got {tuple(ids.shape)} and {tuple(lp.shape)}")
    if tuple(ids.shape[:-1]) != tuple(leading):
        raise ValueError(f"{ids_name} must have shape {tuple(leading)} + [k] (the positions' leading dims), "
                         f"got {tuple(ids.shape)}")
    if ids.shape[-1] < min_entries:
        raise ValueError(f"{ids_name} holds {ids.shape[-1]} entries per position; top_k={min_entries} needs at "
                         f"least that many (K_t >= K)")
    check_same_device(**{ids_name: ids, lp_name: lp, "inputs": torch.empty(0, device=device)})
    n = math.prod(leading)
    ids, lp = ids.reshape(n, -1).long(), lp.reshape(n, -1)
    checks.add((valid[:, None] & (torch.isnan(lp) | (lp > _LOGPROB_SLACK))).any(), lambda: ValueError(
        f"{lp_name} must hold log-probabilities (<= 0, -inf allowed) at valid positions; found NaN or a value > 0"))
    if ranked:
        ordered = ids.sort(1).values
        twice = (ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)
        checks.add((valid[:, None] & twice).any(), lambda: ValueError(
            f"{ids_name} holds an id twice at one valid position"))
    return ids, lp.float().clamp(max=0.0)


def _position(name, x, leading, device, *, floating=False):
    if x is None:
        return None
    if floating:
        check_tensor(name, x)
        if tuple(x.shape) != tuple(leading):
            raise ValueError(f"{name} must have shape {tuple(leading)}, got {tuple(x.shape)}")
        check_same_device(**{name: x, "inputs": torch.empty(0, device=device)})
        return x.reshape(-1)
    return check_position_tensor(name, x, leading, device, kind="ids").reshape(-1)


@dataclass
class _Inputs:
    """Every per-position input flattened to [N] / [N, k]; absent ones None."""

    leading: tuple
    device: torch.device
    teacher: tuple  # (ids [N, K_t], log-probs [N, K_t])
    scored: Optional[tuple]  # the teacher's log-probs at fixed ids (e.g. the student's top-K)
    student_logits: Optional[torch.Tensor]  # [N, V], with autograd
    student_topk: Optional[tuple]
    sampled_ids: Optional[torch.Tensor]
    teacher_logprob_sampled: Optional[torch.Tensor]
    student_logprob_sampled: Optional[torch.Tensor]  # [N], may carry autograd
    vocab_size: Optional[int]
    valid: torch.Tensor
    sequence_ids: Optional[torch.Tensor]


def _check_inputs(a: dict, top_k: int, checks: DeferredChecks) -> _Inputs:
    """The arguments of ``teachability_from_topk`` checked and flattened (cheap; value checks deferred)."""
    t_ids, t_lp = a["teacher_topk_ids"], a["teacher_topk_logprobs"]
    if not isinstance(t_ids, torch.Tensor) or t_ids.dim() < 1:
        raise TypeError("teacher_topk_ids must be an integer torch.Tensor of shape [..., K_t]")
    leading, device = tuple(t_ids.shape[:-1]), t_ids.device
    zs = a["student_logits"]
    if zs is not None and a["student_topk_ids"] is not None:
        raise ValueError("pass student_logits or student_topk_ids/student_topk_logprobs, not both")
    if zs is None and a["student_topk_ids"] is None:
        raise ValueError("the student is missing: pass student_logits [..., V] (the trainer's) or "
                         "student_topk_ids and student_topk_logprobs [..., K_s] (the rollout engine's)")
    vocab_size = a["vocab_size"]
    if zs is not None:
        check_tensor("student_logits", zs, min_dims=1)
        if tuple(zs.shape[:-1]) != leading:
            raise ValueError(f"student_logits must have shape {leading} + [V] (teacher_topk_ids' leading dims), "
                             f"got {tuple(zs.shape)}")
        check_same_device(student_logits=zs, teacher_topk_ids=t_ids)
        check_finite(checks, "student_logits", zs, allow_neg_inf=True)
        vocab_size = zs.shape[-1] if vocab_size is None else as_int("vocab_size", vocab_size, low=1,
                                                                     high=zs.shape[-1])
        zs = zs.reshape(-1, zs.shape[-1])
        if a["student_logprob_sampled"] is not None:
            raise ValueError("student_logprob_sampled is computed from student_logits; pass one of them")
    elif vocab_size is not None:
        vocab_size = as_int("vocab_size", vocab_size, low=1)
    if vocab_size is not None and top_k > vocab_size:
        raise ValueError(f"top_k must be in [1, vocab_size={vocab_size}], got {top_k}")
    valid = check_position_tensor("valid_mask", a["valid_mask"], leading, device, kind="mask", checks=checks)
    n = math.prod(leading)
    valid = torch.ones(n, dtype=torch.bool, device=device) if valid is None else valid.reshape(n)
    seq = check_position_tensor("sequence_ids", a["sequence_ids"], leading, device, kind="ids")
    seq = default_sequence_ids(leading, device) if seq is None else seq
    inputs = _Inputs(
        leading=leading, device=device,
        teacher=_pair("teacher_topk_ids", t_ids, "teacher_topk_logprobs", t_lp, leading, device, checks,
                      valid, min_entries=top_k),
        scored=_pair("teacher_scored_ids", a["teacher_scored_ids"], "teacher_scored_logprobs",
                     a["teacher_scored_logprobs"], leading, device, checks, valid, ranked=False),
        student_logits=zs,
        student_topk=_pair("student_topk_ids", a["student_topk_ids"], "student_topk_logprobs",
                           a["student_topk_logprobs"], leading, device, checks, valid, min_entries=top_k),
        sampled_ids=_position("sampled_ids", a["sampled_ids"], leading, device),
        teacher_logprob_sampled=_position("teacher_logprob_sampled", a["teacher_logprob_sampled"], leading,
                                          device, floating=True),
        student_logprob_sampled=_position("student_logprob_sampled", a["student_logprob_sampled"], leading,
                                          device, floating=True),
        vocab_size=vocab_size,
        valid=valid,
        sequence_ids=None if seq is None else seq.reshape(n))
    _check_sampled(inputs, checks)
    return inputs


def _check_sampled(x: _Inputs, checks: DeferredChecks) -> None:
    for name in ("teacher_logprob_sampled", "student_logprob_sampled"):
        if getattr(x, name) is not None and x.sampled_ids is None:
            raise ValueError(f"{name} needs sampled_ids (the tokens it is the log-prob of)")
    if x.sampled_ids is None:
        return
    high = x.vocab_size if x.vocab_size is not None else 2 ** 62
    bad = x.valid & ((x.sampled_ids < 0) | (x.sampled_ids >= high))
    checks.add(bad.any(), lambda: ValueError(
        f"sampled_ids must be in [0, {x.vocab_size if x.vocab_size is not None else 'V'}) at valid positions"))
    for name in ("teacher_logprob_sampled", "student_logprob_sampled"):
        lp = getattr(x, name)
        if lp is not None:
            checks.add((x.valid & (torch.isnan(lp.detach()) | (lp.detach() > _LOGPROB_SLACK))).any(),
                       lambda name=name: ValueError(f"{name} must hold log-probabilities (<= 0) at valid positions"))


# ---------------------------------------------------------------------------- per-row statistics


def _lookup(query: torch.Tensor, ids: torch.Tensor, logp: torch.Tensor):
    """(log-prob, found) of each ``query`` id [R, Q] among a row's known (ids, log-probs) [R, k]; ids < 0
    are absent on both sides. Not found: -inf."""
    eq = (query[:, :, None] == ids[:, None, :]) & (ids >= 0)[:, None, :] & (query >= 0)[:, :, None]
    found = eq.any(-1)
    value = torch.where(eq, logp[:, None, :], -math.inf).amax(-1)
    return value, found


def _ranked(ids: torch.Tensor, logp: torch.Tensor, k: int) -> torch.Tensor:
    """The ids of the ``k`` largest log-probs of a returned set, ties to the lower id; absent entries
    (id < 0) last, as -1."""
    keys = torch.where(ids >= 0, ordered_keys(logp, ids.clamp(min=0)), torch.iinfo(torch.int64).min)
    top = keys.topk(k, dim=1).indices
    return ids.gather(1, top)


@dataclass
class _KnownSet:
    """One model's known log-probs on a row chunk: ids [R, k] (-1 absent), log-probs, and the bounds on
    every id not in it: each has p <= p_min, all together <= rest (docs/math.md, Sparse teacher signal)."""

    ids: torch.Tensor
    logp: torch.Tensor
    p_min: torch.Tensor  # [R]
    rest: torch.Tensor  # [R]
    mass: torch.Tensor  # [R]: M

    @classmethod
    def of(cls, returned: tuple, extra: Optional[tuple]) -> "_KnownSet":
        """From a returned top-k (ids, log-probs) [R, k] and optional log-probs at ``extra`` ids (absent: -1)."""
        ids, logp = returned
        present = ids >= 0
        p = torch.where(present, logp.exp(), 0.0)
        p_min = torch.where(present, p, math.inf).amin(1)
        if extra is not None:
            e_ids, e_lp = extra
            e_first = ~(e_ids[:, :, None] == e_ids[:, None, :]).tril(-1).any(-1)  # first of equal scored ids
            e_new = (e_ids >= 0) & e_first & ~_lookup(e_ids, ids, logp)[1]
            ids, logp = torch.cat([ids, torch.where(e_new, e_ids, -1)], 1), torch.cat([logp, e_lp], 1)
            p = torch.cat([p, torch.where(e_new, e_lp.exp(), 0.0)], 1)
        mass = p.sum(1, dtype=torch.float64)
        slack = (ids >= 0).sum(1).double() * _REST_SLACK_PER_TERM
        rest = ((1.0 - mass).clamp(min=0.0) + slack).clamp(max=1.0)
        return cls(ids, logp, p_min, rest.float(), mass.float())

    def at(self, query: torch.Tensor):
        """(log-prob at each query id [R, Q], known mask), with unknown ids filled with
        min(p_min, rest / number of unknown query ids of the row)."""
        logp, known = _lookup(query, self.ids, self.logp)
        unknown = (~known & (query >= 0)).sum(1, keepdim=True)
        fill = torch.minimum(self.p_min[:, None], self.rest[:, None] / unknown.clamp(min=1))
        log_fill = torch.where(fill > 0, fill.clamp(min=torch.finfo(torch.float32).tiny).log(), -math.inf)
        return torch.where(known, logp, log_fill), known


def _student_logits_rows(zs: torch.Tensor, temperature: float, top_k: int):
    """From student logit rows [R, V]: entropy, top-K ids (ties to the lower id), log p_s [R, V] and whether
    the row has a finite logit; float32, relative to the row maximum (docs/math.md, Per-position statistics)."""
    z = zs.float() / temperature
    m = z.amax(1, keepdim=True)
    usable = torch.isfinite(m)
    shifted = z - torch.where(usable, m, 0.0)
    e = shifted.exp()
    s0 = e.sum(1, keepdim=True)
    log_s0 = s0.log()
    entropy = (log_s0 - safe_weighted(e, shifted).sum(1, keepdim=True) / s0).squeeze(1)
    cols = torch.arange(z.shape[1], device=z.device).expand_as(z)
    top = ordered_keys(z, cols).topk(top_k, dim=1).indices
    return entropy, top, shifted - log_s0, usable.squeeze(1)


def _gather(logp: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """logp[r, ids[r, j]], -inf where the id is absent (-1)."""
    return torch.where(ids >= 0, logp.gather(1, ids.clamp(min=0)), -math.inf)


def _in_vocab(ids: torch.Tensor, vocab_size: Optional[int]) -> torch.Tensor:
    """Ids at or beyond ``vocab_size`` are padding rows of a larger vocabulary: absent (-1)."""
    return ids if vocab_size is None else torch.where(ids < vocab_size, ids, -1)


def _union_disagreement(ids_s, ids_t, logp_s_u, logp_t_u):
    """D over U = S_s union S_t from log-probs at cat[ids_s, ids_t] [R, 2K]; repeated and absent ids masked."""
    dup = torch.cat([torch.zeros_like(ids_s, dtype=torch.bool),
                     (ids_t[:, :, None] == ids_s[:, None, :]).any(-1)], 1)
    member = ~dup & (torch.cat([ids_s, ids_t], 1) >= 0)
    logpb_s = torch.log_softmax(torch.where(member, logp_s_u, -math.inf), 1)
    logpb_t = torch.log_softmax(torch.where(member, logp_t_u, -math.inf), 1)
    pb_t = logpb_t.exp()
    # 0 * (anything) = 0 for ids the teacher gives no mass; +inf where only the student gives none.
    return safe_weighted(pb_t, logpb_t - logpb_s).sum(1), member


def _chunk_stats(x: _Inputs, rows: torch.Tensor, top_k: int, temperature: float) -> dict:
    """Every statistic for the valid rows ``rows`` (indices into [N]); no autograd."""
    t_ids, t_lp = x.teacher[0][rows], x.teacher[1][rows]
    t_ids = _in_vocab(t_ids, x.vocab_size)
    scored = None if x.scored is None else (_in_vocab(x.scored[0][rows], x.vocab_size), x.scored[1][rows])
    teacher = _KnownSet.of((t_ids, t_lp), scored)
    ids_t = _ranked(t_ids, t_lp, top_k)
    out = {}
    if x.student_logits is not None:
        entropy, ids_s, logp_s, usable = _student_logits_rows(x.student_logits[rows, :x.vocab_size], temperature,
                                                              top_k)
        logp_s_u = _gather(logp_s, torch.cat([ids_s, ids_t], 1))
        if x.sampled_ids is not None:
            out["logp_student_sampled"] = _gather(logp_s, x.sampled_ids[rows, None]).squeeze(1)
        known_s = torch.ones_like(logp_s_u, dtype=torch.bool)
        out.update(entropy_student=entropy, student_usable=usable)
    else:
        s_ids = _in_vocab(x.student_topk[0][rows], x.vocab_size)
        s_lp = x.student_topk[1][rows]
        student = _KnownSet.of((s_ids, s_lp), None)
        ids_s = _ranked(s_ids, s_lp, top_k)
        logp_s_u, known_s = student.at(torch.cat([ids_s, ids_t], 1))
        if x.student_logprob_sampled is not None:
            out["logp_student_sampled"] = x.student_logprob_sampled.detach()[rows].float()
        out.update(student_usable=student.p_min < math.inf)
    logp_t_u, known_t = teacher.at(torch.cat([ids_s, ids_t], 1))
    c_lb = torch.where(known_t[:, :top_k], logp_t_u[:, :top_k].exp(), 0.0).sum(1)
    unknown_s = (~known_t[:, :top_k] & (ids_s >= 0)).sum(1)
    c_ub = c_lb + torch.minimum(teacher.rest, unknown_s * teacher.p_min.clamp(max=1.0))
    disagreement, member = _union_disagreement(ids_s, ids_t, logp_s_u, logp_t_u)
    out.update(teacher_mass=c_lb, teacher_mass_upper=c_ub, teacher_mass_exact=unknown_s == 0,
               disagreement=disagreement, disagreement_exact=(~member | (known_t & known_s)).all(1),
               teacher_known_mass=teacher.mass, topk_ids_student=ids_s, topk_ids_teacher=ids_t,
               teacher_usable=teacher.p_min < math.inf)
    if x.teacher_logprob_sampled is not None:
        out["logp_teacher_sampled"] = x.teacher_logprob_sampled[rows].float()
    return out


# ---------------------------------------------------------------------------- statistics, selection, loss

_ID_FIELDS = ("topk_ids_student", "topk_ids_teacher")
_BOOL_FIELDS = ("teacher_mass_exact", "disagreement_exact")


def _statistics(x: _Inputs, top_k: int, temperature: float, chunk_rows: int,
                checks: DeferredChecks) -> SparseTeachabilityStats:
    """The statistics of every valid position, in row chunks (host sync 1: the valid count and checks)."""
    (num_valid,) = checks.read(x.valid.sum())
    idx = _first_true(x.valid, num_valid)
    with torch.no_grad():
        parts = [_chunk_stats(x, idx[r0:r0 + chunk_rows], top_k, temperature)
                 for r0 in range(0, num_valid, chunk_rows)]
    n = x.valid.numel()
    names = [f.name for f in fields(SparseTeachabilityStats)] + ["student_usable", "teacher_usable"]
    filled = {}
    for name in names:
        if not parts or name not in parts[0]:
            continue
        value = torch.cat([p[name] for p in parts])
        if name in _ID_FIELDS:
            out = torch.full((n, top_k), -1, dtype=torch.long, device=x.device)
        elif name in _BOOL_FIELDS or name.endswith("_usable"):
            out = torch.zeros(n, dtype=torch.bool, device=x.device)
        else:
            out = torch.full((n,), math.nan, dtype=torch.float32, device=x.device)
        out[idx] = value.to(out.dtype)
        filled[name] = out
    usable = filled.pop("student_usable", x.valid) & filled.pop("teacher_usable", x.valid)
    valid = x.valid & usable
    for name, value in filled.items():
        if value.is_floating_point():
            filled[name] = torch.where(valid, value, math.nan)
        elif name in _ID_FIELDS:
            filled[name] = torch.where(valid[:, None], value, -1)
        else:
            filled[name] = value & valid
    if num_valid == 0:  # no chunk ran: empty statistics of the right shapes
        filled = _empty_fields(x, top_k)
    if x.sampled_ids is not None and "logp_student_sampled" in filled and "logp_teacher_sampled" in filled:
        filled["kl_sampled"] = sampled_weight(filled["logp_student_sampled"], filled["logp_teacher_sampled"])
    stats = SparseTeachabilityStats(valid=valid, dropped=x.valid & ~valid, **filled)
    return _reshaped(stats, x.leading)


def _empty_fields(x: _Inputs, top_k: int) -> dict:
    n = x.valid.numel()
    nan = torch.full((n,), math.nan, device=x.device)
    no = torch.zeros(n, dtype=torch.bool, device=x.device)
    ids = torch.full((n, top_k), -1, dtype=torch.long, device=x.device)
    out = dict(teacher_mass=nan, teacher_mass_upper=nan, teacher_mass_exact=no, disagreement=nan,
               disagreement_exact=no, teacher_known_mass=nan, topk_ids_student=ids, topk_ids_teacher=ids)
    if x.student_logits is not None:
        out["entropy_student"] = nan
    if x.sampled_ids is not None and (x.student_logits is not None or x.student_logprob_sampled is not None):
        out["logp_student_sampled"] = nan
    if x.teacher_logprob_sampled is not None:
        out["logp_teacher_sampled"] = nan
    return out


def _reshaped(stats: SparseTeachabilityStats, leading: tuple) -> SparseTeachabilityStats:
    for f in fields(stats):
        value = getattr(stats, f.name)
        if isinstance(value, torch.Tensor):
            setattr(stats, f.name, value.view(*leading, *value.shape[1:]))
    return stats


def _select(stats: SparseTeachabilityStats, x: _Inputs, select, keep_mask) -> None:
    """The library's selection (``selection.score_and_select``) on the sparse statistics, or a given kept set."""
    valid = stats.valid.reshape(-1)
    if keep_mask is not None:
        kept = check_position_tensor("keep_mask", keep_mask, x.leading, x.device, kind="mask").reshape(-1)
        stats.kept = (kept & valid).view(x.leading)
        return
    entropy = stats.entropy_student
    if entropy is None:  # no strategy that reads it gets here (checked before any work)
        entropy = torch.full_like(stats.disagreement, math.nan)
    score, kept = score_and_select(
        select.strategy, entropy=entropy.reshape(-1), disagreement=stats.disagreement.reshape(-1),
        teacher_mass=stats.teacher_mass.reshape(-1), valid=valid, keep_ratio=select.keep_ratio,
        sequence_ids=x.sequence_ids, min_per_sequence=select.min_per_sequence, seed=select.seed)
    stats.score, stats.kept = score.view(x.leading), kept.view(x.leading)


def _kept_sum(per_row: torch.Tensor, kept_idx: torch.Tensor, norm: float) -> torch.Tensor:
    return per_row.index_select(0, kept_idx).sum() / norm


def _sampled_loss(x: _Inputs, stats: SparseTeachabilityStats, kept_idx: torch.Tensor, norm: float,
                  temperature: float) -> torch.Tensor:
    """docs/math.md, Loss and gradients, estimator "sampled": sum over kept rows of w * logp_s(y) / norm with
    w = logp_s(y) - logp_t(y) detached; logp_s(y) with autograd, formed for the kept rows only."""
    y = x.sampled_ids.index_select(0, kept_idx)
    if x.student_logits is not None:
        rows = x.student_logits.index_select(0, kept_idx)[:, :x.vocab_size].float() / temperature
        logp_y = torch.log_softmax(rows, 1).gather(1, y[:, None]).squeeze(1)
    else:
        logp_y = x.student_logprob_sampled.index_select(0, kept_idx).float()
    logp_t_y = x.teacher_logprob_sampled.index_select(0, kept_idx).float()
    return sampled_token_loss(logp_y, logp_t_y).sum() / norm


def _loss(x: _Inputs, stats: SparseTeachabilityStats, per_token_loss, normalizer, temperature: float,
          checks: DeferredChecks) -> Optional[torch.Tensor]:
    """The loss over the kept positions (host sync 2: the kept count and the checks), or None when the
    inputs give none (statistics and selection only)."""
    kept = stats.kept.reshape(-1)
    if stats.kl_sampled is not None:
        checks.add((kept & ~torch.isfinite(stats.kl_sampled.reshape(-1))).any(), lambda: ValueError(
            "the sampled-token weight logp_s(y) - logp_t(y) is infinite at kept positions: teacher_logprob_sampled "
            "(or the student's) is -inf there; the engine must return the raw log-prob of the sampled token"))
    elif per_token_loss is not None:
        if not isinstance(per_token_loss, torch.Tensor) or tuple(per_token_loss.shape) != x.leading:
            raise ValueError(f"per_token_loss must be a tensor of shape {x.leading} (one loss per position)")
        checks.add((kept & ~torch.isfinite(per_token_loss.detach().reshape(-1))).any(), lambda: ValueError(
            "per_token_loss is not finite at kept positions"))
    else:
        checks.read()
        return None
    (num_kept,) = checks.read(kept.sum())
    norm = float(num_kept) if normalizer is None else as_float("normalizer", normalizer, positive=True)
    kept_idx = _first_true(kept, num_kept)
    if stats.kl_sampled is not None:
        return _sampled_loss(x, stats, kept_idx, max(norm, 1.0), temperature)
    return _kept_sum(per_token_loss.reshape(-1), kept_idx, max(norm, 1.0))


_INPUT_ARGS = ("teacher_topk_ids", "teacher_topk_logprobs", "student_logits", "student_topk_ids",
               "student_topk_logprobs", "teacher_scored_ids", "teacher_scored_logprobs", "sampled_ids",
               "teacher_logprob_sampled", "student_logprob_sampled", "valid_mask", "sequence_ids", "vocab_size")


def _check_options(strategy, keep_ratio, min_per_sequence, seed, top_k, temperature, chunk_rows, has_logits):
    select = check_selection_options(strategy=strategy, keep_ratio=keep_ratio, min_per_sequence=min_per_sequence,
                                     seed=seed)
    if select.strategy in ENTROPY_STRATEGIES and not has_logits:
        raise ValueError(f"strategy={select.strategy!r} needs the student's entropy over the whole vocabulary, "
                         "which needs student_logits; only the student's top-K was given (use a strategy "
                         "without entropy, e.g. 'teachability', or pass student_logits)")
    chunk_rows = _DEFAULT_CHUNK_ROWS if chunk_rows is None else as_int("chunk_rows", chunk_rows, low=1)
    return select, as_int("top_k", top_k, low=1), as_float("temperature", temperature, positive=True), chunk_rows


def teachability_from_topk(
    *,
    teacher_topk_ids: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    student_logits: Optional[torch.Tensor] = None,
    student_topk_ids: Optional[torch.Tensor] = None,
    student_topk_logprobs: Optional[torch.Tensor] = None,
    teacher_scored_ids: Optional[torch.Tensor] = None,
    teacher_scored_logprobs: Optional[torch.Tensor] = None,
    sampled_ids: Optional[torch.Tensor] = None,
    teacher_logprob_sampled: Optional[torch.Tensor] = None,
    student_logprob_sampled: Optional[torch.Tensor] = None,
    per_token_loss: Optional[torch.Tensor] = None,
    valid_mask: Optional[torch.Tensor] = None,
    sequence_ids: Optional[torch.Tensor] = None,
    top_k: int = DEFAULTS.top_k,
    keep_ratio: float = DEFAULTS.keep_ratio,
    strategy: str = DEFAULTS.strategy,
    temperature: float = DEFAULTS.temperature,
    vocab_size: Optional[int] = DEFAULTS.vocab_size,
    min_per_sequence: int = DEFAULTS.min_per_sequence,
    seed: int = DEFAULTS.seed,
    keep_mask: Optional[torch.Tensor] = None,
    normalizer: Optional[float] = None,
    chunk_rows: Optional[int] = DEFAULTS.chunk_rows,
):
    """TA-OPD statistics, selection and the sampled-token loss from a sparse teacher signal
    (docs/math.md, Sparse teacher signal). Positions are [..., ] (e.g. [B, T] or [N]); entries [..., k].

    Args:
        teacher_topk_ids, teacher_topk_logprobs: [..., K_t] with K_t >= top_k: the engine's top-K_t ids and
            raw log-probs (normalised over the full vocabulary at ``temperature``, before any sampling
            filter). Ids < 0 are empty slots; ids >= vocab_size are padding rows and dropped.
        student_logits: [..., V] the trainer's logits (entropy, exact p_s, the loss's gradient), or
        student_topk_ids, student_topk_logprobs: [..., K_s >= top_k] the rollout engine's top-K (no
            entropy: strategies that need it refuse).
        teacher_scored_ids, teacher_scored_logprobs: [..., J] the teacher's log-probs at fixed ids (SGLang
            ``token_ids_logprob``, e.g. at the student's top-K): C is exact where they cover S_s.
        sampled_ids: [...] the sampled tokens y; teacher_logprob_sampled: [...] logp_t(y) (vLLM's prompt
            log-probs include it); student_logprob_sampled: [...] logp_s(y) when there are no logits (it
            may carry autograd). With both, the loss is the sampled estimator over the kept positions.
        per_token_loss: [...] an engine's own per-position loss, used when logp_t(y) is not delivered: the
            loss is its sum over kept positions / the kept count.
        valid_mask, sequence_ids, top_k, keep_ratio, strategy, temperature, min_per_sequence, seed, keep_mask,
        normalizer: as in ``fused_teachability_kl``; vocab_size: default student_logits' V; chunk_rows: 256.

    Returns:
        (loss or None, SparseTeachabilityStats): no loss without logp_t(y) or per_token_loss; gradients
        reach only the kept rows.
    """
    select, top_k, temperature, chunk_rows = _check_options(strategy, keep_ratio, min_per_sequence, seed, top_k,
                                                            temperature, chunk_rows, student_logits is not None)
    checks = DeferredChecks()
    args = {name: value for name, value in locals().items() if name in _INPUT_ARGS}
    x = _check_inputs(args, top_k, checks)
    stats = _statistics(x, top_k, temperature, chunk_rows, checks)
    _select(stats, x, select, keep_mask)
    return _loss(x, stats, per_token_loss, normalizer, temperature, checks), stats
