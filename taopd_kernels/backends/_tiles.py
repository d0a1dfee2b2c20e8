"""Pieces every backend shares: ordered top-K keys, the union disagreement from carried logits, the
row-chunk and vocabulary-tile loops, the float32 accumulation of a logit-gradient tile into the
head's gradients, and the per-row partial state of a vocabulary range (``PartialRowState``) with the one
place that finishes it into the statistics. Plain PyTorch on small tensors ([R, K] or one tile at a time)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Iterator, List, Optional, Tuple

import torch

from ..stats import RowStats

_LOW_MASK = (1 << 32) - 1
EMPTY_KEY = torch.iinfo(torch.int64).min  # a candidate slot with no id (a vocabulary range narrower than K)


def ordered_keys(values: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """int64 keys whose order is (value descending, id ascending); values float32, ids int64."""
    v = values.float() + 0.0  # -0.0 -> +0.0 so that equal floats give equal keys
    bits = v.view(torch.int32)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # monotone in the float value, as signed int32
    return (ordered.long() << 32) | (_LOW_MASK - ids)


def keys_to_ids(keys: torch.Tensor) -> torch.Tensor:
    return _LOW_MASK - (keys & _LOW_MASK)


def keys_to_values(keys: torch.Tensor) -> torch.Tensor:
    ordered = (keys >> 32).to(torch.int32)
    bits = ordered ^ ((ordered >> 31) & 0x7FFFFFFF)
    return bits.view(torch.float32)


def safe_weighted(weight: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """weight * value with 0 where weight == 0 (so e^-inf * inf never makes NaN)."""
    return torch.where(weight > 0, weight * value, torch.zeros_like(weight))



_MM_DTYPE_OK: dict = {}


def mm_float32(a: torch.Tensor, b: torch.Tensor, *, upcast: bool = True) -> Optional[torch.Tensor]:
    """a @ b as float32: 16-bit operands multiply as they are with a float32 result (``aten::mm.dtype``,
    torch >= 2.8 on CUDA), never rounded to 16 bits; where that overload is missing, both are upcast to
    float32 (exact products, slower), or None is returned when ``upcast`` is False."""
    key = (a.device.type, a.dtype)
    if a.dtype == b.dtype and a.dtype in (torch.bfloat16, torch.float16) and _MM_DTYPE_OK.get(key, True):
        try:
            out = torch.ops.aten.mm.dtype(a, b, torch.float32)
            _MM_DTYPE_OK[key] = True
            return out
        except (AttributeError, RuntimeError, NotImplementedError):
            _MM_DTYPE_OK[key] = False
    if a.dtype == b.dtype == torch.float32:
        return a @ b
    return a.float() @ b.float() if upcast else None


class _OnlineSoftmax:
    """Running (max, S0, S1, Q) of one model's logits; Q is taken against ``gap`` = z - other."""

    def __init__(self, rows: int, device):
        self.m = torch.full((rows,), -torch.inf, device=device)
        self.s0 = torch.zeros(rows, device=device)
        self.s1 = torch.zeros(rows, device=device)
        self.q = torch.zeros(rows, device=device)

    def update(self, z: torch.Tensor, gap: torch.Tensor, finite: bool) -> None:
        """Fold one tile in. ``finite``: the tile holds no -inf."""
        m_new = torch.maximum(self.m, z.max(dim=1).values)
        ok = torch.isfinite(m_new)
        shift = torch.where(ok, self.m - m_new, torch.zeros_like(m_new))  # <= 0, or -inf
        scale = torch.where(self.s0 > 0, shift.exp(), torch.zeros_like(shift))
        base = torch.where(ok, m_new, torch.zeros_like(m_new))
        centred = z - base[:, None]
        e = centred.exp()
        if finite:
            s1_tile = torch.linalg.vecdot(e, centred)
            q_tile = torch.linalg.vecdot(e, gap)
        else:  # e == 0 where z == -inf; keep 0 * inf out of the sums
            s1_tile = safe_weighted(e, centred).sum(1)
            q_tile = safe_weighted(e, gap).sum(1)
        self.s1 = scale * (self.s1 + safe_weighted(self.s0, shift)) + s1_tile
        self.s0 = scale * self.s0 + e.sum(1)
        self.q = scale * self.q + q_tile
        self.m = m_new

    def lse(self) -> torch.Tensor:
        return self.m + self.s0.log()

    def entropy(self) -> torch.Tensor:
        return self.s0.log() - self.s1 / self.s0

    def expected_gap(self) -> torch.Tensor:
        """E_p[z - other]."""
        return self.q / self.s0


