"""The triton backend against the float64 reference (docs/math.md (Per-position statistics; Loss and gradients)).

Without a GPU the kernels run in the Triton interpreter (conftest sets TRITON_INTERPRET=1), so shapes
here are small; the tests marked ``gpu`` run the real sizes and check that no [N, V] buffer appears.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from taopd_kernels import fused_teachability_kl, teachability_stats
from taopd_kernels.estimators import sampled_weight
from taopd_kernels.backends import pytorch as torch_backend
from taopd_kernels.reference import reference_row_stats, reference_teachability_kl

triton = pytest.importorskip("triton")
from taopd_kernels.backends import triton as triton_backend  # noqa: E402
from taopd_kernels.backends.triton import stats_forward  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
FLOAT_FIELDS = ("lse_student", "lse_teacher", "entropy_student", "kl_reverse", "kl_forward",
                "teacher_mass", "disagreement")


def make(n=32, d_s=16, d_t=40, v_s=300, v_t=None, *, dtype=torch.float32, seed=0, scale=3.0, bias=False):
    """Related student/teacher hidden states and weights whose logits have std ~ scale."""
    v_t = v_s if v_t is None else v_t
    g = torch.Generator().manual_seed(seed)
    h_s = torch.randn(n, d_s, generator=g)
    w_s = torch.randn(v_s, d_s, generator=g) * scale / d_s ** 0.5
    h_t = torch.randn(n, d_t, generator=g)
    w_t = torch.randn(v_t, d_t, generator=g) * scale / d_t ** 0.5
    k, v = min(d_s, d_t), min(v_s, v_t)
    h_t[:, :k] = 0.5 * h_t[:, :k] + 0.5 * h_s[:, :k]
    w_t[:v, :k] = 0.5 * w_t[:v, :k] + 0.5 * w_s[:v, :k]
    b_s = torch.randn(v_s, generator=g) * 0.5 if bias else None
    b_t = torch.randn(v_t, generator=g) * 0.5 if bias else None
    cast = lambda x: None if x is None else x.to(device=DEVICE, dtype=dtype)  # noqa: E731
    return tuple(cast(x) for x in (h_s, w_s, b_s, h_t, w_t, b_t))


def logits64(h, w, b, vocab_size, tau):
    z = h.double() @ w[:vocab_size].double().T
    if b is not None:
        z = z + b[:vocab_size].double()
    return z / tau


def truth(h_s, w_s, b_s, h_t, w_t, b_t, *, vocab_size, top_k, tau=1.0, sampled_ids=None):
    return reference_row_stats(logits64(h_s, w_s, b_s, vocab_size, tau).cpu(),
                               logits64(h_t, w_t, b_t, vocab_size, tau).cpu(), top_k,
                               None if sampled_ids is None else sampled_ids.cpu())


def check_rows(out, ref, *, atol=2e-5, rtol=2e-5, ids=True, sampled=False):
    for name in FLOAT_FIELDS + (("logp_student_sampled", "logp_teacher_sampled") if sampled else ()):
        got, want = getattr(out, name), getattr(ref, name)
        assert got.dtype == torch.float32 and got.shape == want.shape, name
        torch.testing.assert_close(got.cpu().double(), want.cpu().double(), atol=atol, rtol=rtol, msg=name)
    if ids:
        for name in ("topk_ids_student", "topk_ids_teacher"):
            got = getattr(out, name)
            assert got.dtype == torch.int64
            assert torch.equal(got.cpu(), getattr(ref, name).cpu()), name


def test_is_available():
    ok, reason = triton_backend.is_available(DEVICE)
    assert ok, reason
    ok, reason = triton_backend.is_available(torch.device("meta"))
    assert not ok and "meta" in reason


def test_package_imports_without_triton():
    code = ("import sys; import taopd_kernels; assert 'triton' not in sys.modules, 'imported triton'; "
            "sys.modules['triton'] = None; from taopd_kernels.backends import triton as triton_backend; "
            "ok, why = triton_backend.is_available('cpu'); assert not ok and 'triton' in why, why; print('ok')")
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr


@pytest.mark.parametrize("case", [
    # (v_s, v_t, vocab_size, top_k, tau, bias, split, d_s, d_t)
    (517, 517, None, 16, 1.0, False, None, 16, 40),     # one split, odd tail, K=16
    (300, 300, None, 4, 0.7, True, 128, 40, 16),        # 3 splits, bias, tau < 1
    (1000, 1100, 777, 1, 2.0, False, 256, 16, 16),      # vocab mismatch + slicing, K=1, uneven splits
])
def test_forward_float32_matches_truth(case):
    v_s, v_t, vocab_size, top_k, tau, bias, split, d_s, d_t = case
    h_s, w_s, b_s, h_t, w_t, b_t = make(n=40, d_s=d_s, d_t=d_t, v_s=v_s, v_t=v_t, bias=bias, seed=1)
    vocab = vocab_size or min(v_s, v_t)
    y = torch.randint(0, vocab, (40,), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    out = triton_backend.forward_stats(h_s, w_s, b_s, h_t, w_t, b_t, vocab_size=vocab, top_k=top_k,
                                       temperature=tau, sampled_ids=y, chunk_vocab=split)
    ref = truth(h_s, w_s, b_s, h_t, w_t, b_t, vocab_size=vocab, top_k=top_k, tau=tau, sampled_ids=y)
    check_rows(out, ref, sampled=True)


def test_forward_small_tiles_many_row_blocks(monkeypatch):
    """Several row blocks (with a row tail) and many tiles per split: the skip-or-fold path of the top-K."""
    monkeypatch.setitem(stats_forward.INTERPRETER_BLOCKS, "BLOCK_M", 16)
    monkeypatch.setitem(stats_forward.INTERPRETER_BLOCKS, "BLOCK_V", 32)
    h_s, w_s, b_s, h_t, w_t, b_t = make(n=37, d_s=24, d_t=16, v_s=403, seed=3)
    out = triton_backend.forward_stats(h_s, w_s, b_s, h_t, w_t, b_t, vocab_size=403, top_k=4, temperature=1.0,
                                       chunk_vocab=200)
    check_rows(out, truth(h_s, w_s, b_s, h_t, w_t, b_t, vocab_size=403, top_k=4))


def test_program_coords_is_a_bijection():
    """pid -> (row block, split) of the 1-D forward grid covers every pair once, for group sizes that do and
    do not divide the row-block count; group 1 is split-major, a group >= the row blocks row-major."""
    coords = stats_forward.program_coords.fn
    for row_blocks in (1, 2, 7, 8, 64):
        for splits in (1, 3, 12):
            for group in (1, 2, 3, 5, 8, 64, 100):
                pairs = [coords(pid, row_blocks, splits, group) for pid in range(row_blocks * splits)]
                assert sorted(pairs) == [(m, s) for m in range(row_blocks) for s in range(splits)], \
                    (row_blocks, splits, group)
                if group == 1:
                    assert pairs == [(m, s) for m in range(row_blocks) for s in range(splits)]
                if group >= row_blocks:
                    assert pairs == [(m, s) for s in range(splits) for m in range(row_blocks)]


@pytest.mark.parametrize("group_m, max_grid_y", [(1, 65535), (1, 4), (3, 65535)])
def test_forward_grouped_order_many_row_blocks_and_splits(monkeypatch, group_m, max_grid_y):
    """Many row blocks (8, with a row tail) x many splits (7, an odd last one): split-major on the 2-D grid,
    split-major on the 1-D grid (as past CUDA's grid-y limit), groups of 3 row blocks (not a divisor of
    8): exact against the float64 reference, tied logits included (duplicated W rows tie across tiles
    and splits)."""
    monkeypatch.setitem(stats_forward.INTERPRETER_BLOCKS, "BLOCK_M", 8)
    monkeypatch.setitem(stats_forward.INTERPRETER_BLOCKS, "BLOCK_V", 32)
    monkeypatch.setattr(stats_forward, "GROUP_M", group_m)
    monkeypatch.setattr(stats_forward, "MAX_GRID_Y", max_grid_y)
    assert stats_forward._split_major(group_m, 61, 8) == (group_m == 1 and max_grid_y > 8)
    n, v = 61, 403
    h_s, w_s, b_s, h_t, w_t, b_t = make(n=n, d_s=16, d_t=24, v_s=v, seed=13, bias=True)
    for src, dst in ((5, 6), (5, 200), (5, 402), (90, 330)):
        w_s[dst], w_t[dst] = w_s[src], w_t[src]
        b_s[dst], b_t[dst] = b_s[src], b_t[src]
    y = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(14)).to(DEVICE)
    part = stats_forward.launch_stats_forward(h_s, w_s, b_s, h_t, w_t, b_t, vocab_size=v, top_k=4,
                                              temperature=0.9, sampled_ids=y, split_size=64)[0]
    assert part.shape[0] == 7
    out = triton_backend.forward_stats(h_s, w_s, b_s, h_t, w_t, b_t, vocab_size=v, top_k=4, temperature=0.9,
                                       sampled_ids=y, chunk_vocab=64)
    check_rows(out, truth(h_s, w_s, b_s, h_t, w_t, b_t, vocab_size=v, top_k=4, tau=0.9, sampled_ids=y),
               sampled=True)


@pytest.mark.parametrize("top_k", [4, 16])
def test_topk_ties_go_to_lower_id(top_k):
    """Logits on a coarse grid (exact in float32) tie all over; duplicated rows of W tie across tiles
    and splits. Ids must match the stable sort exactly."""
    g = torch.Generator().manual_seed(4)
    n, d, v = 24, 16, 300
    grid = lambda *shape: torch.randint(-2, 3, shape, generator=g).float() / 4  # noqa: E731
    h_s, h_t = grid(n, d), grid(n, d)
    w_s, w_t = grid(v, d), grid(v, d)
    for src, dst in ((3, 4), (3, 150), (3, 299), (70, 71), (70, 260)):
        w_s[dst] = w_s[src]
        w_t[dst] = w_t[src]
    h_s, w_s, h_t, w_t = (x.to(DEVICE) for x in (h_s, w_s, h_t, w_t))
    for split in (None, 128):
        out = triton_backend.forward_stats(h_s, w_s, None, h_t, w_t, None, vocab_size=v, top_k=top_k,
                                           temperature=1.0, chunk_vocab=split)
        check_rows(out, truth(h_s, w_s, None, h_t, w_t, None, vocab_size=v, top_k=top_k))


def test_forward_neg_inf_bias():
    """-inf biases (masked tokens): rows where fewer than K logits are finite still get exact ids."""
    h_s, w_s, b_s, h_t, w_t, b_t = make(n=20, v_s=300, bias=True, seed=5)
    masked = torch.ones(300, dtype=torch.bool, device=DEVICE)
    masked[[7, 150, 151]] = False  # only three finite logits per row, K = 4
    b_s = b_s.masked_fill(masked, float("-inf"))
    b_t = b_t.masked_fill(masked, float("-inf"))
    out = triton_backend.forward_stats(h_s, w_s, b_s, h_t, w_t, b_t, vocab_size=300, top_k=4, temperature=1.0,
                                       chunk_vocab=128)
    check_rows(out, truth(h_s, w_s, b_s, h_t, w_t, b_t, vocab_size=300, top_k=4))


def test_forward_empty_rows():
    h_s, w_s, b_s, h_t, w_t, b_t = make(n=0)
    out = triton_backend.forward_stats(h_s, w_s, b_s, h_t, w_t, b_t, vocab_size=300, top_k=4, temperature=1.0)
    assert out.lse_student.shape == (0,) and out.topk_ids_student.shape == (0, 4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_forward_low_precision_no_worse_than_naive(dtype):
    """Error vs float64 truth (of the rounded inputs) no worse than torch logits in ``dtype`` + a little."""
    h_s, w_s, b_s, h_t, w_t, b_t = make(n=32, d_s=40, d_t=16, v_s=517, dtype=dtype, seed=6, bias=True)
    out = triton_backend.forward_stats(h_s, w_s, b_s, h_t, w_t, b_t, vocab_size=517, top_k=16, temperature=1.0)
    ref = truth(h_s, w_s, b_s, h_t, w_t, b_t, vocab_size=517, top_k=16)
    naive_logits = lambda h, w, b: (h @ w.T + b).float().cpu()  # noqa: E731
    naive = reference_row_stats(naive_logits(h_s, w_s, b_s), naive_logits(h_t, w_t, b_t), 16)
    for name in FLOAT_FIELDS:
        want = getattr(ref, name).double()
        ours = (getattr(out, name).cpu().double() - want).abs().max().item()
        theirs = (getattr(naive, name).double() - want).abs().max().item()
        assert ours <= theirs + 1e-4, (name, ours, theirs)
    # Our logits are float32-accurate, so the ids match the truth except at float32-level near-ties.
    agree = (out.topk_ids_student.cpu() == ref.topk_ids_student).float().mean().item()
    assert agree > 0.99


def _backward_inputs(estimator, *, bias, v_s=300, v_t=None, vocab_size=None, n=24, seed=7, tau=1.0):
    h_s, w_s, b_s, h_t, w_t, b_t = make(n=n, d_s=40, d_t=16, v_s=v_s, v_t=v_t, bias=bias, seed=seed)
    vocab = vocab_size or min(w_s.shape[0], w_t.shape[0])
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, vocab, (n,), generator=g).to(DEVICE)
    stats = torch_backend.forward_stats(h_s, w_s, b_s, h_t, w_t, b_t, vocab_size=vocab, top_k=4,
                                        temperature=tau, sampled_ids=y)
    coef = (torch.rand(n, generator=g) + 0.5).to(DEVICE)
    kw = dict(vocab_size=vocab, temperature=tau, estimator=estimator, row_coef=coef, sampled_ids=y,
              sampled_weight=sampled_weight(stats.logp_student_sampled, stats.logp_teacher_sampled),
              need_bias_grad=bias)
    return (h_s, w_s, b_s, h_t, w_t, b_t), kw


@pytest.mark.parametrize("estimator", ["full", "sampled"])
@pytest.mark.parametrize("chunks", [(None, None), (7, 100)])
def test_backward_kept_matches_torch_backend(estimator, chunks):
    """Direct backend call (row coefficients differ per row), against the chunked torch backward;
    small chunk sizes exercise several row and column chunks."""
    chunk_rows, chunk_vocab = chunks
    tensors, kw = _backward_inputs(estimator, bias=True, v_s=300, v_t=320, vocab_size=290, tau=1.3)
    h_s, w_s, b_s, h_t, w_t, b_t = tensors
    teacher_h = h_t if estimator == "full" else None
    got = triton_backend.backward_kept(h_s, w_s, b_s, teacher_h, w_t, b_t, chunk_rows=chunk_rows,
                                       chunk_vocab=chunk_vocab, **kw)
    want = torch_backend.backward_kept(h_s, w_s, b_s, h_t, w_t, b_t, **kw)
    for name, a, b in zip(("dh", "dW", "db"), got, want):
        assert a.dtype == torch.float32 and a.shape == b.shape, name
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=name)
    assert torch.equal(got[1][290:], torch.zeros_like(got[1][290:]))  # beyond vocab_size
    assert torch.equal(got[2][290:], torch.zeros_like(got[2][290:]))


def test_backward_without_bias_grad():
    tensors, kw = _backward_inputs("full", bias=False)
    dh, dw, db = triton_backend.backward_kept(*tensors, **kw)
    assert db is None and dh.shape == (24, 40) and dw.shape == (300, 40)


def _loss_and_grads(fn, tensors, **kwargs):
    h_s, w_s, b_s, h_t, w_t, b_t = (None if x is None else x.detach().clone().requires_grad_(True) for x in tensors)
    out = fn(h_s, w_s, h_t, w_t, student_bias=b_s, teacher_bias=b_t, **kwargs)
    loss = out[0]
    loss.backward()
    teacher_grads = [x.grad for x in (h_t, w_t, b_t) if x is not None]
    grads = (h_s.grad, w_s.grad, None if b_s is None else b_s.grad)
    return loss.detach(), grads, teacher_grads, out


@pytest.mark.parametrize("estimator", ["full", "sampled"])
def test_api_end_to_end_matches_reference(estimator):
    """Public API with backend="triton" vs the float64 autograd reference on the same kept set:
    [B, T, D] inputs, valid mask, vocab mismatch, bias, temperature; teacher gets no gradient and
    unkept rows get exactly zero."""
    b, t = 2, 12
    h_s, w_s, b_s, h_t, w_t, b_t = make(n=b * t, d_s=16, d_t=40, v_s=330, v_t=300, bias=True, seed=8)
    h_s, h_t = h_s.view(b, t, -1), h_t.view(b, t, -1)
    g = torch.Generator().manual_seed(9)
    valid = (torch.rand(b, t, generator=g) > 0.2).to(DEVICE)
    y = torch.randint(0, 300, (b, t), generator=g).to(DEVICE)
    opts = dict(valid_mask=valid, sampled_ids=y, top_k=4, keep_ratio=0.25, estimator=estimator,
                temperature=1.5)
    tensors = (h_s, w_s, b_s, h_t, w_t, b_t)
    loss, grads, teacher_grads, (_, stats) = _loss_and_grads(fused_teachability_kl, tensors, backend="triton",
                                                             **opts)
    kept = stats.kept
    assert kept.sum() >= 1 and not (kept & ~valid).any()
    ref_loss, ref_grads, _, (_, info) = _loss_and_grads(
        reference_teachability_kl, tensors, keep_mask=kept.cpu(), **{**opts, "valid_mask": valid.cpu(),
                                                                     "sampled_ids": y.cpu()})
    torch.testing.assert_close(loss.cpu(), ref_loss.cpu(), atol=1e-5, rtol=1e-5)
    for name, a, r in zip(("dh_s", "dW_s", "db_s"), grads, ref_grads):
        torch.testing.assert_close(a.cpu(), r.cpu(), atol=1e-5, rtol=1e-4, msg=name)
    assert all(x is None for x in teacher_grads)
    assert torch.equal(grads[0][~kept], torch.zeros_like(grads[0][~kept]))
    # Statistics agree with the reference at valid positions (NaN elsewhere).
    rows = info["rows"]
    flat_valid = valid.reshape(-1).cpu()
    for name in FLOAT_FIELDS:
        got = getattr(stats, name).reshape(-1).cpu()
        assert torch.isnan(got[~flat_valid]).all(), name
        torch.testing.assert_close(got[flat_valid].double(), getattr(rows, name)[flat_valid].double(),
                                   atol=2e-5, rtol=2e-5, msg=name)
    assert torch.equal(stats.topk_ids_student.reshape(-1, 4)[flat_valid].cpu(), rows.topk_ids_student[flat_valid])


def test_api_stats_match_torch_backend():
    h_s, w_s, b_s, h_t, w_t, b_t = make(n=30, v_s=517, seed=10)
    kw = dict(top_k=16, keep_ratio=0.1, strategy="teachability")
    a = teachability_stats(h_s, w_s, h_t, w_t, backend="triton", **kw)
    b = teachability_stats(h_s, w_s, h_t, w_t, backend="torch", **kw)
    for name in FLOAT_FIELDS:
        torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=2e-5, rtol=2e-5, msg=name)
    assert torch.equal(a.topk_ids_student, b.topk_ids_student)
    assert torch.equal(a.topk_ids_teacher, b.topk_ids_teacher)
    assert torch.equal(a.kept, b.kept)


def test_api_bf16_gradients_no_worse_than_naive():
    """bf16 end to end: gradient error vs float64 truth (of the rounded inputs) no worse than autograd
    through bf16 logits, plus a small tolerance relative to the gradient's size."""
    n = 24
    h_s, w_s, b_s, h_t, w_t, b_t = make(n=n, d_s=40, d_t=16, v_s=300, dtype=torch.bfloat16, seed=11)
    keep = torch.zeros(n, dtype=torch.bool)
    keep[::3] = True
    tensors = (h_s, w_s, None, h_t, w_t, None)
    _, grads, _, _ = _loss_and_grads(fused_teachability_kl, tensors, backend="triton", keep_mask=keep.to(DEVICE),
                                     top_k=4)
    as64 = tuple(None if x is None else x.double().cpu() for x in tensors)
    _, truth_grads, _, _ = _loss_and_grads(reference_teachability_kl, as64, keep_mask=keep, top_k=4)

    # Naive: bf16 logits with autograd, loss in float32 on top.
    hs, ws = (x.detach().clone().requires_grad_(True) for x in (h_s, w_s))
    zs = (hs @ ws.T).float()
    zt = (h_t @ w_t.T).float()
    logp_s, logp_t = zs.log_softmax(-1), zt.log_softmax(-1)
    kl = (logp_s.exp() * (logp_s - logp_t)).sum(-1)
    (kl[keep.to(DEVICE)].sum() / keep.sum()).backward()
    for name, ours, naive, want in zip(("dh_s", "dW_s"), grads, (hs.grad, ws.grad), truth_grads):
        scale = want.abs().max().item()
        err_ours = (ours.cpu().double() - want).abs().max().item()
        err_naive = (naive.cpu().double() - want).abs().max().item()
        assert err_ours <= err_naive + 1e-2 * scale, (name, err_ours, err_naive, scale)


