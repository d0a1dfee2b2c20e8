"""Chunked PyTorch backend: SPEC sections 2 and 4 without an [N, V] tensor for either model.

Forward. Positions are taken ``chunk_rows`` at a time and the vocabulary ``chunk_vocab`` columns at a
time. For each tile the scaled float32 logits z_s, z_t of shape [R, BV] are formed (a matmul for the
hidden-state path, a slice for the logits path) and folded into per-row accumulators with online
max-rescaling. With reference points m (running maxima):

    S0 = sum_v e^(z_s - m_s)                    -> lse_s = m_s + log S0
    S1 = sum_v e^(z_s - m_s) (z_s - m_s)        -> H_s = log S0 - S1 / S0
    Q  = sum_v e^(z_s - m_s) (z_s - z_t)        -> KL_rev = Q / S0 - lse_s + lse_t
    (and the teacher's S0, Q for lse_t and KL_fwd)

Top-K is kept per row as int64 keys (order-preserving float bits << 32 | (2^32 - 1 - id)): every key
is distinct, so ``torch.topk`` on keys is exact and sends ties to the lower id. Each model's top-K
entry carries the other model's logit, so C and D need no second pass.

Backward. Only kept rows are recomputed, tile by tile; the logit gradient of SPEC section 4 is formed
per tile and reduced straight into dh (float32 [R, D]), dW (float32 [V_s, D], cast once by the
caller) and db. Memory held: a few [R, BV] float32 tiles plus the accumulators; never [N, V].
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

from .stats import RowStats

TileFn = Callable[[int, int], Tuple[torch.Tensor, torch.Tensor]]

DEFAULT_CHUNK_ROWS = 1024
# Vocabulary tile width: about TILE_ELEMENTS logits per tile, so that few rows get wide tiles (per-op
# overhead, paid ~20 times a tile, dominates small tiles on a CPU) and many rows stay within memory:
# a handful of [rows, width] float32 temporaries are alive at once (~8 MB each at the target).
TILE_ELEMENTS = 1 << 21
MIN_CHUNK_VOCAB, MAX_CHUNK_VOCAB = 1024, 65536


def default_chunk_vocab(rows: int) -> int:
    width = TILE_ELEMENTS // max(rows, 1)
    return max(MIN_CHUNK_VOCAB, min(MAX_CHUNK_VOCAB, width // MIN_CHUNK_VOCAB * MIN_CHUNK_VOCAB))
_LOW_MASK = (1 << 32) - 1


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


def _safe_weighted(weight: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """weight * value with 0 where weight == 0 (so e^-inf * inf never makes NaN)."""
    return torch.where(weight > 0, weight * value, torch.zeros_like(weight))


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
            s1_tile = _safe_weighted(e, centred).sum(1)
            q_tile = _safe_weighted(e, gap).sum(1)
        self.s1 = scale * (self.s1 + _safe_weighted(self.s0, shift)) + s1_tile
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


def tile_topk_keys(z: torch.Tensor, v0: int, k: int) -> torch.Tensor:
    """Exact top-k keys of a tile (value descending, id ascending), without keying the whole tile.

    ``torch.topk`` on float values gives the right set except where the k-th and (k+1)-th values tie
    (it may then pick any of the tied ids); only those rows are redone with ordered keys.
    """
    cols = z.shape[1]
    if cols <= k:
        ids = torch.arange(v0, v0 + cols, device=z.device).expand_as(z)
        return ordered_keys(z, ids)
    values, pos = torch.topk(z, k + 1, dim=1)
    keys = ordered_keys(values[:, :k], pos[:, :k] + v0)
    tied = (values[:, k - 1] == values[:, k]).nonzero().squeeze(1)
    if tied.numel():
        zt = z.index_select(0, tied)
        ids = torch.arange(v0, v0 + cols, device=z.device).expand_as(zt)
        keys[tied] = torch.topk(ordered_keys(zt, ids), k, dim=1).values
    return keys


class _RunningTopK:
    """Exact running top-K of one model, with the other model's logit at the same ids carried."""

    def __init__(self, rows: int, k: int, device):
        self.k = k
        self.keys = torch.full((rows, 0), 0, dtype=torch.long, device=device)
        self.other = torch.zeros((rows, 0), device=device)

    def update(self, z: torch.Tensor, other: torch.Tensor, v0: int) -> None:
        tile_keys = tile_topk_keys(z, v0, self.k)
        tile_other = other.gather(1, keys_to_ids(tile_keys) - v0)
        all_keys = torch.cat([self.keys, tile_keys], 1)
        all_other = torch.cat([self.other, tile_other], 1)
        k_keep = min(self.k, all_keys.shape[1])
        self.keys, sel = torch.topk(all_keys, k_keep, dim=1)
        self.other = all_other.gather(1, sel)

    def ids(self) -> torch.Tensor:
        return keys_to_ids(self.keys)

    def values(self) -> torch.Tensor:
        return keys_to_values(self.keys)


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
    return _safe_weighted(logpb_t.exp(), logpb_t - logpb_s).sum(1)


