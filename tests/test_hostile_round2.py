"""The loss head's second round of hostile input (issue 24): stale statistics caught in the forward on both
sides, legal input that gave a wrong result or a deep crash, and the module / CLI a Liger or TRL user
expects. Each case gives the right result (against the float64 reference) or a clear error naming the
argument."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from helpers import make_inputs

import taopd_kernels
from taopd_kernels import (
    TeachabilityKLLoss,
    TeachabilityStats,
    fused_teachability_kl,
    select_across,
    select_top,
    strategy_scores,
    teachability_kl_from_logits,
    teachability_kl_loss,
    teachability_stats,
)
from taopd_kernels.reference import reference_teachability_kl

OPTS = dict(backend="torch", keep_ratio=0.2, top_k=4)


def _grad(inputs):
    inputs = {k: v.clone() for k, v in inputs.items()}
    for name in ("student_hidden", "student_weight", "student_bias"):
        if name in inputs:
            inputs[name].requires_grad_(True)
    return inputs


# ---------------------------------------------------------------------------------- stale statistics


@pytest.mark.parametrize("changed", ["teacher_hidden", "teacher_weight", "student_weight", "teacher_bias",
                                     "student_bias"])
def test_statistics_of_another_tensor_are_refused_in_the_forward(changed):
    inputs = make_inputs(n=24, v_s=200, bias=True, seed=1)
    st = teachability_stats(**inputs, **OPTS)
    other = dict(inputs)
    other[changed] = make_inputs(n=24, v_s=200, bias=True, seed=2)[changed]
    with pytest.raises(ValueError, match=f"another {changed}"):
        fused_teachability_kl(**other, stats=st, **OPTS)
    with torch.no_grad(), pytest.raises(ValueError, match=f"another {changed}"):
        fused_teachability_kl(**other, stats=st, **OPTS)


def test_stale_student_rows_outside_the_kept_set_are_refused():
    """Only rows the (stale) selection leaves out differ: spot checks of kept rows cannot see it."""
    inputs = make_inputs(n=24, v_s=200, seed=3)
    st = teachability_stats(**inputs, **OPTS)
    other = dict(inputs)
    h = inputs["student_hidden"].clone()
    h[~st.kept] += 0.5
    other["student_hidden"] = h
    with torch.no_grad(), pytest.raises(ValueError, match="another student_hidden"):
        fused_teachability_kl(**other, stats=st, **OPTS)


def test_legitimate_reuse_passes_also_when_recomputed_in_other_chunks():
    inputs = make_inputs(n=24, v_s=200, seed=4)
    st = teachability_stats(**inputs, chunk_rows=5, **OPTS)
    g = _grad(inputs)
    g["student_hidden"] = (g["student_hidden"] * 3.0) / 3.0  # not bit-identical, within rounding
    loss, _ = fused_teachability_kl(**g, stats=st, **OPTS)
    loss.backward()
    fresh, _ = fused_teachability_kl(**inputs, **OPTS)
    torch.testing.assert_close(loss.detach(), fresh, atol=1e-5, rtol=1e-5)


def test_concatenated_statistics_cannot_be_reused_and_concat_of_nothing_is_clear():
    with pytest.raises(ValueError, match="at least one"):
        TeachabilityStats.concat([])


def test_select_across_refuses_parts_of_other_options():
    inputs = make_inputs(leading=(2, 6), v_s=200, seed=5)
    loss_fn = TeachabilityKLLoss(backend="torch", top_k=4)
    a = loss_fn.statistics(inputs["student_hidden"], inputs["student_weight"], inputs["teacher_hidden"],
                           inputs["teacher_weight"])
    for option, kwargs in (("temperature", dict(temperature=2.0)), ("top_k", dict(top_k=8)),
                           ("vocab_size", dict(vocab_size=150))):
        b = TeachabilityKLLoss(backend="torch", **{"top_k": 4, **kwargs}).statistics(
            inputs["student_hidden"], inputs["student_weight"], inputs["teacher_hidden"], inputs["teacher_weight"])
        with pytest.raises(ValueError, match=option):
            select_across([a, b])
    c = teachability_stats(**inputs, sampled_ids=torch.zeros(2, 6, dtype=torch.long), strategy=None, top_k=4,
                           backend="torch")
    with pytest.raises(ValueError, match="sampled"):
        select_across([a, c])


# ------------------------------------------------------------------- legal input, wrong output or crash


def test_zero_dim_tensor_normalizer():
    inputs = _grad(make_inputs(n=16, v_s=150, seed=6))
    loss, st = fused_teachability_kl(**inputs, normalizer=torch.tensor(4.0), **OPTS)
    loss.backward()
    ref, _ = reference_teachability_kl(**inputs, keep_mask=st.kept, top_k=4, dtype=torch.float64)
    torch.testing.assert_close(loss.double(), ref.double() * st.num_kept / 4.0, atol=1e-5, rtol=1e-5)
    assert inputs["student_hidden"].grad.dtype == torch.float32


def test_zero_row_weight_on_a_row_with_minus_inf_teacher_logits_gives_finite_gradients():
    inputs = _grad(make_inputs(n=10, v_s=120, bias=True, seed=7))
    bias_t = inputs["teacher_bias"].clone()
    bias_t[:60] = -math.inf  # the teacher gives probability 0 to tokens the student emits: KL = inf there
    weight = torch.zeros(10)
    loss, st = fused_teachability_kl(**{**inputs, "teacher_bias": bias_t}, row_weight=weight, **OPTS)
    assert loss.item() == 0.0 and st.num_kept > 0
    loss.backward()
    for name in ("student_hidden", "student_weight", "student_bias"):
        assert torch.equal(inputs[name].grad, torch.zeros_like(inputs[name])), name


def test_reduction_none_with_nan_upstream_gradient_at_unkept_rows():
    inputs = _grad(make_inputs(leading=(2, 8), v_s=150, seed=8))
    labels = torch.randint(0, 150, (2, 8), generator=torch.Generator().manual_seed(0))
    rows = TeachabilityKLLoss(reduction="none", **OPTS)(inputs["student_hidden"], inputs["student_weight"],
                                                        inputs["teacher_hidden"], inputs["teacher_weight"], labels)
    kept = rows != 0
    count = kept.sum()
    torch.where(kept, rows / count, torch.zeros_like(rows)).sum().backward()
    assert torch.isfinite(inputs["student_hidden"].grad).all()


@pytest.mark.parametrize("where", ["inputs", "stats", "num_items_in_batch"])
def test_meta_device_is_a_clear_error(where):
    inputs = make_inputs(n=8, v_s=100, seed=9)
    if where == "inputs":
        with pytest.raises(ValueError, match="meta"):
            fused_teachability_kl(**{k: v.to("meta") for k, v in inputs.items()}, **OPTS)
    elif where == "stats":
        st = teachability_stats(**inputs, **OPTS).to("meta")
        with pytest.raises(ValueError, match="stats are on meta"):
            fused_teachability_kl(**inputs, stats=st, **OPTS)
    else:
        with pytest.raises(ValueError, match="num_items_in_batch.*meta"):
            teachability_kl_loss(*[inputs[k] for k in ("student_hidden", "student_weight", "teacher_hidden",
                                                       "teacher_weight")], num_items_in_batch=torch.tensor(3.0, device="meta"), **OPTS)


def test_select_top_checks_its_arguments():
    score, valid = torch.rand(10), torch.ones(10, dtype=torch.bool)
    with pytest.raises(ValueError, match="valid"):
        select_top(score, torch.ones(12, dtype=torch.bool), keep_ratio=0.5)
    with pytest.raises(ValueError, match="sequence_ids"):
        select_top(score, valid, keep_ratio=0.5, sequence_ids=torch.zeros(3, dtype=torch.long))
    for bad in (float("nan"), 5.0, 0.0):
        with pytest.raises(ValueError, match="keep_ratio"):
            select_top(score, valid, keep_ratio=bad)
    with pytest.raises(ValueError, match="min_per_sequence"):
        select_top(score, valid, keep_ratio=0.5, min_per_sequence=-1)


def test_random_strategy_seed_out_of_range_names_seed():
    with pytest.raises(ValueError, match="seed"):
        strategy_scores("random", entropy=torch.zeros(4), disagreement=torch.zeros(4), teacher_mass=torch.zeros(4),
                        valid=torch.ones(4, dtype=torch.bool), seed=2 ** 70)


def test_numpy_integer_num_items_in_batch_and_empty_batch_with_shift():
    inputs = make_inputs(leading=(2, 6), v_s=100, seed=10)
    args = [inputs[k] for k in ("student_hidden", "student_weight", "teacher_hidden", "teacher_weight")]
    labels = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(1))
    a, _ = teachability_kl_loss(*args, labels, num_items_in_batch=np.int64(7), **OPTS)
    b, _ = teachability_kl_loss(*args, labels, num_items_in_batch=7, **OPTS)
    assert torch.equal(a, b)
    empty = make_inputs(leading=(2, 0), v_s=100, seed=10)
    eargs = [empty[k] for k in ("student_hidden", "student_weight", "teacher_hidden", "teacher_weight")]
    loss, st = teachability_kl_loss(*eargs, torch.zeros(2, 0, dtype=torch.long), shift_labels=True, **OPTS)
    assert loss.item() == 0.0 and st.num_valid == 0


def test_huge_finite_logits_say_what_overflows():
    inputs = make_inputs(n=6, v_s=50, seed=11)
    zs = inputs["student_hidden"] @ inputs["student_weight"].T
    zt = inputs["teacher_hidden"] @ inputs["teacher_weight"].T
    zs[:, 0], zt[:, 0] = 3e38, -3e38
    with pytest.raises(ValueError, match="overflow"):
        teachability_kl_from_logits(zs, zt, backend="torch", top_k=4)


# ------------------------------------------------------------------------------- a Liger / TRL user


def _module_args(seed=12, v_s=150, v_t=None):
    inputs = _grad(make_inputs(leading=(2, 8), v_s=v_s, v_t=v_t, seed=seed))
    return inputs, [inputs[k] for k in ("student_hidden", "student_weight", "teacher_hidden", "teacher_weight")]


def test_module_returns_the_loss_and_stats_on_request():
    inputs, args = _module_args()
    loss_fn = TeachabilityKLLoss(**OPTS)
    loss = loss_fn(*args)
    assert isinstance(loss, torch.Tensor) and loss.dim() == 0
    loss.backward()
    loss2, st = loss_fn(*args, return_stats=True)
    assert isinstance(st, TeachabilityStats) and torch.equal(loss.detach(), loss2.detach())
    doc = TeachabilityKLLoss.forward.__doc__
    for section in ("Args", "Shapes", "Returns", "Raises", "Example"):
        assert section in doc, section


@pytest.mark.parametrize("bad", [dict(strategy="TA-OPD"), dict(keep_ratio=0.0), dict(top_k=0),
                                 dict(estimator="kl"), dict(temperature=-1.0), dict(backend="gpu"),
                                 dict(seed=2 ** 70), dict(ignore_index=1.5), dict(reduction="avg")])
def test_module_options_are_checked_at_construction(bad):
    with pytest.raises((ValueError, TypeError), match=next(iter(bad))):
        TeachabilityKLLoss(**bad)


def test_logits_passed_as_hidden_states_get_a_hint():
    inputs = make_inputs(n=6, v_s=50, seed=13)
    zs = inputs["student_hidden"] @ inputs["student_weight"].T
    zt = inputs["teacher_hidden"] @ inputs["teacher_weight"].T
    with pytest.raises(ValueError, match="teachability_kl_from_logits"):
        fused_teachability_kl(zs, inputs["student_weight"], zt, inputs["teacher_weight"], **OPTS)


def test_different_vocabularies_warn_once():
    _, args = _module_args(seed=14, v_s=150, v_t=157)
    from taopd_kernels import options
    options._WARNED_VOCABS.clear()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for _ in range(2):
            fused_teachability_kl(*[a.detach() for a in args], **OPTS)
    hits = [w for w in seen if "vocab" in str(w.message)]
    assert len(hits) == 1 and "150" in str(hits[0].message) and "157" in str(hits[0].message)


def test_liger_style_shift_labels_tensor():
    _, args = _module_args(seed=15)
    labels = torch.randint(0, 150, (2, 8), generator=torch.Generator().manual_seed(2))
    loss_fn = TeachabilityKLLoss(**OPTS)
    a = loss_fn(*args, shift_labels=labels)
    b = loss_fn(*args, labels)
    assert torch.equal(a.detach(), b.detach())
    with pytest.raises(TypeError, match="shift_labels"):
        loss_fn(*args, labels, shift_labels=labels)


def test_hf_num_items_in_batch_keeps_the_scale_of_the_mean_over_kept():
    _, args = _module_args(seed=16)
    labels = torch.randint(0, 150, (2, 8), generator=torch.Generator().manual_seed(3))
    loss_fn = TeachabilityKLLoss(**OPTS)
    mean, st = loss_fn(*args, labels, return_stats=True)
    # HF Trainer passes the number of label tokens: one micro-batch gives the mean over kept exactly.
    hf = loss_fn(*args, labels, num_items_in_batch=int((labels != -100).sum()))
    torch.testing.assert_close(hf, mean)
    # The explicit global kept count (select_across) is ``normalizer``.
    summed = loss_fn(*args, labels, normalizer=2 * st.num_kept)
    torch.testing.assert_close(summed, mean / 2)


def test_fullgraph_compile_with_an_explicit_backend_names_the_sync():
    inputs = make_inputs(n=8, v_s=100, seed=17)

    def f(h_s, w_s, h_t, w_t):
        return fused_teachability_kl(h_s, w_s, h_t, w_t, **OPTS)[0]

    compiled = torch.compile(f, fullgraph=True, backend="eager")
    with pytest.raises(Exception, match="host sync"):
        compiled(*[inputs[k] for k in ("student_hidden", "student_weight", "teacher_hidden", "teacher_weight")])
    from taopd_kernels import backends
    assert "importlib" not in backends.module.__code__.co_names


def test_fused_docstring_says_what_the_loss_is():
    doc = fused_teachability_kl.__doc__
    assert "mean over the kept positions" in doc and "Example" in doc and "Raises" in doc
    assert "~/.cache/taopd" in doc


def test_partitioned_lm_head_weight_gets_a_gather_hint():
    from taopd_kernels import hf

    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(0))

    class Model(torch.nn.Module):
        config = type("C", (), {})()

        def get_output_embeddings(self):
            return Head()

    with pytest.raises(TypeError, match="GatheredParameters"):
        hf.lm_head_params(Model())


def test_version_and_changelog():
    import pathlib
    assert taopd_kernels.__version__ != "0.1.0"
    root = pathlib.Path(__file__).resolve().parents[1]
    assert taopd_kernels.__version__ in (root / "CHANGELOG.md").read_text()
    assert f'version = "{taopd_kernels.__version__}"' in (root / "pyproject.toml").read_text()
