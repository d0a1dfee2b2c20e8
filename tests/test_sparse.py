"""teachability_from_topk: statistics, selection and loss from a sparse (top-K) teacher signal
(docs/math.md, Sparse teacher signal), against the exact statistics and the float64 reference.

Tolerances. Inputs here are logits on a grid of 1/8 in [-6, 6] (so ties are exact and stay exact in
float32), |z| / tau <= 12. Every statistic is a sum of at most V = 97 float32 terms of size <= 12 formed
from exp/log of float32 numbers, so its float32 error is a few units of 2^-24 * 12 * V ~ 7e-5 in the
worst case and ~1e-6 typically; the float64 reference is exact to 1e-15 at that size. ATOL = 1e-4 with
RTOL = 1e-4 is therefore a bound, not a fit; both implementations are checked against float64.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from taopd_kernels import STRATEGIES, teachability_kl_from_logits
from taopd_kernels.reference import reference_row_stats, reference_sparse_loss, reference_sparse_stats
from taopd_kernels.selection import score_and_select
from taopd_kernels.sparse import ENTROPY_STRATEGIES, teachability_from_topk

ATOL = RTOL = 1e-4


def grid_logits(g, *shape):
    """Logits on a grid of 1/8 in [-6, 6]: many exact ties, no near-ties that float32 could merge."""
    return torch.randint(-48, 49, shape, generator=g).float() / 8


def engine(z, k, temperature=1.0, *, shuffle_gen=None):
    """What an inference engine returns: the top-k ids and raw log-probs at ``temperature``, ranked by
    log-prob with ties to the lower id; ``shuffle_gen`` permutes the returned entries (engines' order)."""
    lp = torch.log_softmax(z.float() / temperature, -1)
    order = torch.sort(lp, dim=-1, descending=True, stable=True).indices[..., :k]
    ids, vals = order, lp.gather(-1, order)
    if shuffle_gen is not None:
        perm = torch.argsort(torch.rand(ids.shape, generator=shuffle_gen), dim=-1)
        ids, vals = ids.gather(-1, perm), vals.gather(-1, perm)
    return ids, vals, lp


def close(a, b, atol=ATOL, rtol=RTOL):
    a, b = a.double(), b.double()
    both_inf = torch.isinf(a) & torch.isinf(b) & (a.sign() == b.sign())
    ok = both_inf | ((a - b).abs() <= atol + rtol * b.abs())
    return bool(ok.all()), float(torch.where(both_inf, 0.0, (a - b).abs()).max()) if a.numel() else 0.0


def related_pair(seed, leading, vocab):
    g = torch.Generator().manual_seed(seed)
    zs = grid_logits(g, *leading, vocab)
    zt = torch.round((0.5 * zs + 0.5 * grid_logits(g, *leading, vocab)) * 8) / 8
    return g, zs, zt


# ------------------------------------------------------------------------ K_t = V: exact statistics


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_full_vocabulary_equals_exact_statistics(temperature):
    g, zs, zt = related_pair(0, (3, 11), 97)
    valid = torch.rand(3, 11, generator=g) > 0.2
    y = torch.randint(0, 97, (3, 11), generator=g)
    ids, vals, lp_t = engine(zt, 97, temperature)
    _, exact = teachability_kl_from_logits(zs, zt, valid_mask=valid, sampled_ids=y, temperature=temperature,
                                           keep_ratio=0.2, estimator="sampled")
    _, sparse = teachability_from_topk(teacher_topk_ids=ids, teacher_topk_logprobs=vals, student_logits=zs,
                                       sampled_ids=y, teacher_logprob_sampled=lp_t.gather(-1, y[..., None])[..., 0],
                                       valid_mask=valid, temperature=temperature, keep_ratio=0.2)
    truth = reference_row_stats(zs.reshape(-1, 97).double() / temperature, zt.reshape(-1, 97).double() / temperature,
                                16, y.reshape(-1))
    v = valid.reshape(-1)
    assert torch.equal(sparse.valid, valid)
    assert bool(sparse.teacher_mass_exact[valid].all()) and bool(sparse.disagreement_exact[valid].all())
    for field, exact_field in (("teacher_mass", "teacher_mass"), ("teacher_mass_upper", "teacher_mass"),
                               ("disagreement", "disagreement"), ("entropy_student", "entropy_student"),
                               ("logp_student_sampled", "logp_student_sampled")):
        got = getattr(sparse, field).reshape(-1)[v]
        ok, worst = close(got, getattr(truth, exact_field)[v])
        assert ok, (field, worst)
        ok, worst = close(got, getattr(exact, exact_field).reshape(-1)[v])
        assert ok, (field, "vs library", worst)
    assert torch.equal(sparse.topk_ids_student[valid], exact.topk_ids_student[valid])
    assert torch.equal(sparse.topk_ids_teacher[valid], exact.topk_ids_teacher[valid])
    kl = exact.logp_student_sampled - exact.logp_teacher_sampled
    assert close(sparse.kl_sampled[valid], kl[valid])[0]
    assert torch.isnan(sparse.teacher_mass[~valid]).all() and (sparse.topk_ids_student[~valid] == -1).all()


def test_selection_is_the_librarys_on_the_same_statistics():
    g, zs, zt = related_pair(1, (4, 16), 64)
    ids, vals, _ = engine(zt, 20)
    for strategy in STRATEGIES:
        _, stats = teachability_from_topk(teacher_topk_ids=ids, teacher_topk_logprobs=vals, student_logits=zs,
                                          strategy=strategy, keep_ratio=0.1, seed=3)
        seq = torch.arange(64).div(16, rounding_mode="floor")
        score, kept = score_and_select(strategy, entropy=stats.entropy_student.reshape(-1),
                                       disagreement=stats.disagreement.reshape(-1),
                                       teacher_mass=stats.teacher_mass.reshape(-1), valid=stats.valid.reshape(-1),
                                       keep_ratio=0.1, sequence_ids=seq, min_per_sequence=1, seed=3)
        assert torch.equal(kept.view(4, 16), stats.kept), strategy
        assert torch.equal(torch.nan_to_num(score.view(4, 16), nan=-7), torch.nan_to_num(stats.score, nan=-7))


# ------------------------------------------------------------------------ K_t < V: bounds and reference


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10 ** 6), n=st.integers(1, 24), vocab=st.integers(16, 80), k_extra=st.integers(0, 48),
       top_k=st.sampled_from([1, 4, 8, 16]), temperature=st.sampled_from([0.5, 1.0, 2.0]),
       student_kind=st.sampled_from(["logits", "topk"]), scored=st.sampled_from([None, "student_topk", "random"]),
       shuffle=st.booleans())
