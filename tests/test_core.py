"""The torch backend and the public API against the float64 reference (docs/math.md (Per-position statistics; Scores and selection; Loss and gradients))."""

import math

import pytest
import torch
from helpers import STAT_FIELDS, assert_stats_close, make_inputs, max_err, naive_rows, truth_rows
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from taopd_kernels import (
    STRATEGIES,
    fused_teachability_kl,
    select_positions,
    teachability_kl_from_logits,
    teachability_stats,
)
from taopd_kernels.backends._tiles import keys_to_ids, keys_to_values, ordered_keys
from taopd_kernels.reference import reference_logits, reference_teachability_kl

SMALL_TILES = dict(chunk_rows=17, chunk_vocab=100)  # several row chunks and an odd vocabulary tail


def grads(loss, tensors):
    return torch.autograd.grad(loss, tensors, allow_unused=True)


def student_params(inputs, bias=True):
    names = ["student_hidden", "student_weight"] + (["student_bias"] if bias and "student_bias" in inputs else [])
    for name in names:
        inputs[name].requires_grad_(True)
    return [inputs[name] for name in names]


# ----------------------------------------------------------------------------------------------
# Statistics (docs/math.md, Per-position statistics)


@pytest.mark.parametrize("top_k", [1, 4, 16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_stats_match_reference(top_k, temperature):
    inputs = make_inputs(n=40, v_s=517, bias=True, seed=top_k)
    y = torch.randint(0, 517, (40,), generator=torch.Generator().manual_seed(1))
    stats = teachability_stats(**inputs, top_k=top_k, temperature=temperature, sampled_ids=y,
                               backend="torch", **SMALL_TILES)
    truth = truth_rows(inputs, top_k=top_k, temperature=temperature, sampled_ids=y)
    assert_stats_close(stats, truth)
    torch.testing.assert_close(stats.logp_student_sampled, truth.logp_student_sampled, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(stats.logp_teacher_sampled, truth.logp_teacher_sampled, atol=2e-5, rtol=1e-5)


def test_stats_ranges_and_identities():
    inputs = make_inputs(n=32, v_s=300)
    stats = teachability_stats(**inputs, backend="torch", **SMALL_TILES)
    assert (stats.kl_reverse >= -1e-6).all() and (stats.kl_forward >= -1e-6).all()
    assert (stats.disagreement >= -1e-6).all()
    assert ((stats.teacher_mass >= 0) & (stats.teacher_mass <= 1 + 1e-6)).all()
    assert ((stats.entropy_student >= 0) & (stats.entropy_student <= math.log(300) + 1e-5)).all()
    # Identical models: both KLs, D vanish, and C is the student's own top-K mass.
    same = dict(inputs, teacher_hidden=inputs["student_hidden"], teacher_weight=inputs["student_weight"])
    stats = teachability_stats(**same, backend="torch", **SMALL_TILES)
    assert stats.kl_reverse.abs().max() < 1e-5 and stats.kl_forward.abs().max() < 1e-5
    assert stats.disagreement.abs().max() < 1e-6
    assert torch.equal(stats.topk_ids_student, stats.topk_ids_teacher)


def test_teacher_mass_is_exact_not_the_intersection_bound():
    # The student's top-1 is a token the teacher does not rank in its own top-1 but gives real mass.
    zs = torch.tensor([[5.0, 0.0, 0.0, 0.0]])
    zt = torch.tensor([[1.0, 2.0, 0.0, 0.0]])
    _, stats = teachability_kl_from_logits(zs, zt, top_k=1, backend="torch")
    p_t = torch.softmax(zt.double(), -1)
    assert stats.teacher_mass.item() == pytest.approx(float(p_t[0, 0]), rel=1e-6)
    # D on U = {0, 1}: forward KL of the renormalised distributions.
    u = torch.tensor([0, 1])
    pb_t = torch.softmax(zt[0, u].double(), -1)
    pb_s = torch.softmax(zs[0, u].double(), -1)
    assert stats.disagreement.item() == pytest.approx(float((pb_t * (pb_t / pb_s).log()).sum()), rel=1e-5)


def test_topk_ties_go_to_the_lower_id():
    inputs = make_inputs(n=12, v_s=300, seed=5)
    # Make columns 10, 150 and 299 (the last, in the vocabulary tail) copies of column 200, in both
    # models, so that their logits are bit-identical to 200's in every row.
    for name in ("student_weight", "teacher_weight"):
        w = inputs[name]
        w[200] = w[200] * 4  # large, so the tied group is in every top-K
        for col in (10, 150, 299):
            w[col] = w[200]
    for top_k in (1, 2, 3, 5):
        stats = teachability_stats(**inputs, top_k=top_k, backend="torch", chunk_rows=5, chunk_vocab=64)
        truth = truth_rows(inputs, top_k=top_k)
        assert torch.equal(stats.topk_ids_student, truth.topk_ids_student)
        assert torch.equal(stats.topk_ids_teacher, truth.topk_ids_teacher)
    # Where the tied group tops a row, top-2 must be the two lowest ids of the group.
    zs = reference_logits(inputs["student_hidden"], inputs["student_weight"], None, 300, 1.0)
    tops = zs.argmax(-1)
    stats = teachability_stats(**inputs, top_k=2, backend="torch", chunk_rows=5, chunk_vocab=64)
    for row in torch.nonzero(torch.isin(tops, torch.tensor([10, 150, 200, 299]))).squeeze(1):
        assert stats.topk_ids_student[row].tolist() == [10, 150]


def test_all_equal_logits():
    zs = torch.zeros(3, 37)
    zt = torch.zeros(3, 37)
    _, stats = teachability_kl_from_logits(zs, zt, top_k=4, backend="torch", chunk_vocab=8)
    assert stats.topk_ids_student.tolist() == [[0, 1, 2, 3]] * 3
    torch.testing.assert_close(stats.entropy_student, torch.full((3,), math.log(37)))
    torch.testing.assert_close(stats.teacher_mass, torch.full((3,), 4 / 37))
    assert stats.kl_reverse.abs().max() < 1e-6 and stats.disagreement.abs().max() < 1e-7


def test_negative_infinite_logits():
    g = torch.Generator().manual_seed(0)
    zs = torch.randn(6, 50, generator=g) * 2
    zt = torch.randn(6, 50, generator=g) * 2
    zs[:, 40:] = -math.inf  # masked tokens of the student
    zt[:, 45:] = -math.inf  # teacher masks a subset of those
    zs[0, 5] = -math.inf
    _, stats = teachability_kl_from_logits(zs, zt, top_k=4, backend="torch", chunk_vocab=16)
    truth = truth_rows_from_logits(zs, zt, top_k=4)
    assert_stats_close(stats, truth, fields=("lse_student", "lse_teacher", "entropy_student", "kl_reverse",
                                             "teacher_mass", "disagreement"))
    assert torch.isfinite(stats.kl_reverse).all()  # student mass stays where the teacher has some
    # The teacher gives zero mass to 45..49 only where the student has none either; flip it and
    # the reverse KL is +inf, as it should be (not NaN); a loss over such positions is an error that
    # says why (docs/math.md, Conventions), and with nothing kept the statistics still show the +inf.
    with pytest.raises(ValueError, match="loss is infinite"):
        teachability_kl_from_logits(zt, zs, top_k=4, backend="torch", chunk_vocab=16)
    _, stats = teachability_kl_from_logits(zt, zs, top_k=4, backend="torch", chunk_vocab=16,
                                           keep_mask=torch.zeros(6, dtype=torch.bool))
    assert (stats.kl_reverse == math.inf).all()


def truth_rows_from_logits(zs, zt, top_k, temperature=1.0):
    from taopd_kernels.reference import reference_row_stats

    return reference_row_stats(zs.double() / temperature, zt.double() / temperature, top_k)


def test_vocab_mismatch_slices_both_models():
    # 151,936 vs 152,064 at small scale: the teacher has 8 extra padding rows.
    inputs = make_inputs(n=24, v_s=300, v_t=308, seed=2)
    inputs["teacher_weight"][300:] = 50.0  # huge padding logits would leak mass if not sliced
    stats = teachability_stats(**inputs, top_k=8, backend="torch", **SMALL_TILES)
    assert_stats_close(stats, truth_rows(inputs, top_k=8, vocab_size=300))
    assert int(stats.topk_ids_teacher.max()) < 300
    # An explicit vocab_size slices both.
    stats = teachability_stats(**inputs, top_k=8, vocab_size=250, backend="torch", **SMALL_TILES)
    assert_stats_close(stats, truth_rows(inputs, top_k=8, vocab_size=250))


def test_leading_batch_dims_and_mask():
    inputs = make_inputs(leading=(3, 11), v_s=200, seed=4)
    mask = torch.rand(3, 11, generator=torch.Generator().manual_seed(0)) < 0.7
    stats = teachability_stats(**inputs, valid_mask=mask, top_k=4, backend="torch", **SMALL_TILES)
    assert stats.kl_reverse.shape == (3, 11) and stats.topk_ids_student.shape == (3, 11, 4)
    assert torch.isnan(stats.kl_reverse[~mask]).all() and (stats.topk_ids_student[~mask] == -1).all()
    assert_stats_close(stats, truth_rows(inputs, top_k=4), mask=mask)
    assert not (stats.kept & ~mask).any()
    # Each sequence (row of the batch) with a valid position keeps at least one.
    for b in range(3):
        if mask[b].any():
            assert stats.kept[b].any()


def test_logits_path_matches_hidden_path():
    inputs = make_inputs(n=30, v_s=400, bias=True, seed=6)
    zs = reference_logits(inputs["student_hidden"], inputs["student_weight"], inputs["student_bias"], 400, 1.0)
    zt = reference_logits(inputs["teacher_hidden"], inputs["teacher_weight"], inputs["teacher_bias"], 400, 1.0)
    loss_h, stats_h = fused_teachability_kl(**inputs, top_k=8, keep_ratio=0.2, backend="torch", **SMALL_TILES)
    loss_z, stats_z = teachability_kl_from_logits(zs, zt, top_k=8, keep_ratio=0.2, backend="torch", **SMALL_TILES)
    for name in STAT_FIELDS:
        torch.testing.assert_close(getattr(stats_h, name), getattr(stats_z, name), atol=2e-5, rtol=2e-5)
    assert torch.equal(stats_h.kept, stats_z.kept)
    torch.testing.assert_close(loss_h, loss_z, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# Loss and gradients (docs/math.md, Loss and gradients)


@pytest.mark.parametrize("estimator", ["full", "sampled"])
@pytest.mark.parametrize("temperature", [1.0, 1.5])
def test_loss_and_gradients_match_autograd_reference(estimator, temperature):
    inputs = make_inputs(n=36, v_s=333, v_t=340, bias=True, seed=7)
    y = torch.randint(0, 333, (36,), generator=torch.Generator().manual_seed(2))
    params = student_params(inputs)
    loss, stats = fused_teachability_kl(**inputs, sampled_ids=y, estimator=estimator, temperature=temperature,
                                        top_k=4, keep_ratio=0.15, backend="torch", **SMALL_TILES)
    ref_loss, ref = reference_teachability_kl(**inputs, sampled_ids=y, estimator=estimator,
                                              temperature=temperature, top_k=4, keep_mask=stats.kept,
                                              dtype=torch.float64)
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads(loss, params), grads(ref_loss, params)):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)
    # The kept set is the one the reference selection picks from the same statistics.
    _, kept = select_positions(stats, strategy="teachability", keep_ratio=0.15)
    assert torch.equal(kept, stats.kept)
    assert stats.num_kept == math.ceil(0.15 * 36)


def test_unkept_rows_get_exactly_zero_and_teacher_gets_none():
    inputs = make_inputs(n=40, v_s=257, v_t=300, seed=8)
    inputs["teacher_hidden"].requires_grad_(True)
    inputs["teacher_weight"].requires_grad_(True)
    params = student_params(inputs)
    loss, stats = fused_teachability_kl(**inputs, keep_ratio=0.1, backend="torch", **SMALL_TILES)
    d_h, d_w = grads(loss, params)[:2]
    assert (d_h[~stats.kept] == 0).all() and (d_h[stats.kept].abs().sum(-1) > 0).all()
    assert d_w.shape == inputs["student_weight"].shape
    assert grads(loss, [inputs["teacher_hidden"], inputs["teacher_weight"]]) == (None, None)


def test_student_weight_padding_rows_get_zero_gradient():
    inputs = make_inputs(n=20, v_s=260, v_t=250, seed=9)
    params = student_params(inputs)
    loss, _ = fused_teachability_kl(**inputs, keep_ratio=0.5, backend="torch", **SMALL_TILES)
    d_w = grads(loss, params)[1]
    assert (d_w[250:] == 0).all() and d_w[:250].abs().sum() > 0


def test_full_token_opd_equals_plain_reverse_kl_mean():
    inputs = make_inputs(n=25, v_s=300, seed=10)
    mask = torch.ones(25, dtype=torch.bool)
    mask[::4] = False
    loss, stats = fused_teachability_kl(**inputs, valid_mask=mask, strategy="all", backend="torch", **SMALL_TILES)
    truth = truth_rows(inputs)
    assert torch.equal(stats.kept, mask)
    assert loss.item() == pytest.approx(float(truth.kl_reverse[mask].double().mean()), rel=1e-5)


def test_full_token_opd_equals_trl_generalized_jsd_beta_1():
    pytest.importorskip("trl")
    try:  # trl >= 1.0 moved GKD to trl.experimental
        from trl.experimental.gkd.gkd_trainer import GKDTrainer
    except ImportError:
        from trl.trainer.gkd_trainer import GKDTrainer
    inputs = make_inputs(leading=(2, 9), v_s=300, seed=11)
    labels = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    labels[0, :3] = -100  # prompt positions
    params = student_params(inputs)
    loss, _ = fused_teachability_kl(**inputs, valid_mask=labels != -100, strategy="all", estimator="full",
                                    backend="torch", **SMALL_TILES)
    zs = inputs["student_hidden"] @ inputs["student_weight"].T
    zt = inputs["teacher_hidden"] @ inputs["teacher_weight"].T
    trl_loss = GKDTrainer.generalized_jsd_loss(zs, zt, labels=labels, beta=1.0)
    torch.testing.assert_close(loss, trl_loss, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads(loss, params), grads(trl_loss, params)):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_runs_and_keeps_the_right_count(strategy):
    inputs = make_inputs(leading=(4, 10), v_s=128, seed=12)
    mask = torch.ones(4, 10, dtype=torch.bool)
    mask[:, :3] = False
    params = student_params(inputs)
    loss, stats = fused_teachability_kl(**inputs, valid_mask=mask, strategy=strategy, keep_ratio=0.05,
                                        top_k=4, backend="torch", seed=1)
    if strategy == "all":
        assert torch.equal(stats.kept, mask)
    else:  # global n = ceil(0.05 * 28) = 2, then at least one in each of the 4 sequences
        assert stats.kept.any(dim=1).all() and 4 <= stats.num_kept <= 2 + 3
        assert torch.equal(stats.kept, select_positions(stats, strategy=strategy, keep_ratio=0.05, seed=1)[1])
    assert torch.isfinite(loss)
    assert all(g is not None and torch.isfinite(g).all() for g in grads(loss, params))


def test_precomputed_stats_keep_mask_and_normalizer():
    inputs = make_inputs(n=30, v_s=200, seed=13)
    params = student_params(inputs)
    stats = teachability_stats(**inputs, keep_ratio=0.2, backend="torch")
    loss_a, _ = fused_teachability_kl(**inputs, keep_ratio=0.2, backend="torch")
    loss_b, stats_b = fused_teachability_kl(**inputs, stats=stats, keep_mask=stats.kept, normalizer=2 * stats.num_kept,
                                            backend="torch")
    assert torch.equal(stats_b.kept, stats.kept)
    torch.testing.assert_close(2 * loss_b, loss_a)
    for ga, gb in zip(grads(loss_a, params), grads(loss_b, params)):
        torch.testing.assert_close(2 * gb, ga)


def test_bf16_no_worse_than_naive_bf16_plus_tolerance():
    inputs32 = make_inputs(n=40, v_s=700, seed=14)
    inputs = {k: v.bfloat16() for k, v in inputs32.items()}
    truth = truth_rows(inputs, top_k=8)  # float64 truth from the bf16 inputs
    naive = naive_rows(inputs, torch.bfloat16, top_k=8)
    stats = teachability_stats(**inputs, top_k=8, backend="torch", **SMALL_TILES)
    for name in STAT_FIELDS:
        ours, theirs = max_err(getattr(stats, name), getattr(truth, name)), max_err(getattr(naive, name),
                                                                                   getattr(truth, name))
        assert ours <= theirs + 1e-4, f"{name}: ours {ours:.3g} vs naive bf16 {theirs:.3g}"
    # Gradients come back in the inputs' dtype and agree with the float64 reference.
    params = student_params(inputs)
    loss, stats = fused_teachability_kl(**inputs, top_k=8, keep_ratio=0.2, backend="torch", **SMALL_TILES)
    ref_loss, _ = reference_teachability_kl(**inputs, top_k=8, keep_mask=stats.kept, dtype=torch.float64)
    got = grads(loss, params)
    assert all(g.dtype == torch.bfloat16 for g in got)
    for g, w in zip(got, grads(ref_loss, params)):
        torch.testing.assert_close(g.float(), w.float(), atol=2e-3, rtol=2e-2)


# ----------------------------------------------------------------------------------------------
# Degenerate but legal input


def test_no_valid_position_gives_zero_loss_and_zero_grads():
    inputs = make_inputs(n=8, v_s=64)
    params = student_params(inputs)
    for estimator in ("full", "sampled"):
        loss, stats = fused_teachability_kl(**inputs, valid_mask=torch.zeros(8, dtype=torch.bool),
                                            sampled_ids=torch.full((8,), -100), estimator=estimator,
                                            backend="torch")
        assert loss.item() == 0.0 and stats.num_kept == 0
        for g in grads(loss, params):
            assert g is not None and (g == 0).all()


def test_single_position_and_k_equal_vocab():
    inputs = make_inputs(n=1, v_s=7, seed=15)
    loss, stats = fused_teachability_kl(**inputs, top_k=7, backend="torch", chunk_vocab=3)
    assert stats.num_kept == 1 and torch.isfinite(loss)
    assert sorted(stats.topk_ids_student[0].tolist()) == list(range(7))
    assert stats.teacher_mass.item() == pytest.approx(1.0, abs=1e-6)
    assert_stats_close(stats, truth_rows(inputs, top_k=7))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 30),
    v=st.integers(2, 300),
    extra_t=st.integers(0, 9),
    k=st.integers(1, 20),
    chunk_rows=st.integers(1, 40),
    chunk_vocab=st.integers(1, 128),
    p_valid=st.floats(0.0, 1.0),
    seed=st.integers(0, 1000),
    quantise=st.booleans(),
)
def test_hypothesis_shapes_masks_and_ties(n, v, extra_t, k, chunk_rows, chunk_vocab, p_valid, seed, quantise):
    k = min(k, v)
    g = torch.Generator().manual_seed(seed)
    zs = torch.randn(n, v, generator=g) * 3
    zt = torch.randn(n, v + extra_t, generator=g) * 3
    if quantise:  # many exact ties inside and across tiles
        zs, zt = zs.round(), zt.round()
    mask = torch.rand(n, generator=g) < p_valid
    zs.requires_grad_(True)
    loss, stats = teachability_kl_from_logits(zs, zt, valid_mask=mask, top_k=k, keep_ratio=0.3,
                                              backend="torch", chunk_rows=chunk_rows, chunk_vocab=chunk_vocab)
    if mask.any():
        truth = truth_rows_from_logits(zs.detach()[mask], zt[mask, :v], k)
        assert_stats_close(stats, truth, mask=mask, atol=5e-5, rtol=5e-5)
    (grad,) = torch.autograd.grad(loss, zs)
    assert (grad[~stats.kept] == 0).all() and torch.isfinite(grad).all()
    if stats.num_kept:
        zs64 = zs.detach().double().requires_grad_(True)
        logp_s = torch.log_softmax(zs64, -1)
        logp_t = torch.log_softmax(zt[:, :v].double(), -1)
        kl = (logp_s.exp() * (logp_s - logp_t)).sum(-1)
        want_loss = kl[stats.kept].sum() / stats.num_kept
        (want,) = torch.autograd.grad(want_loss, zs64)
        torch.testing.assert_close(loss.double(), want_loss, atol=5e-5, rtol=5e-5)
        torch.testing.assert_close(grad.double(), want, atol=1e-6, rtol=1e-4)


