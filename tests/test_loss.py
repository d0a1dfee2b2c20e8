"""TeachabilityKLLoss / teachability_kl_loss / select_across against hand-built masks and the float64
reference (docs/math.md, Loss and gradients; Scores and selection).

Tolerances are those of tests/test_core.py: the loss head accumulates in float32 and the reference
is float64 autograd, so losses agree to ~1e-5 and gradients to atol 1e-6 / rtol 1e-4.
"""

import pytest
import torch
from helpers import make_inputs

from taopd_kernels import (
    TeachabilityKLLoss,
    fused_teachability_kl,
    labels_to_positions,
    select_across,
    teachability_kl_loss,
)
from taopd_kernels.reference import reference_logits, reference_teachability_kl

V = 301
TILES = dict(backend="torch", chunk_rows=13, chunk_vocab=128)
LOSS_ATOL, GRAD = dict(atol=1e-5, rtol=1e-5), dict(atol=1e-6, rtol=1e-4)


def _inputs(b=3, t=10, seed=0, bias=True):
    inputs = make_inputs(leading=(b, t), v_s=V, v_t=V + 7, bias=bias, seed=seed)
    for name in ("student_hidden", "student_weight", "student_bias"):
        if name in inputs:
            inputs[name].requires_grad_(True)
    return inputs


def _labels(b=3, t=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, V, (b, t), generator=g)
    labels[0, :4] = -100  # a prompt
    labels[1, -3:] = -100  # padding
    return labels


def _args(inputs):
    return (inputs["student_hidden"], inputs["student_weight"], inputs["teacher_hidden"], inputs["teacher_weight"])


def _kw(inputs):
    return dict(student_bias=inputs.get("student_bias"), teacher_bias=inputs.get("teacher_bias"))


def _params(inputs):
    return [inputs[n] for n in ("student_hidden", "student_weight", "student_bias") if n in inputs]


def _grads(loss, inputs):
    return torch.autograd.grad(loss, _params(inputs), retain_graph=True)


def _reference_rows(inputs, kept, *, estimator="full", sampled_ids=None, temperature=1.0):
    """float64 per-row losses m_t l_t with autograd to the student (never used on big inputs)."""
    zs = reference_logits(inputs["student_hidden"], inputs["student_weight"], inputs.get("student_bias"), V,
                          temperature, torch.float64)
    zt = reference_logits(inputs["teacher_hidden"], inputs["teacher_weight"], inputs.get("teacher_bias"), V,
                          temperature, torch.float64).detach()
    lp_s, lp_t = torch.log_softmax(zs, -1), torch.log_softmax(zt, -1)
    if estimator == "full":
        rows = (lp_s.exp() * (lp_s - lp_t)).sum(-1)
    else:
        y = sampled_ids.reshape(-1, 1)
        a, b = lp_s.gather(1, y).squeeze(1), lp_t.gather(1, y).squeeze(1)
        rows = (a - b).detach() * a
    return torch.where(kept.reshape(-1), rows, torch.zeros_like(rows)).view(kept.shape)


# ------------------------------------------------------------------------------ module == function


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_module_equals_function(reduction):
    inputs, labels = _inputs(), _labels()
    module = TeachabilityKLLoss(keep_ratio=0.2, top_k=4, reduction=reduction, **TILES)
    loss_m, stats_m = module(*_args(inputs), labels, **_kw(inputs), return_stats=True)
    loss_f, stats_f = teachability_kl_loss(*_args(inputs), labels, **_kw(inputs), keep_ratio=0.2, top_k=4,
                                           reduction=reduction, **TILES)
    assert torch.equal(stats_m.kept, stats_f.kept)
    assert torch.equal(loss_m, loss_f)
    for a, b in zip(_grads(loss_m.sum(), inputs), _grads(loss_f.sum(), inputs)):
        assert torch.equal(a, b)
    assert "reduction=" in repr(module)


# ------------------------------------------------------------------------------------- labels


def test_labels_match_hand_built_masks():
    inputs, labels = _inputs(), _labels()
    valid = labels != -100
    ids = torch.where(valid, labels, 0)
    for estimator in ("full", "sampled"):
        loss, stats = teachability_kl_loss(*_args(inputs), labels, **_kw(inputs), keep_ratio=0.25, top_k=4,
                                           estimator=estimator, **TILES)
        want, want_stats = fused_teachability_kl(*_args(inputs), **_kw(inputs), valid_mask=valid, sampled_ids=ids,
                                                 keep_ratio=0.25, top_k=4, estimator=estimator, **TILES)
        assert torch.equal(stats.valid, valid) and torch.equal(stats.kept, want_stats.kept)
        assert torch.equal(loss, want)
        assert torch.equal(stats.logp_student_sampled.nan_to_num(), want_stats.logp_student_sampled.nan_to_num())
        for a, b in zip(_grads(loss, inputs), _grads(want, inputs)):
            assert torch.equal(a, b)


