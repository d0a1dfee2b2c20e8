"""Public entry points: the TA-OPD loss head from hidden states or from logits, and its pieces.

Every entry point is a thin wrapper over one private pipeline (``_run``):
1. check the arguments (cheap, before any heavy work);
2. the statistics (docs/math.md, Per-position statistics) for the valid positions, by the backend that
   ``backends.resolve`` names, without autograd;
3. scores and selection (docs/math.md, Scores and selection) on small [N] tensors;
4. the loss (docs/math.md, Loss and gradients) through ``_TeachabilityKLFunction``, the only place
   that wires forward to backward; its backward recomputes only the kept rows.
The two input kinds (hidden states + lm_head weights, or logits) differ only in a small "head" object
that knows how to compute rows of statistics and the kept rows' gradients.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

import torch

from . import backends
from .options import (
    HeadOptions,
    SelectionOptions,
    check_finite,
    check_head_options,
    check_position_tensor,
    check_same_device,
    check_sampled_ids,
    check_selection_options,
    check_tensor,
)
from .selection import default_sequence_ids, score_and_select
from .stats import RowStats, TeachabilityStats, scatter_rows


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

    def rows(self, x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """The valid rows of a per-position [N, ...] tensor."""
        if x is None or self.all_valid:
            return x
        return x.index_select(0, self.valid_idx)


def _positions(leading, device, valid_mask, sequence_ids, sampled_ids, vocab_size, estimator) -> _Positions:
    valid = check_position_tensor("valid_mask", valid_mask, leading, device, kind="mask")
    seq = check_position_tensor("sequence_ids", sequence_ids, leading, device, kind="ids")
    ids = check_position_tensor("sampled_ids", sampled_ids, leading, device, kind="ids")
    n = math.prod(leading)
    valid = torch.ones(n, dtype=torch.bool, device=device) if valid is None else valid.reshape(n)
    seq = default_sequence_ids(leading, device) if seq is None else seq
    if ids is not None:
        ids = ids.reshape(n)
        check_sampled_ids(ids, valid, vocab_size)
    elif estimator == "sampled":
        raise ValueError("estimator='sampled' needs sampled_ids (the sampled token at every position)")
    return _Positions(tuple(leading), valid, None if seq is None else seq.reshape(n), ids,
                      valid.nonzero().squeeze(1))


# ---------------------------------------------------------------------------- the two input kinds


class _HiddenHead:
    """Final hidden states [N, D] and lm_head weights (+ biases) of both models."""

    path = "hidden"

    def __init__(self, h_s, w_s, b_s, h_t, w_t, b_t):
        self.leading = tuple(h_s.shape[:-1])
        self.h_s = h_s.reshape(-1, h_s.shape[-1])
        self.h_t = h_t.reshape(-1, h_t.shape[-1]).detach()
        self.w_s, self.b_s = w_s, b_s
        self.w_t = w_t.detach()
        self.b_t = None if b_t is None else b_t.detach()
        self.max_vocab = min(w_s.shape[0], w_t.shape[0])

    @property
    def student(self) -> tuple:
        """The differentiable inputs, in the order the autograd Function takes them."""
        return self.h_s, self.w_s, self.b_s

    def row_stats(self, impl, pos: _Positions, opts: HeadOptions) -> RowStats:
        b_s = None if self.b_s is None else self.b_s.detach()
        return impl.forward_stats(pos.rows(self.h_s.detach()), self.w_s.detach(), b_s, pos.rows(self.h_t), self.w_t,
                                  self.b_t, vocab_size=opts.vocab_size, top_k=opts.top_k,
                                  temperature=opts.temperature, sampled_ids=pos.rows(pos.sampled_ids),
                                  chunk_rows=opts.chunk_rows, chunk_vocab=opts.chunk_vocab)

    def kept_grads(self, plan: "_BackwardPlan", saved: tuple, needs: tuple, row_args: dict) -> tuple:
        h_s, w_s, b_s = saved
        idx = plan.kept_idx
        dh_rows, dw, db = plan.backend.backward_kept(
            h_s.index_select(0, idx), w_s, b_s, self.h_t.index_select(0, idx), self.w_t, self.b_t,
            need_bias_grad=b_s is not None and needs[2], **row_args)
        d_h = d_w = d_b = None
        if needs[0]:
            d_h = torch.zeros_like(h_s)
            d_h.index_copy_(0, idx, dh_rows.to(h_s.dtype))
        if needs[1]:
            d_w = dw.to(w_s.dtype)
        if needs[2] and b_s is not None:
            d_b = db.to(b_s.dtype)
        return d_h, d_w, d_b


class _LogitsHead:
    """Logits [N, V_s] and [N, V_t] that the caller already holds."""

    path = "logits"

    def __init__(self, zs, zt):
        self.leading = tuple(zs.shape[:-1])
        self.zs = zs.reshape(-1, zs.shape[-1])
        self.zt = zt.reshape(-1, zt.shape[-1]).detach()
        self.max_vocab = min(zs.shape[-1], zt.shape[-1])

    @property
    def student(self) -> tuple:
        return (self.zs,)

    def row_stats(self, impl, pos: _Positions, opts: HeadOptions) -> RowStats:
        return impl.logits_forward_stats(pos.rows(self.zs.detach()), pos.rows(self.zt), vocab_size=opts.vocab_size,
                                         top_k=opts.top_k, temperature=opts.temperature,
                                         sampled_ids=pos.rows(pos.sampled_ids), chunk_rows=opts.chunk_rows,
                                         chunk_vocab=opts.chunk_vocab)

    def kept_grads(self, plan: "_BackwardPlan", saved: tuple, needs: tuple, row_args: dict) -> tuple:
        (zs,) = saved
        idx = plan.kept_idx
        zt = None if plan.estimator == "sampled" else self.zt.index_select(0, idx)
        rows = plan.backend.logits_grad_kept(zs.index_select(0, idx), zt, **row_args)
        grad = torch.zeros_like(zs)
        grad.index_copy_(0, idx, rows.to(zs.dtype))
        return (grad,)


# ---------------------------------------------------------------------------- loss and backward


@dataclass
class _BackwardPlan:
    """What the backward needs besides the differentiable inputs."""

    head: object
    backend: object
    kept_idx: torch.Tensor
    normalizer: float
    estimator: str
    opts: HeadOptions
    lse_s: torch.Tensor
    lse_t: torch.Tensor
    kl_rev: torch.Tensor
    sampled_ids: Optional[torch.Tensor]
    sampled_weight: Optional[torch.Tensor]

    def row_args(self, grad_output: torch.Tensor) -> dict:
        """Per-kept-row inputs of a backend's kept-row gradient, and its options."""
        i = self.kept_idx
        pick = lambda x: None if x is None else x.reshape(-1)[i]  # noqa: E731
        scale = grad_output.float() / (self.normalizer * self.opts.temperature)
        return dict(vocab_size=self.opts.vocab_size, temperature=self.opts.temperature, estimator=self.estimator,
                    lse_s=pick(self.lse_s), lse_t=pick(self.lse_t), kl_rev=pick(self.kl_rev),
                    row_coef=scale.expand(i.numel()).contiguous(), sampled_ids=pick(self.sampled_ids),
                    sampled_weight=pick(self.sampled_weight), chunk_rows=self.opts.chunk_rows,
                    chunk_vocab=self.opts.chunk_vocab)


