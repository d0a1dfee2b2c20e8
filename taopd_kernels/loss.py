"""The TA-OPD loss head as a ``torch.nn.Module`` and a functional twin, in the shape Liger/TRL users know.

    loss_fn = TeachabilityKLLoss(strategy="teachability", keep_ratio=0.05)
    loss = loss_fn(h_student, lm_head_s.weight, h_teacher, lm_head_t.weight, labels, shift_labels=True)
    loss.backward()            # return_stats=True: (loss, stats)

Built only on the public entry points of ``taopd_kernels.api`` (``fused_teachability_kl``,
``teachability_stats``) and ``selection.select_parts``; docs/math.md is the math contract.

Labels: ``labels[..., t]`` is the token that position ``t`` predicts (aligned with the hidden states),
``ignore_index`` (default -100) where there is no loss. ``shift_labels=True`` takes HF-style unshifted
labels (``labels[:, t + 1]`` is predicted at ``t``; the last position gets ``ignore_index``, so the
shapes stay ``[B, T]``). Valid positions are ``labels != ignore_index``; their label is also the
sampled token (``sampled_ids``) that estimator ``"sampled"`` and ``stats.logp_*_sampled`` use.

Reductions (docs/math.md, Loss and gradients, with ``m`` the kept mask and ``l_t`` the per-row loss):
    "mean": sum_t m_t l_t / sum_t m_t; with ``normalizer`` (a kept count): sum_t m_t l_t / normalizer; with HF
            Trainer's ``num_items_in_batch`` (label tokens): sum_t m_t l_t * (N_valid / N_kept) / num_items_in_batch,
            on the scale of the mean over kept positions (one micro-batch: exactly that mean);
    "sum":  sum_t m_t l_t;
    "none": the per-position tensor m_t l_t (shape of the labels), with gradient; 0 where not kept.

Gradient accumulation (one selection over the whole batch, docs/math.md, Scores and selection):

    stats = [loss_fn.statistics(h_s[i], W_s, h_t[i], W_t, labels[i]) for i in micro]   # no grad
    masks, normalizer = loss_fn.select_across(stats)                                    # one selection
    for i in micro:
        loss = loss_fn(h_s[i], W_s, h_t[i], W_t, labels[i], keep_mask=masks[i],
                       normalizer=normalizer, stats=stats[i])
        loss.backward()        # sum over micro-batches == one big batch's mean over kept positions
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from .api import fused_teachability_kl, teachability_stats
from .estimators import per_position_loss
from .hf import next_token_shift
from .options import DEFAULTS, as_float, check_loss_module_options, default_vocab_size, with_option_docs
from .selection import select_parts
from .stats import TeachabilityStats

REDUCTIONS = ("mean", "sum", "none")


# ------------------------------------------------------------------------------------------ labels


def labels_to_positions(labels: torch.Tensor, leading: tuple, vocab_size: int, *,
                        ignore_index: int = DEFAULTS.ignore_index, shift_labels: bool = False, device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(valid_mask, sampled_ids) from labels: valid where ``labels != ignore_index``, ids 0 elsewhere.

    ``leading``: the hidden states' leading shape; ``vocab_size``: the used vocabulary (ids must lie in
    ``[0, vocab_size)`` unless ignored). ``shift_labels``: labels are HF-style unshifted (``labels[..., 1:]``
    align with positions ``[..., :-1]``; the last position gets ``ignore_index``).
    """
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be an integer torch.Tensor of shape {tuple(leading)}, got {type(labels).__name__}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor (token ids, {ignore_index} where no loss), got {labels.dtype}")
    if tuple(labels.shape) != tuple(leading):
        raise ValueError(f"labels must have shape {tuple(leading)} (the hidden states' leading dims), "
                         f"got {tuple(labels.shape)}")
    if device is not None and labels.device != torch.device(device):
        raise ValueError(f"labels are on {labels.device} but the hidden states are on {device}")
    labels = labels.long()
    if shift_labels and labels.shape[-1] > 0:  # an empty [B, 0] batch has nothing to shift
        _, following = next_token_shift(targets=labels)
        labels = torch.cat([following, labels.new_full((*labels.shape[:-1], 1), ignore_index)], dim=-1)
    valid = labels != ignore_index
    bad = valid & ((labels < 0) | (labels >= vocab_size))
    if bool(bad.any()):  # one host sync
        value = int(labels[bad][0])
        raise ValueError(f"labels must hold token ids in [0, {vocab_size}) or ignore_index={ignore_index}; "
                         f"found {value}")
    return valid, torch.where(valid, labels, torch.zeros_like(labels))


