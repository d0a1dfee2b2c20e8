"""Public entry points: the TA-OPD loss head from hidden states or from logits, and its pieces.

Flow of ``fused_teachability_kl``:
1. check the arguments (cheap, before any heavy work);
2. statistics of SPEC section 2 for the valid positions, by the chosen backend, without autograd;
3. scores and selection of SPEC section 3 (small [N] tensors);
4. the loss of SPEC section 4 through ``_TeachabilityKLFunction``, the only place that wires forward to
   backward; its backward recomputes only the kept rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from . import backends
from ._validate import (
    check_finite,
    check_options,
    check_position_tensor,
    check_same_device,
    check_sampled_ids,
    check_tensor,
)
from .selection import select_top, strategy_scores
from .stats import TeachabilityStats, scatter_rows


@dataclass
class _Positions:
    """The per-position inputs, flattened to [N]."""

    leading: tuple
    valid: torch.Tensor  # bool [N]
    sequence_ids: Optional[torch.Tensor]  # int64 [N] or None
    sampled_ids: Optional[torch.Tensor]  # int64 [N] or None
    valid_idx: torch.Tensor  # int64 [|I|]: found once (one host sync), reused for gathers and scatters

    @property
    def all_valid(self) -> bool:
        return self.valid_idx.numel() == self.valid.numel()


def _positions(leading, device, valid_mask, sequence_ids, sampled_ids, vocab_size, estimator) -> _Positions:
    valid = check_position_tensor("valid_mask", valid_mask, leading, device, kind="mask")
    seq = check_position_tensor("sequence_ids", sequence_ids, leading, device, kind="ids")
    ids = check_position_tensor("sampled_ids", sampled_ids, leading, device, kind="ids")
    n = math.prod(leading)
    valid = torch.ones(n, dtype=torch.bool, device=device) if valid is None else valid.reshape(n)
    if seq is None and len(leading) >= 2:
        # [B, T, ...]: every row of the last leading dim is one sequence.
        seq = torch.arange(n, device=device).div(leading[-1], rounding_mode="floor")
    elif seq is not None:
        seq = seq.reshape(n)
    if ids is not None:
        ids = ids.reshape(n)
        check_sampled_ids(ids, valid, vocab_size)
    elif estimator == "sampled":
        raise ValueError("estimator='sampled' needs sampled_ids (the sampled token at every position)")
    return _Positions(tuple(leading), valid, seq, ids, valid.nonzero().squeeze(1))


def _rows(x: torch.Tensor, pos: _Positions) -> torch.Tensor:
    return x if pos.all_valid else x.index_select(0, pos.valid_idx)


def select_positions(
    stats: TeachabilityStats,
    *,
    strategy: str = "teachability",
    keep_ratio: float = 0.05,
    sequence_ids: Optional[torch.Tensor] = None,
    min_per_sequence: int = 1,
    seed: int = 0,
):
    """Scores and the kept mask from statistics (SPEC section 3); returns (score, kept).

    ``sequence_ids`` default: for [B, T] statistics, each row of T is one sequence; for [N], none.
    """
    check_options(top_k=1, keep_ratio=keep_ratio, strategy=strategy, estimator="full", temperature=1.0,
                  vocab_size=1, max_vocab=1, min_per_sequence=min_per_sequence, backend="auto", seed=seed)
    valid = stats.valid
    if sequence_ids is None and valid.dim() >= 2:
        sequence_ids = torch.arange(valid.numel(), device=valid.device).div(
            valid.shape[-1], rounding_mode="floor").view(valid.shape)
    score = strategy_scores(strategy, entropy=stats.entropy_student, disagreement=stats.disagreement,
                            teacher_mass=stats.teacher_mass, valid=valid, seed=seed)
    if strategy == "all":
        return score, valid.clone()
    kept = select_top(score, valid, keep_ratio=keep_ratio, sequence_ids=sequence_ids,
                      min_per_sequence=min_per_sequence)
    return score, kept


def _select(stats, pos: _Positions, *, strategy, keep_ratio, min_per_sequence, seed, keep_mask):
    if keep_mask is not None:
        # The kept set was chosen elsewhere (e.g. globally across ranks): local scores would be
        # misleading, so stats.score stays whatever the caller put there (None for fresh statistics).
        kept = check_position_tensor("keep_mask", keep_mask, pos.leading, pos.valid.device, kind="mask")
        kept = kept.reshape(-1) & pos.valid
        stats.kept = kept.view(pos.leading)
        return kept
    score = strategy_scores(strategy, entropy=stats.entropy_student.reshape(-1),
                            disagreement=stats.disagreement.reshape(-1),
                            teacher_mass=stats.teacher_mass.reshape(-1), valid=pos.valid, seed=seed)
    if strategy == "all":
        kept = pos.valid.clone()
    else:
        kept = select_top(score, pos.valid, keep_ratio=keep_ratio, sequence_ids=pos.sequence_ids,
                          min_per_sequence=min_per_sequence)
    stats.score = score.view(pos.leading)
    stats.kept = kept.view(pos.leading)
    return kept


def _check_normalizer(normalizer, kept: torch.Tensor) -> float:
    if normalizer is None:
        return float(kept.sum())
    if isinstance(normalizer, torch.Tensor):
        normalizer = float(normalizer)
    if isinstance(normalizer, bool) or not isinstance(normalizer, (int, float)) \
            or not math.isfinite(normalizer) or normalizer <= 0:
        raise ValueError(f"normalizer must be a finite number > 0 (e.g. the global kept count), got {normalizer!r}")
    return float(normalizer)


def _check_stats(stats, leading, top_k, estimator):
    if not isinstance(stats, TeachabilityStats):
        raise TypeError(f"stats must be a TeachabilityStats, got {type(stats).__name__}")
    if tuple(stats.valid.shape) != tuple(leading):
        raise ValueError(f"stats were computed for positions {tuple(stats.valid.shape)}, "
                         f"but the inputs have {tuple(leading)}")
    if stats.topk_ids_student.shape[-1] != top_k:
        raise ValueError(f"stats hold top-{stats.topk_ids_student.shape[-1]} ids, but top_k={top_k}")
    if estimator == "sampled" and stats.logp_student_sampled is None:
        raise ValueError("stats were computed without sampled_ids, which estimator='sampled' needs")


def _loss_value(stats: TeachabilityStats, kept: torch.Tensor, estimator: str, normalizer: float) -> torch.Tensor:
    if normalizer == 0:
        return torch.zeros((), dtype=torch.float32, device=kept.device)
    if estimator == "full":
        per_row = stats.kl_reverse.reshape(-1)
    else:
        lp_s = stats.logp_student_sampled.reshape(-1)
        per_row = (lp_s - stats.logp_teacher_sampled.reshape(-1)) * lp_s  # -A * logp_s(y)
    return (per_row[kept].double().sum() / normalizer).float()


@dataclass
class _BackwardPlan:
    """What the backward needs besides the differentiable inputs (teacher tensors: never differentiated)."""

    backend: object
    kept_idx: torch.Tensor
    normalizer: float
    estimator: str
    temperature: float
    vocab_size: int
    lse_s: torch.Tensor
    lse_t: torch.Tensor
    kl_rev: torch.Tensor
    sampled_ids: Optional[torch.Tensor]
    sampled_weight: Optional[torch.Tensor]
    teacher: tuple = ()
    chunk_rows: Optional[int] = None
    chunk_vocab: Optional[int] = None

    def kept_rows(self):
        i = self.kept_idx
        pick = lambda x: None if x is None else x.reshape(-1)[i]  # noqa: E731
        return dict(lse_s=pick(self.lse_s), lse_t=pick(self.lse_t), kl_rev=pick(self.kl_rev),
                    sampled_ids=pick(self.sampled_ids), sampled_weight=pick(self.sampled_weight))

    def row_coef(self, grad_output: torch.Tensor) -> torch.Tensor:
        scale = grad_output.float() / (self.normalizer * self.temperature)
        return scale.expand(self.kept_idx.numel()).contiguous()


class _TeachabilityKLFunction(torch.autograd.Function):
    """loss = (1 / normalizer) * sum over kept rows of the per-row loss; grads to h_s, W_s, b_s only.

    The statistics are computed before (no autograd needed for them); forward only sums the kept rows,
    backward asks the backend for the kept rows' gradients (SPEC section 4).
    """

    @staticmethod
    def forward(ctx, h_s, w_s, b_s, loss_value, plan: _BackwardPlan):
        ctx.plan = plan
        ctx.save_for_backward(h_s, w_s, b_s)
        return loss_value.clone()

    @staticmethod
    def backward(ctx, grad_output):
        h_s, w_s, b_s = ctx.saved_tensors
        plan: _BackwardPlan = ctx.plan
        n_rows = h_s.shape[0]
        d_h = d_w = d_b = None
        want_h, want_w, want_b = ctx.needs_input_grad[:3]
        if plan.kept_idx.numel() == 0 or plan.normalizer == 0:
            zeros = lambda x, want: torch.zeros_like(x) if (want and x is not None) else None  # noqa: E731
            return zeros(h_s, want_h), zeros(w_s, want_w), zeros(b_s, want_b), None, None
        h_t, w_t, b_t = plan.teacher
        idx = plan.kept_idx
        dh_rows, dw, db = plan.backend.backward_kept(
            h_s.index_select(0, idx), w_s, b_s,
            None if h_t is None else h_t.index_select(0, idx), w_t, b_t,
            vocab_size=plan.vocab_size, temperature=plan.temperature, estimator=plan.estimator,
            row_coef=plan.row_coef(grad_output), need_bias_grad=b_s is not None and want_b,
            chunk_rows=plan.chunk_rows, chunk_vocab=plan.chunk_vocab, **plan.kept_rows())
        if want_h:
            d_h = torch.zeros((n_rows, h_s.shape[1]), dtype=h_s.dtype, device=h_s.device)
            d_h.index_copy_(0, idx, dh_rows.to(h_s.dtype))
        if want_w:
            d_w = dw.to(w_s.dtype)
        if want_b and b_s is not None:
            d_b = db.to(b_s.dtype)
        return d_h, d_w, d_b, None, None


class _TeachabilityKLFromLogitsFunction(torch.autograd.Function):
    """Same loss from logits; backward writes d loss / d student logits for the kept rows only."""

    @staticmethod
    def forward(ctx, student_logits, loss_value, plan: _BackwardPlan):
        ctx.plan = plan
        ctx.save_for_backward(student_logits)
        return loss_value.clone()

    @staticmethod
    def backward(ctx, grad_output):
        (zs,) = ctx.saved_tensors
        plan: _BackwardPlan = ctx.plan
        grad = torch.zeros_like(zs)
        if plan.kept_idx.numel() == 0 or plan.normalizer == 0:
            return grad, None, None
        (zt,) = plan.teacher
        idx = plan.kept_idx
        rows = plan.backend.logits_grad_kept(
            zs.index_select(0, idx), None if plan.estimator == "sampled" else zt.index_select(0, idx),
            vocab_size=plan.vocab_size, temperature=plan.temperature, estimator=plan.estimator,
            row_coef=plan.row_coef(grad_output), chunk_rows=plan.chunk_rows, chunk_vocab=plan.chunk_vocab,
            **plan.kept_rows())
        grad.index_copy_(0, idx, rows.to(zs.dtype))
        return grad, None, None


def _check_hidden_inputs(student_hidden, student_weight, teacher_hidden, teacher_weight,
                         student_bias, teacher_bias, do_check_finite):
    check_tensor("student_hidden", student_hidden, min_dims=2)
    check_tensor("teacher_hidden", teacher_hidden, min_dims=2)
    check_tensor("student_weight", student_weight, dims=2)
    check_tensor("teacher_weight", teacher_weight, dims=2)
    if student_hidden.shape[:-1] != teacher_hidden.shape[:-1]:
        raise ValueError("student_hidden and teacher_hidden must cover the same positions: got leading shapes "
                         f"{tuple(student_hidden.shape[:-1])} and {tuple(teacher_hidden.shape[:-1])}")
    for who, h, w in (("student", student_hidden, student_weight), ("teacher", teacher_hidden, teacher_weight)):
        if h.shape[-1] != w.shape[1]:
            raise ValueError(f"{who}_hidden has hidden size {h.shape[-1]} but {who}_weight is "
                             f"{tuple(w.shape)}; expected [V, {h.shape[-1]}]")
    for who, b, w in (("student", student_bias, student_weight), ("teacher", teacher_bias, teacher_weight)):
        if b is not None:
            check_tensor(f"{who}_bias", b, dims=1)
            if b.shape[0] != w.shape[0]:
                raise ValueError(f"{who}_bias must have shape [{w.shape[0]}] (rows of {who}_weight), "
                                 f"got {tuple(b.shape)}")
    device = check_same_device(student_hidden=student_hidden, student_weight=student_weight,
                               teacher_hidden=teacher_hidden, teacher_weight=teacher_weight,
                               student_bias=student_bias, teacher_bias=teacher_bias)
    if do_check_finite:
        for name, x in (("student_hidden", student_hidden), ("student_weight", student_weight),
                        ("teacher_hidden", teacher_hidden), ("teacher_weight", teacher_weight)):
            check_finite(name, x)
        for name, b in (("student_bias", student_bias), ("teacher_bias", teacher_bias)):
            if b is not None:
                check_finite(name, b, allow_neg_inf=True)
    return device


def _hidden_stats(h_s, w_s, b_s, h_t, w_t, b_t, pos: _Positions, backend, *, vocab_size, top_k,
                  temperature, chunk_rows, chunk_vocab) -> TeachabilityStats:
    with torch.no_grad():
        rows = backend.forward_stats(
            _rows(h_s, pos), w_s, b_s, _rows(h_t, pos), w_t, b_t,
            vocab_size=vocab_size, top_k=top_k, temperature=float(temperature),
            sampled_ids=None if pos.sampled_ids is None else _rows(pos.sampled_ids, pos),
            chunk_rows=chunk_rows, chunk_vocab=chunk_vocab)
    return scatter_rows(rows, pos.valid, pos.valid_idx, pos.leading, top_k)


def teachability_stats(
    student_hidden, student_weight, teacher_hidden, teacher_weight, *,
    student_bias=None, teacher_bias=None, valid_mask=None, sequence_ids=None, sampled_ids=None,
    top_k: int = 16, keep_ratio: float = 0.05, strategy: str = "teachability", temperature: float = 1.0,
    vocab_size: Optional[int] = None, min_per_sequence: int = 1, seed: int = 0,
    backend: str = "auto", chunk_rows: Optional[int] = None, chunk_vocab: Optional[int] = None,
    check_finite: bool = True,
) -> TeachabilityStats:
    """Forward statistics (SPEC section 2) and the selection (section 3), with no loss and no autograd."""
    device = _check_hidden_inputs(student_hidden, student_weight, teacher_hidden, teacher_weight,
                                  student_bias, teacher_bias, check_finite)
    vocab_size = check_options(
        top_k=top_k, keep_ratio=keep_ratio, strategy=strategy, estimator="full", temperature=temperature,
        vocab_size=vocab_size, max_vocab=min(student_weight.shape[0], teacher_weight.shape[0]),
        min_per_sequence=min_per_sequence, backend=backend, chunk_rows=chunk_rows, chunk_vocab=chunk_vocab,
        seed=seed)
    leading = tuple(student_hidden.shape[:-1])
    pos = _positions(leading, device, valid_mask, sequence_ids, sampled_ids, vocab_size, "full")
    impl = backends.resolve(backend, device, needs="forward_stats")
    stats = _hidden_stats(student_hidden.reshape(-1, student_hidden.shape[-1]), student_weight, student_bias,
                          teacher_hidden.reshape(-1, teacher_hidden.shape[-1]), teacher_weight, teacher_bias,
                          pos, impl, vocab_size=vocab_size, top_k=top_k, temperature=temperature,
                          chunk_rows=chunk_rows, chunk_vocab=chunk_vocab)
    _select(stats, pos, strategy=strategy, keep_ratio=keep_ratio, min_per_sequence=min_per_sequence,
            seed=seed, keep_mask=None)
    return stats


def fused_teachability_kl(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    *,
    student_bias: Optional[torch.Tensor] = None,
    teacher_bias: Optional[torch.Tensor] = None,
    valid_mask: Optional[torch.Tensor] = None,
    sequence_ids: Optional[torch.Tensor] = None,
    sampled_ids: Optional[torch.Tensor] = None,
    top_k: int = 16,
    keep_ratio: float = 0.05,
    strategy: str = "teachability",
    estimator: str = "full",
    temperature: float = 1.0,
    vocab_size: Optional[int] = None,
    min_per_sequence: int = 1,
    seed: int = 0,
    keep_mask: Optional[torch.Tensor] = None,
    normalizer: Optional[float] = None,
    stats: Optional[TeachabilityStats] = None,
    backend: str = "auto",
    chunk_rows: Optional[int] = None,
    chunk_vocab: Optional[int] = None,
    check_finite: bool = True,
):
    """TA-OPD loss head from final hidden states and lm_head weights, never holding [N, V] logits.

    Args:
        student_hidden: [..., D_s] (e.g. [N, D_s] or [B, T, D_s]); receives gradients.
        student_weight: [V_s, D_s] lm_head weight; receives gradients (zero in rows >= vocab_size).
        teacher_hidden: [..., D_t], same leading shape; teacher_weight: [V_t, D_t]. No gradients.
        student_bias / teacher_bias: optional [V_s] / [V_t].
        valid_mask: bool [...]; positions that are scored (e.g. the response mask). Default: all.
        sequence_ids: int [...]; which sequence each position belongs to, for ``min_per_sequence``.
            Default for [B, T, D] inputs: the batch index; for [N, D]: one sequence.
        sampled_ids: int [...]; the sampled token y_t (needed by estimator "sampled"; gives logp(y)).
        top_k: K of both top-K sets. keep_ratio: rho, the kept fraction of valid positions.
        strategy: one of ``STRATEGIES`` (SPEC section 3). estimator: "full" or "sampled" (section 4).
        temperature: tau, dividing both logit rows. vocab_size: columns that exist (default min(V_s, V_t)).
        min_per_sequence: kept positions every sequence gets at least. seed: for strategy "random".
        keep_mask: bool [...]; use this kept set instead of selecting (e.g. a global selection); then no
            local score is computed and ``stats.score`` is left as given (None for fresh statistics).
        normalizer: divide by this instead of the local kept count (global count, accumulation).
        stats: statistics already computed for these inputs (``teachability_stats``); skips the forward.
        backend: "auto" (triton on CUDA when available, else torch), "torch", "triton" or "cuda".
        chunk_rows, chunk_vocab: tile sizes. torch backend: positions and vocabulary columns per tile;
            triton backend: chunk_vocab is the forward's vocabulary split and the backward's column
            chunk, chunk_rows the backward's row chunk. Default: the backend's own choice.
        check_finite: reject NaN/inf hidden states and weights (one extra read of each).

    Returns:
        (loss, stats): a float32 scalar with autograd to the student's hidden, weight and bias; and a
        detached ``TeachabilityStats``.
    """
    device = _check_hidden_inputs(student_hidden, student_weight, teacher_hidden, teacher_weight,
                                  student_bias, teacher_bias, check_finite)
    vocab_size = check_options(
        top_k=top_k, keep_ratio=keep_ratio, strategy=strategy, estimator=estimator, temperature=temperature,
        vocab_size=vocab_size, max_vocab=min(student_weight.shape[0], teacher_weight.shape[0]),
        min_per_sequence=min_per_sequence, backend=backend, chunk_rows=chunk_rows, chunk_vocab=chunk_vocab,
        seed=seed)
    leading = tuple(student_hidden.shape[:-1])
    pos = _positions(leading, device, valid_mask, sequence_ids, sampled_ids, vocab_size, estimator)
    impl = backends.resolve(backend, device, needs="backward_kept")
    h_s = student_hidden.reshape(-1, student_hidden.shape[-1])
    h_t = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
    if stats is None:
        stats = _hidden_stats(h_s, student_weight, student_bias, h_t, teacher_weight, teacher_bias, pos, impl,
                              vocab_size=vocab_size, top_k=top_k, temperature=temperature,
                              chunk_rows=chunk_rows, chunk_vocab=chunk_vocab)
    else:
        _check_stats(stats, leading, top_k, estimator)
    kept = _select(stats, pos, strategy=strategy, keep_ratio=keep_ratio, min_per_sequence=min_per_sequence,
                   seed=seed, keep_mask=keep_mask)
    norm = _check_normalizer(normalizer, kept)
    plan = _plan(impl, stats, kept, norm, estimator, temperature, vocab_size, pos,
                 (h_t.detach(), teacher_weight.detach(),
                  None if teacher_bias is None else teacher_bias.detach()), chunk_rows, chunk_vocab)
    loss = _TeachabilityKLFunction.apply(h_s, student_weight, student_bias,
                                         _loss_value(stats, kept, estimator, norm), plan)
    return loss, stats


def _plan(impl, stats, kept, norm, estimator, temperature, vocab_size, pos, teacher, chunk_rows, chunk_vocab):
    sampled_weight = None
    if estimator == "sampled":
        sampled_weight = (stats.logp_student_sampled - stats.logp_teacher_sampled).reshape(-1)
    return _BackwardPlan(
        backend=impl, kept_idx=kept.nonzero().squeeze(1), normalizer=norm, estimator=estimator,
        temperature=float(temperature), vocab_size=vocab_size, lse_s=stats.lse_student.reshape(-1),
        lse_t=stats.lse_teacher.reshape(-1), kl_rev=stats.kl_reverse.reshape(-1),
        sampled_ids=pos.sampled_ids, sampled_weight=sampled_weight, teacher=teacher,
        chunk_rows=chunk_rows, chunk_vocab=chunk_vocab)


def teachability_kl_from_logits(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    valid_mask: Optional[torch.Tensor] = None,
    sequence_ids: Optional[torch.Tensor] = None,
    sampled_ids: Optional[torch.Tensor] = None,
    top_k: int = 16,
    keep_ratio: float = 0.05,
    strategy: str = "teachability",
    estimator: str = "full",
    temperature: float = 1.0,
    vocab_size: Optional[int] = None,
    min_per_sequence: int = 1,
    seed: int = 0,
    keep_mask: Optional[torch.Tensor] = None,
    normalizer: Optional[float] = None,
    backend: str = "auto",
    chunk_rows: Optional[int] = None,
    chunk_vocab: Optional[int] = None,
):
    """The same loss and statistics for callers that already hold logits [..., V_s] and [..., V_t].

    Only the first ``vocab_size`` columns are used (default min(V_s, V_t)); -inf logits are allowed
    (masked tokens), NaN and +inf are not. The gradient w.r.t. ``student_logits`` is zero outside the
    kept rows and beyond ``vocab_size``. Options as in ``fused_teachability_kl``.
    """
    check_tensor("student_logits", student_logits, min_dims=2)
    check_tensor("teacher_logits", teacher_logits, min_dims=2)
    if student_logits.shape[:-1] != teacher_logits.shape[:-1]:
        raise ValueError("student_logits and teacher_logits must cover the same positions: got leading shapes "
                         f"{tuple(student_logits.shape[:-1])} and {tuple(teacher_logits.shape[:-1])}")
    device = check_same_device(student_logits=student_logits, teacher_logits=teacher_logits)
    check_finite("student_logits", student_logits, allow_neg_inf=True)
    check_finite("teacher_logits", teacher_logits, allow_neg_inf=True)
    vocab_size = check_options(
        top_k=top_k, keep_ratio=keep_ratio, strategy=strategy, estimator=estimator, temperature=temperature,
        vocab_size=vocab_size, max_vocab=min(student_logits.shape[-1], teacher_logits.shape[-1]),
        min_per_sequence=min_per_sequence, backend=backend, chunk_rows=chunk_rows, chunk_vocab=chunk_vocab,
        seed=seed)
    leading = tuple(student_logits.shape[:-1])
    pos = _positions(leading, device, valid_mask, sequence_ids, sampled_ids, vocab_size, estimator)
    impl = backends.resolve(backend, device, needs="logits_forward_stats")
    zs = student_logits.reshape(-1, student_logits.shape[-1])
    zt = teacher_logits.reshape(-1, teacher_logits.shape[-1]).detach()
    with torch.no_grad():
        rows = impl.logits_forward_stats(
            _rows(zs.detach(), pos), _rows(zt, pos), vocab_size=vocab_size, top_k=top_k,
            temperature=float(temperature),
            sampled_ids=None if pos.sampled_ids is None else _rows(pos.sampled_ids, pos),
            chunk_rows=chunk_rows, chunk_vocab=chunk_vocab)
    stats = scatter_rows(rows, pos.valid, pos.valid_idx, leading, top_k)
    kept = _select(stats, pos, strategy=strategy, keep_ratio=keep_ratio, min_per_sequence=min_per_sequence,
                   seed=seed, keep_mask=keep_mask)
    norm = _check_normalizer(normalizer, kept)
    plan = _plan(impl, stats, kept, norm, estimator, temperature, vocab_size, pos, (zt,), chunk_rows, chunk_vocab)
    loss = _TeachabilityKLFromLogitsFunction.apply(zs, _loss_value(stats, kept, estimator, norm), plan)
    return loss, stats
