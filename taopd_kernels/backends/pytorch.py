"""The PyTorch backend (``backend="torch"``): docs/math.md (Per-position statistics, Loss and gradients)
without an [N, V] tensor for either model. Runs everywhere and never calls the CUDA or Triton kernels.

Forward. Positions are taken ``chunk_rows`` at a time and the vocabulary ``chunk_vocab`` columns at a
time. For each tile the scaled float32 logits z_s, z_t of shape [R, BV] are formed (a matmul for the
hidden-state path, a slice for the logits path) and folded into per-row accumulators with online
max-rescaling. With reference points m (running maxima):

    S0 = sum_v e^(z_s - m_s)                    -> lse_s = m_s + log S0
    S1 = sum_v e^(z_s - m_s) (z_s - m_s)        -> H_s = log S0 - S1 / S0
    Q  = sum_v e^(z_s - m_s) (z_s - z_t)        -> E_ps[z_s - z_t] = Q / S0,
                                                   KL_rev = (Q / S0 - (m_s - m_t)) - (log S0_s - log S0_t)
    (and the teacher's S0, Q for lse_t and KL_fwd)

Top-K is kept per row as int64 keys (order-preserving float bits << 32 | (2^32 - 1 - id)): every key
is distinct, so ``torch.topk`` on keys is exact and sends ties to the lower id. Each model's top-K
entry carries the other model's logit, so C and D need no second pass. The accumulators of a vocabulary
range are a ``PartialRowState`` (``forward_partial``, ids from ``id_offset``: a vocabulary shard), finished
into RowStats in one place (``PartialRowState.finish``).

Backward. Only kept rows are recomputed, tile by tile; the logit gradient of docs/math.md, Loss and gradients is formed
per tile and reduced straight into dh (float32 [R, D]), dW (float32 [V_s, D], cast once by the
caller) and db. Memory held: a few [R, BV] float32 tiles plus the accumulators; never [N, V].
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

from ..stats import RowStats
from ._tiles import (
    KeptGrads,
    PartialRowState,
    _OnlineSoftmax,
    accumulate_head_grads,
    head_grad_buffers,
    keys_to_ids,
    ordered_keys,
    pad_keys,
    row_chunks,
    safe_weighted,
    vocab_tiles,
)

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
def tile_topk_keys(z: torch.Tensor, v0: int, k: int) -> torch.Tensor:
    """Exact top-k keys of a tile (value descending, id ascending), without keying the whole tile and
    without a host sync.

    ``torch.topk`` on float values gives the right set except where the k-th and (k+1)-th values tie (it
    may then pick any of the tied ids). So the candidates are the entries strictly above the k-th value t
    (all among the k+1 returned) plus the k lowest-id entries equal to t (a running count and a binary
    search); the exact set is the top-k of those disjoint candidates by ordered key.
    """
    cols = z.shape[1]
    if cols <= k:
        ids = torch.arange(v0, v0 + cols, device=z.device).expand_as(z)
        return ordered_keys(z, ids)
    values, pos = torch.topk(z, k + 1, dim=1)
    kth = values[:, k - 1:k]
    # The j-th entry equal to the k-th value, in column order, for j = 1..k: where the running count of
    # such entries first reaches j (a cumsum and a binary search per row; no second topk over the tile).
    tied_count = (z == kth).cumsum(1, dtype=torch.int32)
    j = torch.arange(1, k + 1, device=z.device, dtype=torch.int32).expand(z.shape[0], k).contiguous()
    tied_pos = torch.searchsorted(tied_count, j).clamp(max=cols - 1)
    tied_ok = j <= tied_count[:, -1:]
    lowest = torch.iinfo(torch.int64).min
    above = torch.where(values > kth, ordered_keys(values, pos + v0), lowest)
    tied = torch.where(tied_ok, ordered_keys(kth.expand(-1, k), tied_pos + v0), lowest)
    return torch.topk(torch.cat([above, tied], 1), k, dim=1).values


class _RunningTopK:
    """Exact running top-K of one model, with the other model's logit at the same ids carried."""

    def __init__(self, rows: int, k: int, device):
        self.k = k
        self.keys = torch.full((rows, 0), 0, dtype=torch.long, device=device)
        self.other = torch.zeros((rows, 0), device=device)

    def update(self, z: torch.Tensor, other: torch.Tensor, v0: int) -> None:
        tile_keys = tile_topk_keys(z, v0, self.k)
        # Clamped: with NaN logits (overflowing inputs) no candidate is real and the ids are junk; the API
        # then reports the overflow (a non-finite log-sum-exp) instead of crashing here.
        tile_other = other.gather(1, (keys_to_ids(tile_keys) - v0).clamp(0, z.shape[1] - 1))
        all_keys = torch.cat([self.keys, tile_keys], 1)
        all_other = torch.cat([self.other, tile_other], 1)
        k_keep = min(self.k, all_keys.shape[1])
        self.keys, sel = torch.topk(all_keys, k_keep, dim=1)
        self.other = all_other.gather(1, sel)