def row_chunks(rows: int, chunk_rows: int) -> Iterator[slice]:
    """Consecutive row slices of at most ``chunk_rows`` rows covering ``range(rows)``."""
    for r0 in range(0, rows, chunk_rows):
        yield slice(r0, min(r0 + chunk_rows, rows))


def vocab_tiles(vocab_size: int, chunk_vocab: int) -> Iterator[Tuple[int, int]]:
    """(v0, v1) column ranges of at most ``chunk_vocab`` columns covering ``range(vocab_size)``."""
    for v0 in range(0, vocab_size, chunk_vocab):
        yield v0, min(v0 + chunk_vocab, vocab_size)


def union_disagreement(
    ids_s: torch.Tensor, zs_at_s: torch.Tensor, zt_at_s: torch.Tensor,
    ids_t: torch.Tensor, zs_at_t: torch.Tensor, zt_at_t: torch.Tensor,
) -> torch.Tensor:
    """D: forward KL of p_t, p_s renormalised on U = S_s union S_t, from the carried logits [R, K]."""
    dup = (ids_t[:, :, None] == ids_s[:, None, :]).any(-1)  # teacher ids already in S_s
    neg_inf = torch.full_like(zs_at_t, -torch.inf)
    zs_u = torch.cat([zs_at_s, torch.where(dup, neg_inf, zs_at_t)], 1).float()
    zt_u = torch.cat([zt_at_s, torch.where(dup, neg_inf, zt_at_t)], 1).float()
    logpb_s = torch.log_softmax(zs_u, 1)
    logpb_t = torch.log_softmax(zt_u, 1)
    return safe_weighted(logpb_t.exp(), logpb_t - logpb_s).sum(1)


class KeptGrads(tuple):
    """What a kept-row backward returns: the tuple (dh, dW, db) as the backend contract says, and ``lse``,
    the kept rows' log-sum-exps recomputed from the backward's own logits (float32 [R], or None), which
    the API compares with statistics the caller passed back in (``stats=``), at no extra cost."""

    def __new__(cls, d_h, d_w, d_b, lse=None):
        grads = super().__new__(cls, (d_h, d_w, d_b))
        grads.lse = lse
        return grads


def head_grad_buffers(h_s, w_s, need_bias_grad: bool):
    """Zeroed float32 (dh [R, D_s], dW [V_s, D_s], db [V_s] or None)."""
    d_h = torch.zeros(h_s.shape, dtype=torch.float32, device=h_s.device)
    d_w = torch.zeros(w_s.shape, dtype=torch.float32, device=h_s.device)
    d_b = torch.zeros(w_s.shape[0], dtype=torch.float32, device=h_s.device) if need_bias_grad else None
    return d_h, d_w, d_b


def accumulate_head_grads(g, hs32, w_s, v0: int, v1: int, d_h_rows, d_w, d_b) -> None:
    """Fold the logit gradient g [R, v1-v0] of one vocabulary tile into dh (rows), dW and db, in float32."""
    d_h_rows += g @ w_s[v0:v1].float()
    d_w[v0:v1] += g.T @ hs32
    if d_b is not None:
        d_b[v0:v1] += g.sum(0)


def pad_keys(keys: torch.Tensor, other: torch.Tensor, k: int):
    """Widen [R, k'] candidates (k' <= k: a range narrower than K) to [R, k] with empty slots."""
    missing = k - keys.shape[1]
    if missing <= 0:
        return keys, other
    rows = keys.shape[0]
    return (torch.cat([keys, keys.new_full((rows, missing), EMPTY_KEY)], 1),
            torch.cat([other, other.new_zeros(rows, missing)], 1))


