"""Forward statistics kernel: docs/math.md, Per-position statistics from (h_s, W_s, h_t, W_t) in one pass over the vocabulary.

Grid: (row blocks of BLOCK_M positions) x (vocabulary splits) in split-major order: a row block's splits
are consecutive programs (2-D grid (splits, row blocks); other orders through ``program_coords`` on a
1-D grid). A program owns BLOCK_M rows and one split [v_lo, v_hi) and walks it BLOCK_V
columns at a time. For each tile it forms both models' scaled
logits with ``tl.dot`` (bf16/fp16 operands, float32 accumulation; float32 operands as 3xTF32), masks
columns at or beyond ``vocab_size`` (or the split end) to -inf, and folds the tile into per-row state:

    online softmax, reference m = running max:
        S0_s = sum e^(z_s - m_s)        S1_s = sum e^(z_s - m_s) (z_s - m_s)
        Q_s  = sum e^(z_s - m_s) (z_s - z_t)
        S0_t = sum e^(z_t - m_t)        Q_t  = sum e^(z_t - m_t) (z_s - z_t)
    sampled ids: z_s(y), z_t(y) (only tiles that hold some row's y are looked at);
    running top-K of each model, carrying the other model's logit at the same ids.

Top-K without sorting: a tile is looked at only if some row's tile maximum beats that row's current
K-th entry (after the first tiles this gets rare, so most tiles cost one comparison per row). Then
the entries above each row's K-th value are counted, and that many rounds (the rows' maximum, at most
K) of max-extraction pull the tile's entries out in (value descending, id ascending) order, each
replacing the row's worst entry when it is better.
The order is exact: ties go to the lower id, -inf logits included (masked columns get an id above
every real one, placeholders of an unfilled list higher still).

Output per split (the partial state): float32 [S, 9, R] = (m_s, S0_s, S1_s, Q_s, m_t, S0_t, Q_t,
z_s(y), z_t(y)) and [S, R, K] (value, id, other value) lists for each model. ``merge_partials`` then
combines splits (log-sum-exp merge in float64, top-K merge by int64 sort keys) and derives lse, H_s,
both KLs, C and D on [R, K]-sized tensors.

Program order and HBM traffic (N = 8192, V = 151,936, D_s = 2048, D_t = 4096, bf16; H100/H200: 132 SMs,
50 MB L2; 128x64 tiles, one program per SM): hidden states are 8192 x 6144 x 2 B = 101 MB, W (both
models) 1.87 GB, the math 15.3 TFLOP. Every tile reads its program's rows again (1.57 MB of h and
0.79 MB of W per 100 MFLOP tile, 239 GB of h over the grid), so what matters is whether the rows of
the programs in flight stay in L2.
- Old order (row blocks fastest, 4 splits): the 132 programs in flight are two splits of all 64 row
  blocks, 96 MiB of rows, more than L2: rows come from HBM at every tile step, shared only by the
  two splits of a row block in flight together: ~120 GB of h + ~2.3 GB of W (each split's W once
  per wave), 25 ms at the H200's 4.8 TB/s (36 ms at the H100's 3.35), more than the math (15 ms at
  the 989 TFLOP/s bf16 peak): HBM-bound.
- Split-major order, 12 splits (``num_splits`` with the L2 term): the programs in flight are all 12
  splits of 11 row blocks, 16.5 MiB of rows (+ 12 splits' W tiles, ~9-18 MiB): each row block is
  read from HBM once (0.10 GB of h), W once per wave of 11 row blocks (6 waves, ~11 GB): ~11 GB,
  2.3 ms at 4.8 TB/s. Traffic from L2 to the SMs is unchanged (~360 GB); that, not HBM, is the next
  limit. Beyond ~18k rows the partial-state cap allows too few splits and the rows in flight outgrow
  L2 again (more splits per row still share each read).
``GROUP_M`` (row blocks per group, row blocks fastest inside one; ``program_coords``) generalises the
order: 1 is split-major (the fewest row blocks in flight for a given S), >= the row-block count the old
order; it is a knob for measuring, not tuned.

Memory held: registers for two [BLOCK_M, BLOCK_V] float32 tiles and the [BLOCK_M, K] lists; global
memory for the partial state, O(S * R * K) (capped at ``PARTIAL_STATE_BYTES`` by the split choice).
No [R, V] tensor exists at any point, for any dtype.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ...options import DEFAULTS
from ...stats import RowStats
from .._tiles import keys_to_ids, ordered_keys, union_disagreement
from ._common import (
    MASKED_ID,
    NO_ID,
    PLACEHOLDER_ID,
    device_guard,
    dot_config,
    interpreting,
    is_hopper,
    l2_bytes,
    logits_tile,
    operand_bytes,
    rows_bucket,
    shipped,
    sm_count,
)

NUM_PARTIAL_STATS = 9
# Split boundaries are multiples of this (the widest BLOCK_V of any config), so splits cut on tiles.
SPLIT_ALIGN = 256
PARTIAL_STATE_BYTES = 64 << 20
INTERPRETER_BLOCKS = dict(BLOCK_M=32, BLOCK_V=128, BLOCK_D=16)
# Row blocks per program group (``program_coords``): 1 is split-major order (the 2-D grid), the one the
# L2 model of ``num_splits`` assumes; >= the row-block count gives the old row-major order (for measuring).
GROUP_M = 1


@triton.jit
def _topk_fold(z, other, ids, tile_max, t_val, t_id, t_oth, BLOCK_M: tl.constexpr, TOP_K: tl.constexpr,
               PLACEHOLDER: tl.constexpr, NONE: tl.constexpr):
    """Fold a [BLOCK_M, BLOCK_V] tile into running top-K lists [BLOCK_M, K_PAD] (value, id, other).

    List slots hold distinct ids; a row's worst slot has the lowest value and, among equal values,
    the highest id. Padding slots (k >= K) hold +inf and are never worst. Tile ids are above every
    real id already listed (a program walks its columns upwards), so a tile entry beats the worst
    slot iff its value is larger, or the list still has placeholders.
    """
    wv = tl.min(t_val, axis=1)
    wid = tl.max(tl.where(t_val == wv[:, None], t_id, -1), axis=1)
    not_full = wid >= PLACEHOLDER
    need = (tile_max > wv) | not_full
    if tl.max(need.to(tl.int32), axis=0) > 0:
        # Entries that can enter the list; the rows' largest count is the number of rounds needed.
        above = tl.sum((z > wv[:, None]).to(tl.int32), axis=1)
        rounds = tl.max(tl.where(not_full, TOP_K, tl.minimum(above, TOP_K)), axis=0)
        last_v = tl.full([BLOCK_M], float("inf"), tl.float32)
        last_id = tl.full([BLOCK_M], -1, tl.int32)
        r = 0
        while r < rounds:
            # Next entry after (last_v, last_id) in (value desc, id asc) order.
            cand = (z < last_v[:, None]) | ((z == last_v[:, None]) & (ids[None, :] > last_id[:, None]))
            zc = tl.where(cand, z, float("-inf"))
            best_v = tl.max(zc, axis=1)
            best_id = tl.min(tl.where(cand & (zc == best_v[:, None]), ids[None, :], NONE), axis=1)
            best_o = tl.max(tl.where(ids[None, :] == best_id[:, None], other, float("-inf")), axis=1)
            better = (best_v > wv) | ((best_v == wv) & (best_id < wid))
            slot = (t_id == wid[:, None]) & better[:, None]
            t_val = tl.where(slot, best_v[:, None], t_val)
            t_id = tl.where(slot, best_id[:, None], t_id)
            t_oth = tl.where(slot, best_o[:, None], t_oth)
            wv = tl.min(t_val, axis=1)
            wid = tl.max(tl.where(t_val == wv[:, None], t_id, -1), axis=1)
            last_v = best_v
            last_id = best_id
            r += 1
    return t_val, t_id, t_oth


@triton.jit
def _softmax_fold(z, m, s0, s1, q, gap, WITH_S1: tl.constexpr):
    """Fold a tile into (m, S0, S1, Q) with max-rescaling; Q accumulates e^(z - m) * gap.

    -inf logits contribute nothing (never 0 * inf); a row with only -inf so far keeps S0 = 0.
    Also returns the tile's row maxima (the top-K fold's cheap check).
    """
    tile_max = tl.max(z, axis=1)
    m_new = tl.maximum(m, tile_max)
    finite = m_new > float("-inf")
    base = tl.where(finite, m_new, 0.0)
    shift = tl.where(finite, m - m_new, 0.0)  # <= 0, or -inf when nothing was seen before
    has_mass = s0 > 0
    scale = tl.where(has_mass, tl.exp(shift), 0.0)
    centred = z - base[:, None]
    e = tl.exp(centred)
    live = e > 0
    if WITH_S1:
        s1 = scale * (s1 + tl.where(has_mass, s0 * shift, 0.0)) + tl.sum(tl.where(live, e * centred, 0.0), axis=1)
    s0 = scale * s0 + tl.sum(e, axis=1)
    q = scale * q + tl.sum(tl.where(live, e * gap, 0.0), axis=1)
    return m_new, s0, s1, q, tile_max


@triton.jit
def program_coords(pid, row_blocks, n_splits, group_m):
    """(row block, split) of program ``pid`` of the 1-D grid (row_blocks * n_splits programs).

    Programs come in groups of ``group_m`` row blocks x all splits (the last group has the leftover
    row blocks); inside a group the row blocks run fastest. group_m = 1 is split-major order (a row
    block's splits are consecutive programs), group_m >= row_blocks the old row-major order. Plain
    integer arithmetic, so the same code runs on Python ints (``program_coords.fn``, tested).
    """
    per_group = group_m * n_splits
    group = pid // per_group
    first = group * group_m
    size = min(row_blocks - first, group_m)
    local = pid - group * per_group
    return first + local % size, local // size


@triton.jit
def _stats_forward_kernel(
    hs_ptr, ws_ptr, bs_ptr, ht_ptr, wt_ptr, bt_ptr, y_ptr,
    part_ptr, top_val_ptr, top_id_ptr, top_oth_ptr,
    R, VOCAB, SPLIT, N_SPLITS, GROUP_M,
    stride_hsm, stride_hsd, stride_wsv, stride_wsd,
    stride_htm, stride_htd, stride_wtv, stride_wtd,
    inv_tau, ROWS_BUCKET,
    D_S: tl.constexpr, D_T: tl.constexpr, TOP_K: tl.constexpr, K_PAD: tl.constexpr,
    HAS_BS: tl.constexpr, HAS_BT: tl.constexpr, HAS_Y: tl.constexpr,
    DTYPE_S: tl.constexpr, DTYPE_T: tl.constexpr, PREC_S: tl.constexpr, PREC_T: tl.constexpr,
    EVEN_DS: tl.constexpr, EVEN_DT: tl.constexpr,
    MASKED: tl.constexpr, PLACEHOLDER: tl.constexpr, NONE: tl.constexpr,
    SPLIT_MAJOR: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    if SPLIT_MAJOR:
        # 2-D grid (splits, row blocks): blocks are dispatched x fastest, so this is split-major order with
        # both ids in special registers, re-read after the loop. Computed ids (the 1-D branch) stay live
        # through it: 8-12 B of spills in the 255-register sm_90a configs, so that branch serves only
        # GROUP_M > 1 (measuring) and row counts past the grid-y limit (over 2-4M rows).
        pid_s = tl.program_id(0)
        pid_m = tl.program_id(1)
    else:
        pid_m, pid_s = program_coords(tl.program_id(0), (R + BLOCK_M - 1) // BLOCK_M, N_SPLITS, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < R
    rows_c = tl.minimum(rows, R - 1)
    v_lo = pid_s * SPLIT
    v_hi = tl.minimum(v_lo + SPLIT, VOCAB)

    neg_inf = tl.full([BLOCK_M], float("-inf"), tl.float32)
    zero = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_s, s0_s, s1_s, q_s = neg_inf, zero, zero, zero
    m_t, s0_t, q_t = neg_inf, zero, zero
    zy_s, zy_t = zero, zero
    if HAS_Y:
        y = tl.load(y_ptr + rows_c, mask=row_ok, other=-1)

    kk = tl.arange(0, K_PAD)
    real_slot = kk < TOP_K
    init_val = tl.where(real_slot, float("-inf"), float("inf"))
    init_id = tl.where(real_slot, PLACEHOLDER + kk, -1 - kk)
    zeros_k = tl.zeros([BLOCK_M, K_PAD], dtype=tl.float32)
    ts_val = zeros_k + init_val[None, :]
    ts_id = tl.zeros([BLOCK_M, K_PAD], dtype=tl.int32) + init_id[None, :]
    ts_oth = zeros_k + float("-inf")
    tt_val, tt_id, tt_oth = ts_val, ts_id, ts_oth

    # A while loop over the split (the hidden-size loops inside are the pipelined ones).
    v0 = v_lo
    while v0 < v_hi:
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < v_hi
        cols_c = tl.minimum(cols, v_hi - 1)
        ids = tl.where(col_ok, cols, MASKED)
        zs = logits_tile(hs_ptr, ws_ptr, bs_ptr, rows_c, cols_c, D_S, stride_hsm, stride_hsd,
                         stride_wsv, stride_wsd, inv_tau, HAS_BS, BLOCK_M, BLOCK_V, BLOCK_D, EVEN_DS,
                         DTYPE_S, PREC_S)
        zt = logits_tile(ht_ptr, wt_ptr, bt_ptr, rows_c, cols_c, D_T, stride_htm, stride_htd,
                         stride_wtv, stride_wtd, inv_tau, HAS_BT, BLOCK_M, BLOCK_V, BLOCK_D, EVEN_DT,
                         DTYPE_T, PREC_T)
        zs = tl.where(col_ok[None, :], zs, float("-inf"))
        zt = tl.where(col_ok[None, :], zt, float("-inf"))
        gap = zs - zt
        m_s, s0_s, s1_s, q_s, max_s = _softmax_fold(zs, m_s, s0_s, s1_s, q_s, gap, True)
        m_t, s0_t, _unused, q_t, max_t = _softmax_fold(zt, m_t, s0_t, zero, q_t, gap, False)
        if HAS_Y:
            hit = (y >= v0) & (y < v0 + BLOCK_V)
            if tl.max(hit.to(tl.int32), axis=0) > 0:
                at_y = ids[None, :] == y[:, None]
                zy_s += tl.sum(tl.where(at_y, zs, 0.0), axis=1)
                zy_t += tl.sum(tl.where(at_y, zt, 0.0), axis=1)
        ts_val, ts_id, ts_oth = _topk_fold(zs, zt, ids, max_s, ts_val, ts_id, ts_oth, BLOCK_M, TOP_K,
                                           PLACEHOLDER, NONE)
        tt_val, tt_id, tt_oth = _topk_fold(zt, zs, ids, max_t, tt_val, tt_id, tt_oth, BLOCK_M, TOP_K,
                                           PLACEHOLDER, NONE)
        v0 += BLOCK_V

    # Partial state: [S, 9, R] floats and [2, S, R, K] lists (model 0 = student, 1 = teacher).
    rows64 = rows.to(tl.int64)
    n_split = tl.cast(N_SPLITS, tl.int64)
    base = pid_s.to(tl.int64) * 9 * R + rows64
    tl.store(part_ptr + base + 0 * R, m_s, mask=row_ok)
    tl.store(part_ptr + base + 1 * R, s0_s, mask=row_ok)
    tl.store(part_ptr + base + 2 * R, s1_s, mask=row_ok)
    tl.store(part_ptr + base + 3 * R, q_s, mask=row_ok)
    tl.store(part_ptr + base + 4 * R, m_t, mask=row_ok)
    tl.store(part_ptr + base + 5 * R, s0_t, mask=row_ok)
    tl.store(part_ptr + base + 6 * R, q_t, mask=row_ok)
    tl.store(part_ptr + base + 7 * R, zy_s, mask=row_ok)
    tl.store(part_ptr + base + 8 * R, zy_t, mask=row_ok)
    top = (pid_s.to(tl.int64) * R + rows64)[:, None] * TOP_K + kk[None, :]
    top_mask = row_ok[:, None] & real_slot[None, :]
    tl.store(top_val_ptr + top, ts_val, mask=top_mask)
    tl.store(top_id_ptr + top, ts_id, mask=top_mask)
    tl.store(top_oth_ptr + top, ts_oth, mask=top_mask)
    top += n_split * R * TOP_K
    tl.store(top_val_ptr + top, tt_val, mask=top_mask)
    tl.store(top_id_ptr + top, tt_id, mask=top_mask)
    tl.store(top_oth_ptr + top, tt_oth, mask=top_mask)


def _configs(hopper: bool, nbytes: int):
    """Autotune candidates: the ones that compile without local-memory spills for sm_90a / sm_80 with the
    JIT's own specialisation (``aot.py``; ``tests/test_triton.py`` asserts it for every one shipped).

    Two float32 logit tiles live at once (student and teacher) plus the epilogue state, so per-thread
    tile size is the limit: on sm_90a 128x64 and 64x128 with 8 warps fit in 255 registers (128x128
    spilled 1,656 bytes and was dropped); Ampere keeps its mma.sync operands in registers too, so only
    128x32 (8 warps) and 32x64 (4 warps) stay spill-free there (128x64 and 64x128 spilled ~1 KB).
    float32 operands (3xTF32) use a 32-wide hidden step so the stages fit in shared memory, and need
    more registers per tile: 64x64 and 128x32 on sm_90a, 128x32 on sm_80.
    """
    wide = nbytes > 2
    block_d = 64 if (not wide and hopper) else 32
    if hopper:
        shapes = [(64, 64, 8, 3), (128, 32, 8, 3)] if wide else [(128, 64, 8, 3), (128, 64, 8, 4), (64, 128, 8, 3)]
    else:
        shapes = [(128, 32, 8, 3)] if wide else [(128, 32, 8, 3), (32, 64, 4, 3)]
    return [triton.Config(dict(BLOCK_M=m, BLOCK_V=v, BLOCK_D=block_d), num_warps=w, num_stages=s)
            for m, v, w, s in shapes]


_TUNED = {}


def _tuned_kernel(device: torch.device, nbytes: int):
    key = (is_hopper(device), nbytes)
    if key not in _TUNED:
        _TUNED[key] = triton.autotune(configs=shipped(_configs(*key)), key=["D_S", "D_T", "ROWS_BUCKET", "TOP_K"])(
            _stats_forward_kernel)
    return _TUNED[key]


def num_splits(rows: int, vocab: int, sms: int, top_k: int = DEFAULTS.top_k, block_m: int = 128, warmup_tiles: int = 4, *,
               row_bytes: int = 0, l2_bytes: int = 0) -> int:
    """Vocabulary splits: enough that the programs in flight keep their hidden rows in L2, then whole waves.

    L2 (when ``row_bytes``, the hidden bytes of one row of both models, and ``l2_bytes`` are given): in
    split-major order one program per SM (the shipped 8-warp configs hold one each) covers
    ceil(sms / S) + 1 row blocks at a time; the smallest S whose rows fit in half of L2 (the other
    half is for the S splits' W tiles) is the least S considered, or the most allowed if none fits
    (more splits of a row block in flight still share each read of its rows). Waves: a program costs
    (its tiles + ``warmup_tiles``), the warm-up standing for the first tiles' full top-K rounds and the
    merge; o programs share an SM at 1/o speed each. The efficiency of S splits is ideal time /
    modelled time, taken as the worse of o = 1 and o = 2 (occupancy is not known before tuning); the
    smallest S (from the least) within 1% of the best wins. A split keeps at least 8 tiles of 256
    columns, there are at most 64 splits, and the partial state stays under ``PARTIAL_STATE_BYTES``.
    """
    row_blocks = triton.cdiv(max(rows, 1), block_m)
    tiles = triton.cdiv(vocab, 128)
    per_split = rows * (4 * NUM_PARTIAL_STATS + 2 * top_k * 12)
    most = max(1, min(64, vocab // (8 * SPLIT_ALIGN), PARTIAL_STATE_BYTES // max(per_split, 1)))
    least = 1
    if row_bytes > 0 and l2_bytes > 0:
        in_flight = lambda s: min(row_blocks, triton.cdiv(sms, s) + 1) * block_m * row_bytes  # noqa: E731
        least = next((s for s in range(1, most + 1) if in_flight(s) <= l2_bytes // 2), most)
    best, best_eff = least, -1.0
    for s in range(least, most + 1):
        programs = row_blocks * s
        cost = tiles / s + warmup_tiles
        eff = min(row_blocks * tiles / (sms * triton.cdiv(programs, sms * o) * o * cost) for o in (1, 2))
        if eff > best_eff * 1.01:
            best, best_eff = s, eff
    return best


MAX_GRID_Y = 65535


def _split_major(group_m: int, rows: int, block_m: int) -> bool:
    """The 2-D split-major grid (GROUP_M = 1), unless the row blocks would pass CUDA's grid-y limit (then
    the same order through ``program_coords`` on a 1-D grid)."""
    return group_m == 1 and triton.cdiv(rows, block_m) <= MAX_GRID_Y


def launch_stats_forward(h_s, w_s, b_s, h_t, w_t, b_t, *, vocab_size: int, top_k: int, temperature: float,
                         sampled_ids: Optional[torch.Tensor] = None, split_size: Optional[int] = None):
    """Run the kernel; returns the partial state (part [S, 9, R], top value/id/other [2, S, R, K])."""
    rows = h_s.shape[0]
    device = h_s.device
    interp = interpreting()
    align = INTERPRETER_BLOCKS["BLOCK_V"] if interp else SPLIT_ALIGN
    if split_size is None:
        row_bytes = h_s.shape[1] * h_s.element_size() + h_t.shape[1] * h_t.element_size()
        splits = 1 if interp else num_splits(rows, vocab_size, sm_count(device), top_k, row_bytes=row_bytes,
                                             l2_bytes=l2_bytes(device))
        split_size = triton.cdiv(vocab_size, splits)
    split = triton.cdiv(split_size, align) * align
    splits = triton.cdiv(vocab_size, split)
    group_m = max(1, min(int(GROUP_M), rows))  # beyond the row-block count it changes nothing
    part = torch.empty((splits, NUM_PARTIAL_STATS, rows), dtype=torch.float32, device=device)
    top_val = torch.empty((2, splits, rows, top_k), dtype=torch.float32, device=device)
    top_id = torch.empty((2, splits, rows, top_k), dtype=torch.int32, device=device)
    top_oth = torch.empty((2, splits, rows, top_k), dtype=torch.float32, device=device)
    dtype_s, prec_s = dot_config(h_s, w_s)
    dtype_t, prec_t = dot_config(h_t, w_t)
    y = sampled_ids.to(device=device, dtype=torch.int32).contiguous() if sampled_ids is not None else None
    b_s = b_s.contiguous() if b_s is not None else None
    b_t = b_t.contiguous() if b_t is not None else None
    args = (h_s, w_s, b_s if b_s is not None else w_s, h_t, w_t, b_t if b_t is not None else w_t,
            y if y is not None else part, part, top_val, top_id, top_oth,
            rows, vocab_size, split, splits, group_m,
            h_s.stride(0), h_s.stride(1), w_s.stride(0), w_s.stride(1),
            h_t.stride(0), h_t.stride(1), w_t.stride(0), w_t.stride(1),
            1.0 / float(temperature), rows_bucket(rows))
    flags = dict(D_S=h_s.shape[1], D_T=h_t.shape[1], TOP_K=top_k, K_PAD=max(2, triton.next_power_of_2(top_k)),
                 HAS_BS=b_s is not None, HAS_BT=b_t is not None, HAS_Y=y is not None,
                 DTYPE_S=dtype_s, DTYPE_T=dtype_t, PREC_S=prec_s, PREC_T=prec_t,
                 MASKED=MASKED_ID, PLACEHOLDER=PLACEHOLDER_ID, NONE=NO_ID)
    def grid(meta):
        row_blocks = triton.cdiv(rows, meta["BLOCK_M"])
        return (splits, row_blocks) if meta["SPLIT_MAJOR"] else (row_blocks * splits,)

    with device_guard(device):
        if interp:
            blocks = INTERPRETER_BLOCKS
            flags.update(EVEN_DS=h_s.shape[1] % blocks["BLOCK_D"] == 0, EVEN_DT=h_t.shape[1] % blocks["BLOCK_D"] == 0,
                         SPLIT_MAJOR=_split_major(group_m, rows, blocks["BLOCK_M"]))
            _stats_forward_kernel[grid(dict(blocks, **flags))](*args, **flags, **blocks)
        else:
            kernel = _tuned_kernel(device, operand_bytes(h_s, w_s, h_t, w_t))
            block_d = kernel.configs[0].kwargs["BLOCK_D"]
            block_m = min(c.kwargs["BLOCK_M"] for c in kernel.configs)
            flags.update(EVEN_DS=h_s.shape[1] % block_d == 0, EVEN_DT=h_t.shape[1] % block_d == 0,
                         SPLIT_MAJOR=_split_major(group_m, rows, block_m))
            kernel[grid](*args, **flags)
    return part, top_val, top_id, top_oth


def _merge_softmax(m, s0, s1, q):
    """Combine per-split (m, S0, S1, Q) [S, R] (float64) -> (max, log S0, entropy or None, Q / S0)."""
    top = m.max(0).values
    base = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    live = s0 > 0
    w = torch.where(live, (m - base).exp(), torch.zeros_like(m))
    zero = torch.zeros_like(m)
    total = (w * s0).sum(0)
    gap = torch.where(live, w * q, zero).sum(0) / total
    entropy = None
    if s1 is not None:
        shifted = torch.where(live, w * (s1 + s0 * (m - base)), zero).sum(0)
        entropy = total.log() - shifted / total
    return base, total.log(), entropy, gap


def _merge_topk(val, ids, other, top_k: int):
    """Exact top-K over splits [S, R, K] -> sorted (ids int64, values, other values) [R, K]."""
    splits, rows, k = val.shape
    flat = lambda x: x.permute(1, 0, 2).reshape(rows, splits * k)  # noqa: E731
    v, i, o = flat(val), flat(ids).long(), flat(other)
    keys = ordered_keys(v, i)
    top, pos = torch.topk(keys, top_k, dim=1)
    return keys_to_ids(top), v.gather(1, pos), o.gather(1, pos)


def merge_partials(part, top_val, top_id, top_oth, *, top_k: int, with_sampled: bool) -> RowStats:
    """RowStats from the partial state of ``launch_stats_forward`` (small tensors only)."""
    p = part.double()
    m_s, log_s0_s, entropy, gap_s = _merge_softmax(p[:, 0], p[:, 1], p[:, 2], p[:, 3])
    m_t, log_s0_t, _, gap_t = _merge_softmax(p[:, 4], p[:, 5], None, p[:, 6])
    ids_s, zs_at_s, zt_at_s = _merge_topk(top_val[0], top_id[0], top_oth[0], top_k)
    ids_t, zt_at_t, zs_at_t = _merge_topk(top_val[1], top_id[1], top_oth[1], top_k)
    # Cancellation-free forms (docs/math.md, Per-position statistics): logit differences are taken
    # against the row maxima before the log-sums join, never lse_s - lse_t of two large numbers.
    max_gap = m_s - m_t
    out = RowStats(
        lse_student=(m_s + log_s0_s).float(),
        lse_teacher=(m_t + log_s0_t).float(),
        entropy_student=entropy.float(),
        kl_reverse=((gap_s - max_gap) - (log_s0_s - log_s0_t)).float(),
        kl_forward=((-gap_t + max_gap) - (log_s0_t - log_s0_s)).float(),
        topk_ids_student=ids_s,
        topk_ids_teacher=ids_t,
        teacher_mass=((zt_at_s.double() - m_t[:, None]) - log_s0_t[:, None]).exp().sum(1).float(),
        disagreement=union_disagreement(ids_s, zs_at_s, zt_at_s, ids_t, zs_at_t, zt_at_t),
        expected_gap=gap_s.float(),
    )
    if with_sampled:
        out.logp_student_sampled = ((p[:, 7].sum(0) - m_s) - log_s0_s).float()
        out.logp_teacher_sampled = ((p[:, 8].sum(0) - m_t) - log_s0_t).float()
    return out
