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

from . import backends, estimators, provenance
from .options import (
    DEFAULTS,
    DeferredChecks,
    HeadOptions,
    SelectionOptions,
    as_float,
    check_finite,
    check_head_options,
    check_position_tensor,
    check_same_device,
    check_sampled_ids,
    check_selection_options,
    check_tensor,
    default_vocab_size,
    warn_vocabularies_differ,
    with_option_docs,
)
from .selection import default_sequence_ids, score_and_select
from .stats import RowStats, TeachabilityStats, scatter_rows
from .vocab_parallel import ShardedBackend, ShardLayout, VocabParallel, local_shards


@dataclass
class _Positions:
    """The per-position inputs, flattened to [N]."""

    leading: tuple
    valid: torch.Tensor  # bool [N]
    sequence_ids: Optional[torch.Tensor]  # int64 [N] or None
    sampled_ids: Optional[torch.Tensor]  # int64 [N] or None
    valid_idx: Optional[torch.Tensor] = None  # int64 [|I|], once the count is known
    num_valid: Optional[int] = None

    def rows(self, x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """The valid rows of a per-position [N, ...] tensor."""
        if x is None or self.num_valid == self.valid.numel():
            return x
        return x.index_select(0, self.valid_idx)


def _first_true(mask: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the ``count`` True entries of a bool [N] mask, ascending: ``mask.nonzero()`` without the
    host sync, since the count is already known (a stable sort puts the True entries first)."""
    return torch.sort((~mask).to(torch.int8), stable=True).indices[:count]


def _positions(leading, device, valid_mask, sequence_ids, sampled_ids, vocab_size, estimator,
               checks: DeferredChecks) -> _Positions:
    valid = check_position_tensor("valid_mask", valid_mask, leading, device, kind="mask", checks=checks)
    seq = check_position_tensor("sequence_ids", sequence_ids, leading, device, kind="ids")
    ids = check_position_tensor("sampled_ids", sampled_ids, leading, device, kind="ids")
    n = math.prod(leading)
    valid = torch.ones(n, dtype=torch.bool, device=device) if valid is None else valid.reshape(n)
    seq = default_sequence_ids(leading, device) if seq is None else seq
    if ids is not None:
        ids = ids.reshape(n)
        check_sampled_ids(checks, ids, valid, vocab_size)
    elif estimator == "sampled":
        raise ValueError("estimator='sampled' needs sampled_ids (the sampled token at every position)")
    return _Positions(tuple(leading), valid, None if seq is None else seq.reshape(n), ids)


def _signature(**tensors) -> dict:
    return {name: (tuple(t.shape), str(t.dtype).replace("torch.", ""), str(t.device))
            for name, t in tensors.items() if t is not None}


# ---------------------------------------------------------------------------- the two input kinds


class _HiddenHead:
    """Final hidden states [N, D] and lm_head weights (+ biases) of both models."""

    path = "hidden"

    def __init__(self, h_s, w_s, b_s, h_t, w_t, b_t):
        self.leading = tuple(h_s.shape[:-1])
        self.h_s = h_s.reshape(-1, h_s.shape[-1])
        self.w_s, self.b_s = w_s, b_s
        self.h_t = h_t.reshape(-1, h_t.shape[-1])
        self.w_t, self.b_t = w_t, b_t
        self.max_vocab = default_vocab_size(w_s.shape[0], w_t.shape[0])
        self.vocab_rows = (w_s.shape[0], w_t.shape[0])

    @property
    def student(self) -> tuple:
        """The differentiable inputs, in the order the autograd Function takes them."""
        return self.h_s, self.w_s, self.b_s

    @property
    def teacher(self) -> tuple:
        """Inputs the backward reads but never differentiates (saved, so in-place changes are caught)."""
        return self.h_t.detach(), self.w_t.detach(), None if self.b_t is None else self.b_t.detach()

    def shape_class(self, opts: HeadOptions):
        """What backend="auto" measures by on a GPU (backends.ShapeClass); metadata only, no sync."""
        return backends.ShapeClass.of(self.h_s, self.w_s, self.h_t, self.w_t, vocab_size=opts.vocab_size,
                                      top_k=opts.top_k)

    def signature(self) -> dict:
        return _signature(**self.named_inputs())

    def named_inputs(self) -> dict:
        """The inputs by name, as the statistics' fingerprints (``provenance``) and signature know them."""
        return dict(student_hidden=self.h_s, student_weight=self.w_s, student_bias=self.b_s,
                    teacher_hidden=self.h_t, teacher_weight=self.w_t, teacher_bias=self.b_t)

    def row_stats(self, impl, pos: _Positions, opts: HeadOptions) -> RowStats:
        h_t, w_t, b_t = self.teacher
        b_s = None if self.b_s is None else self.b_s.detach()
        return impl.forward_stats(pos.rows(self.h_s.detach()), self.w_s.detach(), b_s, pos.rows(h_t), w_t, b_t,
                                  vocab_size=opts.vocab_size, top_k=opts.top_k, temperature=opts.temperature,
                                  sampled_ids=pos.rows(pos.sampled_ids), chunk_rows=opts.chunk_rows,
                                  chunk_vocab=opts.chunk_vocab)

    @staticmethod
    def kept_grads(plan: "_BackwardPlan", student: tuple, teacher: tuple, needs: tuple, row_args: dict) -> tuple:
        h_s, w_s, b_s = student
        h_t, w_t, b_t = teacher
        idx = plan.kept_idx
        grads = plan.backend.backward_kept(
            h_s.index_select(0, idx), w_s, b_s, h_t.index_select(0, idx), w_t, b_t,
            need_bias_grad=b_s is not None and needs[2], **row_args)
        dh_rows, dw, db = grads
        if plan.verify_lse:
            _check_reused_lse(getattr(grads, "lse", None), plan.lse_s.index_select(0, idx))
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
        self.zt = zt.reshape(-1, zt.shape[-1])
        self.max_vocab = default_vocab_size(zs.shape[-1], zt.shape[-1])
        self.vocab_rows = (zs.shape[-1], zt.shape[-1])

    @property
    def student(self) -> tuple:
        return (self.zs,)

    @property
    def teacher(self) -> tuple:
        return (self.zt.detach(),)

    def shape_class(self, opts: HeadOptions):
        return None  # the logits path keeps the fixed order

    def signature(self) -> dict:
        return _signature(student_logits=self.zs, teacher_logits=self.zt)

    def named_inputs(self) -> dict:
        return {}  # the logits path takes no ``stats=``: nothing to fingerprint

    def row_stats(self, impl, pos: _Positions, opts: HeadOptions) -> RowStats:
        return impl.logits_forward_stats(pos.rows(self.zs.detach()), pos.rows(self.teacher[0]),
                                         vocab_size=opts.vocab_size, top_k=opts.top_k, temperature=opts.temperature,
                                         sampled_ids=pos.rows(pos.sampled_ids), chunk_rows=opts.chunk_rows,
                                         chunk_vocab=opts.chunk_vocab)

    @staticmethod
    def kept_grads(plan: "_BackwardPlan", student: tuple, teacher: tuple, needs: tuple, row_args: dict) -> tuple:
        (zs,), (zt,) = student, teacher
        idx = plan.kept_idx
        rows = plan.backend.logits_grad_kept(
            zs.index_select(0, idx), None if plan.estimator == "sampled" else zt.index_select(0, idx), **row_args)
        grad = torch.zeros_like(zs)
        grad.index_copy_(0, idx, rows.to(zs.dtype))
        return (grad,)


# ---------------------------------------------------------------------------- loss and backward


@dataclass
class _BackwardPlan:
    """What the backward needs besides the saved inputs."""

    head: object
    backend: object
    kept_idx: torch.Tensor
    normalizer: object  # float, or a device scalar the caller passed
    estimator: str
    opts: HeadOptions
    lse_s: torch.Tensor  # the statistics' log-sum-exps, compared with the backward's when ``verify_lse``
    sampled_ids: Optional[torch.Tensor]
    sampled_weight: Optional[torch.Tensor]
    num_student: int
    row_weight: Optional[torch.Tensor] = None  # [N] per-position weights of the loss, or None
    verify_lse: bool = False  # statistics were passed in: compare them with the backward's own lse

    def row_args(self, grad_output: torch.Tensor) -> dict:
        """Per-kept-row inputs of a backend's kept-row gradient, and its options."""
        i = self.kept_idx
        pick = lambda x: None if x is None else x.reshape(-1)[i]  # noqa: E731
        # float32 whatever the normaliser (a float64 device scalar would make the backend's GEMMs mix dtypes)
        scale = (grad_output.float() / (self.normalizer * self.opts.temperature)).float()
        row_coef = scale.expand(i.numel()) if self.row_weight is None else scale * pick(self.row_weight).float()
        return dict(vocab_size=self.opts.vocab_size, temperature=self.opts.temperature, estimator=self.estimator,
                    row_coef=row_coef.contiguous(), sampled_ids=pick(self.sampled_ids),
                    sampled_weight=pick(self.sampled_weight), chunk_rows=self.opts.chunk_rows,
                    chunk_vocab=self.opts.chunk_vocab)


class _TeachabilityKLFunction(torch.autograd.Function):
    """loss = (1 / normalizer) * sum over kept rows of the per-row loss; gradients to the student only.

    The statistics are computed before (no autograd needed for them); forward only returns the loss
    value, backward asks the backend for the kept rows' gradients (docs/math.md, Loss and gradients).
    The teacher's tensors are saved too, so an in-place change between forward and backward is an
    error, as for the student's. The backward is not itself differentiable (double backward raises).
    """

    @staticmethod
    def forward(ctx, loss_value, plan: _BackwardPlan, *inputs):
        ctx.plan = plan
        ctx.save_for_backward(*inputs)
        return loss_value.clone()

    @staticmethod
    def backward(ctx, grad_output):
        if torch.is_grad_enabled():  # create_graph=True: the analytic backward has no graph of its own
            raise RuntimeError("fused_teachability_kl does not support second-order gradients "
                               "(create_graph=True / double backward)")
        plan: _BackwardPlan = ctx.plan
        saved = ctx.saved_tensors
        student, teacher = saved[:plan.num_student], saved[plan.num_student:]
        needs = ctx.needs_input_grad[2:2 + plan.num_student]
        if plan.kept_idx.numel() == 0:
            grads = tuple(torch.zeros_like(x) if (want and x is not None) else None for x, want in zip(student, needs))
        else:
            grads = plan.head.kept_grads(plan, student, teacher, needs, plan.row_args(grad_output))
        return (None, None, *grads, *(None,) * len(teacher))


def _check_reused_lse(recomputed: Optional[torch.Tensor], given: torch.Tensor) -> None:
    """Reused statistics must come from these tensors' values: the backward recomputes the kept rows'
    log-sum-exps anyway, so compare (one host read, only when ``stats=`` was passed). The tolerance is 30x
    the float32 rounding of a recomputed logit (GEMMs of other shapes): 1e-4 (1 + |lse|)."""
    if recomputed is None or recomputed.numel() == 0:
        return
    off = (recomputed.float() - given.float()).abs() > 1e-4 * (1 + given.float().abs())
    if bool(off.any()):
        worst = (recomputed.float() - given.float()).abs().max().item()
        raise ValueError(f"stats were computed from other tensor values than this call's (the kept rows' "
                         f"log-sum-exps differ by up to {worst:.3g}); recompute them for these inputs")


def _normalizer(normalizer, checks: DeferredChecks):
    """None (the kept count), a Python number > 0, or a device scalar (checked with the call's sync)."""
    if normalizer is None:
        return None
    if isinstance(normalizer, torch.Tensor) and normalizer.dim() == 0 and normalizer.is_floating_point():
        value = normalizer.detach().double()
        checks.add(~(torch.isfinite(value) & (value > 0)), lambda: ValueError(
            f"normalizer must be a finite number > 0 (e.g. the global kept count), got {normalizer!r}"))
        return value
    return as_float("normalizer", normalizer, positive=True)


def _check_reuse(stats, computed_from: dict, pos: _Positions, checks: DeferredChecks, estimator: str, head):
    """Statistics passed back in (``stats=``) must come from this call's options and inputs: every input's
    fingerprint (``provenance``) is compared, in the forward, with the call's deferred checks."""
    if not isinstance(stats, TeachabilityStats):
        raise TypeError(f"stats must be a TeachabilityStats, got {type(stats).__name__}")
    if stats.computed_from is None:
        raise ValueError("stats do not say what they were computed from (made by hand or by an older version); "
                         "pass the TeachabilityStats that teachability_stats returned")
    if tuple(stats.valid.shape) != tuple(pos.leading):
        raise ValueError(f"stats were computed for positions {tuple(stats.valid.shape)}, "
                         f"but the inputs have {tuple(pos.leading)}")
    before = stats.computed_from
    for key in computed_from:
        if before.get(key) != computed_from[key]:
            raise ValueError(f"stats were computed with {key}={before.get(key)!r}, but this call has "
                             f"{key}={computed_from[key]!r}; recompute them (teachability_stats) with the same options")
    if estimator == "sampled" and stats.logp_student_sampled is None:
        raise ValueError("stats were computed without sampled_ids, which estimator='sampled' needs")
    if stats.valid.device != pos.valid.device:
        raise ValueError(f"stats are on {stats.valid.device} but the inputs are on {pos.valid.device}; "
                         "move them with stats.to(device)")
    provenance.check_same_inputs(stats.fingerprints, checks, pos.valid, **head.named_inputs())
    given = stats.valid.reshape(-1) | (stats.dropped.reshape(-1) if stats.dropped is not None else False)
    checks.add((given != pos.valid).any(), lambda: ValueError(
        "stats were computed with a different valid_mask than this call's"))
    if pos.sampled_ids is not None:
        same = torch.where(pos.valid, stats.sampled_ids.reshape(-1) == pos.sampled_ids, True)
        checks.add(~same.all(), lambda: ValueError("stats were computed with different sampled_ids than this call's"))


# ---------------------------------------------------------------------------- the pipeline


def _row_weight(row_weight, pos: "_Positions", kept: torch.Tensor, checks: DeferredChecks) -> Optional[torch.Tensor]:
    """The detached [N] weights, 0 off the kept rows (there they multiply nothing: a NaN upstream gradient of
    ``reduction="none"`` at an unkept row is legal); NaN or inf at a kept row is an error."""
    if row_weight is None:
        return None
    if not isinstance(row_weight, torch.Tensor) or not row_weight.is_floating_point():
        raise TypeError(f"row_weight must be a floating-point tensor of shape {pos.leading}, got "
                        f"{type(row_weight).__name__ if not isinstance(row_weight, torch.Tensor) else row_weight.dtype}")
    if tuple(row_weight.shape) != tuple(pos.leading):
        raise ValueError(f"row_weight must have shape {tuple(pos.leading)}, got {tuple(row_weight.shape)}")
    if row_weight.device != pos.valid.device:
        raise ValueError(f"row_weight is on {row_weight.device} but the inputs are on {pos.valid.device}")
    w = row_weight.detach().reshape(-1)
    checks.add((kept & ~torch.isfinite(w)).any(), lambda: ValueError(
        "row_weight (with reduction='none': the upstream gradient) contains NaN or inf at kept positions"))
    return torch.where(kept, w, 0.0)


_COMPILE_SYNCS = (
    "the taopd_kernels loss head makes two host syncs per call (it reads how many positions are valid, then how "
    "many are kept, with its input checks), which torch.compile(fullgraph=True) cannot trace: compile the model "
    "and call the loss head outside the compiled region (or without fullgraph=True: the rest still compiles)")


def _run(head, *, valid_mask, sequence_ids, sampled_ids, head_opts: dict, select: SelectionOptions,
         checks: DeferredChecks, keep_mask=None, normalizer=None, stats=None, row_weight=None,
         want_loss: bool = True, vocab_parallel: Optional[VocabParallel] = None):
    """(loss or None, TeachabilityStats) for one call of any entry point.

    Host syncs: one to learn how many positions are valid (with every input check read at the same
    time), one to learn how many are kept (with the checks on the statistics); none per tile, none in
    the backward. A call that reuses statistics skips the first and reads one in the backward instead:
    whether the backward's recomputed log-sum-exps match the statistics' (``_check_reused_lse``).
    """
    device = head.student[0].device
    if torch.compiler.is_compiling():
        torch._dynamo.graph_break(msg=_COMPILE_SYNCS)
    if head_opts.get("vocab_size") is None and vocab_parallel is None:  # shards: the layout checks the sizes
        warn_vocabularies_differ(*head.vocab_rows)
    layout = None if vocab_parallel is None else ShardLayout.gather(vocab_parallel, *head.vocab_rows, device)
    opts = check_head_options(max_vocab=head.max_vocab if layout is None else layout.max_vocab, **head_opts)
    pos = _positions(head.leading, device, valid_mask, sequence_ids, sampled_ids, opts.vocab_size, opts.estimator,
                     checks)
    name, impl = backends.resolve(opts.backend, device, path=head.path, top_k=opts.top_k,
                                  shape=head.shape_class(opts))
    if layout is not None:  # this rank's shard, merged over the group (taopd_kernels/vocab_parallel.py)
        impl = ShardedBackend(name, impl, layout, opts.vocab_size)
    computed_from = dict(temperature=opts.temperature, vocab_size=opts.vocab_size, top_k=opts.top_k,
                         sampled_ids=pos.sampled_ids is not None, inputs=head.signature(),
                         vocab_shards=None if layout is None else (layout.rows_s, layout.rows_t, layout.rank))
    reused = stats is not None
    if stats is None:
        stats = _fresh_stats(head, impl, pos, opts, checks)
        stats.backend, stats.computed_from = name, computed_from
    else:
        _check_reuse(stats, computed_from, pos, checks, opts.estimator, head)
        stats = dataclasses.replace(stats)  # the caller's object is never changed
    kept = _kept(stats, pos, select, keep_mask, checks)
    if not want_loss:
        checks.read()  # host sync 2: the checks on the statistics
        return None, stats
    return _loss(head, impl, stats, kept, pos, opts, checks, normalizer=normalizer, row_weight=row_weight,
                 verify_lse=reused), stats


def _fresh_stats(head, impl, pos: _Positions, opts: HeadOptions, checks: DeferredChecks) -> TeachabilityStats:
    """The backend's statistics of the valid positions, placed at the caller's positions."""
    (pos.num_valid,) = checks.read(pos.valid.sum())  # host sync 1: before any heavy work
    pos.valid_idx = _first_true(pos.valid, pos.num_valid)
    with torch.no_grad():
        rows = head.row_stats(impl, pos, opts)
    stats = scatter_rows(rows, pos.valid, pos.valid_idx, pos.leading, opts.top_k)
    stats.fingerprints = provenance.fingerprints(**head.named_inputs())
    lse_s, lse_t = stats.lse_student.reshape(-1), stats.lse_teacher.reshape(-1)
    # No finite logit in the used vocabulary for a model: not a valid position (docs/math.md, Conventions).
    empty_row = pos.valid & ((lse_s == -math.inf) | (lse_t == -math.inf))
    overflow = pos.valid & ~empty_row & ~(torch.isfinite(lse_s) & torch.isfinite(lse_t))
    checks.add(overflow.any(), lambda: ValueError(
        "the logits are NaN or overflow float32 (log-sum-exp not finite) at some valid positions: the "
        "hidden states or weights are too large for float32 logits, or hold NaN"))
    stats.valid, stats.dropped = (pos.valid & ~empty_row).view(pos.leading), empty_row.view(pos.leading)
    if pos.sampled_ids is not None:
        stats.sampled_ids = torch.where(pos.valid, pos.sampled_ids, -1).view(pos.leading)
    return stats


def _kept(stats: TeachabilityStats, pos: _Positions, select: SelectionOptions, keep_mask,
          checks: DeferredChecks) -> Optional[torch.Tensor]:
    """The kept mask [N], also set as ``stats.kept`` (and ``stats.score`` when selected here); None for
    statistics only (no ``keep_mask``, strategy None)."""
    valid = stats.valid.reshape(-1)
    if keep_mask is not None:
        # The kept set was chosen elsewhere (e.g. globally across ranks): stats.score stays as given.
        kept = check_position_tensor("keep_mask", keep_mask, pos.leading, valid.device, kind="mask",
                                     checks=checks).reshape(-1) & valid
        stats.kept = kept.view(pos.leading)
        return kept
    if select.strategy is None:
        return None
    score, kept = score_and_select(
        select.strategy, entropy=stats.entropy_student.reshape(-1), disagreement=stats.disagreement.reshape(-1),
        teacher_mass=stats.teacher_mass.reshape(-1), valid=valid, keep_ratio=select.keep_ratio,
        sequence_ids=pos.sequence_ids, min_per_sequence=select.min_per_sequence, seed=select.seed)
    stats.score, stats.kept = score.view(pos.leading), kept.view(pos.leading)
    return kept


def _loss(head, impl, stats: TeachabilityStats, kept: torch.Tensor, pos: _Positions, opts: HeadOptions,
          checks: DeferredChecks, *, normalizer, row_weight, verify_lse: bool) -> torch.Tensor:
    """The loss over the kept positions (host sync 2: the kept count), wired to the kept-row backward."""
    weight = _row_weight(row_weight, pos, kept, checks)
    per_row = estimators.per_position_loss(stats, opts.estimator).reshape(-1)
    # Rows the backward differentiates: the kept ones, less those of weight 0 (they drop even an infinite row,
    # whose gradient would be inf * 0).
    carried = kept if weight is None else kept & (weight != 0)
    if weight is not None:
        per_row = torch.where(carried, per_row * weight, 0.0)
    checks.add((carried & ~torch.isfinite(per_row)).any(), lambda: _infinite_loss_error(stats, carried))
    norm = _normalizer(normalizer, checks)
    num_kept, num_carried = checks.read(kept.sum(), carried.sum())  # host sync 2
    norm = float(num_kept) if norm is None else norm
    loss_value = torch.where(kept, per_row.double(), 0.0).sum() / norm if num_kept else \
        torch.zeros((), dtype=torch.float64, device=kept.device)
    sampled_weight = None
    if opts.estimator == "sampled":
        sampled_weight = estimators.sampled_weight(stats.logp_student_sampled, stats.logp_teacher_sampled).reshape(-1)
    plan = _BackwardPlan(head=head, backend=impl, kept_idx=_first_true(carried, num_carried), normalizer=norm,
                         estimator=opts.estimator, opts=opts, lse_s=stats.lse_student.reshape(-1),
                         sampled_ids=pos.sampled_ids, sampled_weight=sampled_weight,
                         num_student=len(head.student), row_weight=weight, verify_lse=verify_lse)
    return _TeachabilityKLFunction.apply(loss_value.float(), plan, *head.student, *head.teacher)


def _infinite_loss_error(stats: TeachabilityStats, kept: torch.Tensor) -> ValueError:
    """Why the loss is infinite at a kept row (read only when it is: the error path)."""
    lse = torch.stack([stats.lse_student.reshape(-1), stats.lse_teacher.reshape(-1)]).abs()
    infinite = ~torch.isfinite(stats.kl_reverse.reshape(-1))
    largest = float(torch.where(kept & infinite, lse.max(0).values, 0.0).max())
    if largest > 1e30:
        return ValueError(f"the loss overflows float32 at kept positions: logits of magnitude ~{largest:.3g} (after "
                          "1/temperature) leave no room for the difference of the two models' logits; the hidden "
                          "states or weights are far too large (scale them down, or check for a broken layer)")
    return ValueError("the loss is infinite at kept positions: the teacher gives probability 0 (a -inf logit) to "
                      "tokens the student can emit (reverse KL = inf), or a sampled token has probability 0 under a "
                      "model")


def _check_hidden_inputs(student_hidden, student_weight, teacher_hidden, teacher_weight,
                         student_bias, teacher_bias, do_check_finite, checks: DeferredChecks):
    check_tensor("student_hidden", student_hidden, min_dims=2)
    check_tensor("teacher_hidden", teacher_hidden, min_dims=2)
    check_tensor("student_weight", student_weight, dims=2)
    check_tensor("teacher_weight", teacher_weight, dims=2)
    if student_hidden.shape[:-1] != teacher_hidden.shape[:-1]:
        raise ValueError("student_hidden and teacher_hidden must cover the same positions: got leading shapes "
                         f"{tuple(student_hidden.shape[:-1])} and {tuple(teacher_hidden.shape[:-1])}")
    for who, h, w in (("student", student_hidden, student_weight), ("teacher", teacher_hidden, teacher_weight)):
        if h.shape[-1] != w.shape[1]:
            hint = (f"; these look like logits [..., V] (V = {w.shape[0]}): for logits use "
                    "teachability_kl_from_logits") if h.shape[-1] == w.shape[0] else ""
            raise ValueError(f"{who}_hidden has hidden size {h.shape[-1]} but {who}_weight is "
                             f"{tuple(w.shape)}; expected [V, {h.shape[-1]}]{hint}")
        if h.shape[-1] == 0:
            raise ValueError(f"{who}_hidden has hidden size 0; expected at least 1")
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
            check_finite(checks, name, x)
        for name, b in (("student_bias", student_bias), ("teacher_bias", teacher_bias)):
            if b is not None:
                check_finite(checks, name, b, allow_neg_inf=True)
    return _HiddenHead(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias)


# ---------------------------------------------------------------------------- public entry points


@with_option_docs
def teachability_stats(
    student_hidden, student_weight, teacher_hidden, teacher_weight, *,
    student_bias=None, teacher_bias=None, valid_mask=None, sequence_ids=None, sampled_ids=None,
    top_k: int = DEFAULTS.top_k, keep_ratio: float = DEFAULTS.keep_ratio, strategy: Optional[str] = DEFAULTS.strategy,
    temperature: float = DEFAULTS.temperature, vocab_size: Optional[int] = DEFAULTS.vocab_size,
    min_per_sequence: int = DEFAULTS.min_per_sequence, seed: int = DEFAULTS.seed, backend: str = DEFAULTS.backend,
    chunk_rows: Optional[int] = DEFAULTS.chunk_rows, chunk_vocab: Optional[int] = DEFAULTS.chunk_vocab,
    check_finite: bool = DEFAULTS.check_finite, vocab_parallel: Optional[VocabParallel] = None,
) -> TeachabilityStats:
    """Forward statistics (docs/math.md, Per-position statistics) and the selection (Scores and
    selection), with no loss and no autograd. ``strategy=None``: statistics only (``score`` and ``kept``
    stay None), for a caller that selects over a larger batch itself (``select_positions``)."""
    select = check_selection_options(strategy=strategy, keep_ratio=keep_ratio, min_per_sequence=min_per_sequence,
                                     seed=seed, allow_none=True)
    checks = DeferredChecks()
    vocab_parallel, (student_weight, teacher_weight, student_bias, teacher_bias) = local_shards(
        vocab_parallel, student_weight, teacher_weight, student_bias, teacher_bias)
    head = _check_hidden_inputs(student_hidden, student_weight, teacher_hidden, teacher_weight,
                                student_bias, teacher_bias, check_finite, checks)
    _, stats = _run(head, checks=checks, valid_mask=valid_mask, sequence_ids=sequence_ids, sampled_ids=sampled_ids,
                    head_opts=dict(top_k=top_k, estimator="full", temperature=temperature, vocab_size=vocab_size,
                                   backend=backend, chunk_rows=chunk_rows, chunk_vocab=chunk_vocab),
                    select=select, want_loss=False, vocab_parallel=vocab_parallel)
    return stats


@with_option_docs
def select_positions(
    stats: TeachabilityStats,
    *,
    strategy: str = DEFAULTS.strategy,
    keep_ratio: float = DEFAULTS.keep_ratio,
    sequence_ids: Optional[torch.Tensor] = None,
    min_per_sequence: int = DEFAULTS.min_per_sequence,
    seed: int = DEFAULTS.seed,
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


@with_option_docs
def fused_teachability_kl(
    student_hidden: torch.Tensor, student_weight: torch.Tensor, teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor, *, student_bias: Optional[torch.Tensor] = None,
    teacher_bias: Optional[torch.Tensor] = None, valid_mask: Optional[torch.Tensor] = None,
    sequence_ids: Optional[torch.Tensor] = None, sampled_ids: Optional[torch.Tensor] = None,
    top_k: int = DEFAULTS.top_k, keep_ratio: float = DEFAULTS.keep_ratio, strategy: str = DEFAULTS.strategy,
    estimator: str = DEFAULTS.estimator, temperature: float = DEFAULTS.temperature,
    vocab_size: Optional[int] = DEFAULTS.vocab_size, min_per_sequence: int = DEFAULTS.min_per_sequence,
    seed: int = DEFAULTS.seed, keep_mask: Optional[torch.Tensor] = None, normalizer: Optional[float] = None,
    stats: Optional[TeachabilityStats] = None, row_weight: Optional[torch.Tensor] = None,
    backend: str = DEFAULTS.backend, chunk_rows: Optional[int] = DEFAULTS.chunk_rows,
    chunk_vocab: Optional[int] = DEFAULTS.chunk_vocab, check_finite: bool = DEFAULTS.check_finite,
    vocab_parallel: Optional[VocabParallel] = None,
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
        keep_mask: bool [...]; use this kept set instead of selecting (e.g. a global selection); then no
            local score is computed and ``stats.score`` is left as given (None for fresh statistics).
        normalizer: divide by this instead of the local kept count (global count, accumulation).
        stats: statistics already computed for these inputs (``teachability_stats``); skips the forward.
        row_weight: float [...]; per-position weights w_t of the loss, sum_t m_t w_t l_t / normalizer
            (detached; e.g. the upstream gradient of a per-position loss, or importance weights).
        vocab_parallel: ``VocabParallel(group, hidden_grad)``: the weights (and biases) are this rank's
            vocabulary shard of heads sharded over ``group``, contiguous in rank order; the statistics,
            selection and loss are the whole heads' on every rank, the weight gradients this shard's rows
            (docs/distributed.md, Vocabulary-parallel lm_head). DTensor weights sharded on dim 0 turn it on.
        The options (top_k, keep_ratio, strategy, ...): below, from ``LossHeadOptions``.

    Returns:
        (loss, stats): ``loss`` is a float32 scalar, the mean over the kept positions of the per-position
        loss (reverse KL for estimator "full"): ``sum_kept l_t / N_kept``, or ``/ normalizer`` when given,
        with autograd to the student's hidden, weight and bias; ``stats`` the detached
        ``TeachabilityStats`` (``stats.kept`` the kept positions, ``stats.backend`` the backend that ran).

    Raises:
        ValueError / TypeError naming the argument: shapes, dtypes, devices (also the meta device), NaN or inf
        inputs, options out of range, ``stats`` computed from other inputs or options, an infinite loss at a
        kept position (a teacher probability of 0 where the student has mass). RuntimeError: a named backend
        that cannot run here.

    ``backend="auto"`` on CUDA measures the usable backends once per device and shape class and caches the
    choice in ``$TAOPD_CACHE_DIR`` (default ``~/.cache/taopd``; backends/autotune.py); on the CPU it is torch.

    Example::

        loss, stats = fused_teachability_kl(h_s, lm_head_s.weight, h_t, lm_head_t.weight,
                                            valid_mask=response_mask, keep_ratio=0.05)
        loss.backward()
        print(stats.num_kept, stats.summary()["teacher_mass/kept"])
    """
    select = check_selection_options(strategy=strategy, keep_ratio=keep_ratio, min_per_sequence=min_per_sequence,
                                     seed=seed)
    checks = DeferredChecks()
    vocab_parallel, (student_weight, teacher_weight, student_bias, teacher_bias) = local_shards(
        vocab_parallel, student_weight, teacher_weight, student_bias, teacher_bias)
    head = _check_hidden_inputs(student_hidden, student_weight, teacher_hidden, teacher_weight,
                                student_bias, teacher_bias, check_finite, checks)
    return _run(head, checks=checks, valid_mask=valid_mask, sequence_ids=sequence_ids, sampled_ids=sampled_ids,
                head_opts=dict(top_k=top_k, estimator=estimator, temperature=temperature, vocab_size=vocab_size,
                               backend=backend, chunk_rows=chunk_rows, chunk_vocab=chunk_vocab),
                select=select, keep_mask=keep_mask, normalizer=normalizer, stats=stats, row_weight=row_weight,
                vocab_parallel=vocab_parallel)


@with_option_docs
def teachability_kl_from_logits(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, valid_mask: Optional[torch.Tensor] = None,
    sequence_ids: Optional[torch.Tensor] = None, sampled_ids: Optional[torch.Tensor] = None,
    top_k: int = DEFAULTS.top_k, keep_ratio: float = DEFAULTS.keep_ratio, strategy: str = DEFAULTS.strategy,
    estimator: str = DEFAULTS.estimator, temperature: float = DEFAULTS.temperature,
    vocab_size: Optional[int] = DEFAULTS.vocab_size, min_per_sequence: int = DEFAULTS.min_per_sequence,
    seed: int = DEFAULTS.seed, keep_mask: Optional[torch.Tensor] = None, normalizer: Optional[float] = None,
    backend: str = DEFAULTS.backend, chunk_rows: Optional[int] = DEFAULTS.chunk_rows,
    chunk_vocab: Optional[int] = DEFAULTS.chunk_vocab,
    vocab_parallel: Optional[VocabParallel] = None,
):
    """The same loss and statistics for callers that already hold logits [..., V_s] and [..., V_t].

    Only the first ``vocab_size`` columns are used (default min(V_s, V_t)); -inf logits are allowed
    (masked tokens), NaN and +inf are not. The gradient w.r.t. ``student_logits`` is zero outside the
    kept rows and beyond ``vocab_size``. Options as in ``fused_teachability_kl``; with ``vocab_parallel`` the
    logits are this rank's columns of the whole rows (plain tensors).
    """
    select = check_selection_options(strategy=strategy, keep_ratio=keep_ratio, min_per_sequence=min_per_sequence,
                                     seed=seed)
    check_tensor("student_logits", student_logits, min_dims=2)
    check_tensor("teacher_logits", teacher_logits, min_dims=2)
    if student_logits.shape[:-1] != teacher_logits.shape[:-1]:
        raise ValueError("student_logits and teacher_logits must cover the same positions: got leading shapes "
                         f"{tuple(student_logits.shape[:-1])} and {tuple(teacher_logits.shape[:-1])}")
    check_same_device(student_logits=student_logits, teacher_logits=teacher_logits)
    checks = DeferredChecks()
    check_finite(checks, "student_logits", student_logits, allow_neg_inf=True)
    check_finite(checks, "teacher_logits", teacher_logits, allow_neg_inf=True)
    return _run(_LogitsHead(student_logits, teacher_logits), checks=checks, valid_mask=valid_mask, sequence_ids=sequence_ids,
                sampled_ids=sampled_ids,
                head_opts=dict(top_k=top_k, estimator=estimator, temperature=temperature, vocab_size=vocab_size,
                               backend=backend, chunk_rows=chunk_rows, chunk_vocab=chunk_vocab),
                select=select, keep_mask=keep_mask, normalizer=normalizer, vocab_parallel=vocab_parallel)
