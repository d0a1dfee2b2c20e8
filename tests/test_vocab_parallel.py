"""Vocabulary-parallel statistics (``vocab_parallel=``, taopd_kernels/vocab_parallel.py): both lm_heads sharded
by vocabulary over 2 and 4 gloo processes on the CPU give what one process with the whole heads gives.

Every scenario runs once per world size in one ``mp.spawn`` (module fixture); each rank saves what it got and
the test process compares it with one process (the same entry point with the whole heads, backend "torch")
and with float64 (``reference.reference_row_stats``).

Tolerance. One process's float32 statistics are within ``TOL`` = 2e-5 (absolute + relative) of float64 on
these inputs (the bound tests/helpers.py uses for every backend; float32 rounding of a 517-column sum of
terms of size <= 1 is ~1e-6). The vocabulary-parallel path sums the same terms in another grouping (tp
shards, then tp - 1 rescaled additions), so it obeys the same bound against float64, and the two paths differ
by at most 2 TOL (checked). Nothing here depends on the machine: the bound is 20x the float32 rounding.

Exact where it must be: every rank's statistics, selection, loss and dh are bitwise identical (the merge runs
in rank order on the same bits); top-K ids equal one process's wherever neighbouring float64 logits differ by
more than TOL, and everywhere on integer-valued logits (exact in float32), where ties (also across a shard
boundary) go to the lower global id.

Hostile shardings: V not divisible by tp, uneven and empty shards, one rank's shard all -inf by bias, a
vocab_size cut inside a shard (later ranks use no column), a teacher with extra padding rows on the last rank,
and student/teacher shards over different ids (refused on every rank, naming the ranges).
"""

from __future__ import annotations

import math
import socket

import pytest
import torch

from helpers import make_inputs
from taopd_kernels import fused_teachability_kl, teachability_kl_from_logits
from taopd_kernels.reference import reference_logits, reference_row_stats

TOL = 2e-5
FLOAT_FIELDS = ("lse_student", "lse_teacher", "entropy_student", "kl_reverse", "kl_forward", "teacher_mass",
                "disagreement", "logp_student_sampled", "logp_teacher_sampled")
ID_FIELDS = ("topk_ids_student", "topk_ids_teacher")
WORLD_SIZES = (2, 4)
LEADING = (4, 12)


def _even(v: int, world: int) -> list:
    """torch.chunk's split (the DTensor Shard(0) layout): ceil(v / world) rows per rank, the rest last."""
    per = math.ceil(v / world)
    return [max(0, min(per, v - r * per)) for r in range(world)]


def _integer_inputs(v=64, d=8, seed=5, boundary=None):
    """Integer-valued hidden states and weights: exact integer logits in float32, full of ties; the rows at
    ``boundary - 1`` and ``boundary`` (a shard boundary) are equal, so their logits tie across shards."""
    g = torch.Generator().manual_seed(seed)
    x = {"student_hidden": torch.randint(-2, 3, (*LEADING, d), generator=g).float(),
         "student_weight": torch.randint(-1, 2, (v, d), generator=g).float(),
         "teacher_hidden": torch.randint(-2, 3, (*LEADING, d), generator=g).float(),
         "teacher_weight": torch.randint(-1, 2, (v, d), generator=g).float()}
    if boundary is not None:
        for name in ("student_weight", "teacher_weight"):
            x[name][boundary] = x[name][boundary - 1]
    return x


