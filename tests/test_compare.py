"""The comparison (train/compare.py -> taopd_train.experiments.compare) end to end on tiny random models: every file, the documented fields, resume."""

import dataclasses
import json

import pytest

from taopd_train.experiments import compare as cmp


def _cfg(tmp_path):
    from tests.test_train import _tiny_cfg

    return _tiny_cfg(tmp_path, "optim.steps=1", "eval.every=1", "data.eval_size=4", "eval.batch_size=4")


RUN_FIELDS = {"strategy", "seed", "keep_ratio", "kept_fraction", "final_accuracy", "accuracy_curve",
              "heldout_kl_reverse", "heldout_kl_forward", "loss_head_s", "total_s"}


def test_compare_writes_every_file_and_resumes(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path)
    out = tmp_path / "cmp"
    strategies, seeds = ["all", "teachability"], [0, 1]
    # an interrupted comparison: the third run fails
    real_train = cmp.driver.train
    calls = []

    def flaky(c, log=None, hooks=None):
        calls.append((c.loss.strategy, c.seed))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_train(c, log=log, hooks=hooks)

    monkeypatch.setattr(cmp.driver, "train", flaky)
    with pytest.raises(KeyboardInterrupt):
        cmp.compare(cfg, strategies, seeds, out, kl_contexts=3, log=lambda m: None, progress=False)
    first = json.loads((out / "compare.json").read_text())
    assert [(r["strategy"], r["seed"]) for r in first["runs"]] == [("all", 0), ("teachability", 0)]
    assert not (out / "compare.md").exists()
    monkeypatch.setattr(cmp.driver, "train", real_train)
    calls.clear()
    monkeypatch.setattr(cmp.driver, "train", lambda c, log=None, hooks=None: (
        calls.append((c.loss.strategy, c.seed)), real_train(c, log=log, hooks=hooks))[1])
    res = cmp.compare(cfg, strategies, seeds, out, kl_contexts=3, log=lambda m: None, progress=True)
    assert calls == [("all", 1), ("teachability", 1)]  # finished runs are not rerun
    data = json.loads((out / "compare.json").read_text())
    assert data["runs"][:2] == first["runs"][:2]
    assert len(data["runs"]) == 4 and data == json.loads(json.dumps(res))
    for r in data["runs"]:
        assert RUN_FIELDS <= set(r)
        assert [p[0] for p in r["accuracy_curve"]] == [0, 1]
        assert r["heldout_kl_reverse"] >= 0 and r["heldout_kl_forward"] >= 0
        assert r["kl_curve"][-1] == [r["accuracy_curve"][-1][0], r["heldout_kl_reverse"], r["heldout_kl_forward"]]
        assert 0 < r["kept_fraction"] <= 1 and r["loss_head_s"] > 0 and r["total_s"] > 0
        assert r["keep_ratio"] == (1.0 if r["strategy"] == "all" else cfg.loss.keep_ratio)
    by = {(r["strategy"], r["seed"]): r for r in data["runs"]}
    assert by[("all", 0)]["kept_fraction"] == 1.0
    # one bank for every run, the same theta_0 for every strategy of a seed (random-init models are drawn
    # with the run seed; the built-in ones are prepared once): identical step-0 KLs per seed
    for seed in seeds:
        assert len({tuple(r["kl_curve"][0]) for r in data["runs"] if r["seed"] == seed}) == 1
    assert data["config"]["strategies"] == strategies and data["config"]["steps"] == 1
    # a task without position classes (arithmetic): no per-class kept metrics to average
    assert all(r["kept_class_mix"] == {} and r["C_kept_by_class"] == {} for r in data["runs"])
    md = (out / "compare.md").read_text()
    assert all(f"| {s} | 2 |" in md for s in strategies)
    assert (out / "compare.png").stat().st_size > 0
    # other settings in the same folder: refused, not mixed, and the message names them
    with pytest.raises(cmp.ConfigError, match=r"other settings \(driver\.optim\.steps: 1 -> 2; steps: 1 -> 2\)"):
        cmp.compare(dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, steps=2)), strategies, seeds, out,
                    kl_contexts=3, log=lambda m: None, progress=False)
    with pytest.raises(cmp.ConfigError, match=r"kl_contexts: 3 -> 4"):
        cmp.compare(cfg, strategies, seeds, out, kl_contexts=4, log=lambda m: None, progress=False)
    # where the prepared models are cached and what is logged do not change a run's numbers: it resumes
    calls.clear()
    moved = dataclasses.replace(cfg, sft=dataclasses.replace(cfg.sft, cache_dir=str(tmp_path / "elsewhere")),
                                logging=dataclasses.replace(cfg.logging, plot=not cfg.logging.plot, every=3))
    again = cmp.compare(moved, strategies, seeds, out, kl_contexts=3, log=lambda m: None, progress=False)
    assert calls == [] and again["runs"] == data["runs"]


def test_main_rejects_unknown_strategies(tmp_path, capsys):
    assert cmp.main(["--strategies", "all,bogus", "--out", str(tmp_path), "--seeds", "0"]) == 2
    assert "bogus" in capsys.readouterr().err


def test_a_run_entry_averages_the_per_class_kept_metrics_over_steps():
    rec = cmp.RunRecord(None, {})
    nan = float("nan")
    rec.on_step_end(1, {"kept_fraction": 0.1, "loss_head_s": 0.0, "kept_mix/rule": 0.75, "kept_mix/wrong": 0.25,
                        "C_kept/rule": 0.5, "C_kept/wrong": nan, "kept_rate/rule": 0.2, "C/rule": 0.9})
    rec.on_step_end(2, {"kept_fraction": 0.1, "loss_head_s": 0.0, "kept_mix/rule": 0.25, "kept_mix/wrong": 0.75,
                        "C_kept/rule": 0.75, "C_kept/wrong": nan, "kept_rate/rule": 0.4, "C/rule": 0.8})
    assert rec.class_means("kept_mix/") == {"rule": 0.5, "wrong": 0.5}
    # a step that kept nothing of a class does not count towards its mean C; never kept: None
    assert rec.class_means("C_kept/") == {"rule": 0.625, "wrong": None}