def test_no_kept_rows_gives_zero_gradients():
    h_s, w_s, b_s, h_t, w_t, b_t = make(n=10, seed=12)
    h_s.requires_grad_(True)
    w_s.requires_grad_(True)
    loss, _ = fused_teachability_kl(h_s, w_s, h_t, w_t, keep_mask=torch.zeros(10, dtype=torch.bool, device=DEVICE),
                                    top_k=4, backend="triton")
    loss.backward()
    assert loss.item() == 0.0 and not h_s.grad.any() and not w_s.grad.any()


def test_num_splits_fills_waves():
    # Without the L2 term (row_bytes, l2_bytes unknown): waves only.
    # 64 row blocks on 132 SMs: 4 splits fill 256 of 264 slots with 1 or 2 programs per SM.
    assert stats_forward.num_splits(8192, 151936, 132) == 4
    # Enough rows: no split.
    assert stats_forward.num_splits(65536, 151936, 132) == 1
    # Many rows on 108 SMs: splitting would help the waves, but the partial state is capped (64 MiB).
    assert stats_forward.num_splits(65536, 151936, 108, top_k=16) <= 2
    # Tiny vocabulary: never more splits than 8 tiles of 256 columns allow.
    assert stats_forward.num_splits(128, 4096, 132) == 2


