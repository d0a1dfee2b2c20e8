"""Plain-data containers for the per-position statistics of docs/math.md, Per-position statistics.

``RowStats`` is the contract between the API and every backend (torch, triton, cuda): tensors over the
rows a backend was given, flattened to [R]. ``TeachabilityStats`` is what users get back: the same
numbers reshaped to the caller's leading dimensions, plus the selection (score, kept mask).
Everything is detached; positions that are not valid hold NaN (floats) or -1 (ids), so that a mean
over the wrong positions shows up as NaN instead of a plausible number.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable, List, Optional

import torch

# The per-position statistics both containers carry, in one list (fields, summaries, concatenation).
FLOAT_FIELDS = ("lse_student", "lse_teacher", "entropy_student", "kl_reverse", "kl_forward",
                "teacher_mass", "disagreement", "expected_gap")
ID_FIELDS = ("topk_ids_student", "topk_ids_teacher")
SAMPLED_FIELDS = ("logp_student_sampled", "logp_teacher_sampled")
# The statistics ``summary()`` averages (over all valid and over kept positions).
SUMMARY_FIELDS = ("entropy_student", "kl_reverse", "kl_forward", "teacher_mass", "disagreement")


@dataclass
class _PositionStats:
    """The per-position statistics of docs/math.md, Per-position statistics (float32, int64 ids)."""

    lse_student: torch.Tensor
    lse_teacher: torch.Tensor
    entropy_student: torch.Tensor
    kl_reverse: torch.Tensor
    kl_forward: torch.Tensor
    topk_ids_student: torch.Tensor
    topk_ids_teacher: torch.Tensor
    teacher_mass: torch.Tensor  # C: sum of p_t over the student's top-K ids
    disagreement: torch.Tensor  # D: forward KL of the renormalised p_t, p_s on the union of top-K
    # E_ps[(z_s - z_t) / tau], the E_ps[g] of the full estimator's gradient p_s * (g - E_ps[g])
    # (docs/math.md, Loss and gradients); the kept-row backward recomputes it from its own logits.
    expected_gap: torch.Tensor


@dataclass
class RowStats(_PositionStats):
    """Per-row statistics as a backend returns them (float32 [R], int64 [R, K])."""

    logp_student_sampled: Optional[torch.Tensor] = None
    logp_teacher_sampled: Optional[torch.Tensor] = None

    @classmethod
    def concat(cls, parts: List["RowStats"], device, top_k: int, with_sampled: bool) -> "RowStats":
        """The rows of ``parts`` (e.g. row chunks) in order; empty [0] / [0, K] tensors for no part."""
        if not parts:
            empty = torch.zeros(0, device=device)
            ids = torch.zeros((0, top_k), dtype=torch.long, device=device)
            sampled = empty if with_sampled else None
            return cls(*(empty,) * 5, ids, ids, empty, empty, empty, sampled, sampled)
        return cls(**{f.name: None if getattr(parts[0], f.name) is None
                      else torch.cat([getattr(p, f.name) for p in parts]) for f in fields(cls)})


@dataclass
class TeachabilityStats(_PositionStats):
    """Detached per-position statistics, shaped like the caller's leading dimensions.

    Float fields are float32 and NaN at positions that are not valid; id fields are int64 [..., K] and
    -1 there. ``lse_*`` are log-sum-exps of the temperature-scaled logits (log p = z / tau - lse).
    ``score`` is the selection score of the chosen strategy (NaN where not valid), ``kept`` the
    positions that carry loss, ``valid`` the positions that were scored, ``dropped`` the positions given
    as valid that had no finite logit (so they are not valid).
    """

    valid: torch.Tensor
    score: Optional[torch.Tensor] = None
    kept: Optional[torch.Tensor] = None
    logp_student_sampled: Optional[torch.Tensor] = None
    logp_teacher_sampled: Optional[torch.Tensor] = None
    backend: Optional[str] = None  # the backend that computed the statistics ("torch", "triton", "cuda")
    # Positions the caller marked valid that have no finite logit for a model in the used vocabulary
    # (e.g. an all -inf row): not valid (docs/math.md, Conventions), reported here.
    dropped: Optional[torch.Tensor] = None
    sampled_ids: Optional[torch.Tensor] = None  # the sampled tokens the logp_*_sampled fields are of (-1: none)
    # What the statistics were computed from: options and the inputs' shapes, dtypes and devices. A call
    # that reuses them (``stats=``) must match, or it is a ValueError naming the difference.
    computed_from: Optional[dict] = None
    # {input name: float32 fingerprint} of the tensors they were computed from (``provenance``): a call that
    # reuses them checks its own inputs against these, whichever rows differ.
    fingerprints: Optional[dict] = None

    @property
    def num_valid(self) -> int:
        return int(self.valid.sum())

    @property
    def num_kept(self) -> int:
        return 0 if self.kept is None else int(self.kept.sum())

    def summary(self, all_reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> dict:
        """Means for logging: every statistic over valid positions and over kept positions.

        ``all_reduce``: sums a float64 tensor over processes (e.g. a distributed all-reduce), so the
        means are over the positions of every rank. All sums and counts travel in one tensor, and the
        host reads it once.
        """
        groups = {"all": self.valid.bool()}
        if self.kept is not None:
            groups["kept"] = self.kept.bool()
        parts = []
        for name in SUMMARY_FIELDS:
            value = getattr(self, name).double()
            for mask in groups.values():
                parts += [torch.where(mask, value, 0.0).sum(), mask.sum().double()]
        parts += [groups["all"].sum().double(),
                  groups["kept"].sum().double() if "kept" in groups else self.valid.new_zeros((), dtype=torch.float64)]
        totals = torch.stack(parts)
        if all_reduce is not None:
            totals = all_reduce(totals)
        totals = totals.tolist()
        out = {"num_valid": int(totals[-2]), "num_kept": int(totals[-1])}
        out["kept_fraction"] = out["num_kept"] / max(out["num_valid"], 1)
        i = 0
        for name in SUMMARY_FIELDS:
            for group in groups:
                total, count = totals[i], totals[i + 1]
                out[f"{name}/{group}"] = total / count if count else float("nan")
                i += 2
        return out

    @classmethod
    def concat(cls, parts: List["TeachabilityStats"]) -> "TeachabilityStats":
        """Flatten each part's positions and concatenate them into one [N] batch (e.g. the micro-batches
        of a rollout batch, for one selection over all of them)."""
        if not parts:
            raise ValueError("TeachabilityStats.concat needs at least one TeachabilityStats (got an empty list)")
        kwargs = {}
        lead = parts[0].valid.dim()
        for f in fields(cls):
            values = [getattr(p, f.name) for p in parts]
            if f.name == "fingerprints":  # of each part's own inputs: the concatenation has no inputs of its own
                kwargs[f.name] = None
                continue
            if any(not isinstance(v, torch.Tensor) for v in values):
                kwargs[f.name] = values[0] if all(v == values[0] for v in values) else None
                continue
            kwargs[f.name] = torch.cat([v.reshape(-1, *v.shape[lead:]) for v in values])
        return cls(**kwargs)

    def to(self, device) -> "TeachabilityStats":
        kwargs = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, dict) and f.name == "fingerprints":
                v = {name: x.to(device) for name, x in v.items()}
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

    filled = {name: fill_float(getattr(rows, name)) for name in FLOAT_FIELDS + SAMPLED_FIELDS}
    filled.update({name: fill_ids(getattr(rows, name)) for name in ID_FIELDS})
    return TeachabilityStats(valid=valid_flat.view(leading), **filled)
