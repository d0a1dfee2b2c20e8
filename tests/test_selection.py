"""docs/math.md, Scores and selection: batch normalisation, strategy scores, global top-n, ties, minimum per sequence."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from taopd_kernels import STRATEGIES, batch_normalize, num_to_keep, select_top, strategy_scores

from helpers import tied_selection_inputs


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


# ---------------------------------------------------------------------------------------------------
# select_parts: one selection over several parts (micro-batches), and over the parts of every process.

def _parts_inputs(n_total: int = 19):
    """tied_selection_inputs, and a function giving a part (a slice of them) in the shape select_parts reads."""
    import types

    ent, dis, mass, valid, seq = tied_selection_inputs(n_total)
    part = lambda sl: types.SimpleNamespace(entropy_student=ent[sl], disagreement=dis[sl],  # noqa: E731
                                            teacher_mass=mass[sl], valid=valid[sl])
    return ent, dis, mass, valid, seq, part


def _concatenated(strategy, ent, dis, mass, valid, seq):
    score = strategy_scores(strategy, entropy=ent, disagreement=dis, teacher_mass=mass, valid=valid, seed=3)
    kept = valid.clone() if strategy == "all" else select_top(score, valid, keep_ratio=0.3, sequence_ids=seq,
                                                              min_per_sequence=2)
    return score, kept


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("ids", ["local", "global", "none"])
def test_select_parts_equals_the_concatenation(strategy, ids):
    from taopd_kernels.selection import select_parts

    ent, dis, mass, valid, seq, part = _parts_inputs()
    cuts = [slice(0, 3), slice(3, 3), slice(3, 12), slice(12, None)]  # an empty part too
    # "local": ids of this process's sequences (equal ids in two parts: one sequence), any values.
    seq_ids = None if ids == "none" else [seq[c] + (10 if ids == "local" else 0) for c in cuts]
    sel = select_parts([part(c) for c in cuts], strategy=strategy, keep_ratio=0.3, min_per_sequence=2, seed=3,
                       sequence_ids=seq_ids, global_sequence_ids=ids == "global")
    score, kept = _concatenated(strategy, ent, dis, mass, valid, None if ids == "none" else seq)
    assert torch.equal(torch.cat(sel.keep_masks), kept)
    assert torch.allclose(torch.cat(sel.scores), score, rtol=0, atol=0, equal_nan=True)
    assert (sel.num_kept, sel.num_valid) == (int(kept.sum()), int(valid.sum()))
    assert [m.shape for m in sel.keep_masks] == [valid[c].shape for c in cuts]


def test_select_parts_numbers_rows_of_2d_parts_across_parts():
    from taopd_kernels.selection import disjoint_sequence_ids, select_parts

    ent, dis, mass, valid, _, part = _parts_inputs(24)
    grid = lambda x: x.view(6, 4)  # noqa: E731
    whole = part(slice(None))
    two_d = [type(whole)(**{k: grid(v)[a:b] for k, v in vars(whole).items()}) for a, b in ((0, 2), (2, 6))]
    sel = select_parts(two_d, keep_ratio=0.3, min_per_sequence=2, strategy="teachability")
    rows = torch.arange(24) // 4
    _, kept = _concatenated("teachability", ent, dis, mass, valid, rows)
    assert torch.equal(torch.cat([m.reshape(-1) for m in sel.keep_masks]), kept)
    assert [m.shape for m in sel.keep_masks] == [(2, 4), (4, 4)]
    got = disjoint_sequence_ids([torch.tensor([0, 2]), torch.tensor([], dtype=torch.long), torch.tensor([1, 0])])
    assert [g.tolist() for g in got] == [[0, 2], [], [4, 3]]
    with pytest.raises(ValueError, match="mix position ranks"):
        select_parts([two_d[0], whole])
    with pytest.raises(ValueError, match="at least one"):
        select_parts([])
    with pytest.raises(ValueError, match="2\\*\\*53"):
        select_parts([whole], sequence_ids=[torch.full((24,), 2 ** 53)], global_sequence_ids=True)


def _select_parts_worker(rank, world, init, out_dir, splits):
    import torch.distributed as dist

    from taopd_kernels.selection import select_parts

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        ent, dis, mass, valid, seq, part = _parts_inputs()
        results = {}
        for ids_kind, split in splits.items():
            mine = slice(0, split) if rank == 0 else slice(split, None)
            cuts = [slice(mine.start, (mine.start or 0) + 2), slice((mine.start or 0) + 2, mine.stop)]
            ids = [seq[c] - seq[mine].min() if ids_kind == "local" else seq[c] for c in cuts]
            for strategy in STRATEGIES:
                sel = select_parts([part(c) for c in cuts], strategy=strategy, keep_ratio=0.3, min_per_sequence=2,
                                   seed=3, sequence_ids=ids, global_sequence_ids=ids_kind == "global")
                results[(ids_kind, strategy)] = (torch.cat(sel.keep_masks), sel.num_kept, sel.num_valid)
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_select_parts_across_two_processes_equals_the_concatenation(tmp_path):
    """Two gloo processes, uneven, two parts each: "local" ids renumbered from 0 on each rank (made
    disjoint by the library), "global" ids shared by the ranks with one sequence split between them."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    splits = {"local": 9, "global": 7}  # rank 0 gets positions [0, split): 9 ends sequence 1, 7 cuts it
    mp.spawn(_select_parts_worker, args=(2, f"tcp://127.0.0.1:{port}", str(tmp_path), splits), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    ent, dis, mass, valid, seq, _ = _parts_inputs()
    for strategy in STRATEGIES:
        _, kept = _concatenated(strategy, ent, dis, mass, valid, seq)
        for ids_kind in splits:
            got = [r[(ids_kind, strategy)] for r in ranks]
            assert torch.equal(torch.cat([g[0] for g in got]), kept), (ids_kind, strategy)
            assert all(g[1:] == (int(kept.sum()), int(valid.sum())) for g in got)