def stream_partial_state(
    tile_fn: TileFn,
    rows: int,
    vocab_size: int,
    top_k: int,
    chunk_vocab: int,
    device,
    sampled_ids: Optional[torch.Tensor] = None,
    finite: bool = False,
    id_offset: int = 0,
) -> PartialRowState:
    """Fold the tiles ``tile_fn(v0, v1) -> (z_s, z_t)`` (scaled float32 [R, v1-v0]) of columns [0, vocab_size)
    into the per-row partial state; a column's id is ``id_offset`` + its index (a vocabulary shard's ids).

    ``finite=True`` promises that no logit is -inf (skips the masking that -inf needs).
    """
    soft_s, soft_t = _OnlineSoftmax(rows, device), _OnlineSoftmax(rows, device)
    top_s, top_t = _RunningTopK(rows, top_k, device), _RunningTopK(rows, top_k, device)
    zs_y = zt_y = None
    if sampled_ids is not None:
        y = sampled_ids.long()
        zs_y = torch.full((rows,), float("nan"), device=device)
        zt_y = torch.full((rows,), float("nan"), device=device)
    for v0, v1 in vocab_tiles(vocab_size, chunk_vocab):
        zs, zt = tile_fn(v0, v1)
        gap = zs - zt
        soft_s.update(zs, gap, finite)
        soft_t.update(zt, gap.neg_(), finite)
        top_s.update(zs, zt, v0 + id_offset)
        top_t.update(zt, zs, v0 + id_offset)
        if sampled_ids is not None:
            here = (y >= v0) & (y < v1)
            col = (y - v0).clamp(0, v1 - v0 - 1)[:, None]
            zs_y = torch.where(here, zs.gather(1, col).squeeze(1), zs_y)
            zt_y = torch.where(here, zt.gather(1, col).squeeze(1), zt_y)
    keys_s, other_s = pad_keys(top_s.keys, top_s.other, top_k)
    keys_t, other_t = pad_keys(top_t.keys, top_t.other, top_k)
    return PartialRowState(soft_s.m, soft_s.s0, soft_s.s1, soft_s.q, soft_t.m, soft_t.s0, soft_t.q,
                           keys_s, other_s, keys_t, other_t, zs_y, zt_y)


def logit_grad_tile(
    zs: torch.Tensor,
    zt: Optional[torch.Tensor],
    v0: int,
    *,
    estimator: str,
    row_max: torch.Tensor,
    log_s0: torch.Tensor,
    expected_gap: Optional[torch.Tensor],
    row_coef: torch.Tensor,
    sampled_ids: Optional[torch.Tensor],
    sampled_weight: Optional[torch.Tensor],
) -> torch.Tensor:
    """d loss / d z_s for one tile of scaled logits (docs/math.md, Loss and gradients), 1/tau in row_coef.

    full:    coef * p_s * ((z_s - z_t) - E_ps[z_s - z_t])   (cancellation-free: no log p_s - log p_t - KL)
    sampled: coef * w * (1[v = y] - p_s), with w = logp_s(y) - logp_t(y) = -A
    p_s = e^((z_s - m) - log S0) with the row maximum m: z_s - lse_s would subtract two numbers of size |z|,
    losing ~eps |z| in every exponent (3e-5 at |z| ~ 300), where z_s - m is exact near the maximum.
    """
    p_s = ((zs - row_max[:, None]) - log_s0[:, None]).exp()
    if estimator == "full":
        g = safe_weighted(p_s, (zs - zt) - expected_gap[:, None])
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


def is_available(device: torch.device):
    return True, ""


def _chunk_sizes(rows: int, chunk_rows: Optional[int], chunk_vocab: Optional[int]) -> Tuple[int, int]:
    chunk_rows = chunk_rows or DEFAULT_CHUNK_ROWS
    return chunk_rows, chunk_vocab or default_chunk_vocab(min(chunk_rows, max(rows, 1)))