def scenarios(world: int) -> dict:
    """name -> (inputs, student rows per rank, teacher rows per rank, call options)."""
    base = dict(top_k=16, keep_ratio=0.25, strategy="teachability", estimator="full", temperature=0.7,
                backend="torch", chunk_vocab=64)
    x = make_inputs(leading=LEADING, v_s=517, bias=True, seed=1)
    even = _even(517, world)
    uneven = [100, 417] if world == 2 else [50, 300, 0, 167]  # an empty shard in the middle
    neg = make_inputs(leading=LEADING, v_s=517, bias=True, seed=2)
    neg_start = even[0]
    for name in ("student_bias", "teacher_bias"):
        neg[name][neg_start:neg_start + even[1]] = -math.inf  # rank 1's whole shard
    padded = make_inputs(leading=LEADING, v_s=517, v_t=530, seed=3)
    g = torch.Generator().manual_seed(4)
    sampled = torch.randint(0, 517, LEADING, generator=g)
    ints = _integer_inputs(boundary=64 // world)
    out = {
        "bias_even": (x, even, even, base),
        "sampled_uneven": (x, uneven, uneven, dict(base, estimator="sampled", strategy="tip", sampled_ids=sampled)),
        "neg_inf_shard": (neg, even, even, dict(base, strategy="divergence")),
        "vocab_cut": (padded, even, even[:-1] + [even[-1] + 13],
                      dict(base, vocab_size=300, sampled_ids=sampled.clamp(max=299))),
        "integer_ties": (ints, _even(64, world), _even(64, world),
                         dict(base, top_k=8, temperature=1.0, keep_ratio=0.5, strategy="compat")),
        "partial_hidden_grad": (x, even, even, dict(base, hidden_grad="partial")),
    }
    return out


def _valid_mask():
    valid = torch.ones(LEADING, dtype=torch.bool)
    valid[1, 7:] = False
    valid[3, :2] = False
    return valid


def _shard(x: dict, rows_s, rows_t, rank: int) -> dict:
    lo_s, lo_t = sum(rows_s[:rank]), sum(rows_t[:rank])
    out = dict(x)
    for name, lo, n in (("student_weight", lo_s, rows_s[rank]), ("student_bias", lo_s, rows_s[rank]),
                        ("teacher_weight", lo_t, rows_t[rank]), ("teacher_bias", lo_t, rows_t[rank])):
        if name in x:
            out[name] = x[name][lo:lo + n]
    return out


def _call(x: dict, opts: dict, vocab_parallel=None):
    """The entry point on leaf copies of ``x``: (loss, stats, {student grad name: grad})."""
    leaves = {k: v.clone().requires_grad_(k.startswith("student")) for k, v in x.items()}
    kw = {k: v for k, v in opts.items() if k != "hidden_grad"}
    if vocab_parallel is not None:
        kw["vocab_parallel"] = vocab_parallel
    bias = {k: leaves[k] for k in ("student_bias", "teacher_bias") if k in leaves}
    loss, stats = fused_teachability_kl(leaves["student_hidden"], leaves["student_weight"],
                                        leaves["teacher_hidden"], leaves["teacher_weight"], valid_mask=_valid_mask(),
                                        **bias, **kw)
    loss.backward()
    grads = {k: v.grad for k, v in leaves.items() if k.startswith("student")}
    return loss.detach(), stats, grads


def _record(loss, stats, grads) -> dict:
    out = {"loss": loss, "kept": stats.kept, "valid": stats.valid, "grads": grads}
    for name in FLOAT_FIELDS + ID_FIELDS:
        out[name] = getattr(stats, name)
    return out


def _logits_case(world: int, rank: int, group=None, vocab_parallel=None):
    """The logits path: logits [4, 12, 517] with -inf entries, sharded by columns."""
    x = make_inputs(leading=LEADING, v_s=517, seed=6)
    zs = reference_logits(x["student_hidden"], x["student_weight"], None, 517, 1.0, torch.float32).view(*LEADING, 517)
    zt = reference_logits(x["teacher_hidden"], x["teacher_weight"], None, 517, 1.0, torch.float32).view(*LEADING, 517)
    zs[..., 5:40] = -math.inf
    zt[..., 10:30] = -math.inf  # inside the student's -inf columns: a finite reverse KL
    cols = _even(517, world)
    lo = sum(cols[:rank])
    if vocab_parallel is not None:
        zs, zt = zs[..., lo:lo + cols[rank]], zt[..., lo:lo + cols[rank]]
    zs = zs.clone().requires_grad_(True)
    kw = dict(top_k=16, keep_ratio=0.25, backend="torch", chunk_vocab=64, valid_mask=_valid_mask())
    if vocab_parallel is not None:
        kw["vocab_parallel"] = vocab_parallel
    loss, stats = teachability_kl_from_logits(zs, zt, **kw)
    loss.backward()
    return _record(loss.detach(), stats, {"student_logits": zs.grad})


def _dtensor_case(world: int, rank: int):
    """DTensor weights sharded on dim 0 over a 1-D mesh (torch.chunk layout), no vocab_parallel option."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    x, _, _, opts = scenarios(world)["bias_even"]
    mesh = init_device_mesh("cpu", (world,))
    leaves = {k: (distribute_tensor(v, mesh, [Shard(0)]) if v.dim() == 1 or k.endswith("weight") else v.clone())
              for k, v in x.items()}
    for k, v in leaves.items():
        v.requires_grad_(k.startswith("student"))
    loss, stats = fused_teachability_kl(leaves["student_hidden"], leaves["student_weight"], leaves["teacher_hidden"],
                                        leaves["teacher_weight"], student_bias=leaves["student_bias"],
                                        teacher_bias=leaves["teacher_bias"], valid_mask=_valid_mask(), **opts)
    loss.backward()
    grads = {k: (v.grad.to_local() if hasattr(v.grad, "to_local") else v.grad) for k, v in leaves.items()
             if k.startswith("student")}
    return _record(loss.detach(), stats, grads)


def _worker(rank: int, world: int, init: str, out_dir: str):
    import torch.distributed as dist

    from taopd_kernels.vocab_parallel import VocabParallel

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        results = {}
        for name, (x, rows_s, rows_t, opts) in scenarios(world).items():
            option = VocabParallel(hidden_grad=opts.get("hidden_grad", "reduce"))
            results[name] = _record(*_call(_shard(x, rows_s, rows_t, rank), opts, option))
        results["logits"] = _logits_case(world, rank, vocab_parallel=VocabParallel())
        results["dtensor"] = _dtensor_case(world, rank)
        # Student and teacher shards over different ids (a 517-row student, a 530-row teacher, both split
        # evenly): refused on every rank.
        x = make_inputs(leading=LEADING, v_s=517, v_t=530, seed=3)
        try:
            _call(_shard(x, _even(517, world), _even(530, world), rank), dict(backend="torch"), VocabParallel())
            results["mismatch"] = None
        except ValueError as exc:
            results["mismatch"] = str(exc)
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module", params=WORLD_SIZES, ids=lambda w: f"tp{w}")
def ranks(request, tmp_path_factory):
    """Every rank's results for one world size (one spawn of ``world`` gloo processes)."""
    import torch.multiprocessing as mp

    world = request.param
    out = tmp_path_factory.mktemp(f"vocab_parallel_tp{world}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(world, f"tcp://127.0.0.1:{port}", str(out)), nprocs=world)
    return world, [torch.load(out / f"rank{r}.pt") for r in range(world)]


_ONE = {}


def one_process(world: int, name: str) -> dict:
    """The same call in this process with the whole heads (cached)."""
    if (world, name) not in _ONE:
        if name == "logits":
            _ONE[world, name] = _logits_case(world, 0)
        else:
            x, _, _, opts = scenarios(world)["bias_even" if name == "dtensor" else name]
            _ONE[world, name] = _record(*_call(x, opts))
    return _ONE[world, name]


def _float64_truth(world: int, name: str):
    x, _, _, opts = scenarios(world)[name]
    vocab = opts.get("vocab_size") or min(x["student_weight"].shape[0], x["teacher_weight"].shape[0])
    zs = reference_logits(x["student_hidden"], x["student_weight"], x.get("student_bias"), vocab,
                          opts["temperature"], torch.float64)
    zt = reference_logits(x["teacher_hidden"], x["teacher_weight"], x.get("teacher_bias"), vocab,
                          opts["temperature"], torch.float64)
    y = opts.get("sampled_ids")
    return zs, zt, reference_row_stats(zs, zt, opts["top_k"], None if y is None else y.reshape(-1))


def _close(got, want, mask, tol, what):
    got, want = got.reshape(-1)[mask].double(), want.reshape(-1)[mask].double()
    torch.testing.assert_close(got, want, atol=tol, rtol=tol, msg=lambda m: f"{what}: {m}")


def _separated(z64: torch.Tensor, k: int) -> torch.Tensor:
    """Rows whose k + 1 largest float64 logits are pairwise more than TOL apart (float32 rounding cannot
    reorder them), so their top-K ids are fixed by the values alone."""
    top = torch.topk(z64, min(k + 1, z64.shape[1]), dim=1).values
    gaps = top[:, :-1] - top[:, 1:]
    finite = torch.isfinite(top[:, :-1])
    return torch.where(finite, gaps > 3 * TOL * (1 + top[:, :-1].abs()), True).all(1)


NAMES = ("bias_even", "sampled_uneven", "neg_inf_shard", "vocab_cut", "integer_ties", "partial_hidden_grad",
         "logits", "dtensor")


def test_vocab_parallel_bitwise_identical_on_every_rank(ranks):
    """Statistics, selection and loss carry the same bits on every rank (and dh, except the partial one)."""
    world, results = ranks
    for name in NAMES:
        first = results[0][name]
        for r in range(1, world):
            other = results[r][name]
            for key in FLOAT_FIELDS + ID_FIELDS + ("loss", "kept", "valid"):
                a, b = first[key], other[key]
                if a is None:
                    assert b is None, (name, key)
                    continue
                assert torch.equal(torch.nan_to_num(a, nan=7.5), torch.nan_to_num(b, nan=7.5)), (name, key, r)
            if name != "partial_hidden_grad" and "student_hidden" in first["grads"]:
                assert torch.equal(first["grads"]["student_hidden"], other["grads"]["student_hidden"]), (name, r)


def test_vocab_parallel_statistics_equal_one_process_and_float64(ranks):
    world, results = ranks
    for name in ("bias_even", "sampled_uneven", "neg_inf_shard", "vocab_cut", "integer_ties"):
        got, one = results[0][name], one_process(world, name)
        _, _, truth = _float64_truth(world, name)
        valid = got["valid"].reshape(-1)
        assert torch.equal(valid, one["valid"].reshape(-1))
        for field in FLOAT_FIELDS:
            if got[field] is None:
                assert one[field] is None
                continue
            want64 = getattr(truth, field)
            _close(got[field], want64.reshape(-1), valid, TOL, f"{name} {field} vs float64")
            _close(one[field], want64.reshape(-1), valid, TOL, f"{name} {field} one process vs float64")
            _close(got[field], one[field], valid, 2 * TOL, f"{name} {field} vs one process")
        torch.testing.assert_close(got["loss"].double(), one["loss"].double(), atol=2 * TOL, rtol=2 * TOL)


def test_vocab_parallel_topk_ids_and_selection_equal_one_process(ranks):
    """Top-K ids equal one process's (and float64's) on every row whose top K + 1 logits are separated by more
    than the tolerance (most rows here); the kept positions equal one process's."""
    world, results = ranks
    for name in ("bias_even", "sampled_uneven", "neg_inf_shard", "vocab_cut"):
        got, one = results[0][name], one_process(world, name)
        zs, zt, truth = _float64_truth(world, name)
        valid = got["valid"].reshape(-1)
        k = got["topk_ids_student"].shape[-1]
        for field, z in (("topk_ids_student", zs), ("topk_ids_teacher", zt)):
            rows = valid & _separated(z, k)
            assert rows.sum() >= valid.sum() // 2, (name, field)  # the check is not vacuous
            mine = got[field].reshape(-1, k)[rows]
            assert torch.equal(mine, one[field].reshape(-1, k)[rows]), (name, field)
            assert torch.equal(mine, getattr(truth, field)[rows]), (name, field)
        assert torch.equal(got["kept"], one["kept"]), name


def test_vocab_parallel_exact_ties_on_integer_logits(ranks):
    """Integer-valued logits (exact in float32, many ties, equal rows across a shard boundary): the ids are
    exactly one process's and float64's, ties to the lower global id, on every row."""
    world, results = ranks
    got, one = results[0]["integer_ties"], one_process(world, "integer_ties")
    zs, zt, truth = _float64_truth(world, "integer_ties")
    valid = got["valid"].reshape(-1)
    boundary = 64 // world
    assert (zs[:, boundary] == zs[:, boundary - 1]).all()  # the tie across the boundary is there
    for field in ID_FIELDS:
        mine = got[field].reshape(-1, 8)[valid]
        assert torch.equal(mine, one[field].reshape(-1, 8)[valid]), field
        assert torch.equal(mine, getattr(truth, field)[valid]), field
        both = (mine == boundary - 1).any(1) & (mine == boundary).any(1)
        lower_only = (mine == boundary - 1).any(1) & ~(mine == boundary).any(1)
        assert not ((mine == boundary).any(1) & ~(mine == boundary - 1).any(1)).any()  # never the higher alone
        assert both.any() or lower_only.any()
    assert torch.equal(got["kept"], one["kept"])


def test_vocab_parallel_gradients_equal_one_process(ranks):
    """dh (reduced over the group), each rank's rows of dW and db: concatenated in rank order, one process's."""
    world, results = ranks
    for name in ("bias_even", "sampled_uneven", "neg_inf_shard", "vocab_cut", "integer_ties", "dtensor"):
        one = one_process(world, name)
        for key in one["grads"]:
            want = one["grads"][key]
            if key == "student_hidden":
                got = results[0][name]["grads"][key]
            else:
                got = torch.cat([results[r][name]["grads"][key] for r in range(world)])
            scale = float(want.abs().max())
            assert scale > 0, (name, key)
            torch.testing.assert_close(got, want, atol=TOL * scale, rtol=0, msg=lambda m: f"{name} {key}: {m}")


def test_vocab_parallel_partial_hidden_grad_sums_to_one_process(ranks):
    """hidden_grad="partial": each rank returns its part G_r W_r; their sum (the caller's all_reduce) is dh."""
    world, results = ranks
    parts = [results[r]["partial_hidden_grad"]["grads"]["student_hidden"] for r in range(world)]
    want = one_process(world, "partial_hidden_grad")["grads"]["student_hidden"]
    assert not torch.allclose(parts[0], want)  # a part, not the whole
    torch.testing.assert_close(sum(parts), want, atol=TOL * float(want.abs().max()), rtol=0)


def test_vocab_parallel_hostile_shardings(ranks):
    """The -inf shard's ids are never chosen; the vocab_size cut leaves later columns' gradients zero."""
    world, results = ranks
    _, rows_s, _, _ = scenarios(world)["neg_inf_shard"]
    lo, hi = rows_s[0], rows_s[0] + rows_s[1]
    for field in ID_FIELDS:
        ids = results[0]["neg_inf_shard"][field]
        assert not ((ids >= lo) & (ids < hi)).any()
    dw = torch.cat([results[r]["vocab_cut"]["grads"]["student_weight"] for r in range(world)])
    assert dw.shape[0] == 517 and (dw[300:] == 0).all() and (dw[:300] != 0).any()


def test_vocab_parallel_logits_path_equals_one_process(ranks):
    world, results = ranks
    got, one = results[0]["logits"], one_process(world, "logits")
    valid = got["valid"].reshape(-1)
    for field in FLOAT_FIELDS:
        if one[field] is not None:
            _close(got[field], one[field], valid, 2 * TOL, f"logits {field}")
    assert torch.equal(got["kept"], one["kept"])
    grad = torch.cat([results[r]["logits"]["grads"]["student_logits"] for r in range(world)], dim=-1)
    want = one["grads"]["student_logits"]
    torch.testing.assert_close(grad, want, atol=TOL * float(want.abs().max()), rtol=0)


def test_vocab_parallel_dtensor_weights_equal_one_process(ranks):
    world, results = ranks
    got, one = results[0]["dtensor"], one_process(world, "dtensor")
    valid = got["valid"].reshape(-1)
    for field in FLOAT_FIELDS:
        if one[field] is not None:
            _close(got[field], one[field], valid, 2 * TOL, f"dtensor {field}")
    assert torch.equal(got["kept"], one["kept"])


def test_vocab_parallel_refuses_shards_over_different_ids(ranks):
    world, results = ranks
    for r in range(world):
        msg = results[r]["mismatch"]
        assert msg is not None and "vocab_parallel" in msg and "must cover the same ids" in msg, msg