def test_shift_labels_matches_hand_shifted():
    inputs = _inputs()
    raw = _labels(seed=3)  # HF-style: raw[:, t] is the token AT position t
    loss, stats = teachability_kl_loss(*_args(inputs), raw, shift_labels=True, **_kw(inputs), keep_ratio=0.25,
                                       top_k=4, estimator="sampled", **TILES)
    shifted = torch.full_like(raw, -100)
    shifted[:, :-1] = raw[:, 1:]
    valid = shifted != -100
    want, want_stats = fused_teachability_kl(*_args(inputs), **_kw(inputs), valid_mask=valid,
                                             sampled_ids=torch.where(valid, shifted, 0), keep_ratio=0.25, top_k=4,
                                             estimator="sampled", **TILES)
    assert stats.valid.shape == raw.shape and not stats.valid[:, -1].any()
    assert torch.equal(stats.valid, valid) and torch.equal(stats.kept, want_stats.kept)
    assert torch.equal(loss, want)
    v2, ids2 = labels_to_positions(raw, raw.shape, V, shift_labels=True)
    assert torch.equal(v2, valid) and torch.equal(ids2, torch.where(valid, shifted, 0))


def test_custom_ignore_index_and_no_labels():
    inputs = _inputs()
    labels = _labels().masked_fill(_labels() == -100, 7 * V)  # a custom ignore value
    loss, stats = teachability_kl_loss(*_args(inputs), labels, ignore_index=7 * V, **_kw(inputs), **TILES)
    assert torch.equal(stats.valid, _labels() != -100)
    _, stats = teachability_kl_loss(*_args(inputs), None, **_kw(inputs), **TILES)
    assert bool(stats.valid.all())


@pytest.mark.parametrize("bad, err, text", [
    (lambda lab: lab.float(), TypeError, "labels must be an integer"),
    (lambda lab: lab.bool(), TypeError, "labels must be an integer"),
    (lambda lab: lab[:, :-1], ValueError, "labels must have shape"),
    (lambda lab: lab.index_put((torch.tensor([2]), torch.tensor([2])), torch.tensor(V)), ValueError, "labels must hold"),
    (lambda lab: lab.index_put((torch.tensor([2]), torch.tensor([2])), torch.tensor(-5)), ValueError, "labels must hold"),
    (lambda lab: [1, 2], TypeError, "labels must be"),
])
def test_label_errors_name_labels(bad, err, text):
    inputs = _inputs()
    with pytest.raises(err, match=text):
        teachability_kl_loss(*_args(inputs), bad(_labels()), **_kw(inputs), **TILES)


def test_option_errors():
    inputs = _inputs()
    with pytest.raises(ValueError, match="reduction"):
        TeachabilityKLLoss(reduction="avg")
    with pytest.raises(ValueError, match="num_items_in_batch"):
        teachability_kl_loss(*_args(inputs), _labels(), reduction="sum", num_items_in_batch=3, **TILES)
    with pytest.raises(ValueError, match="num_items_in_batch"):
        teachability_kl_loss(*_args(inputs), _labels(), num_items_in_batch=0, **TILES)
    with pytest.raises(ValueError, match="shift_labels"):
        teachability_kl_loss(*_args(inputs), None, shift_labels=True, **TILES)


# ---------------------------------------------------------------------------------- reductions


@pytest.mark.parametrize("estimator", ["full", "sampled"])
def test_reductions_match_reference(estimator):
    inputs, labels = _inputs(seed=5), _labels(seed=5)
    opts = dict(keep_ratio=0.3, top_k=4, estimator=estimator, temperature=1.3, **TILES)
    mean, stats = teachability_kl_loss(*_args(inputs), labels, **_kw(inputs), reduction="mean", **opts)
    kept, n = stats.kept, stats.num_kept
    valid = labels != -100
    ids = torch.where(valid, labels, 0)
    ref_mean, _ = reference_teachability_kl(**inputs, valid_mask=valid, sampled_ids=ids, keep_mask=kept,
                                            estimator=estimator, top_k=4, temperature=1.3, dtype=torch.float64)
    torch.testing.assert_close(mean, ref_mean, **LOSS_ATOL)
    for a, b in zip(_grads(mean, inputs), _grads(ref_mean, inputs)):
        torch.testing.assert_close(a, b, **GRAD)

    total, stats_s = teachability_kl_loss(*_args(inputs), labels, **_kw(inputs), reduction="sum", **opts)
    assert torch.equal(stats_s.kept, kept)
    torch.testing.assert_close(total, ref_mean * n, **LOSS_ATOL)
    for a, b in zip(_grads(total, inputs), _grads(ref_mean * n, inputs)):
        torch.testing.assert_close(a, b, atol=1e-6 * n, rtol=1e-4)

    items = 2 * n + 3
    scaled, _ = teachability_kl_loss(*_args(inputs), labels, **_kw(inputs), normalizer=torch.tensor(items), **opts)
    torch.testing.assert_close(scaled, ref_mean * n / items, **LOSS_ATOL)
    # HF Trainer's num_items_in_batch (label tokens): each kept row stands for N_valid / N_kept of them.
    hf, _ = teachability_kl_loss(*_args(inputs), labels, **_kw(inputs), num_items_in_batch=torch.tensor(items),
                                 **opts)
    torch.testing.assert_close(hf, ref_mean * int(valid.sum()) / items, **LOSS_ATOL)

    rows, stats_n = teachability_kl_loss(*_args(inputs), labels, **_kw(inputs), reduction="none", **opts)
    assert rows.shape == labels.shape and rows.dtype == torch.float32 and torch.equal(stats_n.kept, kept)
    assert bool((rows[~kept] == 0).all())
    ref_rows = _reference_rows(inputs, kept, estimator=estimator, sampled_ids=ids.reshape(-1), temperature=1.3)
    torch.testing.assert_close(rows.double(), ref_rows, **LOSS_ATOL)
    torch.testing.assert_close(rows.sum(), total, **LOSS_ATOL)
    # Arbitrary per-position weights (many distinct upstream gradients) and a plain sum.
    w = torch.rand(labels.shape, generator=torch.Generator().manual_seed(1))
    for weight in (w, torch.ones_like(w)):
        got = _grads((rows * weight).sum(), inputs)
        want = _grads((ref_rows * weight.double()).sum(), inputs)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=1e-6 * n, rtol=1e-4)