def test_num_splits_keeps_the_rows_in_flight_in_l2():
    """With the hidden bytes per row (Qwen scale: 2048 + 4096 bf16) and a 50 MiB L2, as the launcher
    passes them: the rows of the programs in flight (ceil(132 / S) + 1 row blocks of 1.5 MiB) must fit
    in 25 MiB, so S >= 9, and the wave model then picks 12 (132 = 11 row blocks x 12 splits)."""
    qwen = dict(row_bytes=(2048 + 4096) * 2, l2_bytes=50 << 20)
    assert stats_forward.num_splits(8192, 151936, 132, **qwen) == 12
    s = stats_forward.num_splits(8192, 151936, 132, **qwen)
    assert (-(-132 // s) + 1) * 128 * qwen["row_bytes"] <= qwen["l2_bytes"] // 2
    # Many rows: the partial-state cap (64 MiB) allows 2 splits, short of the L2 target; take all of them
    # (a row block's two splits in flight share each read of its rows).
    assert stats_forward.num_splits(65536, 151936, 132, **qwen) == 2
    # Few row blocks fit in L2 anyway: the wave model alone, as before.
    assert stats_forward.num_splits(128, 4096, 132, **qwen) == 2
    assert stats_forward.num_splits(2048, 151936, 132, **qwen) == stats_forward.num_splits(2048, 151936, 132)


_AOT_SCRIPT = r"""
import json, sys, torch
from taopd_kernels.backends.triton import aot
rows = []
for arch in (90, 80):
    for dtype in (torch.bfloat16, torch.float32):
        for c in aot.compile_shipped(arch, dtype=dtype):
            rows.append(dict(kernel=c.kernel, arch=arch, dtype=str(dtype), config=c.config, regs=c.registers,
                             spill=c.spill_bytes, shared=c.shared_bytes, mma=c.tensor_cores,
                             limit=aot.SHARED_LIMIT[arch]))
print(json.dumps(rows))
"""


def test_every_shipped_config_compiles_as_the_jit_will():
    """Ahead-of-time compilation for sm_90a and sm_80 (no GPU needed) of every shipped autotune config,
    from the launchers' own arguments at Qwen scale (N=8192, D_s=2048, D_t=4096, V=151,936, K=16) with
    the JIT's specialisation (unit strides constant, 16-divisible ints and aligned pointers marked), in
    bf16 and float32: no local-memory spills, shared memory within the architecture's limit, and bf16
    tiles on the tensor cores (wgmma on sm_90a, mma.sync on sm_80)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], env=env, capture_output=True, text=True, timeout=1200)
    if res.returncode != 0 and "no ptxas could assemble" in res.stderr:
        pytest.skip("no ptxas on this machine can assemble Triton's PTX")
    assert res.returncode == 0, res.stderr[-4000:]
    rows = json.loads(res.stdout.strip().splitlines()[-1])
    assert len(rows) >= 20
    for r in rows:
        where = f"{r['kernel']} sm_{r['arch']} {r['dtype']} {r['config']}"
        assert r["spill"] == 0, f"{where}: {r['spill']} bytes of local-memory spills"
        assert r["shared"] <= r["limit"], f"{where}: {r['shared']} bytes of shared memory"
        if r["dtype"] == "torch.bfloat16":
            assert r["mma"], f"{where}: no tensor-core instructions"


# ---------------------------------------------------------------------------------------------------
# GPU: real sizes, memory bounds.

def _gpu_inputs(n, d_s, d_t, v, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    h_s = torch.randn(n, d_s, device="cuda", generator=g).to(dtype)
    w_s = (torch.randn(v, d_s, device="cuda", generator=g) * (3.0 / d_s ** 0.5)).to(dtype)
    h_t = torch.randn(n, d_t, device="cuda", generator=g).to(dtype)
    w_t = (torch.randn(v, d_t, device="cuda", generator=g) * (3.0 / d_t ** 0.5)).to(dtype)
    return h_s, w_s, h_t, w_t


@pytest.mark.gpu
def test_gpu_forward_real_size_matches_torch_and_bounded_memory():
    n, d_s, d_t, v, k = 4096, 2048, 4096, 151936, 16
    h_s, w_s, h_t, w_t = _gpu_inputs(n, d_s, d_t, v)
    y = torch.randint(0, v, (n,), device="cuda")
    kw = dict(vocab_size=v, top_k=k, temperature=1.0, sampled_ids=y)
    # Warm-up at the same size: autotuning (its benchmark flushes L2 with a 256 MB buffer) and compiling.
    triton_backend.forward_stats(h_s, w_s, None, h_t, w_t, None, **kw)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = triton_backend.forward_stats(h_s, w_s, None, h_t, w_t, None, **kw)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < 64 << 20, f"forward allocated {extra / 2**20:.1f} MiB beyond its inputs"
    rows = slice(0, 512)  # the torch backend in float32 on a slice of rows
    ref = torch_backend.forward_stats(h_s[rows], w_s, None, h_t[rows], w_t, None, **{**kw, "sampled_ids": y[rows]})
    for name in FLOAT_FIELDS + ("logp_student_sampled", "logp_teacher_sampled"):
        torch.testing.assert_close(getattr(out, name)[rows], getattr(ref, name), atol=2e-3, rtol=2e-3, msg=name)
    overlap = (out.topk_ids_student[rows] == ref.topk_ids_student).float().mean().item()
    assert overlap > 0.99


@pytest.mark.gpu
def test_gpu_float32_forward_matches_truth():
    n, d_s, d_t, v = 256, 256, 512, 50000
    h_s, w_s, h_t, w_t = _gpu_inputs(n, d_s, d_t, v, dtype=torch.float32, seed=1)
    out = triton_backend.forward_stats(h_s, w_s, None, h_t, w_t, None, vocab_size=v - 3, top_k=16, temperature=0.8)
    check_rows(out, truth(h_s, w_s, None, h_t, w_t, None, vocab_size=v - 3, top_k=16, tau=0.8), atol=1e-4,
               rtol=1e-4, ids=False)


@pytest.mark.gpu
@pytest.mark.parametrize("estimator", ["full", "sampled"])
def test_gpu_backward_real_size_matches_torch_and_bounded_workspace(estimator):
    n_kept, d_s, d_t, v = 205, 2048, 4096, 151936
    h_s, w_s, h_t, w_t = _gpu_inputs(n_kept, d_s, d_t, v, seed=2)
    b_s = torch.randn(v, device="cuda").to(torch.bfloat16)
    y = torch.randint(0, v, (n_kept,), device="cuda")
    stats = triton_backend.forward_stats(h_s, w_s, b_s, h_t, w_t, None, vocab_size=v, top_k=16, temperature=1.0,
                                         sampled_ids=y)
    kw = dict(vocab_size=v, temperature=1.0, estimator=estimator,
              row_coef=torch.full((n_kept,), 1.0 / n_kept, device="cuda"),
              sampled_ids=y, sampled_weight=sampled_weight(stats.logp_student_sampled, stats.logp_teacher_sampled),
              need_bias_grad=True)
    triton_backend.backward_kept(h_s, w_s, b_s, h_t, w_t, None, **kw)  # warm-up: autotune, compile
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    dh, dw, db = triton_backend.backward_kept(h_s, w_s, b_s, h_t, w_t, None, **kw)
    torch.cuda.synchronize()
    outputs = dh.numel() * 4 + dw.numel() * 4 + db.numel() * 4
    extra = torch.cuda.max_memory_allocated() - base - outputs
    assert extra <= 256 << 20, f"backward workspace {extra / 2**20:.1f} MiB"
    want = torch_backend.backward_kept(h_s, w_s, b_s, h_t, w_t, None, chunk_rows=n_kept, chunk_vocab=8192, **kw)
    for name, a, b in zip(("dh", "dW", "db"), (dh, dw, db), want):
        scale = b.abs().max().item()
        assert (a - b).abs().max().item() <= 2e-2 * scale, name


@pytest.mark.gpu
def test_gpu_end_to_end_bf16_and_int64_offsets():
    """Full API at N = 4096, V = 151936 (bf16), and a weight with V * D > 2**31 elements."""
    n, d_s, d_t, v = 4096, 2048, 4096, 151936
    h_s, w_s, h_t, w_t = _gpu_inputs(n, d_s, d_t, v, seed=3)
    h_s.requires_grad_(True)
    w_s.requires_grad_(True)
    loss, stats = fused_teachability_kl(h_s, w_s, h_t, w_t, backend="triton")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(h_s.grad.float()).all() and torch.isfinite(w_s.grad.float()).all()
    assert stats.num_kept == 205

    big_d = 16384  # 151936 * 16384 > 2**31: int64 offsets needed into W
    g = torch.Generator(device="cuda").manual_seed(4)
    w_big = (torch.randn(v, big_d, device="cuda", generator=g) / big_d ** 0.5 * 3).to(torch.bfloat16)
    h_big = torch.randn(64, big_d, device="cuda", generator=g).to(torch.bfloat16)
    out = triton_backend.forward_stats(h_big, w_big, None, h_big, w_big, None, vocab_size=v, top_k=16,
                                       temperature=1.0)
    ref = torch_backend.forward_stats(h_big, w_big, None, h_big, w_big, None, vocab_size=v, top_k=16,
                                      temperature=1.0)
    torch.testing.assert_close(out.lse_student, ref.lse_student, atol=2e-3, rtol=2e-3)
    assert (out.topk_ids_student == ref.topk_ids_student).float().mean() > 0.99