def _forward(tile_fns, rows: int, *, vocab_size: int, top_k: int, sampled_ids, chunk_rows: int,
             chunk_vocab: int, finite: bool, device, id_offset: int) -> PartialRowState:
    """The partial state over row chunks: ``tile_fns(rows_slice)`` gives the chunk's TileFn; ``finite``:
    the logits hold no -inf."""
    parts = []
    with torch.no_grad():
        for sl in row_chunks(rows, chunk_rows):
            y = None if sampled_ids is None else sampled_ids[sl]
            parts.append(stream_partial_state(tile_fns(sl), sl.stop - sl.start, vocab_size, top_k, chunk_vocab,
                                              device, y, finite=finite, id_offset=id_offset))
        if not parts:  # no rows: empty [0] / [0, K] tensors
            parts.append(stream_partial_state(None, 0, 0, top_k, 1, device, sampled_ids, id_offset=id_offset))
    return PartialRowState.concat(parts)


def forward_partial(
    h_s, w_s, b_s, h_t, w_t, b_t, *,
    vocab_size: int, top_k: int, temperature: float, id_offset: int = 0,
    sampled_ids: Optional[torch.Tensor] = None,
    chunk_rows: Optional[int] = None, chunk_vocab: Optional[int] = None,
) -> PartialRowState:
    """The partial state of every row of h_s [R, D_s], h_t [R, D_t] over the first ``vocab_size`` rows of the
    heads given (a vocabulary shard whose first id is ``id_offset``; ``sampled_ids`` in the shard's columns)."""
    chunk_rows, chunk_vocab = _chunk_sizes(h_s.shape[0], chunk_rows, chunk_vocab)
    # Hidden states and weights are finite (checked by the API); only a bias can hold -inf, so with a
    # bias the tiles take the -inf-safe sums (deciding it from the values would cost a host sync).
    return _forward(lambda sl: hidden_tile_fn(h_s[sl], w_s, b_s, h_t[sl], w_t, b_t, temperature), h_s.shape[0],
                    vocab_size=vocab_size, top_k=top_k, sampled_ids=sampled_ids, chunk_rows=chunk_rows,
                    chunk_vocab=chunk_vocab, finite=b_s is None and b_t is None, device=h_s.device,
                    id_offset=id_offset)


def forward_stats(h_s, w_s, b_s, h_t, w_t, b_t, **options) -> RowStats:
    """RowStats for every row of h_s [R, D_s], h_t [R, D_t] (the API passes only valid rows)."""
    return forward_partial(h_s, w_s, b_s, h_t, w_t, b_t, **options).finish()


def logits_forward_partial(zs, zt, *, vocab_size: int, top_k: int, temperature: float, id_offset: int = 0,
                           sampled_ids: Optional[torch.Tensor] = None,
                           chunk_rows: Optional[int] = None, chunk_vocab: Optional[int] = None) -> PartialRowState:
    """The partial state of every row of logits zs [R, V_s], zt [R, V_t] over their first ``vocab_size``
    columns (a vocabulary shard whose first id is ``id_offset``)."""
    chunk_rows, chunk_vocab = _chunk_sizes(zs.shape[0], chunk_rows, chunk_vocab)
    # Logits may hold -inf (masked tokens): the tiles take the -inf-safe sums.
    return _forward(lambda sl: logits_tile_fn(zs[sl, :vocab_size], zt[sl, :vocab_size], temperature), zs.shape[0],
                    vocab_size=vocab_size, top_k=top_k, sampled_ids=sampled_ids, chunk_rows=chunk_rows,
                    chunk_vocab=chunk_vocab, finite=False, device=zs.device, id_offset=id_offset)


def logits_forward_stats(zs, zt, **options) -> RowStats:
    """RowStats for every row of logits zs [R, V_s], zt [R, V_t]; only the first ``vocab_size`` columns."""
    return logits_forward_partial(zs, zt, **options).finish()