class _TeachabilityKLFunction(torch.autograd.Function):
    """loss = (1 / normalizer) * sum over kept rows of the per-row loss; gradients to the student only.

    The statistics are computed before (no autograd needed for them); forward only returns the loss
    value, backward asks the backend for the kept rows' gradients (docs/math.md, Loss and gradients).
    """

    @staticmethod
    def forward(ctx, loss_value, plan: _BackwardPlan, *student):
        ctx.plan = plan
        ctx.save_for_backward(*student)
        return loss_value.clone()

    @staticmethod
    def backward(ctx, grad_output):
        saved = ctx.saved_tensors
        plan: _BackwardPlan = ctx.plan
        needs = ctx.needs_input_grad[2:]
        if plan.kept_idx.numel() == 0 or plan.normalizer == 0:
            grads = tuple(torch.zeros_like(x) if (want and x is not None) else None for x, want in zip(saved, needs))
        else:
            grads = plan.head.kept_grads(plan, saved, needs, plan.row_args(grad_output))
        return (None, None, *grads)


def _loss_value(stats: TeachabilityStats, kept: torch.Tensor, estimator: str, normalizer: float) -> torch.Tensor:
    if normalizer == 0:
        return torch.zeros((), dtype=torch.float32, device=kept.device)
    if estimator == "full":
        per_row = stats.kl_reverse.reshape(-1)
    else:
        lp_s = stats.logp_student_sampled.reshape(-1)
        per_row = (lp_s - stats.logp_teacher_sampled.reshape(-1)) * lp_s  # -A * logp_s(y)
    return (per_row[kept].double().sum() / normalizer).float()


def _check_normalizer(normalizer, kept: torch.Tensor) -> float:
    if normalizer is None:
        return float(kept.sum())
    if isinstance(normalizer, torch.Tensor) and normalizer.dim() == 0:
        normalizer = normalizer.item()
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


# ---------------------------------------------------------------------------- the pipeline


