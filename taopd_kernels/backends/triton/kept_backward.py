"""Kept-row backward kernel: the logit gradient of docs/math.md, Loss and gradients, recomputed tile by tile.

For the R kept rows and one chunk of columns [v0, v0 + n) the kernel recomputes the scaled logits
z_s (and z_t for the "full" estimator) with ``tl.dot`` and writes, without the per-row factor c_r,

    full:     g[r, v] = p_s(v) * ((z_s(v) - z_t(v)) - E_ps[z_s - z_t][r])      c_r = row_coef[r]
    sampled:  g[r, v] = 1[v = y_r] - p_s(v)                                  c_r = row_coef[r] * w_r

(p_s = e^((z - m) - log S0); w_r = logp_s(y) - logp_t(y) = -A_r; row_coef already holds
grad_output / normalizer / tau) into a workspace G [R, n] (bf16 for bf16 inputs, else float32: fp16 would flush small p_s to zero), and the bias gradient
db[v] = sum_r c_r g[r, v] as float32 partial sums per row block (summed on the host, deterministic).
The kept rows' maximum m, log S0 and E_ps[z_s - z_t] come from a first pass of the same kernel
(``SOFTMAX``): the same tiles, blocks and config, so the same logits to the bit. Each program writes
its tile's per-row (max, sum e^(z - max), sum e^(z - max) (z_s - z_t)), merged on the host per chunk
in float64. Logits formed by another kernel (the forward's) can differ from these in the last bit,
eps |z| each, and at |z| / tau ~ 1e2-1e6 that moved p_s of a near-one-hot row by as much (a
gradient a hundred times less accurate than naive float32 autograd there).
The launcher then reduces each chunk with cuBLAS:

    dh    += (G @ W_s[v0:v0+n]) * c            (float32 GEMM output, float32 accumulation across chunks)
    dW_s[v0:v0+n] = G^T @ (c * h_s)            (float32 GEMM output, each row of dW written once)

Grid: (row blocks of BLOCK_M) x (column tiles of the chunk), row blocks fastest so that the programs
running together share a W tile. Memory held: the workspace and the matmul
results of one chunk, bounded by ``WORKSPACE_BYTES`` (the chunk width is chosen from it), the first
pass's partials (3 floats per kept row per ``MIN_BLOCK_V`` columns of one chunk), plus the
float32 outputs dh [R, D_s], dW [V_s, D_s], db [V_s] that the interface returns; never [N, V].
Rows of dW (and db) at or beyond ``vocab_size`` are zero.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .._tiles import mm_float32
from .stats_forward import _merge_softmax
from ._common import device_guard, dot_config, interpreting, is_hopper, logits_tile, operand_bytes, rows_bucket, shipped

WORKSPACE_BYTES = 128 << 20
# The row block is fixed (not tuned) so the db partial buffer has a known number of rows.
BLOCK_M_GPU = 64
INTERPRETER_BLOCKS = dict(BLOCK_M=16, BLOCK_V=64, BLOCK_D=16)
# The narrowest column tile of any config: the first pass's partial slots per chunk are sized for it.
MIN_BLOCK_V = 64


@triton.jit
def _kept_backward_kernel(
    hs_ptr, ws_ptr, bs_ptr, ht_ptr, wt_ptr, bt_ptr,
    max_ptr, logs0_ptr, gap_ptr, coef_ptr, y_ptr, g_ptr, db_ptr, part_ptr,
    R, V0, VLEN, N_SLOTS,
    stride_hsm, stride_hsd, stride_wsv, stride_wsd,
    stride_htm, stride_htd, stride_wtv, stride_wtd,
    stride_g, inv_tau, ROWS_BUCKET,
    D_S: tl.constexpr, D_T: tl.constexpr, FULL: tl.constexpr, NEED_DB: tl.constexpr,
    HAS_BS: tl.constexpr, HAS_BT: tl.constexpr, SOFTMAX: tl.constexpr,
    DTYPE_S: tl.constexpr, DTYPE_T: tl.constexpr, PREC_S: tl.constexpr, PREC_T: tl.constexpr,
    EVEN_DS: tl.constexpr, EVEN_DT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Row blocks fastest: consecutive programs share one column tile of W, so each W tile is read from
    # HBM about once (the kept rows' h, a few MB, stays in L2), not once per row block.
    pid_m = tl.program_id(0)
    pid_v = tl.program_id(1)
    local = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = local < VLEN
    cols_c = V0 + tl.minimum(local, VLEN - 1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < R
    rows_c = tl.minimum(rows, R - 1)

    zs = logits_tile(hs_ptr, ws_ptr, bs_ptr, rows_c, cols_c, D_S, stride_hsm, stride_hsd, stride_wsv, stride_wsd,
                     inv_tau, HAS_BS, BLOCK_M, BLOCK_V, BLOCK_D, EVEN_DS, DTYPE_S, PREC_S)
    if SOFTMAX:
        # First pass: this tile's per-row softmax partials, from exactly the logits the gradient pass forms.
        zm = tl.where(col_ok[None, :], zs, -float("inf"))
        m = tl.max(zm, axis=1)
        base = tl.where(m > -float("inf"), m, 0.0)  # a row of -inf logits (a -inf bias): e = 0, no NaN
        e = tl.where(col_ok[None, :], tl.exp(zs - base[:, None]), 0.0)
        if FULL:
            zt = logits_tile(ht_ptr, wt_ptr, bt_ptr, rows_c, cols_c, D_T, stride_htm, stride_htd, stride_wtv,
                             stride_wtd, inv_tau, HAS_BT, BLOCK_M, BLOCK_V, BLOCK_D, EVEN_DT, DTYPE_T, PREC_T)
            q = tl.sum(tl.where(e > 0, e * (zs - zt), 0.0), axis=1)
        else:
            q = tl.zeros([BLOCK_M], dtype=tl.float32)
        slot = part_ptr + pid_v.to(tl.int64) * R + rows
        tl.store(slot, m, mask=row_ok)
        tl.store(slot + N_SLOTS * R, tl.sum(e, axis=1), mask=row_ok)
        tl.store(slot + 2 * N_SLOTS * R, q, mask=row_ok)
    else:
        # p_s = e^((z_s - m) - log S0): z_s - lse would subtract two numbers of size |z| (~eps |z| lost).
        p_s = tl.exp((zs - tl.load(max_ptr + rows_c)[:, None]) - tl.load(logs0_ptr + rows_c)[:, None])
        if FULL:
            zt = logits_tile(ht_ptr, wt_ptr, bt_ptr, rows_c, cols_c, D_T, stride_htm, stride_htd, stride_wtv,
                             stride_wtd, inv_tau, HAS_BT, BLOCK_M, BLOCK_V, BLOCK_D, EVEN_DT, DTYPE_T, PREC_T)
            # Cancellation-free: p_s * (g - E_ps[g]) with g = z_s - z_t, not log p_s - log p_t - KL_rev.
            eg = tl.load(gap_ptr + rows_c)
            g = tl.where(p_s > 0, p_s * ((zs - zt) - eg[:, None]), 0.0)
        else:
            y = tl.load(y_ptr + rows_c)
            g = tl.where(cols_c[None, :] == y[:, None], 1.0, 0.0) - p_s
        ok = row_ok[:, None] & col_ok[None, :]
        g = tl.where(ok, g, 0.0)
        g_off = rows.to(tl.int64)[:, None] * stride_g + local[None, :]
        tl.store(g_ptr + g_off, g.to(g_ptr.dtype.element_ty), mask=ok)
        if NEED_DB:
            coef = tl.load(coef_ptr + rows_c)
            db = tl.sum(g * coef[:, None], axis=0)
            tl.store(db_ptr + pid_m.to(tl.int64) * VLEN + local, db, mask=col_ok)


def _configs(hopper: bool, nbytes: int):
    """Autotune candidates (BLOCK_M is fixed at ``BLOCK_M_GPU``): the ones that compile without spills
    for sm_90a / sm_80 with the JIT's specialisation (``aot.py``; asserted in tests/test_triton.py). float32
    operands drop the shapes that spill with them (128 columns on 4 warps; 256 columns on sm_90a)."""
    wide = nbytes > 2
    block_d = 64 if (not wide and hopper) else 32
    if hopper:
        shapes = [(128, 8, 4)] if wide else [(128, 4, 3), (128, 8, 4), (256, 8, 3)]
    else:
        shapes = [(128, 8, 3), (64, 4, 3)] if wide else [(128, 4, 3), (128, 8, 3), (64, 4, 3)]
    assert min(v for v, _, _ in shapes) >= MIN_BLOCK_V
    return [triton.Config(dict(BLOCK_V=v, BLOCK_D=block_d), num_warps=w, num_stages=s) for v, w, s in shapes]


_TUNED = {}


def _tuned_kernel(device: torch.device, nbytes: int):
    key = (is_hopper(device), nbytes)
    if key not in _TUNED:
        _TUNED[key] = triton.autotune(configs=shipped(_configs(*key)), key=["D_S", "D_T", "ROWS_BUCKET", "FULL"])(
            _kept_backward_kernel)
    return _TUNED[key]


def _launch(args, flags, rows: int, width: int, device, nbytes: int):
    with device_guard(device):
        if interpreting():
            blocks = INTERPRETER_BLOCKS
            flags.update(EVEN_DS=flags["D_S"] % blocks["BLOCK_D"] == 0, EVEN_DT=flags["D_T"] % blocks["BLOCK_D"] == 0)
            grid = (triton.cdiv(rows, blocks["BLOCK_M"]), triton.cdiv(width, blocks["BLOCK_V"]))
            _kept_backward_kernel[grid](*args, **flags, **blocks)
        else:
            kernel = _tuned_kernel(device, nbytes)
            block_d = kernel.configs[0].kwargs["BLOCK_D"]
            flags.update(EVEN_DS=flags["D_S"] % block_d == 0, EVEN_DT=flags["D_T"] % block_d == 0,
                         BLOCK_M=BLOCK_M_GPU)
            grid = lambda meta: (triton.cdiv(rows, BLOCK_M_GPU), triton.cdiv(width, meta["BLOCK_V"]))  # noqa: E731
            kernel[grid](*args, **flags)


def _block_m() -> int:
    return INTERPRETER_BLOCKS["BLOCK_M"] if interpreting() else BLOCK_M_GPU


class _ChunkLauncher:
    """The kernel's launch for one row chunk [r0, r1): what does not change between the two passes and
    the vocabulary chunks (inputs, strides, flags, the partials buffer) is bound once here."""

    def __init__(self, h_s, w_s, b_s, h_t, w_t, b_t, *, full: bool, coef, sampled_ids, need_bias_grad: bool,
                 temperature: float, vocab_size: int, width: int, part):
        self.device, self.full, self.coef = h_s.device, full, coef
        self.vocab_size, self.width, self.part = vocab_size, width, part
        self.n_slots = triton.cdiv(width, MIN_BLOCK_V)
        dtype_s, prec_s = dot_config(h_s, w_s)
        dtype_t, prec_t = dot_config(h_t, w_t) if full else (dtype_s, prec_s)
        self.nbytes = operand_bytes(h_s, w_s, *((h_t, w_t) if full else ()))
        self.y = sampled_ids.to(device=self.device, dtype=torch.int32).contiguous() if not full else None
        self.b_s = b_s.contiguous() if b_s is not None else None
        self.b_t = b_t.contiguous() if (b_t is not None and full) else None
        self.h_s, self.w_s = h_s, w_s
        self.h_t, self.w_t = (h_t, w_t) if full else (h_s, w_s)  # the sampled estimator reads no teacher
        self.flags = dict(D_S=h_s.shape[1], D_T=self.h_t.shape[1], FULL=full, NEED_DB=need_bias_grad,
                          HAS_BS=self.b_s is not None, HAS_BT=self.b_t is not None,
                          DTYPE_S=dtype_s, DTYPE_T=dtype_t, PREC_S=prec_s, PREC_T=prec_t)
        self.inv_tau = 1.0 / float(temperature)
        self.rows = (0, 0)

    def select_rows(self, r0: int, r1: int):
        """Start row chunk [r0, r1); returns its partials view [3, n_slots, rows] (contiguous: the kernel
        indexes it so)."""
        self.rows = (r0, r1)
        return self.part[: 3 * self.n_slots * (r1 - r0)].view(3, self.n_slots, r1 - r0)

    def __call__(self, v0: int, softmax: bool, row_max, log_s0, gap, g, db_buf, slots) -> None:
        (r0, r1), n = self.rows, min(v0 + self.width, self.vocab_size) - v0
        h_s, w_s, h_t, w_t, coef = self.h_s, self.w_s, self.h_t, self.w_t, self.coef
        args = (h_s[r0:r1], w_s, self.b_s if self.b_s is not None else w_s,
                h_t[r0:r1], w_t, self.b_t if self.b_t is not None else w_t,
                row_max, log_s0, gap, coef[r0:r1], self.y[r0:r1] if self.y is not None else coef, g, db_buf,
                slots, r1 - r0, v0, n, self.n_slots,
                h_s.stride(0), h_s.stride(1), w_s.stride(0), w_s.stride(1),
                h_t.stride(0), h_t.stride(1), w_t.stride(0), w_t.stride(1),
                g.stride(0), self.inv_tau, rows_bucket(r1 - r0))
        _launch(args, dict(self.flags, SOFTMAX=softmax), r1 - r0, n, self.device, self.nbytes)


def _softmax_pass(launch: _ChunkLauncher, slots, g0):
    """First pass over the chunk's rows: (max, S0, Q) per row from the very tiles the gradient pass will
    recompute, merged vocabulary chunk by chunk in float64. Returns float32 (row max, log S0, E_ps[gap])."""
    run = None
    coef = launch.coef
    for v0 in range(0, launch.vocab_size, launch.width):
        slots[0].fill_(-torch.inf)
        slots[1:].zero_()
        launch(v0, True, coef, coef, coef, g0, coef, slots)
        p = slots.double()
        if run is not None:
            p = torch.cat([run[:, None], p], 1)
        m, log_s0, _, gap = _merge_softmax(p[0], p[1], None, p[2])
        run = torch.stack([m, log_s0.exp(), gap * log_s0.exp()])
    return run[0].float().contiguous(), run[1].log().float().contiguous(), (run[2] / run[1]).float().contiguous()


def _gradient_pass(launch: _ChunkLauncher, slots, softmax, workspace, db_part, h_scaled, grads, mm_dtype) -> None:
    """Second pass: each vocabulary chunk's logit gradient G into the workspace, reduced by cuBLAS into
    dh (rows of the chunk), dW (columns of the chunk) and db."""
    (r0, r1), n_rows = launch.rows, launch.rows[1] - launch.rows[0]
    d_h, d_w, d_b = grads
    db_rows = triton.cdiv(n_rows, _block_m())
    for v0 in range(0, launch.vocab_size, launch.width):
        v1 = min(v0 + launch.width, launch.vocab_size)
        n = v1 - v0
        g = workspace[: n_rows * n].view(n_rows, n)
        db_buf = db_part[: db_rows * n] if d_b is not None else launch.coef
        launch(v0, False, *softmax, g, db_buf, slots)
        w_chunk = launch.w_s[v0:v1]
        if w_chunk.dtype != mm_dtype:
            w_chunk = w_chunk.to(mm_dtype)
        d_h[r0:r1] += mm_float32(g, w_chunk)
        dw_chunk = mm_float32(g.t(), h_scaled[r0:r1])
        if r0 == 0:
            d_w[v0:v1].copy_(dw_chunk)
        else:
            d_w[v0:v1] += dw_chunk
        if d_b is not None:
            d_b[v0:v1] += db_buf.view(db_rows, n).sum(0)


def _chunk_sizes(rows: int, d_s: int, elem: int, w_elem: int, vocab_size: int, chunk_rows, chunk_vocab):
    """(row chunk, vocabulary chunk width) that keep the logit-gradient workspace within WORKSPACE_BYTES."""
    row_chunk = chunk_rows or max(1, WORKSPACE_BYTES // (256 * elem))
    if chunk_vocab is None:
        per_col = min(rows, row_chunk) * elem + d_s * max(elem, w_elem) + 4 * triton.cdiv(min(rows, row_chunk), _block_m())
        chunk_vocab = max(256, WORKSPACE_BYTES // per_col // 256 * 256)
    return row_chunk, min(chunk_vocab, vocab_size)


def kept_backward(h_s, w_s, b_s, h_t, w_t, b_t, *, vocab_size: int, temperature: float, estimator: str,
                  row_coef, sampled_ids=None, sampled_weight=None,
                  need_bias_grad: bool = False, chunk_rows: Optional[int] = None,
                  chunk_vocab: Optional[int] = None):
    """(dh float32 [R, D_s], dW float32 [V_s, D_s], db float32 [V_s] or None, lse float32 [R]: the kept
    rows' log-sum-exps from the first pass's logits); see the module docstring."""
    device = h_s.device
    rows, d_s = h_s.shape
    full = estimator == "full"
    d_w = torch.empty(w_s.shape, dtype=torch.float32, device=device)
    d_w[vocab_size:].zero_()
    d_h = torch.zeros((rows, d_s), dtype=torch.float32, device=device)
    d_b = torch.zeros(w_s.shape[0], dtype=torch.float32, device=device) if need_bias_grad else None
    if rows == 0:
        d_w.zero_()
        return d_h, d_w, d_b, torch.zeros(0, dtype=torch.float32, device=device)

    coef = row_coef.to(device=device, dtype=torch.float32)
    if not full:
        coef = coef * sampled_weight.to(device=device, dtype=torch.float32)
    coef = coef.contiguous()
    # Workspace and GEMM operand dtype: bf16 when h and W are both bf16 (float32 range, products exact in
    # the float32 GEMM output), else float32; the GEMMs always return float32 (``mm_float32``).
    mm_dtype = torch.bfloat16 if h_s.dtype == w_s.dtype == torch.bfloat16 else torch.float32
    elem = torch.tensor([], dtype=mm_dtype).element_size()
    h_scaled = (h_s.float() * coef[:, None]).to(mm_dtype)  # c * h, for dW = G^T @ (c h)
    row_chunk, width = _chunk_sizes(rows, d_s, elem, w_s.element_size(), vocab_size, chunk_rows, chunk_vocab)
    chunk = min(rows, row_chunk)
    workspace = torch.empty(chunk * width, dtype=mm_dtype, device=device)
    db_part = torch.empty(triton.cdiv(chunk, _block_m()) * width, dtype=torch.float32, device=device) \
        if need_bias_grad else None
    part = torch.empty(3 * triton.cdiv(width, MIN_BLOCK_V) * chunk, dtype=torch.float32, device=device)
    launch = _ChunkLauncher(h_s, w_s, b_s, h_t, w_t, b_t, full=full, coef=coef, sampled_ids=sampled_ids,
                            need_bias_grad=need_bias_grad, temperature=temperature, vocab_size=vocab_size,
                            width=width, part=part)
    lse = torch.empty(rows, dtype=torch.float32, device=device)
    for r0 in range(0, rows, row_chunk):
        r1 = min(r0 + row_chunk, rows)
        slots = launch.select_rows(r0, r1)
        softmax = _softmax_pass(launch, slots, workspace[: r1 - r0].view(r1 - r0, 1))  # g0: not written
        lse[r0:r1] = softmax[0] + softmax[1]
        _gradient_pass(launch, slots, softmax, workspace, db_part, h_scaled, (d_h, d_w, d_b), mm_dtype)
    d_h.mul_(coef[:, None])
    return d_h, d_w, d_b, lse