def test_none_reduction_unkept_rows_and_teacher_get_no_gradient():
    inputs, labels = _inputs(bias=False), _labels()
    inputs["teacher_hidden"].requires_grad_(True)
    rows, stats = teachability_kl_loss(*_args(inputs), labels, reduction="none", keep_ratio=0.1, **TILES)
    d_h, d_t = torch.autograd.grad(rows.sum(), [inputs["student_hidden"], inputs["teacher_hidden"]],
                                   allow_unused=True)
    assert d_t is None or bool((d_t == 0).all())
    assert bool((d_h[~stats.kept] == 0).all()) and bool((d_h[stats.kept] != 0).any())


# ----------------------------------------------------------------------- selection across batches


@pytest.mark.parametrize("strategy", ["teachability", "random", "all"])
def test_two_micro_batches_equal_one_batch(strategy):
    """One global selection over two micro-batches == one big batch: same kept set, loss and grads.

    The micro-batch losses differ from the one-batch loss only by float32 summation order (the per-row
    values are identical, the divisor is the same global count), so they agree to 1e-6; both are
    checked against the float64 reference with test_core's tolerances.
    """
    inputs, labels = _inputs(b=4, t=12, seed=9), _labels(b=4, t=12, seed=9)
    loss_fn = TeachabilityKLLoss(strategy=strategy, keep_ratio=0.1, top_k=4, min_per_sequence=2, **TILES)
    big, big_stats = loss_fn(*_args(inputs), labels, **_kw(inputs), return_stats=True)
    big_grads = _grads(big, inputs)

    halves = [slice(0, 2), slice(2, 4)]
    parts = {n: [inputs[n][s] for s in halves] for n in ("student_hidden", "teacher_hidden")}
    stats = [loss_fn.statistics(parts["student_hidden"][i], inputs["student_weight"], parts["teacher_hidden"][i],
                                inputs["teacher_weight"], labels[halves[i]], **_kw(inputs)) for i in range(2)]
    assert all(s.kept is None for s in stats)
    masks, normalizer = loss_fn.select_across(stats)
    assert torch.equal(torch.cat(masks), big_stats.kept)
    assert normalizer == big_stats.num_kept
    total = 0
    for i in range(2):
        loss, st = loss_fn(parts["student_hidden"][i], inputs["student_weight"], parts["teacher_hidden"][i],
                           inputs["teacher_weight"], labels[halves[i]], **_kw(inputs), keep_mask=masks[i],
                           normalizer=normalizer, stats=stats[i], return_stats=True)
        assert torch.equal(st.kept, masks[i])
        total = total + loss
    torch.testing.assert_close(total, big, atol=1e-6, rtol=1e-6)
    for a, b in zip(_grads(total, inputs), big_grads):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-5)

    valid = labels != -100
    ref, _ = reference_teachability_kl(**inputs, valid_mask=valid, keep_mask=big_stats.kept, top_k=4,
                                       dtype=torch.float64)
    torch.testing.assert_close(total, ref, **LOSS_ATOL)
    for a, b in zip(_grads(total, inputs), _grads(ref, inputs)):
        torch.testing.assert_close(a, b, **GRAD)


def test_select_across_flat_parts_and_errors():
    inputs = make_inputs(n=30, v_s=V)
    s = [TeachabilityKLLoss(**TILES).statistics(inputs["student_hidden"][a:b], inputs["student_weight"],
                                                inputs["teacher_hidden"][a:b], inputs["teacher_weight"])
         for a, b in ((0, 10), (10, 30))]
    masks, normalizer = select_across(s, keep_ratio=0.1)
    assert [m.shape for m in masks] == [(10,), (20,)] and normalizer == 3
    _, one = fused_teachability_kl(**inputs, keep_ratio=0.1, **TILES)
    assert torch.equal(torch.cat(masks), one.kept)
    with pytest.raises(ValueError, match="at least one"):
        select_across([])
    with pytest.raises(TypeError, match="TeachabilityStats"):
        select_across([object()])