def _run(head, *, valid_mask, sequence_ids, sampled_ids, head_opts: dict, select: SelectionOptions,
         keep_mask=None, normalizer=None, stats=None, want_loss: bool = True):
    """(loss or None, TeachabilityStats) for one call of any entry point."""
    opts = check_head_options(max_vocab=head.max_vocab, **head_opts)
    device = head.student[0].device
    pos = _positions(head.leading, device, valid_mask, sequence_ids, sampled_ids, opts.vocab_size, opts.estimator)
    name, impl = backends.resolve(opts.backend, device, path=head.path, top_k=opts.top_k)
    if stats is None:
        with torch.no_grad():
            rows = head.row_stats(impl, pos, opts)
        stats = scatter_rows(rows, pos.valid, pos.valid_idx, pos.leading, opts.top_k)
        stats.backend = name
    else:
        _check_stats(stats, pos.leading, opts.top_k, opts.estimator)
        stats = dataclasses.replace(stats)  # the caller's object is never changed

    if keep_mask is not None:
        # The kept set was chosen elsewhere (e.g. globally across ranks): stats.score stays as given.
        kept = check_position_tensor("keep_mask", keep_mask, pos.leading, device, kind="mask").reshape(-1) & pos.valid
        stats.kept = kept.view(pos.leading)
    elif select.strategy is not None:
        score, kept = score_and_select(
            select.strategy, entropy=stats.entropy_student.reshape(-1), disagreement=stats.disagreement.reshape(-1),
            teacher_mass=stats.teacher_mass.reshape(-1), valid=pos.valid, keep_ratio=select.keep_ratio,
            sequence_ids=pos.sequence_ids, min_per_sequence=select.min_per_sequence, seed=select.seed)
        stats.score, stats.kept = score.view(pos.leading), kept.view(pos.leading)
    if not want_loss:
        return None, stats

    norm = _check_normalizer(normalizer, kept)
    sampled_weight = None
    if opts.estimator == "sampled":
        sampled_weight = (stats.logp_student_sampled - stats.logp_teacher_sampled).reshape(-1)
    plan = _BackwardPlan(head=head, backend=impl, kept_idx=kept.nonzero().squeeze(1), normalizer=norm,
                         estimator=opts.estimator, opts=opts, lse_s=stats.lse_student.reshape(-1),
                         lse_t=stats.lse_teacher.reshape(-1), kl_rev=stats.kl_reverse.reshape(-1),
                         sampled_ids=pos.sampled_ids, sampled_weight=sampled_weight)
    loss = _TeachabilityKLFunction.apply(_loss_value(stats, kept, opts.estimator, norm), plan, *head.student)
    return loss, stats


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
    check_same_device(student_hidden=student_hidden, student_weight=student_weight,
                      teacher_hidden=teacher_hidden, teacher_weight=teacher_weight,
                      student_bias=student_bias, teacher_bias=teacher_bias)
    if do_check_finite:
        for name, x in (("student_hidden", student_hidden), ("student_weight", student_weight),
                        ("teacher_hidden", teacher_hidden), ("teacher_weight", teacher_weight)):
            check_finite(name, x)
        for name, b in (("student_bias", student_bias), ("teacher_bias", teacher_bias)):
            if b is not None:
                check_finite(name, b, allow_neg_inf=True)
    return _HiddenHead(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias)


# ---------------------------------------------------------------------------- public entry points


def teachability_stats(
    student_hidden, student_weight, teacher_hidden, teacher_weight, *,
    student_bias=None, teacher_bias=None, valid_mask=None, sequence_ids=None, sampled_ids=None,
    top_k: int = 16, keep_ratio: float = 0.05, strategy: Optional[str] = "teachability", temperature: float = 1.0,
    vocab_size: Optional[int] = None, min_per_sequence: int = 1, seed: int = 0,
    backend: str = "auto", chunk_rows: Optional[int] = None, chunk_vocab: Optional[int] = None,
    check_finite: bool = True,
) -> TeachabilityStats:
    """Forward statistics (docs/math.md, Per-position statistics) and the selection (Scores and
    selection), with no loss and no autograd. ``strategy=None``: statistics only (``score`` and ``kept``
    stay None), for a caller that selects over a larger batch itself (``select_positions``)."""
    select = check_selection_options(strategy=strategy, keep_ratio=keep_ratio, min_per_sequence=min_per_sequence,
                                     seed=seed, allow_none=True)
    head = _check_hidden_inputs(student_hidden, student_weight, teacher_hidden, teacher_weight,
                                student_bias, teacher_bias, check_finite)
    _, stats = _run(head, valid_mask=valid_mask, sequence_ids=sequence_ids, sampled_ids=sampled_ids,
                    head_opts=dict(top_k=top_k, estimator="full", temperature=temperature, vocab_size=vocab_size,
                                   backend=backend, chunk_rows=chunk_rows, chunk_vocab=chunk_vocab),
                    select=select, want_loss=False)
    return stats


