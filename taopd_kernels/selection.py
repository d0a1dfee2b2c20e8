"""Scores and selection of docs/math.md, Scores and selection (TA-OPD and the baselines it is compared with).

Everything here works on small [N] tensors (one value per position), so it is plain PyTorch for
every backend. In a multi-process run the same functions run on the positions gathered from all
ranks, which is what makes the selection global.

Choices where the math contract is silent (also in the README):
- Norm() ignores non-finite values when taking the quantiles; +inf normalises to 1, -inf to 0 and
  NaN to 0 (NaN never wins a place).
- n = max(1, ceil(keep_ratio * |I|)) is computed with the product rounded to 9 decimals first, so
  that 0.05 * 100 keeps 5 positions, not 6 (0.05 * 100 == 5.000000000000001 in floating point).
- "random" draws one uniform number per position (valid or not, in flat order) from a CPU generator
  seeded with ``seed``, so the draw does not depend on the device or on which positions are valid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from . import distributed
from .options import DEFAULTS, STRATEGIES, DeferredChecks, as_int, check_keep_ratio, check_seed, check_selection_options

QUANTILE_LOW = 0.05
QUANTILE_HIGH = 0.95
_DEGENERATE_RANGE = 1e-12


def _linear_quantiles(x: torch.Tensor, keep: torch.Tensor, qs) -> tuple:
    """Linearly interpolated quantiles (torch.quantile's "linear") of x[keep], without a host sync:
    the kept values are sorted to the front, and the order statistics are gathered at tensor indices.
    Returns (quantiles [len(qs)], number of kept values) as device tensors."""
    count = keep.sum()
    ordered = torch.sort(torch.where(keep, x, torch.full_like(x, math.inf))).values
    last = (count - 1).clamp(min=0).to(x.dtype)
    out = []
    top = max(x.numel() - 1, 0)
    for q in qs:
        pos = last * q
        lo = pos.floor()
        frac = pos - lo
        lo_i = lo.long()
        hi_i = torch.minimum(lo_i + 1, (count - 1).clamp(min=0))
        # 1-element index tensors: indexing with a 0-d tensor would read it on the host.
        v_lo, v_hi = ordered.index_select(0, torch.stack([lo_i, hi_i]).clamp(max=top))
        out.append(v_lo + (v_hi - v_lo) * frac)
    return torch.stack(out), count


def batch_normalize(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Norm(z) = clip((z - Q05) / (Q95 - Q05), 0, 1) over the valid positions (float64 inside).

    Quantiles are linearly interpolated over the finite valid values. Invalid positions get 0, and so
    does every position when there is no finite valid value or the range is degenerate. No host sync.
    """
    x = values.reshape(-1).double()
    v = valid.reshape(-1).bool()
    if x.numel() == 0:
        return torch.zeros(values.shape, dtype=torch.float32, device=values.device)
    finite = v & torch.isfinite(x)
    q, count = _linear_quantiles(x, finite, (QUANTILE_LOW, QUANTILE_HIGH))
    span = q[1] - q[0]
    usable = (count > 0) & (span >= _DEGENERATE_RANGE)
    normed = ((x - q[0]) / torch.where(usable, span, torch.ones_like(span))).clamp(0.0, 1.0)
    normed = torch.nan_to_num(normed, nan=0.0)
    return torch.where(v & usable, normed, torch.zeros_like(x)).float().view(values.shape)


def strategy_scores(
    strategy: str,
    *,
    entropy: torch.Tensor,
    disagreement: torch.Tensor,
    teacher_mass: torch.Tensor,
    valid: torch.Tensor,
    seed: int = DEFAULTS.seed,
) -> torch.Tensor:
    """The per-position score of one strategy (docs/math.md, Scores and selection table). NaN where not valid."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    flat_valid = valid.reshape(-1)

    def norm(x):
        return batch_normalize(x.reshape(-1), flat_valid)

    if strategy == "random":
        gen = torch.Generator(device="cpu").manual_seed(check_seed(seed))
        score = torch.rand(flat_valid.numel(), generator=gen, dtype=torch.float64).float().to(valid.device)
    elif strategy == "all":
        score = torch.ones(flat_valid.numel(), dtype=torch.float32, device=valid.device)
    elif strategy == "entropy":
        score = norm(entropy)
    elif strategy == "compat":
        score = norm(teacher_mass)
    else:
        d = norm(disagreement)
        if strategy == "divergence":
            score = d
        elif strategy == "teachability":
            score = d * norm(teacher_mass)
        elif strategy == "incompatible":
            score = d * (1.0 - norm(teacher_mass))
        elif strategy == "tip":
            h = norm(entropy)
            score = h + d - h * d
        else:  # teachability_entropy
            h = norm(entropy)
            s = d * norm(teacher_mass)
            score = h + s - h * s
    score = torch.where(flat_valid, score, torch.full_like(score, float("nan")))
    return score.view(valid.shape)


def default_sequence_ids(shape, device) -> Optional[torch.Tensor]:
    """The default grouping for ``min_per_sequence``: for [B, T] (or [B, ..., T]) positions every row of
    the last dimension is one sequence; for flat [N] positions there is none."""
    shape = tuple(shape)
    if len(shape) < 2:
        return None
    n = math.prod(shape)
    return torch.arange(n, device=device).div(shape[-1], rounding_mode="floor").view(shape)


def score_and_select(
    strategy: str,
    *,
    entropy: torch.Tensor,
    disagreement: torch.Tensor,
    teacher_mass: torch.Tensor,
    valid: torch.Tensor,
    keep_ratio: float,
    sequence_ids: Optional[torch.Tensor],
    min_per_sequence: int,
    seed: int = DEFAULTS.seed,
):
    """(score, kept) of one strategy over one batch of positions: the score table, then the global top-n
    with the per-sequence top-up; ``"all"`` keeps every valid position (plain OPD, keep_ratio unused)."""
    score = strategy_scores(strategy, entropy=entropy, disagreement=disagreement, teacher_mass=teacher_mass,
                            valid=valid, seed=seed)
    if strategy == "all":
        return score, valid.bool().clone()
    kept = select_top(score, valid, keep_ratio=keep_ratio, sequence_ids=sequence_ids,
                      min_per_sequence=min_per_sequence)
    return score, kept


def num_to_keep(keep_ratio: float, num_valid: int) -> int:
    """n = max(1, ceil(rho * |I|)); 0 when there is no valid position."""
    if num_valid <= 0:
        return 0
    return max(1, math.ceil(round(keep_ratio * num_valid, 9)))


def _num_to_keep_tensor(keep_ratio: float, num_valid: torch.Tensor) -> torch.Tensor:
    """``num_to_keep`` on a device count (no host sync), with the same rounding to 9 decimals."""
    prod = torch.round(num_valid.double() * keep_ratio * 1e9) / 1e9
    n = torch.ceil(prod).long().clamp(min=1)
    return torch.where(num_valid > 0, n, torch.zeros_like(n))


def _descending_order(score: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Indices of the valid positions by descending score, ties to the earlier position, then the
    invalid ones (two stable sorts: no host sync)."""
    ranked = torch.where(valid, torch.nan_to_num(score, nan=-math.inf), torch.full_like(score, -math.inf))
    order = torch.sort(ranked, descending=True, stable=True).indices
    return order[torch.sort((~valid[order]).to(torch.int8), stable=True).indices]


def _check_select_top(score, valid, keep_ratio, sequence_ids, min_per_sequence) -> None:
    for name, x in (("score", score), ("valid", valid)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if valid.shape != score.shape:
        raise ValueError(f"valid must have the shape of score {tuple(score.shape)}, got {tuple(valid.shape)}")
    if sequence_ids is not None and (not isinstance(sequence_ids, torch.Tensor) or sequence_ids.shape != score.shape):
        raise ValueError(f"sequence_ids must be a tensor of the shape of score {tuple(score.shape)}, got "
                         f"{tuple(sequence_ids.shape) if isinstance(sequence_ids, torch.Tensor) else sequence_ids!r}")
    if valid.device != score.device:
        raise ValueError(f"valid is on {valid.device} but score is on {score.device}")
    check_keep_ratio(keep_ratio)
    as_int("min_per_sequence", min_per_sequence, low=0)


def select_top(
    score: torch.Tensor,
    valid: torch.Tensor,
    *,
    keep_ratio: float,
    sequence_ids: Optional[torch.Tensor] = None,
    min_per_sequence: int = DEFAULTS.min_per_sequence,
) -> torch.Tensor:
    """Keep the global top-n valid positions by score, then top up every sequence to its minimum.

    ``score``, ``valid`` and ``sequence_ids`` share a shape; returns a bool mask of that shape. Runs on
    the device without a host sync (sorts and gathers only).
    """
    _check_select_top(score, valid, keep_ratio, sequence_ids, min_per_sequence)
    shape = valid.shape
    s = score.reshape(-1).double()
    v = valid.reshape(-1).bool()
    if v.numel() == 0:
        return v.clone().view(shape)
    n = _num_to_keep_tensor(keep_ratio, v.sum())
    order = _descending_order(s, v)
    rank = torch.arange(v.numel(), device=v.device)
    kept = torch.zeros_like(v)
    kept[order] = (rank < n) & v[order]
    if sequence_ids is not None and min_per_sequence > 0:
        # Rank of each position within its sequence along the global order: a stable sort by sequence
        # keeps the global order inside each group (valid positions first: they lead the order).
        seq_of_order = sequence_ids.reshape(-1).long()[order]
        by_seq = torch.sort(seq_of_order, stable=True)
        grp = by_seq.values
        starts = torch.ones_like(grp, dtype=torch.bool)
        starts[1:] = grp[1:] != grp[:-1]
        pos = torch.arange(grp.numel(), device=grp.device)
        first = torch.cummax(torch.where(starts, pos, torch.zeros_like(pos)), 0).values
        need = ((pos - first) < min_per_sequence) & v[order[by_seq.indices]]
        kept[order[by_seq.indices]] |= need
    return kept.view(shape)


# ------------------------------------------------------------------------- selection across parts


@dataclass
class PartsSelection:
    """One selection over several parts (micro-batches; under torch.distributed, every rank's), seen from
    this process: its parts' kept masks and scores, and the counts over all parts of all processes."""

    keep_masks: List[torch.Tensor]  # bool, one per part, in the part's shape (``valid``)
    scores: List[torch.Tensor]  # float32, one per part; NaN where not valid
    num_kept: int  # kept positions over all parts and processes: the loss normaliser
    num_valid: int  # valid positions over all parts and processes


def disjoint_sequence_ids(ids: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """Number each group's sequences (non-negative int ids) after the previous groups', so that equal ids
    in two groups are two sequences. The offsets stay on the device (no host sync)."""
    sizes = torch.stack([s.max() + 1 if s.numel() else s.new_zeros(()) for s in ids])
    starts = torch.cumsum(sizes, 0) - sizes
    return [s + start for s, start in zip(ids, starts)]


def _local_sequence_ids(parts, sequence_ids, global_ids: bool, device, checks: DeferredChecks):
    """This process's flat sequence ids [N], or None (no sequences). Default: for [B, ..., T] parts every
    row is a sequence (numbered across the parts), for [N] parts none. Given ids name sequences of this
    process (equal ids in two parts: one sequence), or of every process with ``global_ids``."""
    if sequence_ids is None:
        dims = {p.valid.dim() for p in parts}
        if len(dims) != 1:
            raise ValueError(f"the parts mix position ranks {sorted(dims)}; use all [N] or all [B, T] "
                             "(or pass sequence_ids)")
        if dims == {1}:
            return None
        rows = [default_sequence_ids(p.valid.shape, device).reshape(-1) for p in parts]
        return torch.cat(disjoint_sequence_ids(rows))
    ids = [sequence_ids] if isinstance(sequence_ids, torch.Tensor) else list(sequence_ids)
    if len(ids) != len(parts) or any(s.numel() != p.valid.numel() for s, p in zip(ids, parts)):
        raise ValueError("sequence_ids must give one id per position of every part (one tensor per part)")
    flat = torch.cat([s.reshape(-1).to(device).long() for s in ids])
    if not global_ids:
        return torch.unique(flat, return_inverse=True)[1]
    # They travel as float64 with the statistics: exact below 2**53.
    checks.add((flat.abs() >= 2 ** 53).any(), lambda: ValueError("global sequence ids must be below 2**53 in "
                                                                 "magnitude"))
    return flat


# What parts selected together must share: the options behind C and D (``TeachabilityStats.computed_from``).
_PROVENANCE = ("temperature", "top_k", "vocab_size", "sampled_ids")


def _check_same_provenance(parts: Sequence) -> None:
    """Parts of one selection come from the same options (their scores compare) and one device."""
    devices = {str(p.valid.device) for p in parts}
    if len(devices) > 1:
        raise ValueError(f"the parts are on several devices ({sorted(devices)}); move them to one (stats.to(device))")
    first = getattr(parts[0], "computed_from", None) or {}
    for i, part in enumerate(parts[1:], start=1):
        mine = getattr(part, "computed_from", None) or {}
        for key in _PROVENANCE:
            if key in first and key in mine and first[key] != mine[key]:
                what = "estimator 'sampled' statistics (sampled_ids)" if key == "sampled_ids" else key
                raise ValueError(f"the parts were computed with different {what}: part 0 has {key}={first[key]!r}, "
                                 f"part {i} has {key}={mine[key]!r}; compute every part with the same options")


def select_parts(parts: Sequence, *, strategy: str = DEFAULTS.strategy, keep_ratio: float = DEFAULTS.keep_ratio,
                 min_per_sequence: int = DEFAULTS.min_per_sequence, seed: int = DEFAULTS.seed, sequence_ids=None,
                 global_sequence_ids: bool = False, group=None, local: bool = False) -> PartsSelection:
    """docs/math.md, Scores and selection over the positions of several parts at once, as over their
    concatenation in flat order (each part flattened, in the order given); under torch.distributed (world
    > 1 in ``group``, None: the default group; ``local=True``: this process only) the parts of every rank,
    rank 0's first. ``parts``: statistics (only entropy_student, disagreement, teacher_mass and valid are
    read). ``sequence_ids``: None (``_local_sequence_ids``), or one int tensor per part; ranks number their
    sequences after the previous ranks' unless ``global_sequence_ids`` (then one sequence may span ranks).

    What crosses the network: per position five float64 numbers (H_s, D, C, valid, sequence number),
    padded to the longest rank; every rank computes the same selection and keeps its slice. One host read
    (the counts, with the checks); more only under torch.distributed (sizes, the layout check).
    """
    opts = check_selection_options(strategy=strategy, keep_ratio=keep_ratio, min_per_sequence=min_per_sequence,
                                   seed=seed)
    parts = list(parts)
    if not parts:
        raise ValueError("select_parts needs at least one part")
    _check_same_provenance(parts)
    device, checks = parts[0].valid.device, DeferredChecks()
    seq = _local_sequence_ids(parts, sequence_ids, global_sequence_ids, device, checks)
    column = lambda name: torch.cat([getattr(p, name).reshape(-1) for p in parts]).double()  # noqa: E731
    valid = torch.cat([p.valid.reshape(-1) for p in parts])
    packed = torch.stack([column("entropy_student"), column("disagreement"), column("teacher_mass"),
                          valid.double(), valid.new_zeros(valid.shape, dtype=torch.float64) if seq is None
                          else seq.double()])
    rank, n_ranks = (0, 1) if local else distributed.world(group)
    if n_ranks > 1 and not distributed.same_on_every_rank(seq is not None, device, group):
        raise ValueError("select_parts: some ranks pass sequence ids and others do not (use the same layout on "
                         "every rank)")
    ranks = [packed] if n_ranks == 1 else distributed.gather_columns(packed, group)
    all_seq = None
    if seq is not None:
        ids = [r[4].long() for r in ranks]
        all_seq = torch.cat(ids if global_sequence_ids else disjoint_sequence_ids(ids))
    every = torch.cat(ranks, dim=1)
    all_valid = every[3] > 0.5
    score, kept = score_and_select(opts.strategy, entropy=every[0].float(), disagreement=every[1].float(),
                                   teacher_mass=every[2].float(), valid=all_valid, keep_ratio=opts.keep_ratio,
                                   sequence_ids=all_seq, min_per_sequence=opts.min_per_sequence, seed=opts.seed)
    num_kept, num_valid = checks.read(kept.sum(), all_valid.sum())  # the one host read: the normaliser
    start = sum(r.shape[1] for r in ranks[:rank])
    sizes = [p.valid.numel() for p in parts]
    mine = slice(start, start + valid.numel())
    return PartsSelection(keep_masks=[m.view(p.valid.shape) for m, p in zip(kept[mine].split(sizes), parts)],
                          scores=[s.view(p.valid.shape) for s, p in zip(score[mine].split(sizes), parts)],
                          num_kept=num_kept, num_valid=num_valid)
