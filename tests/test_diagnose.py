"""train/diagnose.py: its statistics against direct computations on hand-made tables, and the whole
diagnostic end to end on tiny random models (every file, the documented fields)."""

import csv
import json

import numpy as np
import pytest

from taopd_train.experiments import diagnose as dg


def _table(n_prompts=40, per=25, seed=0):
    """y = 0.5 x1 - 0.25 x2 + 0 x3 + noise, with a prompt-level random effect (clustered errors)."""
    rng = np.random.default_rng(seed)
    pid = np.repeat(np.arange(n_prompts), per)
    X = rng.normal(size=(len(pid), 3))
    y = 0.5 * X[:, 0] - 0.25 * X[:, 1] + 0.3 * rng.normal(size=n_prompts)[pid] + 0.1 * rng.normal(size=len(pid))
    return pid, X, y


def _direct_beta(y, X):
    """Standardised coefficients from the normal equations, written out."""
    Xz = (X - X.mean(0)) / X.std(0)
    yz = (y - y.mean()) / y.std()
    A = np.column_stack([np.ones(len(y)), Xz])
    return np.linalg.solve(A.T @ A, A.T @ yz)[1:]


def test_standardized_ols_matches_the_normal_equations_and_the_known_coefficients():
    pid, X, y = _table()
    fit = dg.standardized_ols(y, X, ["a", "b", "c"])
    direct = _direct_beta(y, X)
    assert np.allclose([fit["beta"][n] for n in "abc"], direct, atol=1e-10)
    # known coefficients: beta_j = b_j sd(x_j) / sd(y)
    known = np.array([0.5, -0.25, 0.0]) * X.std(0) / y.std()
    assert np.allclose(direct, known, atol=0.05)
    resid = (y - y.mean()) / y.std() - np.column_stack([np.ones(len(y)), (X - X.mean(0)) / X.std(0)]) @ \
        np.r_[0.0, direct]
    assert fit["r2"] == pytest.approx(1 - (resid ** 2).sum() / len(y), abs=1e-9)
    b, r2 = dg._beta_lstsq(y, X)
    assert np.allclose(b, direct, atol=1e-10) and r2 == pytest.approx(fit["r2"], abs=1e-10)


def test_cluster_bootstrap_matches_a_direct_loop():
    pid, X, y = _table()
    table = {"prompt_id": pid, "y": y, "a": X[:, 0], "b": X[:, 1], "c": X[:, 2]}
    n_boot, seed = 200, 7
    res = dg.regression(table, ["a", "b", "c"], dg.cluster_resamples(pid, n_boot, seed), y="y")
    # direct: the same prompt draws, every row of a drawn prompt, refit from the normal equations
    rng = np.random.default_rng(seed)
    ids = np.unique(pid)
    boots = []
    for _ in range(n_boot):
        pick = rng.integers(0, len(ids), size=len(ids))
        rows = np.concatenate([np.flatnonzero(pid == ids[i]) for i in pick])
        boots.append(_direct_beta(y[rows], X[rows]))
    boots = np.array(boots)
    for j, n in enumerate("abc"):
        lo, hi = np.quantile(boots[:, j], [0.025, 0.975])
        assert res["coefficients"][n]["ci"] == pytest.approx([lo, hi], abs=1e-10)
        assert lo < res["coefficients"][n]["beta"] < hi
    # clusters resampled as wholes: each resample has a multiple of the cluster size
    assert all(len(r) % 25 == 0 for r in dg.cluster_resamples(pid, 5, 0))
    # with clustered errors the cluster CI of the intercept-free predictors still covers the known value
    known = np.array([0.5, -0.25, 0.0]) * X.std(0) / y.std()
    for j, n in enumerate("abc"):
        lo, hi = res["coefficients"][n]["ci"]
        assert lo - 0.02 <= known[j] <= hi + 0.02


def test_q3_gap_and_matched_gap_on_a_hand_made_table():
    # 4 prompts x 6 positions; Q3 = low H, high D; within it the gain rises with C
    H = np.array([0.1, 0.2, 0.1, 0.9, 0.8, 0.2] * 4)
    D = np.array([0.9, 0.8, 0.7, 0.1, 0.2, 0.9] * 4)
    C = np.array([0.9, 0.5, 0.1, 0.5, 0.5, 0.8] * 4)
    G = 2.0 * C * (H <= 0.2) + 0.01
    table = {"prompt_id": np.repeat(np.arange(4), 6), "H_norm": H, "D_norm": D, "C_norm": C, "gain": G,
             "pos_norm": np.tile(np.linspace(0, 1, 6), 4)}
    q = dg.q3_gap(table)
    cell = (H <= np.median(H)) & (D >= np.median(D))
    c, g = C[cell], G[cell]
    lo, hi = np.quantile(c, [1 / 3, 2 / 3])
    assert q["gap"] == pytest.approx(g[c >= hi].mean() - g[c <= lo].mean())
    assert q["gap"] > 0 and q["n_q3"] == cell.sum()
    hi_rows, lo_rows = dg.matched_pairs(table)
    med = np.median(C)
    assert (C[hi_rows] > med).all() and (C[lo_rows] < med).all()
    assert (table["prompt_id"][hi_rows] == table["prompt_id"][lo_rows]).all()
    m = dg.matched_gap(table, [np.arange(4)] * 3)
    assert m["gap"] == pytest.approx((G[hi_rows] - G[lo_rows]).mean()) and m["ci"][0] == pytest.approx(m["gap"])


def test_diagnose_end_to_end_on_tiny_models(tmp_path):
    from tests.test_train import _tiny_cfg

    cfg = _tiny_cfg(tmp_path)
    out = tmp_path / "diag"
    res = dg.diagnose(cfg, contexts=6, train_steps=1, top_k=(4, 16), n_boot=20, out=out, log=lambda m: None)
    data = json.loads((out / "diagnostic.json").read_text())
    assert data["n_contexts"] == 6 and set(data["by_k"]) == {"4", "16"}
    for k in ("4", "16"):
        r = data["by_k"][k]
        assert r["n_contexts"] == 6 and r["n_positions"] == data["n_positions"] > 0
        for name in dg.SPLIT:
            assert set(r["coefficients"][name]) >= {"beta", "ci"} and len(r["coefficients"][name]["ci"]) == 2
        for m in ("split", "baseline", "baseline_C"):
            assert "r2" in r["models"][m]
        assert "incremental_r2" in r["models"]["split"] and "incremental_r2" in r["models"]["baseline_C"]
        assert set(r["q3_gap"]) >= {"gap", "ci"} and "gap" in r["matched_gap"]
        assert r["kernel_vs_reference_kl_fwd_max_abs"] < 1e-3
    with open(out / "tokens.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == dg.CSV_COLUMNS and len(rows) == data["n_positions"]
    g = [float(r["gain"]) for r in rows]
    assert np.allclose(g, [float(r["kl_fwd_before"]) - float(r["kl_fwd_after"]) for r in rows], atol=1e-5)
    assert (out / "diagnostic.png").stat().st_size > 0
    assert res["config"]["strategy"] == "all" and res["config"]["train_steps"] == 1
    # a trained student given as --checkpoint: the same bank, no training
    res2 = dg.diagnose(cfg, contexts=6, checkpoint=res["config"]["checkpoint"], top_k=(16,), n_boot=5,
                       out=tmp_path / "diag2", log=lambda m: None)
    assert res2["kl_fwd_after_mean"] == pytest.approx(res["kl_fwd_after_mean"], rel=1e-5)
