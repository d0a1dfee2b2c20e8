"""The loss head under hostile input: every case either matches the float64 reference under the precision
rule (no worse than the naive float32 computation plus a small tolerance) or raises a ValueError /
TypeError naming the argument. Also the host-sync budget of one forward+backward."""

from __future__ import annotations

import math
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from taopd_kernels import (
    fused_teachability_kl,
    select_positions,
    teachability_kl_from_logits,
    teachability_stats,
)
from taopd_kernels import backends
from taopd_kernels.reference import reference_teachability_kl

from helpers import make_inputs

BACKENDS_HERE = ["torch"] + (["triton"] if backends.available("triton", torch.device("cpu"))[0] else [])


def _grad_inputs(inputs):
    inputs = {k: v.clone() for k, v in inputs.items()}
    inputs["student_hidden"].requires_grad_()
    inputs["student_weight"].requires_grad_()
    return inputs


# ---------------------------------------------------------------------------------------------------
# Host syncs


class _SyncCounter(TorchDispatchMode):
    """Counts the ops that make the host wait for the device: data-dependent output sizes (nonzero,
    unique, masked_select, boolean-mask indexing) and scalar reads (.item(), bool(), int(), float())."""

    SYNC_OPS = {"nonzero", "_local_scalar_dense", "masked_select", "unique", "_unique", "_unique2",
                "unique_dim", "unique_consecutive", "nonzero_static_fallback"}

    def __init__(self):
        super().__init__()
        self.seen = []
        self.paused = False  # inside a counted tolist(), whose per-element reads are that one transfer

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name.split("::")[-1]
        if self.paused:
            pass
        elif name in self.SYNC_OPS:
            self.seen.append(name)
        elif name in ("index", "index_put", "index_put_") and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool
                for i in (args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else [])):
            self.seen.append(f"{name}[bool mask]")
        return func(*args, **kwargs)


@contextmanager
def count_syncs():
    """Also counts Tensor.tolist(), which reads device memory without an op the dispatcher sees."""
    counter = _SyncCounter()
    original = torch.Tensor.tolist

    def tolist(self):
        if counter.paused:
            return original(self)
        counter.seen.append("tolist")
        counter.paused = True
        try:
            return original(self)
        finally:
            counter.paused = False

    torch.Tensor.tolist = tolist
    try:
        with counter:
            yield counter.seen
    finally:
        torch.Tensor.tolist = original


@pytest.mark.parametrize("backend", BACKENDS_HERE)
@pytest.mark.parametrize("size", [(4, 16, 300), (6, 40, 1100)])
@pytest.mark.parametrize("finite_check", [False, True])
def test_one_forward_backward_has_at_most_two_host_syncs(backend, size, finite_check):
    b, t, v = size
    inputs = _grad_inputs(make_inputs(leading=(b, t), v_s=v, seed=1))
    g = torch.Generator().manual_seed(0)
    valid = torch.rand(b, t, generator=g) < 0.7
    sampled = torch.randint(0, v, (b, t), generator=g)
    for estimator in ("full", "sampled"):
        with count_syncs() as seen:
            loss, _ = fused_teachability_kl(**inputs, valid_mask=valid, sampled_ids=sampled, estimator=estimator,
                                            keep_ratio=0.1, backend=backend, check_finite=finite_check,
                                            chunk_vocab=128 if backend == "torch" else None)
            loss.backward()
        assert len(seen) <= 2, f"{estimator}: {seen}"


def test_reusing_statistics_costs_at_most_two_syncs_too():
    """The driver's pattern: statistics without selection, a global keep mask, the loss with stats=."""
    inputs = _grad_inputs(make_inputs(leading=(3, 20), v_s=400, seed=2))
    with count_syncs() as seen_stats:
        st = teachability_stats(**{k: v.detach() for k, v in inputs.items()}, strategy=None, backend="torch")
    keep = torch.zeros(3, 20, dtype=torch.bool)
    keep[:, ::7] = True
    with count_syncs() as seen_loss:
        loss, _ = fused_teachability_kl(**inputs, stats=st, keep_mask=keep, normalizer=9.0, backend="torch",
                                        check_finite=False)
        loss.backward()
    assert len(seen_stats) <= 2 and len(seen_loss) <= 2, (seen_stats, seen_loss)


