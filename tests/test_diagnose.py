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
    # a task without position classes (long_arithmetic): the keys the diagnostic had before classes
    assert cfg.data.source == "long_arithmetic" and "position_classes" not in data
    for k in ("4", "16"):
        r = data["by_k"][k]
        assert set(r) == {"n_positions", "n_contexts", "bootstrap", "models", "coefficients", "q3_gap", "q3_gap_rel",
                          "matched_gap", "matched_gap_rel", "kernel_vs_reference_kl_fwd_max_abs"}
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


# ------------------------------------------------------------------ position classes (issue 25, item 4)


def _class_table(effects, per_class=12, n_prompts=60, seed=0, class_mean=None, noise=0.3):
    """``per_class`` rows of every prompt in every class of ``effects`` (class -> slope of G on C), the other
    regressors drawn independently; G = slope * C_norm (+ ``class_mean``[class]) + noise. Class i of m holds
    C in [i/m, (i+1)/m), so that with ``class_mean`` the class and C are confounded."""
    rng = np.random.default_rng(seed)
    names = list(effects)
    labels = np.tile(np.repeat(names, per_class), n_prompts)
    pid = np.repeat(np.arange(n_prompts), per_class * len(names))
    n = len(labels)
    c_lo = {c: i / len(names) for i, c in enumerate(names)}
    C = np.array([c_lo[c] for c in labels]) + rng.uniform(0, 1 / len(names), n)
    H, D, pos, Ht = (rng.uniform(0, 1, n) for _ in range(4))
    slope = np.array([effects[c] for c in labels])
    G = slope * C + noise * rng.normal(size=n)
    if class_mean is not None:
        G = G + np.array([class_mean[c] for c in labels])
    return {"prompt_id": pid, "class": labels, "gain": G, "gain_rel": G, "kl_fwd_before": np.ones(n), "H": H, "D": D,
            "C": C, "H_norm": H, "D_norm": D, "C_norm": C, "pos_norm": pos, "Ht_norm": Ht, "D_learn": D * C,
            "D_incompat": D * (1 - C)}


def test_beta_c_and_the_q3_gap_within_a_class_find_an_effect_only_where_it_is():
    # G rises with C within "brief" only; "rule" and "wrong" hold no C effect
    table = _class_table({"rule": 0.0, "brief": 3.0, "wrong": 0.0})
    res = dg.analyze(table, n_boot=200, seed=1, classes=["rule", "known", "brief", "wrong", "other"])
    by = res["by_class"]
    assert set(by) == {"rule", "brief", "wrong", "lookup"}  # classes absent from the rows are left out
    assert by["lookup"]["members"] == ["brief", "wrong"] and by["lookup"]["n"] == by["brief"]["n"] + by["wrong"]["n"]
    brief = by["brief"]
    assert brief["beta_C"]["beta"] > 0.3 and brief["beta_C"]["ci"][0] > 0
    assert brief["q3_gap"]["gap"] > 0 and brief["q3_gap"]["ci"][0] > 0
    for c in ("rule", "wrong"):
        lo, hi = by[c]["beta_C"]["ci"]
        assert abs(by[c]["beta_C"]["beta"]) < 0.15 and lo < 0 < hi
        lo, hi = by[c]["q3_gap"]["ci"]
        assert lo < 0 < hi
    # the within-class fit is the standardised OLS on that class's rows alone
    rows = table["class"] == "brief"
    X = np.column_stack([table[n][rows] if n != "HxD" else table["H_norm"][rows] * table["D_norm"][rows]
                         for n in dg.BASELINE_C])
    assert brief["beta_C"]["beta"] == pytest.approx(_direct_beta(table["gain"][rows], X)[-1], abs=1e-10)
    assert brief["n"] == rows.sum() and brief["gain_mean"] == pytest.approx(table["gain"][rows].mean())
    assert brief["gain_mean_ci"][0] < brief["gain_mean"] < brief["gain_mean_ci"][1]
    # the Q3 gap within the class: medians and terciles computed on the class's rows (of H, D, C themselves)
    assert brief["q3_gap"]["gap"] == pytest.approx(dg.q3_gap(table, np.flatnonzero(rows), stats=dg.RAW)["gap"])
    assert brief["q3_gap_rel"]["gap"] == pytest.approx(
        dg.q3_gap(table, np.flatnonzero(rows), y="gain_rel", stats=dg.RAW)["gap"])
    assert brief["beta_C"]["vif_C"] < 1.5  # the regressors were drawn independently
    # beside it, the fit on ~C alone: the correlation of G with ~C on the class's rows
    assert by["rule"]["beta_C_alone"]["beta"] == pytest.approx(
        np.corrcoef(table["gain"][table["class"] == "rule"], table["C_norm"][table["class"] == "rule"])[0, 1])
    # the group's fit with its members' dummies is also reported
    assert by["lookup"]["beta_C_with_class_dummies"]["regressors"][-1] == "class=wrong"