@dataclass
class PartialRowState:
    """Per-row partial statistics of one vocabulary range (float32 [R]; keys int64 [R, K], logits [R, K]).

    Per model: ``max_*`` the largest scaled logit (-inf: none in the range), ``s0_*`` = sum e^(z - max),
    ``q_*`` = sum e^(z - max) (z - other) (docs/math.md, Per-position statistics), and the student's ``s1_s``
    = sum e^(z_s - max_s)(z_s - max_s). ``keys_*``: the range's top-K as ordered keys (value descending, global
    id ascending; ``EMPTY_KEY`` in unused slots), ``other_*``: the other model's logit at those ids.
    ``zs_y``, ``zt_y``: the logits at the sampled token, NaN where it lies outside the range.
    """

    max_s: torch.Tensor
    s0_s: torch.Tensor
    s1_s: torch.Tensor
    q_s: torch.Tensor
    max_t: torch.Tensor
    s0_t: torch.Tensor
    q_t: torch.Tensor
    keys_s: torch.Tensor
    other_s: torch.Tensor
    keys_t: torch.Tensor
    other_t: torch.Tensor
    zs_y: Optional[torch.Tensor] = None
    zt_y: Optional[torch.Tensor] = None

    @property
    def scalar_names(self) -> tuple:
        names = ("max_s", "s0_s", "s1_s", "q_s", "max_t", "s0_t", "q_t")
        return names + (("zs_y", "zt_y") if self.zs_y is not None else ())

    @classmethod
    def concat(cls, parts: List["PartialRowState"]) -> "PartialRowState":
        """The rows of ``parts`` (row chunks) in order."""
        return cls(**{f.name: None if getattr(parts[0], f.name) is None
                      else torch.cat([getattr(p, f.name) for p in parts]) for f in fields(cls)})

    def pack(self) -> torch.Tensor:
        """Everything in one int32 [R, 7 + 6K] tensor (+2 columns with the sampled logits): float bits and
        key halves, for one collective."""
        scalars = torch.stack([getattr(self, n).float() for n in self.scalar_names], 1)
        floats = torch.cat([scalars, self.other_s.float(), self.other_t.float()], 1)
        keys = torch.cat([self.keys_s, self.keys_t], 1).contiguous()
        return torch.cat([floats.view(torch.int32), keys.view(torch.int32)], 1)

    def unpack(self, packed: torch.Tensor) -> "PartialRowState":
        """A state of this one's layout from another rank's ``pack()``."""
        n, k = len(self.scalar_names), self.keys_s.shape[1]
        floats = packed[:, :n + 2 * k].contiguous().view(torch.float32)
        keys = packed[:, n + 2 * k:].contiguous().view(torch.int64)
        values = dict(zip(self.scalar_names, floats[:, :n].unbind(1)))
        return PartialRowState(**values, other_s=floats[:, n:n + k], other_t=floats[:, n + k:],
                               keys_s=keys[:, :k], keys_t=keys[:, k:])

    def finish(self) -> RowStats:
        """RowStats from the state of the whole used vocabulary (docs/math.md, Per-position statistics)."""
        log_s0_s, log_s0_t = self.s0_s.log(), self.s0_t.log()
        ids_s, ids_t = keys_to_ids(self.keys_s), keys_to_ids(self.keys_t)
        zs_at_s, zt_at_s = keys_to_values(self.keys_s), self.other_s
        zt_at_t, zs_at_t = keys_to_values(self.keys_t), self.other_t
        # Cancellation-free: differences of logits near the row maxima are formed before the (large) maxima
        # meet the (small) log S0, so nothing of size |z| is subtracted from another number of size |z|.
        gap_s = self.q_s / self.s0_s  # E_ps[z_s - z_t]
        max_gap = self.max_s - self.max_t
        out = RowStats(
            lse_student=self.max_s + log_s0_s,
            lse_teacher=self.max_t + log_s0_t,
            entropy_student=log_s0_s - self.s1_s / self.s0_s,
            kl_reverse=(gap_s - max_gap) - (log_s0_s - log_s0_t),
            kl_forward=(self.q_t / self.s0_t + max_gap) - (log_s0_t - log_s0_s),  # E_pt[z_t - z_s] + ...
            topk_ids_student=ids_s,
            topk_ids_teacher=ids_t,
            teacher_mass=((zt_at_s - self.max_t[:, None]) - log_s0_t[:, None]).exp().sum(1),
            disagreement=union_disagreement(ids_s, zs_at_s, zt_at_s, ids_t, zs_at_t, zt_at_t),
            expected_gap=gap_s,
        )
        if self.zs_y is not None:
            out.logp_student_sampled = (self.zs_y - self.max_s) - log_s0_s
            out.logp_teacher_sampled = (self.zt_y - self.max_t) - log_s0_t
        return out