def stream_row_stats(
    tile_fn: TileFn,
    rows: int,
    vocab_size: int,
    top_k: int,
    chunk_vocab: int,
    device,
    sampled_ids: Optional[torch.Tensor] = None,
    finite: bool = False,
) -> RowStats:
    """Fold the tiles ``tile_fn(v0, v1) -> (z_s, z_t)`` (scaled float32 [R, v1-v0]) into RowStats.

    ``finite=True`` promises that no logit is -inf (skips the masking that -inf needs).
    """
    soft_s, soft_t = _OnlineSoftmax(rows, device), _OnlineSoftmax(rows, device)
    top_s, top_t = _RunningTopK(rows, top_k, device), _RunningTopK(rows, top_k, device)
    if sampled_ids is not None:
        y = sampled_ids.long()
        zs_y = torch.full((rows,), float("nan"), device=device)
        zt_y = torch.full((rows,), float("nan"), device=device)
    for v0 in range(0, vocab_size, chunk_vocab):
        v1 = min(v0 + chunk_vocab, vocab_size)
        zs, zt = tile_fn(v0, v1)
        gap = zs - zt
        soft_s.update(zs, gap, finite)
        soft_t.update(zt, gap.neg_(), finite)
        top_s.update(zs, zt, v0)
        top_t.update(zt, zs, v0)
        if sampled_ids is not None:
            here = (y >= v0) & (y < v1)
            col = (y - v0).clamp(0, v1 - v0 - 1)[:, None]
            zs_y = torch.where(here, zs.gather(1, col).squeeze(1), zs_y)
            zt_y = torch.where(here, zt.gather(1, col).squeeze(1), zt_y)
    lse_s, lse_t = soft_s.lse(), soft_t.lse()
    ids_s, ids_t = top_s.ids(), top_t.ids()
    zs_at_s, zt_at_s = top_s.values(), top_s.other
    zt_at_t, zs_at_t = top_t.values(), top_t.other
    out = RowStats(
        lse_student=lse_s,
        lse_teacher=lse_t,
        entropy_student=soft_s.entropy(),
        kl_reverse=soft_s.expected_gap() - lse_s + lse_t,
        kl_forward=soft_t.expected_gap() - lse_t + lse_s,
        topk_ids_student=ids_s,
        topk_ids_teacher=ids_t,
        teacher_mass=(zt_at_s - lse_t[:, None]).exp().sum(1),
        disagreement=union_disagreement(ids_s, zs_at_s, zt_at_s, ids_t, zs_at_t, zt_at_t),
    )
    if sampled_ids is not None:
        out.logp_student_sampled = zs_y - lse_s
        out.logp_teacher_sampled = zt_y - lse_t
    return out


def logit_grad_tile(
    zs: torch.Tensor,
    zt: Optional[torch.Tensor],
    v0: int,
    *,
    estimator: str,
    lse_s: torch.Tensor,
    lse_t: Optional[torch.Tensor],
    kl_rev: Optional[torch.Tensor],
    row_coef: torch.Tensor,
    sampled_ids: Optional[torch.Tensor],
    sampled_weight: Optional[torch.Tensor],
) -> torch.Tensor:
    """d loss / d z_s for one tile of scaled logits (SPEC section 4), the 1/tau included in row_coef.

    full:    coef * p_s * (log p_s - log p_t - KL_rev)
    sampled: coef * w * (1[v = y] - p_s), with w = logp_s(y) - logp_t(y) = -A
    """
    logp_s = zs - lse_s[:, None]
    p_s = logp_s.exp()
    if estimator == "full":
        logp_t = zt - lse_t[:, None]
        g = _safe_weighted(p_s, logp_s - logp_t - kl_rev[:, None])
        return g * row_coef[:, None]
    ids = torch.arange(v0, v0 + zs.shape[1], device=zs.device)
    onehot = (ids[None, :] == sampled_ids[:, None]).float()
    return (onehot - p_s) * (row_coef * sampled_weight)[:, None]


def hidden_tile_fn(h_s, w_s, b_s, h_t, w_t, b_t, temperature: float, need_teacher: bool = True) -> TileFn:
    """Tiles of scaled float32 logits from hidden states and lm_head weights (float32 matmul)."""
    hs = h_s.float()
    ht = h_t.float() if need_teacher else None
    inv_tau = 1.0 / temperature

    def logits(h, w, b, v0, v1):
        z = h @ w[v0:v1].float().T
        if b is not None:
            z = z + b[v0:v1].float()
        return z if inv_tau == 1.0 else z * inv_tau

    def tile(v0, v1):
        zs = logits(hs, w_s, b_s, v0, v1)
        zt = logits(ht, w_t, b_t, v0, v1) if need_teacher else None
        return zs, zt

    return tile