def test_class_dummies_absorb_a_pure_class_effect():
    # G is the class mean only, and C is higher in the higher-gain classes: C predicts G only through the class
    table = _class_table({"rule": 0.0, "known": 0.0, "wrong": 0.0}, class_mean={"rule": 0.0, "known": 1.0, "wrong": 2.0},
                         noise=0.2)
    res = dg.analyze(table, n_boot=200, seed=2, classes=["rule", "known", "brief", "wrong"])
    plain = res["models"]["baseline_C"]["coefficients"]["C_norm"]
    cov = res["class_covariate"]
    assert plain["beta"] > 0.3 and plain["ci"][0] > 0  # without the class: C looks strongly predictive
    assert abs(cov["beta_C"]["beta"]) < 0.05 and cov["beta_C"]["ci"][0] < 0 < cov["beta_C"]["ci"][1]
    assert cov["reference_class"] == "rule" and cov["dummies"] == ["class=known", "class=wrong"]
    assert set(cov["models"]["baseline_C"]["coefficients"]) == set(dg.BASELINE_C + cov["dummies"])
    assert cov["models"]["baseline_C"]["incremental_r2"] == pytest.approx(
        cov["models"]["baseline_C"]["r2"] - cov["models"]["baseline"]["r2"])
    # the no-class models are those of a table without the class column, unchanged
    no_class = dg.analyze({k: v for k, v in table.items() if k != "class"}, n_boot=200, seed=2)
    assert "by_class" not in no_class and "class_covariate" not in no_class
    assert no_class["models"]["baseline_C"]["coefficients"] == res["models"]["baseline_C"]["coefficients"]


def test_a_class_too_small_or_without_c_variance_is_skipped_with_the_reason():
    table = _class_table({"rule": 1.0, "known": 1.0}, per_class=4, n_prompts=30)
    known = table["class"] == "known"
    table["C_norm"] = np.where(known, 1.0, table["C_norm"])  # C clipped to 1 on every known position
    rule = ~known  # and on rule positions ~D = 1 - ~C: C cannot be told apart from D there
    table["D_norm"] = np.where(rule, 1.0 - table["C_norm"] + 1e-3 * np.sin(np.arange(len(known))), table["D_norm"])
    res = dg.analyze(table, n_boot=20, seed=0, classes=["rule", "known"], groups={})
    assert "C_norm has no variance" in res["by_class"]["known"]["beta_C"]["skipped"]
    b = res["by_class"]["rule"]["beta_C"]
    assert b["corr_C_D"] < -0.999 and b["vif_C"] > 100  # reported, so that such a beta_C is read as unidentified
    # the Q3 gap within the class splits on C itself, not on the clipped ~C: three terciles, no overlap, and
    # the known class's G rising with C shows
    q = res["by_class"]["known"]["q3_gap"]
    assert sum(q["tercile_sizes"]) == q["n_q3"] and min(q["tercile_sizes"]) > 0 and q["gap"] > 0
    clipped = dg.q3_gap(table, np.flatnonzero(known))  # on ~C every row ties: top and bottom tercile are all rows
    assert clipped["tercile_sizes"][0] == clipped["tercile_sizes"][2] == clipped["n_q3"] and clipped["gap"] == 0
    small = dg.analyze(_class_table({"rule": 1.0, "known": 1.0}, per_class=1, n_prompts=30), n_boot=20,
                       classes=["rule", "known"], groups={})
    assert "rows <" in small["by_class"]["known"]["beta_C"]["skipped"] and small["by_class"]["known"]["n"] == 30


def test_diagnose_on_a_task_with_position_classes(tmp_path):
    """The lookup task on tiny random models: every bank position gets the class of the token it predicts."""
    from tests.test_train import _tiny_cfg

    cfg = _tiny_cfg(tmp_path, "data.source=lookup", "rollout.max_new_tokens=6", "data.eval_size=8")
    out = tmp_path / "diag"
    res = dg.diagnose(cfg, contexts=6, train_steps=1, top_k=(16,), n_boot=10, out=out, log=lambda m: None)
    with open(out / "tokens.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == dg.CSV_COLUMNS + ["class"] and len(rows) == res["n_positions"]
    from taopd_train.lookup_task import LAYOUT, LookupTask

    task = LookupTask(num_eval=8)
    # the layout's first items: two rule words, a separator, a lookup whose key group the prompt decides
    by_pos = {}
    for r in rows:
        by_pos.setdefault(int(r["position"]), set()).add(r["class"])
    assert by_pos[0] == by_pos[1] == {"rule"} and by_pos[2] == {"separator"} and by_pos[3] <= {"known", "brief", "wrong"}
    assert all(c in task.classes for c in by_pos.get(5, set()) | by_pos.get(4, set())) and len(LAYOUT) > 5
    data = json.loads((out / "diagnostic.json").read_text())
    assert data["position_classes"]["counts"]["rule"] == sum(r["class"] == "rule" for r in rows)
    k16 = data["by_k"]["16"]
    assert {"rule", "separator", "lookup"} <= set(k16["by_class"]) and "beta_C" in k16["class_covariate"]
    assert k16["by_class"]["lookup"]["n"] == sum(r["class"] in ("known", "brief", "wrong") for r in rows)
    assert (out / "diagnostic.png").stat().st_size > 0