# ---------------------------------------------------------------------------------------------------
# Gradients at large |z| / tau


@pytest.mark.parametrize("backend", BACKENDS_HERE)
@pytest.mark.parametrize("estimator", ["full", "sampled"])
@pytest.mark.parametrize("scale,temperature", [(1e2, 1.0), (1e3, 1.0), (1e4, 1.0), (1e6, 1.0), (3.0, 1e-3)])
def test_gradients_at_large_logit_scale(backend, estimator, scale, temperature):
    """|z| / tau in {1e2, 1e3, 1e4, 1e6} (and 3e3 from a small temperature): the kernel's gradient is no
    worse than naive float32 autograd, both against float64 autograd on the same float32 inputs."""
    inputs = make_inputs(n=24, v_s=300, d_s=16, d_t=24, seed=3, scale=scale)
    sampled = torch.randint(0, 300, (24,), generator=torch.Generator().manual_seed(5))
    kw = dict(sampled_ids=sampled, estimator=estimator, temperature=temperature)
    ours = _grad_inputs(inputs)
    loss, stats = fused_teachability_kl(**ours, keep_ratio=0.25, backend=backend, **kw)
    loss.backward()
    kept = stats.kept

    def reference_grads(dtype):
        inp = _grad_inputs({k: v.to(dtype) for k, v in inputs.items()})
        ref, _ = reference_teachability_kl(**inp, keep_mask=kept, dtype=dtype, **kw)
        return torch.autograd.grad(ref, [inp["student_hidden"], inp["student_weight"]])

    truth = reference_grads(torch.float64)
    naive = reference_grads(torch.float32)
    # The float32 rounding of forming g = (z_s - z_t) / tau per entry: |dg| <= 2 eps |z / tau|_max. Since
    # sum_v p_s(v) = 1 and each row's coefficient is 1 / kept, it moves dh by at most
    # 2 eps |z/tau|_max max|W_s| / kept per row and dW by at most 2 eps |z/tau|_max max|h_s| (the kept rows'
    # coefficients sum to 1). The sampled estimator's weight logp_s(y) - logp_t(y) rounds the same way.
    eps = torch.finfo(torch.float32).eps
    z_max = max(stats.lse_student[kept].abs().max().item(), stats.lse_teacher[kept].abs().max().item())
    z_max = max(z_max, (inputs["student_hidden"] @ inputs["student_weight"].T).abs().max().item() / temperature)
    n_kept = int(kept.sum())
    bounds = (2 * eps * z_max * inputs["student_weight"].abs().max().item() / n_kept,
              2 * eps * z_max * inputs["student_hidden"].abs().max().item())
    for got, want, base, bound, name in zip((ours["student_hidden"].grad, ours["student_weight"].grad), truth,
                                            naive, bounds, ("student_hidden", "student_weight")):
        err = (got.double() - want).abs().max().item()
        err_naive = (base.double() - want).abs().max().item()
        assert math.isfinite(err) and err <= 2 * err_naive + bound, (name, err, err_naive, bound)


# ---------------------------------------------------------------------------------------------------
# Statistics reused with other options or inputs