def _used_vocab(student_weight, teacher_weight, vocab_size):
    if vocab_size is not None:
        return vocab_size
    return default_vocab_size(student_weight.shape[0], teacher_weight.shape[0])


def _positive_number(name: str, value) -> float:
    """A count-like divisor: a number > 0 (Python, numpy, or a one-element tensor, read once)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got shape {tuple(value.shape)}")
        if value.device.type == "meta":
            raise ValueError(f"{name} is on the meta device (no value); pass a number or a tensor with a value")
        value = value.reshape(())
    return as_float(name, value, positive=True)


def _labels_argument(labels, shift_labels):
    """(labels, shift) from ``labels`` and ``shift_labels``: True / False (HF-style unshifted labels or not), or
    Liger's ``shift_labels=<tensor>`` (labels already shifted, given instead of ``labels``)."""
    if isinstance(shift_labels, torch.Tensor):
        if labels is not None:
            raise TypeError("pass either labels= (with shift_labels=True if they are HF-style unshifted) or "
                            "shift_labels=<the already shifted labels tensor>, not both")
        return shift_labels, False
    if not isinstance(shift_labels, bool):
        raise TypeError(f"shift_labels must be True, False or an already shifted labels tensor, got "
                        f"{type(shift_labels).__name__}")
    if shift_labels and labels is None:
        raise ValueError("shift_labels=True needs labels")
    return labels, shift_labels


# ------------------------------------------------------------------------- reduction="none"


class _PerRowLoss(torch.autograd.Function):
    """Per-position losses m_t l_t with gradient, from one forward's statistics.

    Backward: the upstream gradient g_t weights each kept row, which is ``fused_teachability_kl``'s
    ``row_weight``: one kept-row backward with those weights (no [N, V] tensor, whatever g is).
    """

    @staticmethod
    def forward(ctx, values, run_rows, kept, *student):
        ctx.run_rows, ctx.kept = run_rows, kept
        ctx.save_for_backward(*[x for x in student if x is not None])
        ctx.has = [x is not None for x in student]
        return values.clone()

    @staticmethod
    def backward(ctx, grad):
        saved = iter(ctx.saved_tensors)
        student = [next(saved) if has else None for has in ctx.has]
        needs = ctx.needs_input_grad[3:]
        want = [i for i, (x, need) in enumerate(zip(student, needs)) if x is not None and need]
        out = [None] * len(student)
        if not want:
            return (None, None, None, *out)
        leaves = [None if x is None else x.detach().requires_grad_(i in want) for i, x in enumerate(student)]
        with torch.enable_grad():
            loss = ctx.run_rows(leaves, grad.reshape(ctx.kept.shape))
            parts = torch.autograd.grad(loss, [leaves[i] for i in want], allow_unused=True)
        for i, part in zip(want, parts):
            out[i] = torch.zeros_like(student[i]) if part is None else part
        return (None, None, None, *out)


# ------------------------------------------------------------------------------- functional