def logits_tile_fn(zs_rows, zt_rows, temperature: float, need_teacher: bool = True) -> TileFn:
    """Tiles of scaled float32 logits sliced from logits the caller already holds."""
    inv_tau = 1.0 / temperature

    def tile(v0, v1):
        zs = zs_rows[:, v0:v1].float()
        zt = zt_rows[:, v0:v1].float() if need_teacher else None
        if inv_tau != 1.0:
            zs = zs * inv_tau
            zt = zt * inv_tau if zt is not None else None
        return zs, zt

    return tile


def chunked_forward_stats(
    h_s, w_s, b_s, h_t, w_t, b_t, *,
    vocab_size: int, top_k: int, temperature: float,
    sampled_ids: Optional[torch.Tensor] = None,
    chunk_rows: Optional[int] = None, chunk_vocab: Optional[int] = None,
) -> RowStats:
    """RowStats for every row of h_s [R, D_s], h_t [R, D_t] (the API passes only valid rows)."""
    chunk_rows = chunk_rows or DEFAULT_CHUNK_ROWS
    chunk_vocab = chunk_vocab or default_chunk_vocab(min(chunk_rows, h_s.shape[0]))
    # Hidden states and weights are finite (checked by the API); only a bias can hold -inf.
    finite = all(b is None or bool(torch.isfinite(b[:vocab_size]).all()) for b in (b_s, b_t))
    parts = []
    with torch.no_grad():
        for r0 in range(0, h_s.shape[0], chunk_rows):
            r1 = min(r0 + chunk_rows, h_s.shape[0])
            tile_fn = hidden_tile_fn(h_s[r0:r1], w_s, b_s, h_t[r0:r1], w_t, b_t, temperature)
            y = None if sampled_ids is None else sampled_ids[r0:r1]
            parts.append(stream_row_stats(tile_fn, r1 - r0, vocab_size, top_k, chunk_vocab, h_s.device, y,
                                          finite=finite))
    return concat_row_stats(parts, h_s.device, top_k, sampled_ids is not None)


def concat_row_stats(parts, device, top_k: int, with_sampled: bool) -> RowStats:
    if not parts:
        empty = torch.zeros(0, device=device)
        ids = torch.zeros((0, top_k), dtype=torch.long, device=device)
        return RowStats(empty, empty, empty, empty, empty, ids, ids, empty, empty,
                        empty if with_sampled else None, empty if with_sampled else None)
    fields = RowStats.__dataclass_fields__
    return RowStats(**{
        name: (None if getattr(parts[0], name) is None else torch.cat([getattr(p, name) for p in parts]))
        for name in fields
    })


def chunked_backward_kept(
    h_s, w_s, b_s, h_t, w_t, b_t, *,
    vocab_size: int, temperature: float, estimator: str,
    lse_s: torch.Tensor, lse_t: torch.Tensor, kl_rev: torch.Tensor,
    row_coef: torch.Tensor,
    sampled_ids: Optional[torch.Tensor] = None, sampled_weight: Optional[torch.Tensor] = None,
    need_bias_grad: bool = False,
    chunk_rows: Optional[int] = None, chunk_vocab: Optional[int] = None,
):
    """Gradients of the loss w.r.t. the student's hidden rows (the kept ones given here), W_s and b_s.

    ``row_coef`` = grad_output * m_t / sum(m) / tau per row. Returns float32 (dh [R, D_s],
    dW [V_s, D_s], db [V_s] or None); rows of W beyond ``vocab_size`` get zero.
    """
    chunk_rows = chunk_rows or DEFAULT_CHUNK_ROWS
    chunk_vocab = chunk_vocab or default_chunk_vocab(min(chunk_rows, h_s.shape[0]))
    d_h, d_w, d_b = head_grad_buffers(h_s, w_s, need_bias_grad)
    need_teacher = estimator == "full"
    with torch.no_grad():
        for r0 in range(0, h_s.shape[0], chunk_rows):
            r1 = min(r0 + chunk_rows, h_s.shape[0])
            hs = h_s[r0:r1].float()
            tile_fn = hidden_tile_fn(hs, w_s, b_s, h_t[r0:r1] if need_teacher else None, w_t, b_t,
                                     temperature, need_teacher)
            sl = slice(r0, r1)
            for v0 in range(0, vocab_size, chunk_vocab):
                v1 = min(v0 + chunk_vocab, vocab_size)
                zs, zt = tile_fn(v0, v1)
                g = logit_grad_tile(
                    zs, zt, v0, estimator=estimator, lse_s=lse_s[sl],
                    lse_t=None if lse_t is None else lse_t[sl],
                    kl_rev=None if kl_rev is None else kl_rev[sl], row_coef=row_coef[sl],
                    sampled_ids=None if sampled_ids is None else sampled_ids[sl],
                    sampled_weight=None if sampled_weight is None else sampled_weight[sl],
                )
                accumulate_head_grads(g, hs, w_s, v0, v1, d_h[sl], d_w, d_b)
    return d_h, d_w, d_b


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