# ----------------------------------------------------------------------------------------------
# Ordered keys used for the exact top-K


def test_ordered_keys_roundtrip_and_order():
    values = torch.tensor([-math.inf, -3.5, -0.0, 0.0, 1e-30, 2.0, 2.0, math.inf])
    ids = torch.arange(8)
    keys = ordered_keys(values, ids)
    assert torch.equal(keys_to_ids(keys), ids)
    assert torch.equal(keys_to_values(keys), values + 0.0)
    order = torch.argsort(keys, descending=True).tolist()
    assert order == [7, 5, 6, 4, 2, 3, 1, 0]  # value descending, then id ascending (-0.0 == 0.0)


# ----------------------------------------------------------------------------------------------
# Bad input


def _call(**overrides):
    inputs = make_inputs(n=6, d_s=8, d_t=8, v_s=50)
    inputs.update(overrides)
    return fused_teachability_kl(**inputs, backend="torch")


@pytest.mark.parametrize("overrides,match", [
    (dict(teacher_hidden=torch.randn(5, 8)), "same positions"),
    (dict(student_hidden=torch.randn(6, 9)), "hidden size 9"),
    (dict(student_weight=torch.randn(50)), "2 dimensions"),
    (dict(student_bias=torch.randn(49)), r"student_bias must have shape \[50\]"),
    (dict(top_k=0), "top_k"),
    (dict(top_k=51), "top_k"),
    (dict(keep_ratio=0.0), "keep_ratio"),
    (dict(keep_ratio=1.5), "keep_ratio"),
    (dict(strategy="teachable"), "strategy"),
    (dict(estimator="mc"), "estimator"),
    (dict(temperature=0.0), "temperature"),
    (dict(vocab_size=51), "vocab_size"),
    (dict(valid_mask=torch.ones(5, dtype=torch.bool)), "valid_mask must have shape"),
    (dict(valid_mask=torch.ones(6)), "valid_mask must be bool"),
    (dict(sequence_ids=torch.zeros(6)), "sequence_ids must be an integer"),
    (dict(sampled_ids=torch.full((6,), 50)), "sampled_ids must be in"),
    (dict(estimator="sampled"), "needs sampled_ids"),
    (dict(student_hidden=torch.full((6, 8), math.nan)), "student_hidden contains"),
    (dict(teacher_weight=torch.full((50, 8), math.inf)), "teacher_weight contains"),
    (dict(min_per_sequence=-1), "min_per_sequence"),
    (dict(chunk_vocab=0), "chunk_vocab"),
    (dict(normalizer=0.0), "normalizer"),
    (dict(student_hidden=torch.randn(6, 8, dtype=torch.float64).to(torch.int64)), "floating-point"),
])
def test_bad_input_is_rejected_with_a_clear_error(overrides, match):
    with pytest.raises((ValueError, TypeError), match=match):
        _call(**overrides)