@with_option_docs
def teachability_kl_loss(
    student_hidden: torch.Tensor, student_weight: torch.Tensor, teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor, labels: Optional[torch.Tensor] = None, *,
    student_bias: Optional[torch.Tensor] = None, teacher_bias: Optional[torch.Tensor] = None,
    shift_labels=False, num_items_in_batch=None, normalizer=None, keep_mask: Optional[torch.Tensor] = None,
    stats: Optional[TeachabilityStats] = None, strategy: str = DEFAULTS.strategy,
    keep_ratio: float = DEFAULTS.keep_ratio, top_k: int = DEFAULTS.top_k, estimator: str = DEFAULTS.estimator,
    temperature: float = DEFAULTS.temperature, vocab_size: Optional[int] = DEFAULTS.vocab_size,
    min_per_sequence: int = DEFAULTS.min_per_sequence, ignore_index: int = DEFAULTS.ignore_index,
    reduction: str = DEFAULTS.reduction, seed: int = DEFAULTS.seed, backend: str = DEFAULTS.backend,
    chunk_rows: Optional[int] = DEFAULTS.chunk_rows, chunk_vocab: Optional[int] = DEFAULTS.chunk_vocab,
    check_finite: bool = DEFAULTS.check_finite,
):
    """Functional twin of ``TeachabilityKLLoss``: returns ``(loss, stats)`` (the module returns ``loss``).

    ``loss`` is a float32 scalar ("mean", "sum") or a float32 tensor of the labels' shape ("none"), with
    gradient to the student's hidden states, lm_head weight and bias. ``stats`` is the detached
    ``TeachabilityStats`` (``stats.kept`` the positions that carry loss). Arguments as in
    ``TeachabilityKLLoss.forward``; the divisors of reduction "mean" (``module docstring``):
    ``num_items_in_batch`` with HF Trainer's meaning (label tokens of the whole accumulated batch), or
    ``normalizer``, the total kept count of a selection made elsewhere (``select_across``).
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if (num_items_in_batch is not None or normalizer is not None) and reduction != "mean":
        raise ValueError(f"num_items_in_batch / normalizer are divisors for reduction='mean'; got reduction={reduction!r}")
    if num_items_in_batch is not None and normalizer is not None:
        raise ValueError("pass num_items_in_batch (HF: label tokens) or normalizer (the kept count), not both")
    labels, shift = _labels_argument(labels, shift_labels)
    valid_mask = sampled_ids = None
    if labels is not None:
        if not isinstance(student_hidden, torch.Tensor):
            raise TypeError(f"student_hidden must be a torch.Tensor, got {type(student_hidden).__name__}")
        valid_mask, sampled_ids = labels_to_positions(
            labels, tuple(student_hidden.shape[:-1]), _used_vocab(student_weight, teacher_weight, vocab_size),
            ignore_index=ignore_index, shift_labels=shift, device=student_hidden.device)
    common = dict(teacher_hidden=teacher_hidden, teacher_weight=teacher_weight, teacher_bias=teacher_bias,
                  valid_mask=valid_mask, sampled_ids=sampled_ids, top_k=top_k, keep_ratio=keep_ratio,
                  strategy=strategy, estimator=estimator, temperature=temperature, vocab_size=vocab_size,
                  min_per_sequence=min_per_sequence, seed=seed, backend=backend, chunk_rows=chunk_rows,
                  chunk_vocab=chunk_vocab)
    if reduction == "none":
        return _per_position_losses((student_hidden, student_weight, student_bias), keep_mask, stats,
                                    check_finite, common)
    items = None if num_items_in_batch is None else _positive_number("num_items_in_batch", num_items_in_batch)
    divisor = 1.0 if reduction == "sum" or items is not None else (
        None if normalizer is None else _positive_number("normalizer", normalizer))
    loss, stats = fused_teachability_kl(student_hidden, student_weight, student_bias=student_bias, keep_mask=keep_mask,
                                        normalizer=divisor, stats=stats, check_finite=check_finite, **common)
    if items is not None:  # HF's label-token count: each kept row stands for N_valid / N_kept label tokens
        kept_count = stats.kept.sum().clamp(min=1).float()
        loss = loss * (stats.valid.sum().float() / (kept_count * items))
    return loss, stats


def _per_position_losses(student: tuple, keep_mask, stats, check_finite: bool, common: dict):
    """reduction="none": statistics and selection once (no autograd), the per-position values m_t l_t from
    the statistics, and their gradient through one weighted kept-row backward (``_PerRowLoss``)."""
    student_hidden, student_weight, student_bias = student
    with torch.no_grad():
        _, stats = fused_teachability_kl(student_hidden, student_weight, student_bias=student_bias,
                                         keep_mask=keep_mask, normalizer=1.0, stats=stats,
                                         check_finite=check_finite, **common)
    kept = stats.kept.bool()
    per_position = per_position_loss(stats, common["estimator"])
    values = torch.where(kept, per_position, torch.zeros((), device=kept.device)).float()
    frozen = stats

    def run_rows(leaves, weight):
        h, w, b = leaves
        loss, _ = fused_teachability_kl(h, w, student_bias=b, keep_mask=kept, normalizer=1.0, stats=frozen,
                                        row_weight=weight, check_finite=False, **common)
        return loss

    loss = _PerRowLoss.apply(values, run_rows, kept, student_hidden, student_weight, student_bias)
    return loss, stats


# ------------------------------------------------------------------- selection across batches


def select_across(
    stats_list: Sequence[TeachabilityStats],
    *,
    strategy: str = DEFAULTS.strategy,
    keep_ratio: float = DEFAULTS.keep_ratio,
    min_per_sequence: int = DEFAULTS.min_per_sequence,
    seed: int = DEFAULTS.seed,
) -> Tuple[List[torch.Tensor], float]:
    """One selection over several micro-batches' statistics; returns (kept masks, normaliser).

    Equivalent to selecting on the concatenation of the micro-batches as one batch (docs/math.md,
    Scores and selection): the quantiles, the global top-n and (for ``[B, T]`` parts, where every row is
    one sequence) the ``min_per_sequence`` top-up are over all positions at once. ``masks[i]`` has the
    shape of ``stats_list[i].valid``; pass it as ``keep_mask`` and the normaliser (the total kept count,
    at least 1) as ``normalizer`` (module and ``fused_teachability_kl``), so that
    the micro-batch losses sum to the one-batch mean. Statistics from ``teachability_stats(...,
    strategy=None)`` or ``TeachabilityKLLoss.statistics`` (no selection needed). Flat ``[N]`` parts have
    no sequences (no top-up), as for one flat batch. This process's parts only: across processes, use
    ``selection.select_parts``.
    """
    parts = list(stats_list)
    for i, s in enumerate(parts):
        if not isinstance(s, TeachabilityStats):
            raise TypeError(f"stats_list[{i}] must be a TeachabilityStats, got {type(s).__name__}")
    selection = select_parts(parts, strategy=strategy, keep_ratio=keep_ratio, min_per_sequence=min_per_sequence,
                             seed=seed, local=True)
    return selection.keep_masks, float(max(selection.num_kept, 1))


# -------------------------------------------------------------------------------------- module


class TeachabilityKLLoss(torch.nn.Module):
    """TA-OPD loss head: reverse KL(student || teacher) on the selected positions, from hidden states.

    Args (constructor, all checked here): strategy, keep_ratio, top_k, estimator, temperature, vocab_size,
        min_per_sequence, ignore_index (-100), reduction ("mean", "sum", "none"); also seed, backend,
        chunk_rows, chunk_vocab, check_finite as in ``fused_teachability_kl``.

    Called like Liger's fused-linear losses, it returns the loss tensor (``return_stats=True``: ``(loss,
    stats)``); see ``forward``.
    """

    def __init__(self, strategy: str = DEFAULTS.strategy, keep_ratio: float = DEFAULTS.keep_ratio,
                 top_k: int = DEFAULTS.top_k, estimator: str = DEFAULTS.estimator,
                 temperature: float = DEFAULTS.temperature, vocab_size: Optional[int] = DEFAULTS.vocab_size,
                 min_per_sequence: int = DEFAULTS.min_per_sequence, ignore_index: int = DEFAULTS.ignore_index,
                 reduction: str = DEFAULTS.reduction, *, seed: int = DEFAULTS.seed, backend: str = DEFAULTS.backend,
                 chunk_rows: Optional[int] = DEFAULTS.chunk_rows, chunk_vocab: Optional[int] = DEFAULTS.chunk_vocab,
                 check_finite: bool = DEFAULTS.check_finite):
        super().__init__()
        check_loss_module_options(strategy=strategy, keep_ratio=keep_ratio, top_k=top_k, estimator=estimator,
                                  temperature=temperature, vocab_size=vocab_size, min_per_sequence=min_per_sequence,
                                  ignore_index=ignore_index, reduction=reduction, seed=seed, backend=backend,
                                  chunk_rows=chunk_rows, chunk_vocab=chunk_vocab, reductions=REDUCTIONS)
        self.strategy, self.keep_ratio, self.top_k, self.estimator = strategy, keep_ratio, top_k, estimator
        self.temperature, self.vocab_size, self.min_per_sequence = temperature, vocab_size, min_per_sequence
        self.ignore_index, self.reduction, self.seed, self.backend = ignore_index, reduction, seed, backend
        self.chunk_rows, self.chunk_vocab, self.check_finite = chunk_rows, chunk_vocab, check_finite

    def _options(self) -> dict:
        return dict(strategy=self.strategy, keep_ratio=self.keep_ratio, top_k=self.top_k, estimator=self.estimator,
                    temperature=self.temperature, vocab_size=self.vocab_size, min_per_sequence=self.min_per_sequence,
                    ignore_index=self.ignore_index, seed=self.seed, backend=self.backend,
                    chunk_rows=self.chunk_rows, chunk_vocab=self.chunk_vocab)

    def forward(self, student_hidden, student_weight, teacher_hidden, teacher_weight, labels=None, *,
                student_bias=None, teacher_bias=None, shift_labels=False, num_items_in_batch=None, normalizer=None,
                keep_mask=None, stats=None, return_stats: bool = False):
        """The TA-OPD loss of one batch (docs/math.md, Loss and gradients).

        Args:
            student_hidden: final hidden states [B, T, D_s] (or [N, D_s]); receives gradients.
            student_weight: the student's lm_head weight [V_s, D_s]; receives gradients.
            teacher_hidden: [B, T, D_t], teacher_weight: [V_t, D_t]; no gradients.
            labels: int [B, T]: ``labels[..., t]`` is the token position ``t`` predicts, ``ignore_index``
                where there is no loss. HF / TRL batches hold *unshifted* labels (``labels[:, t + 1]`` is
                predicted at ``t``): pass ``shift_labels=True`` for those, or every position is off by one
                without any error. None: every position is valid (no sampled tokens).
            shift_labels: True / False, or (Liger's keyword) the already shifted labels tensor instead of
                ``labels``.
            num_items_in_batch: HF Trainer's count of label tokens in the whole accumulated batch; the
                mean becomes ``sum_kept l_t * (N_valid / N_kept) / num_items_in_batch`` (each kept row stands
                for N_valid / N_kept label tokens), so one micro-batch gives exactly the mean over kept
                positions, and accumulated micro-batches a label-token-weighted average of their means.
                With a ``keep_mask`` from one selection across micro-batches (``select_across``), which
                keeps unequal shares of them, pass ``normalizer=`` instead: that weighting is not its mean.
            normalizer: the total kept count of a selection made elsewhere (``select_across``); the mean
                becomes ``sum_kept l_t / normalizer``, so the micro-batch losses sum to the one-batch mean.
            keep_mask / stats: a selection / statistics made elsewhere (``select_across``, ``statistics``).
            return_stats: also return the detached ``TeachabilityStats``.

        Shapes: ``labels``, ``keep_mask`` and the loss of reduction "none" have the hidden states' leading
        shape; "mean" and "sum" give a 0-d float32 tensor.

        Returns:
            ``loss`` (``(loss, stats)`` with ``return_stats=True``).

        Raises:
            ValueError / TypeError naming the argument: shapes, devices, dtypes, labels out of range,
            options, statistics computed from other inputs or options (``stats=``), both divisors given.

        Example::

            loss_fn = TeachabilityKLLoss(keep_ratio=0.05)
            loss = loss_fn(h_s, lm_head_s.weight, h_t, lm_head_t.weight, labels, shift_labels=True)
            loss.backward()
        """
        loss, out = teachability_kl_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, labels,
                                         student_bias=student_bias, teacher_bias=teacher_bias,
                                         shift_labels=shift_labels, num_items_in_batch=num_items_in_batch,
                                         normalizer=normalizer, keep_mask=keep_mask, stats=stats,
                                         reduction=self.reduction, check_finite=self.check_finite, **self._options())
        return (loss, out) if return_stats else loss

    @torch.no_grad()
    def statistics(self, student_hidden, student_weight, teacher_hidden, teacher_weight, labels=None, *,
                   student_bias=None, teacher_bias=None, shift_labels=False) -> TeachabilityStats:
        """The statistics of one micro-batch with this module's options and no selection (``kept`` None),
        for ``select_across``; pass them back to ``forward(stats=...)`` to skip the forward pass there."""
        opts = self._options()
        labels, shift = _labels_argument(labels, shift_labels)
        valid_mask = sampled_ids = None
        if labels is not None:
            valid_mask, sampled_ids = labels_to_positions(
                labels, tuple(student_hidden.shape[:-1]), _used_vocab(student_weight, teacher_weight, self.vocab_size),
                ignore_index=self.ignore_index, shift_labels=shift, device=student_hidden.device)
        return teachability_stats(
            student_hidden.detach(), student_weight.detach(), teacher_hidden, teacher_weight,
            student_bias=None if student_bias is None else student_bias.detach(), teacher_bias=teacher_bias,
            valid_mask=valid_mask, sampled_ids=sampled_ids, top_k=opts["top_k"], strategy=None,
            temperature=opts["temperature"], vocab_size=opts["vocab_size"], backend=opts["backend"],
            chunk_rows=opts["chunk_rows"], chunk_vocab=opts["chunk_vocab"], check_finite=self.check_finite)

    def select_across(self, stats_list: Sequence[TeachabilityStats]) -> Tuple[List[torch.Tensor], float]:
        """``select_across`` with this module's strategy, keep_ratio, min_per_sequence and seed."""
        return select_across(stats_list, strategy=self.strategy, keep_ratio=self.keep_ratio,
                             min_per_sequence=self.min_per_sequence, seed=self.seed)

    def extra_repr(self) -> str:
        return (f"strategy={self.strategy!r}, keep_ratio={self.keep_ratio}, top_k={self.top_k}, "
                f"estimator={self.estimator!r}, temperature={self.temperature}, reduction={self.reduction!r}")