def select_positions(
    stats: TeachabilityStats,
    *,
    strategy: str = "teachability",
    keep_ratio: float = 0.05,
    sequence_ids: Optional[torch.Tensor] = None,
    min_per_sequence: int = 1,
    seed: int = 0,
):
    """Scores and the kept mask from statistics (docs/math.md, Scores and selection); returns (score, kept).

    ``sequence_ids`` default: for [B, T] statistics, each row of T is one sequence; for [N], none.
    Select once over a whole batch (e.g. ``TeachabilityStats.concat`` of its micro-batches), then pass
    each micro-batch its slice of ``kept`` as ``keep_mask`` and the total kept count as ``normalizer``.
    """
    select = check_selection_options(strategy=strategy, keep_ratio=keep_ratio, min_per_sequence=min_per_sequence,
                                     seed=seed)
    if not isinstance(stats, TeachabilityStats):
        raise TypeError(f"stats must be a TeachabilityStats, got {type(stats).__name__}")
    valid = stats.valid
    seq = check_position_tensor("sequence_ids", sequence_ids, tuple(valid.shape), valid.device, kind="ids")
    if seq is None:
        seq = default_sequence_ids(valid.shape, valid.device)
    return score_and_select(select.strategy, entropy=stats.entropy_student, disagreement=stats.disagreement,
                            teacher_mass=stats.teacher_mass, valid=valid, keep_ratio=select.keep_ratio,
                            sequence_ids=seq, min_per_sequence=select.min_per_sequence, seed=select.seed)


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
        strategy: one of ``STRATEGIES`` (docs/math.md, Scores and selection). estimator: "full" or
            "sampled" (Loss and gradients).
        temperature: tau, dividing both logit rows. vocab_size: columns that exist (default min(V_s, V_t)).
        min_per_sequence: kept positions every sequence gets at least. seed: for strategy "random".
        keep_mask: bool [...]; use this kept set instead of selecting (e.g. a global selection); then no
            local score is computed and ``stats.score`` is left as given (None for fresh statistics).
        normalizer: divide by this instead of the local kept count (global count, accumulation).
        stats: statistics already computed for these inputs (``teachability_stats``); skips the forward.
        backend: "auto" (the one that chooses: triton, cuda, torch on CUDA; torch elsewhere), or "torch",
            "triton", "cuda" (that backend, or an error saying why it cannot run).
        chunk_rows, chunk_vocab: tile sizes. torch backend: positions and vocabulary columns per tile;
            triton backend: chunk_vocab is the forward's vocabulary split and the backward's column
            chunk, chunk_rows the backward's row chunk. Default: the backend's own choice.
        check_finite: reject NaN/inf hidden states and weights (one extra read of each).

    Returns:
        (loss, stats): a float32 scalar with autograd to the student's hidden, weight and bias; and a
        detached ``TeachabilityStats`` (``stats.backend`` names the backend that ran).
    """
    select = check_selection_options(strategy=strategy, keep_ratio=keep_ratio, min_per_sequence=min_per_sequence,
                                     seed=seed)
    head = _check_hidden_inputs(student_hidden, student_weight, teacher_hidden, teacher_weight,
                                student_bias, teacher_bias, check_finite)
    return _run(head, valid_mask=valid_mask, sequence_ids=sequence_ids, sampled_ids=sampled_ids,
                head_opts=dict(top_k=top_k, estimator=estimator, temperature=temperature, vocab_size=vocab_size,
                               backend=backend, chunk_rows=chunk_rows, chunk_vocab=chunk_vocab),
                select=select, keep_mask=keep_mask, normalizer=normalizer, stats=stats)


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
    select = check_selection_options(strategy=strategy, keep_ratio=keep_ratio, min_per_sequence=min_per_sequence,
                                     seed=seed)
    check_tensor("student_logits", student_logits, min_dims=2)
    check_tensor("teacher_logits", teacher_logits, min_dims=2)
    if student_logits.shape[:-1] != teacher_logits.shape[:-1]:
        raise ValueError("student_logits and teacher_logits must cover the same positions: got leading shapes "
                         f"{tuple(student_logits.shape[:-1])} and {tuple(teacher_logits.shape[:-1])}")
    check_same_device(student_logits=student_logits, teacher_logits=teacher_logits)
    check_finite("student_logits", student_logits, allow_neg_inf=True)
    check_finite("teacher_logits", teacher_logits, allow_neg_inf=True)
    return _run(_LogitsHead(student_logits, teacher_logits), valid_mask=valid_mask, sequence_ids=sequence_ids,
                sampled_ids=sampled_ids,
                head_opts=dict(top_k=top_k, estimator=estimator, temperature=temperature, vocab_size=vocab_size,
                               backend=backend, chunk_rows=chunk_rows, chunk_vocab=chunk_vocab),
                select=select, keep_mask=keep_mask, normalizer=normalizer)