def test_reused_statistics_must_match_the_call():
    inputs = make_inputs(n=20, v_s=300, seed=4)
    st = teachability_stats(**inputs, temperature=2.0, backend="torch")
    kept_before = st.kept.clone()
    cases = [
        (dict(temperature=1.0), "temperature"),
        (dict(temperature=2.0, vocab_size=250), "vocab_size"),
        (dict(temperature=2.0, top_k=8), "top_k"),
        (dict(temperature=2.0, valid_mask=torch.arange(20) < 10), "valid_mask"),
        (dict(temperature=2.0, sampled_ids=torch.zeros(20, dtype=torch.long)), "sampled_ids"),
    ]
    for extra, key in cases:
        with pytest.raises(ValueError, match=key):
            fused_teachability_kl(**inputs, stats=st, backend="torch", **extra)
    other = make_inputs(n=20, v_s=300, d_s=8, seed=4)
    with pytest.raises(ValueError, match="inputs"):
        fused_teachability_kl(**other, stats=st, temperature=2.0, backend="torch")
    with_ids = teachability_stats(**inputs, sampled_ids=torch.ones(20, dtype=torch.long), backend="torch")
    with pytest.raises(ValueError, match="sampled_ids"):
        fused_teachability_kl(**inputs, stats=with_ids, sampled_ids=torch.full((20,), 2), backend="torch")
    # Legitimate reuse works and never changes the caller's object.
    loss, out = fused_teachability_kl(**inputs, stats=st, temperature=2.0, keep_ratio=0.5, backend="torch")
    assert torch.equal(st.kept, kept_before) and out.kept.sum() > st.kept.sum()


# ---------------------------------------------------------------------------------------------------
# Rows without a finite logit, infinite losses, overflow


def test_rows_without_a_finite_logit_are_not_valid():
    inputs = _grad_inputs(make_inputs(n=10, v_s=120, bias=True, seed=5))
    inputs["student_bias"] = torch.full((120,), -math.inf)  # the student can emit nothing
    loss, stats = fused_teachability_kl(**inputs, backend="torch")
    loss.backward()
    assert loss.item() == 0.0 and not stats.valid.any() and stats.dropped.all()
    assert inputs["student_weight"].grad.abs().sum() == 0

    zs, zt = torch.randn(5, 40), torch.randn(5, 40)
    zs[2] = -math.inf
    zs.requires_grad_()
    loss, stats = teachability_kl_from_logits(zs, zt, top_k=4, strategy="all", backend="torch")
    loss.backward()
    assert stats.dropped.tolist() == [False, False, True, False, False]
    assert torch.isfinite(loss) and torch.isfinite(zs.grad).all() and zs.grad[2].abs().sum() == 0
    keep = torch.tensor([True, True, False, True, True])
    ref, _ = reference_teachability_kl(zs.detach()[keep].double(), torch.eye(40, dtype=torch.float64),
                                       zt[keep].double(), torch.eye(40, dtype=torch.float64), strategy="all",
                                       top_k=4, dtype=torch.float64)
    assert abs(loss.item() - ref.item()) < 1e-5


def test_teacher_mass_zero_where_the_student_has_mass_is_a_clear_error():
    inputs = make_inputs(n=8, v_s=100, bias=True, seed=6)
    inputs["teacher_bias"] = torch.full((100,), -math.inf)
    inputs["teacher_bias"][3] = 0.0
    with pytest.raises(ValueError, match="loss is infinite"):
        fused_teachability_kl(**inputs, backend="torch")


@pytest.mark.parametrize("temperature", [1e-40, 1e-300, 1e300, 0.0, -1.0, math.inf, math.nan])
def test_temperatures_whose_reciprocal_is_not_a_float32_are_refused(temperature):
    with pytest.raises(ValueError, match="temperature"):
        fused_teachability_kl(**make_inputs(n=4, v_s=50), temperature=temperature, backend="torch")


@pytest.mark.parametrize("dtype,size", [(torch.float32, 1e20), (torch.bfloat16, 1e19)])
def test_logits_that_overflow_float32_are_caught(dtype, size):
    inputs = make_inputs(n=6, v_s=80, seed=8)
    inputs["student_weight"] = (inputs["student_weight"] * size).to(dtype)
    inputs["student_hidden"] = (inputs["student_hidden"] * size).to(dtype)
    with pytest.raises(ValueError, match="overflow"):
        fused_teachability_kl(**inputs, backend="torch")


# ---------------------------------------------------------------------------------------------------
# Types and ranges