def test_bounds_and_reference(seed, n, vocab, k_extra, top_k, temperature, student_kind, scored, shuffle):
    top_k = min(top_k, vocab)
    k_t = min(vocab, top_k + k_extra)
    g, zs, zt = related_pair(seed, (n,), vocab)
    valid = torch.rand(n, generator=g) > 0.25
    ids, vals, _ = engine(zt, k_t, temperature, shuffle_gen=g if shuffle else None)
    kwargs = dict(teacher_topk_ids=ids, teacher_topk_logprobs=vals, top_k=top_k, temperature=temperature)
    truth = reference_row_stats(zs.double() / temperature, zt.double() / temperature, top_k)
    if scored == "student_topk":
        kwargs.update(teacher_scored_ids=truth.topk_ids_student,
                      teacher_scored_logprobs=torch.log_softmax(zt / temperature, -1).gather(1, truth.topk_ids_student))
    elif scored == "random":
        extra = torch.randint(0, vocab, (n, 5), generator=g)
        kwargs.update(teacher_scored_ids=extra, teacher_scored_logprobs=torch.log_softmax(zt / temperature, -1)
                      .gather(1, extra))
    if student_kind == "logits":
        kwargs.update(student_logits=zs)
    else:
        s_ids, s_vals, _ = engine(zs, min(vocab, top_k + 4), temperature)
        kwargs.update(student_topk_ids=s_ids, student_topk_logprobs=s_vals)
    _, stats = teachability_from_topk(**kwargs, valid_mask=valid, strategy="teachability")
    ref = reference_sparse_stats(**kwargs)
    v = valid
    for field in ("teacher_mass", "teacher_mass_upper", "disagreement"):
        ok, worst = close(getattr(stats, field)[v], ref[field][v])
        assert ok, (field, worst)
    assert torch.equal(stats.teacher_mass_exact[v], ref["teacher_mass_exact"][v])
    assert stats.topk_ids_teacher[v].tolist() == [ref["ids_t"][i] for i in range(n) if v[i]]
    # The documented bounds against the exact C of the full rows.
    c_true = truth.teacher_mass
    if student_kind == "logits":  # S_s is the exact one
        assert stats.topk_ids_student[v].tolist() == truth.topk_ids_student[v].tolist()
        assert bool((stats.teacher_mass[v] <= c_true[v] + ATOL).all())
        assert bool((c_true[v] <= stats.teacher_mass_upper[v] + ATOL).all())
        exact = v & stats.teacher_mass_exact
        assert close(stats.teacher_mass[exact], c_true[exact])[0]
        d_exact = v & stats.disagreement_exact
        assert close(stats.disagreement[d_exact], truth.disagreement[d_exact])[0]
        if scored == "student_topk":
            assert bool(stats.teacher_mass_exact[v].all())
    assert bool((stats.teacher_mass[v] <= stats.teacher_mass_upper[v]).all())
    assert bool(torch.isfinite(stats.disagreement[v]).all()) and bool((stats.disagreement[v] >= -ATOL).all())
    assert bool((stats.teacher_known_mass[v] <= 1 + ATOL).all())


