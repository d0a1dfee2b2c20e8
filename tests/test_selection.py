"""docs/math.md, Scores and selection: batch normalisation, strategy scores, global top-n, ties, minimum per sequence."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from taopd_kernels import STRATEGIES, batch_normalize, num_to_keep, select_top, strategy_scores


def test_normalize_matches_linear_quantiles_and_clips():
    x = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0, 100.0])
    valid = torch.ones(6, dtype=torch.bool)
    q05, q95 = torch.quantile(x.double(), torch.tensor([0.05, 0.95], dtype=torch.float64))
    want = ((x.double() - q05) / (q95 - q05)).clamp(0, 1).float()
    torch.testing.assert_close(batch_normalize(x, valid), want)
    assert float(batch_normalize(x, valid)[0]) == 0.0 and float(batch_normalize(x, valid)[-1]) == 1.0


def test_normalize_ignores_invalid_and_nonfinite_positions():
    x = torch.tensor([0.0, 1.0, 2.0, 1e9, math.inf, -math.inf, math.nan])
    valid = torch.tensor([True, True, True, False, True, True, True])
    out = batch_normalize(x, valid)
    pool = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)
    q = torch.quantile(pool, torch.tensor([0.05, 0.95], dtype=torch.float64))
    torch.testing.assert_close(out[:3], ((pool - q[0]) / (q[1] - q[0])).clamp(0, 1).float())
    assert out[3] == 0.0  # invalid
    assert out[4] == 1.0 and out[5] == 0.0 and out[6] == 0.0  # +inf, -inf, NaN


def test_normalize_degenerate_range_gives_zero():
    x = torch.full((5,), 3.0)
    assert torch.equal(batch_normalize(x, torch.ones(5, dtype=torch.bool)), torch.zeros(5))
    assert torch.equal(batch_normalize(x, torch.zeros(5, dtype=torch.bool)), torch.zeros(5))


def test_strategy_table():
    g = torch.Generator().manual_seed(0)
    h, d, c = (torch.rand(40, generator=g) for _ in range(3))
    valid = torch.ones(40, dtype=torch.bool)
    n = lambda x: batch_normalize(x, valid)  # noqa: E731
    want = {
        "teachability": n(d) * n(c),
        "incompatible": n(d) * (1 - n(c)),
        "divergence": n(d),
        "entropy": n(h),
        "tip": n(h) + n(d) - n(h) * n(d),
        "compat": n(c),
        "teachability_entropy": n(h) + n(d) * n(c) - n(h) * n(d) * n(c),
        "all": torch.ones(40),
    }
    for name, expected in want.items():
        got = strategy_scores(name, entropy=h, disagreement=d, teacher_mass=c, valid=valid)
        torch.testing.assert_close(got, expected, msg=name)


def test_random_strategy_is_seeded_and_device_independent():
    h = torch.zeros(30)
    valid = torch.ones(30, dtype=torch.bool)
    a = strategy_scores("random", entropy=h, disagreement=h, teacher_mass=h, valid=valid, seed=3)
    b = strategy_scores("random", entropy=h, disagreement=h, teacher_mass=h, valid=valid, seed=3)
    c = strategy_scores("random", entropy=h, disagreement=h, teacher_mass=h, valid=valid, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_invalid_positions_have_nan_score_and_are_never_kept():
    h = torch.arange(10.0)
    valid = torch.tensor([False] * 5 + [True] * 5)
    for name in STRATEGIES:
        score = strategy_scores(name, entropy=h, disagreement=h, teacher_mass=h, valid=valid)
        assert torch.isnan(score[:5]).all(), name
        kept = select_top(score, valid, keep_ratio=1.0)
        assert not kept[:5].any() and kept[5:].all(), name


@pytest.mark.parametrize("ratio,count,want", [(0.05, 100, 5), (0.05, 101, 6), (0.1, 30, 3), (0.05, 1, 1),
                                              (1.0, 7, 7), (0.05, 0, 0), (0.3, 10, 3), (0.07, 100, 7)])
def test_num_to_keep(ratio, count, want):
    assert num_to_keep(ratio, count) == want


def test_global_top_n_with_ties_to_earlier_position():
    score = torch.tensor([0.5, 0.9, 0.9, 0.1, 0.9, 0.2])
    kept = select_top(score, torch.ones(6, dtype=torch.bool), keep_ratio=0.34)  # n = ceil(2.04) = 3
    assert kept.tolist() == [False, True, True, False, True, False]
    kept = select_top(score, torch.ones(6, dtype=torch.bool), keep_ratio=0.3)  # n = 2: first two 0.9s
    assert kept.tolist() == [False, True, True, False, False, False]


def test_selection_is_global_not_per_sequence_and_tops_up_each_sequence():
    # Sequence 0 holds all high scores; sequence 1 gets only its minimum.
    score = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.1, 0.3, 0.2, 0.05])
    seq = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    valid = torch.ones(8, dtype=torch.bool)
    kept = select_top(score, valid, keep_ratio=0.25, sequence_ids=seq, min_per_sequence=1)
    assert kept.tolist() == [True, True, False, False, False, True, False, False]
    kept = select_top(score, valid, keep_ratio=0.25, sequence_ids=seq, min_per_sequence=2)
    assert kept.tolist() == [True, True, False, False, False, True, True, False]
    kept = select_top(score, valid, keep_ratio=0.25, sequence_ids=seq, min_per_sequence=0)
    assert kept.tolist() == [True, True] + [False] * 6


def test_min_per_sequence_counts_only_valid_positions():
    score = torch.tensor([0.9, 0.8, 0.1, 0.7])
    seq = torch.tensor([0, 0, 1, 1])
    valid = torch.tensor([True, True, True, False])
    kept = select_top(score, valid, keep_ratio=0.3, sequence_ids=seq, min_per_sequence=3)
    assert kept.tolist() == [True, True, True, False]


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 60),
    ratio=st.floats(0.01, 1.0),
    min_per=st.integers(0, 3),
    n_seq=st.integers(1, 6),
    seed=st.integers(0, 10_000),
    quantised=st.booleans(),
)
def test_selection_properties(n, ratio, min_per, n_seq, seed, quantised):
    g = torch.Generator().manual_seed(seed)
    score = torch.rand(n, generator=g)
    if quantised:  # many exact ties
        score = (score * 4).floor() / 4
    valid = torch.rand(n, generator=g) < 0.8
    seq = torch.randint(0, n_seq, (n,), generator=g)
    kept = select_top(score, valid, keep_ratio=ratio, sequence_ids=seq, min_per_sequence=min_per)
    n_valid = int(valid.sum())
    assert not (kept & ~valid).any()
    # Brute force: the global top-n by (score desc, index asc), then per-sequence top-ups.
    order = sorted((i for i in range(n) if valid[i]), key=lambda i: (-float(score[i]), i))
    want = set(order[:num_to_keep(ratio, n_valid)])
    for s in range(n_seq):
        members = [i for i in order if int(seq[i]) == s]
        have = [i for i in members if i in want]
        for i in members:
            if len(have) >= min_per:
                break
            if i not in want:
                want.add(i)
                have.append(i)
    assert set(kept.nonzero().squeeze(1).tolist()) == want