def test_unknown_backend_and_unavailable_backend():
    with pytest.raises(ValueError, match="backend"):
        fused_teachability_kl(**make_inputs(n=2, v_s=10), top_k=2, backend="tpu")
    with pytest.raises(RuntimeError, match="cuda"):
        fused_teachability_kl(**make_inputs(n=2, v_s=10), top_k=2, backend="cuda")


def test_devices_that_differ_are_rejected():
    """The only other device a CPU machine has is meta, which the device check refuses for what it is (no
    values), naming the tensor, before comparing devices."""
    inputs = make_inputs(n=4, v_s=20)
    inputs["teacher_weight"] = inputs["teacher_weight"].to("meta")
    with pytest.raises(ValueError, match="teacher_weight is on the meta device"):
        fused_teachability_kl(**inputs, backend="torch")


@pytest.mark.parametrize("estimator", ["full", "sampled"])
def test_row_weight_matches_the_weighted_reference(estimator):
    """row_weight: loss = sum_t m_t w_t l_t / normalizer, and its gradients, against the float64 reference
    composed row by row (weights of both signs and a zero)."""
    inputs = make_inputs(n=18, v_s=260, seed=21)
    y = torch.randint(0, 260, (18,), generator=torch.Generator().manual_seed(2))
    w = torch.linspace(-1.5, 2.0, 18)
    w[4] = 0.0
    ours = {k: v.clone().requires_grad_(k.startswith("student")) for k, v in inputs.items()}
    loss, stats = fused_teachability_kl(**ours, sampled_ids=y, estimator=estimator, keep_ratio=0.3,
                                        normalizer=2.5, row_weight=w, backend="torch", **SMALL_TILES)
    loss.backward()
    ref = {k: v.double().clone().requires_grad_(k.startswith("student")) for k, v in inputs.items()}
    total = 0.0
    for r in stats.kept.nonzero().flatten().tolist():
        one = torch.zeros(18, dtype=torch.bool)
        one[r] = True
        part, _ = reference_teachability_kl(**ref, sampled_ids=y, estimator=estimator, keep_mask=one,
                                            dtype=torch.float64)
        total = total + w[r].double() * part / 2.5
    total.backward()
    torch.testing.assert_close(loss.double(), total.detach(), atol=2e-5, rtol=2e-5)
    for name in ("student_hidden", "student_weight"):
        torch.testing.assert_close(ours[name].grad.double(), ref[name].grad, atol=2e-5, rtol=2e-4)