def test_order_of_the_returned_entries_changes_nothing():
    g, zs, zt = related_pair(5, (2, 9), 50)
    ids, vals, _ = engine(zt, 20)
    s_ids, s_vals, _ = engine(zt, 20, shuffle_gen=g)
    _, a = teachability_from_topk(teacher_topk_ids=ids, teacher_topk_logprobs=vals, student_logits=zs, top_k=8)
    _, b = teachability_from_topk(teacher_topk_ids=s_ids, teacher_topk_logprobs=s_vals, student_logits=zs, top_k=8)
    for field in ("teacher_mass", "teacher_mass_upper", "disagreement", "topk_ids_teacher", "kept"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field


def test_a_tie_at_the_engines_cut_changes_only_which_tied_id_is_known():
    """Ids 4 and 5 tie at the teacher's 5th place; an engine may return either (K_t = K = 5). The student
    ranks id 5 in its top-5. Returned id 5: C is exact. Returned id 4: C_lb misses id 5's mass, and the
    bound C_lb <= C <= C_ub still holds; S_t holds the returned one (docs/math.md, Ties)."""
    zs = torch.full((1, 12), -2.0)
    zs[0, :4] = torch.tensor([3.0, 2.0, 1.0, 0.5])
    zt = zs.clone()
    zt[0, 4] = zt[0, 5] = -1.0
    zs[0, 5] = 0.4
    lp = torch.log_softmax(zt, -1)
    c_true = float(lp[0, [0, 1, 2, 3, 5]].exp().sum())
    stats = {}
    for fifth in (4, 5):
        ids = torch.tensor([[0, 1, 2, 3, fifth]])
        _, stats[fifth] = teachability_from_topk(teacher_topk_ids=ids, teacher_topk_logprobs=lp.gather(1, ids),
                                                 student_logits=zs, top_k=5, strategy="all")
        assert float(stats[fifth].teacher_mass) <= c_true + 1e-6 <= float(stats[fifth].teacher_mass_upper) + 2e-6
        assert stats[fifth].topk_ids_teacher[0, 4] == fifth
    assert bool(stats[5].teacher_mass_exact) and abs(float(stats[5].teacher_mass) - c_true) < 1e-6
    assert not bool(stats[4].teacher_mass_exact) and float(stats[4].teacher_mass) < c_true - 1e-3


# ------------------------------------------------------------------------ loss and gradients


def _loss_inputs(seed=7, leading=(4, 12), vocab=61, k_t=20):
    g, zs, zt = related_pair(seed, leading, vocab)
    y = torch.randint(0, vocab, leading, generator=g)
    ids, vals, lp_t = engine(zt, k_t)
    valid = torch.rand(leading, generator=g) > 0.2
    return dict(teacher_topk_ids=ids, teacher_topk_logprobs=vals, sampled_ids=y, valid_mask=valid,
                teacher_logprob_sampled=lp_t.gather(-1, y[..., None])[..., 0]), zs


def test_loss_equals_reference_and_gradients_only_through_kept_rows():
    kwargs, zs = _loss_inputs()
    zs = zs.requires_grad_()
    loss, stats = teachability_from_topk(student_logits=zs, keep_ratio=0.15, **kwargs)
    loss.backward()
    z64 = zs.detach().double().requires_grad_()
    ref = reference_sparse_loss(z64, kwargs["sampled_ids"], kwargs["teacher_logprob_sampled"], stats.kept)
    ref.backward()
    assert stats.kept.sum() >= 4
    assert abs(float(loss) - float(ref)) <= ATOL * (1 + abs(float(ref)))
    assert close(zs.grad, z64.grad, atol=1e-6, rtol=1e-4)[0]
    unkept = ~stats.kept
    assert bool((zs.grad[unkept] == 0).all()) and bool((zs.grad[stats.kept].abs().sum(-1) > 0).all())


def test_loss_from_the_student_engine_logprob_and_from_a_per_token_loss():
    kwargs, zs = _loss_inputs(seed=8)
    s_ids, s_vals, lp_s = engine(zs, 20)
    lp_s_y = lp_s.gather(-1, kwargs["sampled_ids"][..., None])[..., 0].clone().requires_grad_()
    loss, stats = teachability_from_topk(student_topk_ids=s_ids, student_topk_logprobs=s_vals,
                                         student_logprob_sampled=lp_s_y, keep_ratio=0.2, **kwargs)
    loss.backward()
    kept = stats.kept
    w = (lp_s_y - kwargs["teacher_logprob_sampled"]).detach()
    assert torch.allclose(lp_s_y.grad, torch.where(kept, w, 0.0) / kept.sum())
    per_token = torch.rand(zs.shape[:-1], requires_grad=True)
    rest = {k: v for k, v in kwargs.items() if k not in ("sampled_ids", "teacher_logprob_sampled")}
    loss, stats = teachability_from_topk(student_logits=zs, per_token_loss=per_token, keep_ratio=0.2, **rest)
    loss.backward()
    assert torch.allclose(loss, per_token[stats.kept].sum() / stats.kept.sum())
    assert bool((per_token.grad[~stats.kept] == 0).all())
    _, stats = teachability_from_topk(student_logits=zs, **rest)
    assert teachability_from_topk(student_logits=zs, **rest)[0] is None and stats.kept.any()


def test_a_row_with_only_top_k_teacher_signal_is_never_infinite():
    """The library's logits path raises for a teacher row that is -inf outside its top-20 (the issue's
    report); from the top-20 log-probs the statistics and loss are finite."""
    g = torch.Generator().manual_seed(3)
    zs, zt = torch.randn(8, 1000, generator=g) * 2, torch.randn(8, 1000, generator=g) * 2
    ids, vals, lp_t = engine(zt, 20)
    y = torch.randint(0, 1000, (8,), generator=g)
    masked = torch.full_like(zt, -math.inf).scatter(1, ids, zt.gather(1, ids))
    with pytest.raises(ValueError, match="infinite"):
        teachability_kl_from_logits(zs, masked, keep_ratio=1.0, strategy="all")
    loss, stats = teachability_from_topk(teacher_topk_ids=ids, teacher_topk_logprobs=vals, student_logits=zs,
                                         sampled_ids=y, teacher_logprob_sampled=lp_t.gather(1, y[:, None])[:, 0],
                                         strategy="all")
    assert math.isfinite(float(loss))
    for field in ("teacher_mass", "teacher_mass_upper", "disagreement", "entropy_student"):
        assert bool(torch.isfinite(getattr(stats, field)).all()), field


def test_flat_and_batched_positions_agree():
    kwargs, zs = _loss_inputs(seed=9)
    flat = {k: v.reshape(-1, *v.shape[2:]) for k, v in kwargs.items()}
    seq = torch.arange(48).div(12, rounding_mode="floor")
    la, a = teachability_from_topk(student_logits=zs, keep_ratio=0.1, **kwargs)
    lb, b = teachability_from_topk(student_logits=zs.reshape(48, -1), keep_ratio=0.1, sequence_ids=seq, **flat)
    assert torch.equal(a.kept.reshape(-1), b.kept) and float(la) == float(lb)


def test_teacher_ids_beyond_the_vocabulary_are_padding():
    g, zs, zt = related_pair(11, (6,), 40)
    ids, vals, _ = engine(zt, 16)
    padded_ids = torch.cat([torch.full((6, 1), 45), ids], 1)  # a padding row the engine returned
    padded_vals = torch.cat([torch.full((6, 1), -30.0), vals], 1)
    _, a = teachability_from_topk(teacher_topk_ids=ids, teacher_topk_logprobs=vals, student_logits=zs, top_k=8)
    _, b = teachability_from_topk(teacher_topk_ids=padded_ids, teacher_topk_logprobs=padded_vals,
                                  student_logits=zs, top_k=8)
    assert torch.equal(a.topk_ids_teacher, b.topk_ids_teacher) and torch.allclose(a.disagreement, b.disagreement)


def test_student_rows_with_neg_inf_logits_and_all_invalid():
    g, zs, zt = related_pair(12, (5,), 30)
    zs[0, 3:] = -math.inf
    zs[1] = -math.inf  # no finite logit: dropped
    ids, vals, _ = engine(zt, 10)
    _, stats = teachability_from_topk(teacher_topk_ids=ids, teacher_topk_logprobs=vals, student_logits=zs, top_k=4)
    assert stats.dropped.tolist() == [False, True, False, False, False] and not bool(stats.valid[1])
    assert not bool(torch.isnan(stats.disagreement[stats.valid]).any())
    loss, stats = teachability_from_topk(teacher_topk_ids=ids, teacher_topk_logprobs=vals, student_logits=zs,
                                         valid_mask=torch.zeros(5, dtype=torch.bool), top_k=4,
                                         per_token_loss=torch.ones(5))
    assert float(loss) == 0.0 and not bool(stats.kept.any())


# ------------------------------------------------------------------------ refusals


def test_strategies_needing_entropy_refuse_without_student_logits():
    kwargs, zs = _loss_inputs()
    s_ids, s_vals, _ = engine(zs, 16)
    for strategy in ENTROPY_STRATEGIES:
        with pytest.raises(ValueError, match="student_logits"):
            teachability_from_topk(student_topk_ids=s_ids, student_topk_logprobs=s_vals, strategy=strategy,
                                   teacher_topk_ids=kwargs["teacher_topk_ids"],
                                   teacher_topk_logprobs=kwargs["teacher_topk_logprobs"])
    for strategy in set(STRATEGIES) - set(ENTROPY_STRATEGIES):
        teachability_from_topk(student_topk_ids=s_ids, student_topk_logprobs=s_vals, strategy=strategy,
                               teacher_topk_ids=kwargs["teacher_topk_ids"],
                               teacher_topk_logprobs=kwargs["teacher_topk_logprobs"])


@pytest.mark.parametrize("change, match", [
    (dict(teacher_topk_logprobs=None), "come together"),
    (dict(top_k=32), "K_t >= K"),
    (dict(student_logits=None), "student is missing"),
    (dict(student_topk_ids=torch.zeros(4, 12, 16, dtype=torch.long)), "not both"),
    (dict(sampled_ids=None), "needs sampled_ids"),
    (dict(teacher_topk_logprobs=torch.full((4, 12, 20), 0.5)), "log-probabilities"),
    (dict(teacher_topk_logprobs=torch.full((4, 12, 20), math.nan)), "log-probabilities"),
    (dict(teacher_topk_ids=torch.zeros(4, 12, 20, dtype=torch.long)), "twice"),
    (dict(teacher_topk_ids=torch.zeros(4, 11, 20, dtype=torch.long)), "leading dims"),
    (dict(valid_mask=torch.ones(4, 11, dtype=torch.bool)), "valid_mask"),
    (dict(strategy="nope"), "strategy"),
    (dict(vocab_size=1000), "vocab_size"),
    (dict(teacher_logprob_sampled=torch.full((4, 12), -math.inf), keep_ratio=1.0), "infinite at kept"),
])
def test_bad_arguments_are_named(change, match):
    kwargs, zs = _loss_inputs()
    kwargs["student_logits"] = zs
    kwargs.update(change)
    with pytest.raises((ValueError, TypeError), match=match):
        teachability_from_topk(**kwargs)


def test_dummy_entries_at_positions_that_are_not_valid_are_ignored():
    """Engines fill rows that predict nothing with dummies (verl: ids 0, log-probs 0.0 after each sequence)."""
    kwargs, zs = _loss_inputs()
    valid = kwargs["valid_mask"]
    ids, lps = kwargs["teacher_topk_ids"].clone(), kwargs["teacher_topk_logprobs"].clone()
    ids[~valid], lps[~valid] = 0, 0.0
    _, a = teachability_from_topk(student_logits=zs, **kwargs)
    _, b = teachability_from_topk(student_logits=zs, **{**kwargs, "teacher_topk_ids": ids,
                                                         "teacher_topk_logprobs": lps})
    assert torch.equal(a.kept, b.kept) and torch.equal(a.teacher_mass.nan_to_num(-1), b.teacher_mass.nan_to_num(-1))


def test_summary_reports_kept_fraction_and_means():
    kwargs, zs = _loss_inputs()
    _, stats = teachability_from_topk(student_logits=zs, keep_ratio=0.25, **kwargs)
    summary = stats.summary()
    assert summary["num_valid"] == int(stats.valid.sum()) and summary["num_kept"] == int(stats.kept.sum())
    assert math.isclose(summary["teacher_mass/kept"], float(stats.teacher_mass[stats.kept].double().mean()),
                        rel_tol=1e-6)
    assert math.isclose(summary["disagreement/all"], float(stats.disagreement[stats.valid].double().mean()),
                        rel_tol=1e-6)