def test_bad_types_and_ranges_name_the_argument():
    inputs = make_inputs(n=6, v_s=60)
    if hasattr(torch, "float8_e4m3fn"):
        with pytest.raises(TypeError, match="student_weight.*floating-point"):
            fused_teachability_kl(**{**inputs, "student_weight": inputs["student_weight"].to(torch.float8_e4m3fn)})
    with pytest.raises(ValueError, match="hidden size 0"):
        fused_teachability_kl(torch.zeros(6, 0), torch.zeros(60, 0), inputs["teacher_hidden"],
                              inputs["teacher_weight"])
    with pytest.raises(ValueError, match="seed"):
        fused_teachability_kl(**inputs, strategy="random", seed=2 ** 70)
    st = teachability_stats(**make_inputs(leading=(2, 5), v_s=60), backend="torch")
    with pytest.raises(ValueError, match="sequence_ids must have shape"):
        select_positions(st, sequence_ids=torch.zeros(7, dtype=torch.long))
    with pytest.raises(TypeError, match="sequence_ids must be a torch.Tensor"):
        select_positions(st, sequence_ids={"a": 1})
    with pytest.raises(TypeError, match="sequence_ids must be an integer tensor"):
        select_positions(st, sequence_ids=torch.zeros(2, 5))
    with pytest.raises(TypeError, match="top_k must be an int"):
        fused_teachability_kl(**inputs, top_k=4.5)


def test_numpy_scalars_and_zero_dim_tensors_are_numbers():
    inputs = make_inputs(n=30, v_s=200, seed=9)
    plain = dict(keep_ratio=0.2, top_k=8, vocab_size=190, temperature=1.5, seed=3, strategy="random")
    want, st_want = fused_teachability_kl(**inputs, **plain, normalizer=4.0, backend="torch")
    # (float64 0-d tensors: a float32 tensor(0.2) is 0.2000000030, which rightly keeps ceil(6.0000001) = 7 of 30.)
    for convert in (lambda x: np.float64(x) if isinstance(x, float) else np.int64(x),
                    lambda x: torch.tensor(x, dtype=torch.float64 if isinstance(x, float) else torch.int64)):
        given = {k: (convert(v) if not isinstance(v, str) else v) for k, v in plain.items()}
        got, st_got = fused_teachability_kl(**inputs, **given, normalizer=convert(4.0), backend="torch")
        assert torch.equal(st_got.kept, st_want.kept) and got.item() == want.item()


# ---------------------------------------------------------------------------------------------------
# Autograd


def test_double_backward_raises_and_teacher_changes_are_caught():
    inputs = _grad_inputs(make_inputs(n=12, v_s=90, seed=10))
    loss, _ = fused_teachability_kl(**inputs, keep_ratio=0.5, backend="torch")
    with pytest.raises(RuntimeError, match="second-order"):
        torch.autograd.grad(loss, inputs["student_hidden"], create_graph=True)
    loss, _ = fused_teachability_kl(**inputs, keep_ratio=0.5, backend="torch")
    with torch.no_grad():
        inputs["teacher_weight"].add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_reused_statistics_of_other_tensor_values_are_caught_in_the_forward(backend):
    """Same shapes and options, other values: the inputs' fingerprints give it away, before any backward."""
    inputs = make_inputs(n=20, v_s=300, seed=11)
    st = teachability_stats(**inputs, backend=backend)
    other = _grad_inputs(make_inputs(n=20, v_s=300, seed=12))
    with pytest.raises(ValueError, match="computed from another student_hidden"):
        fused_teachability_kl(**other, stats=st, keep_ratio=0.2, backend=backend)
    # The same values (the driver's pattern: hidden states recomputed with gradients) pass.
    same = _grad_inputs(inputs)
    loss, _ = fused_teachability_kl(**same, stats=st, keep_ratio=0.2, backend=backend)
    loss.backward()
    assert same["student_weight"].grad.abs().sum() > 0