def _row_grad_kwargs(tile_fn, sl, vocab_size, chunk_vocab, finite, estimator, row_coef, sampled_ids,
                     sampled_weight, softmax_reduce=None) -> dict:
    """Per-row inputs of ``logit_grad_tile`` for one row chunk. The chunk's log-sum-exp and E_ps[z_s - z_t]
    are recomputed from the very tiles the gradient is formed from (a first pass over the kept rows), so
    that p_s sums to 1 and p_s * (g - E[g]) sums to 0 on these logits: the forward's values come from
    tiles of other shapes, whose float32 rounding differs by ~eps * |z|, which would bias the gradient.
    The softmax is passed as (row maximum, log S0), not lse (see ``logit_grad_tile``). ``softmax_reduce``
    (a vocabulary shard): (max, S0, Q) of these columns -> of the whole vocabulary, over the group."""
    soft = _OnlineSoftmax(sl.stop - sl.start, row_coef.device)
    for v0, v1 in vocab_tiles(vocab_size, chunk_vocab):
        zs, zt = tile_fn(v0, v1)
        soft.update(zs, zs - zt if zt is not None else zs, finite)
    row_max, s0, q = soft.m, soft.s0, soft.q
    if softmax_reduce is not None:
        row_max, s0, q = softmax_reduce(row_max, s0, q)
    pick = lambda x: None if x is None else x[sl]  # noqa: E731
    return dict(estimator=estimator, row_max=row_max, log_s0=s0.log(),
                expected_gap=q / s0 if estimator == "full" else None,
                row_coef=row_coef[sl], sampled_ids=pick(sampled_ids), sampled_weight=pick(sampled_weight))


def backward_kept(
    h_s, w_s, b_s, h_t, w_t, b_t, *,
    vocab_size: int, temperature: float, estimator: str,
    row_coef: torch.Tensor,
    sampled_ids: Optional[torch.Tensor] = None, sampled_weight: Optional[torch.Tensor] = None,
    need_bias_grad: bool = False,
    chunk_rows: Optional[int] = None, chunk_vocab: Optional[int] = None,
    softmax_reduce: Optional[Callable] = None,
):
    """Gradients of the loss w.r.t. the student's hidden rows (the kept ones given here), W_s and b_s.

    ``row_coef`` = grad_output * m_t / sum(m) / tau per row. Returns float32 (dh [R, D_s],
    dW [V_s, D_s], db [V_s] or None) as ``KeptGrads``, with the kept rows' log-sum-exps recomputed from
    the very tiles the gradient is formed from (``_row_grad_kwargs``).
    """
    chunk_rows, chunk_vocab = _chunk_sizes(h_s.shape[0], chunk_rows, chunk_vocab)
    d_h, d_w, d_b = head_grad_buffers(h_s, w_s, need_bias_grad)
    need_teacher = estimator == "full"
    lse = []
    with torch.no_grad():
        for sl in row_chunks(h_s.shape[0], chunk_rows):
            hs = h_s[sl].float()
            tile_fn = hidden_tile_fn(hs, w_s, b_s, h_t[sl] if need_teacher else None, w_t, b_t,
                                     temperature, need_teacher)
            per_row = _row_grad_kwargs(tile_fn, sl, vocab_size, chunk_vocab, b_s is None and b_t is None, estimator,
                                       row_coef, sampled_ids, sampled_weight, softmax_reduce)
            lse.append(per_row["row_max"] + per_row["log_s0"])
            for v0, v1 in vocab_tiles(vocab_size, chunk_vocab):
                zs, zt = tile_fn(v0, v1)
                accumulate_head_grads(logit_grad_tile(zs, zt, v0, **per_row), hs, w_s, v0, v1, d_h[sl], d_w, d_b)
    return KeptGrads(d_h, d_w, d_b, torch.cat(lse) if lse else h_s.new_zeros(0, dtype=torch.float32))


def logits_grad_kept(zs, zt, *, vocab_size: int, temperature: float, estimator: str,
                     row_coef, sampled_ids=None, sampled_weight=None,
                     chunk_rows: Optional[int] = None, chunk_vocab: Optional[int] = None,
                     softmax_reduce: Optional[Callable] = None) -> torch.Tensor:
    """d loss / d student logits for the kept rows given, float32 [R, V_s] (zero beyond vocab_size)."""
    chunk_rows, chunk_vocab = _chunk_sizes(zs.shape[0], chunk_rows, chunk_vocab)
    grad = torch.zeros(zs.shape, dtype=torch.float32, device=zs.device)
    need_teacher = estimator == "full"
    with torch.no_grad():
        for sl in row_chunks(zs.shape[0], chunk_rows):
            tile_fn = logits_tile_fn(zs[sl], zt[sl] if need_teacher else None, temperature, need_teacher)
            per_row = _row_grad_kwargs(tile_fn, sl, vocab_size, chunk_vocab, False, estimator, row_coef, sampled_ids,
                                       sampled_weight, softmax_reduce)
            for v0, v1 in vocab_tiles(vocab_size, chunk_vocab):
                tile_s, tile_t = tile_fn(v0, v1)
                grad[sl, v0:v1] = logit_grad_tile(tile_s, tile_t, v0, **per_row)
    return grad
