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
    assert all(f"| {s} | {cfg.optim.lr:g} | 2 |" in md for s in strategies)
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


def test_a_run_entry_records_the_mean_C_at_kept_positions():
    rec = cmp.RunRecord(None, {})
    for c in (0.5, float("nan"), 1.0):  # the middle step kept nothing
        rec.on_step_end(1, {"kept_fraction": 0.1, "loss_head_s": 0.0, "C/kept": c})
    assert cmp.mean_defined(rec.c_kept) == 0.75 and cmp.mean_defined([float("nan")]) is None


def test_compare_md_names_the_best_rival_and_the_incompatible_control():
    """The issue's two headline comparisons, read off compare.md: teachability minus the best (by seed mean)
    of divergence / entropy / tip, and incompatible minus random, each paired over seeds."""
    accs = {"teachability": [0.50, 0.60, 0.70], "divergence": [0.40, 0.45, 0.50], "entropy": [0.45, 0.50, 0.65],
            "tip": [0.10, 0.20, 0.30], "incompatible": [0.20, 0.30, 0.30], "random": [0.30, 0.30, 0.30]}
    runs = [{"strategy": s, "seed": seed, "lr": 2e-4, "final_accuracy": a, "C_kept": 0.9}
            for s, xs in accs.items() for seed, a in enumerate(xs)]
    result = {"config": {"strategies": list(accs), "steps": 1, "keep_ratio": 0.05, "kl_contexts": 0,
                         "driver": {"optim": {"lr": 2e-4}, "data": {"source": "lookup"}, "eval": {}}}, "runs": runs}
    md = cmp.markdown_table(result)
    # entropy has the best seed mean (0.533); teachability - entropy = [0.05, 0.10, 0.05]: mean 0.067
    assert "teachability minus the best of divergence, entropy, tip by seed mean (entropy): +0.067" in md
    # incompatible - random = [-0.1, 0, 0]: mean -0.033
    assert "incompatible minus random: -0.033" in md
    assert "| teachability | 0.0002 | 3 | 0.600 ± 0.100 | n/a | n/a | 0.900 ± 0.000 |" in md


def test_an_lr_sweep_on_validation_prompts_then_each_strategy_at_its_best_lr(tmp_path):
    """--lrs runs every strategy at each lr; --best-lr-from adds each strategy's best lr beside the config's;
    every run records its lr, its commit and which prompts scored it; compare.md holds the sweep table and
    the paired differences."""
    cfg = _cfg(tmp_path)
    sweep_cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, prompts="validation"))
    sweep = cmp.compare(sweep_cfg, ["all", "teachability"], [7], tmp_path / "sweep", kl_contexts=0,
                        log=lambda m: None, progress=False, lrs=[1e-4, 3e-2])
    from taopd_train.task import build_task

    n_val = len(build_task(cfg.data, seed=7).validation_examples())
    assert {(r["strategy"], r["lr"]) for r in sweep["runs"]} == {(s, lr) for s in ("all", "teachability")
                                                                  for lr in (1e-4, 3e-2)}
    assert all(r["eval_prompts"] == "validation" and r["eval_n"] == n_val != cfg.data.eval_size for r in sweep["runs"])
    assert all(r["commit"] and r["heldout_kl_reverse"] != r["heldout_kl_reverse"] for r in sweep["runs"])  # no bank: NaN
    assert sweep["commit_at_start"]
    assert (tmp_path / "sweep" / "runs" / "teachability-lr0.03-seed7").is_dir()
    best = cmp.best_lrs(sweep)
    assert set(best) == {"all", "teachability"}
    md = (tmp_path / "sweep" / "compare.md").read_text()
    assert "Final accuracy by lr" in md and "| all | 0.0001 | 1 |" in md

    lr0 = cfg.optim.lr
    tuned = {"all": 3e-2, "teachability": lr0}  # teachability's equals the config's: one arm, not two
    res = cmp.compare(cfg, ["all", "teachability"], [0, 1], tmp_path / "tuned", kl_contexts=0, log=lambda m: None,
                      progress=False, tuned_lr=tuned)
    assert sorted((r["strategy"], r["lr"], r["seed"]) for r in res["runs"]) == sorted(
        [("all", lr0, 0), ("all", 3e-2, 0), ("teachability", lr0, 0),
         ("all", lr0, 1), ("all", 3e-2, 1), ("teachability", lr0, 1)])
    assert all(r["eval_prompts"] == "heldout" and r["eval_n"] == cfg.data.eval_size for r in res["runs"])
    assert res["config"]["tuned_lr"] == tuned
    md = (tmp_path / "tuned" / "compare.md").read_text()
    assert "teachability minus each strategy, every strategy at the config's lr" in md
    assert "teachability minus each strategy, each strategy at its tuned lr" in md
    assert "| all | 0.03 | 2 |" in md
    # the tuned lrs define the comparison: another choice in the same folder is refused
    with pytest.raises(cmp.ConfigError, match=r"tuned_lr\.all: 0\.03 -> 0\.001"):
        cmp.compare(cfg, ["all", "teachability"], [0, 1], tmp_path / "tuned", kl_contexts=0, log=lambda m: None,
                    progress=False, tuned_lr={**tuned, "all": 1e-3})


def test_best_lr_takes_the_highest_mean_and_the_smaller_lr_on_ties():
    runs = [{"strategy": "a", "lr": lr, "final_accuracy": acc} for lr, acc in ((4e-4, 0.5), (1e-4, 0.5), (2e-4, 0.4))]
    runs += [{"strategy": "b", "final_accuracy": 0.3},  # an entry without lr ran at the config's
             {"strategy": "b", "lr": 8e-4, "final_accuracy": 0.2}, {"strategy": "b", "lr": 8e-4, "final_accuracy": 0.35}]
    assert cmp.best_lrs({"config": {"driver": {"optim": {"lr": 2e-4}}}, "runs": runs}) == {"a": 1e-4, "b": 2e-4}


def test_paired_difference_is_the_paired_t_interval_over_shared_seeds():
    # d = a - b over the shared seeds {0, 1, 2} = [1, 2, 3]: mean 2, sd 1, t(0.975, 2 df) = 4.302653
    d = cmp.paired_difference({0: 1.0, 1: 3.0, 2: 5.0, 9: 0.0}, {0: 0.0, 1: 1.0, 2: 2.0, 8: 0.0})
    half = 4.302653 / 3 ** 0.5
    assert d["n"] == 3 and d["mean"] == pytest.approx(2.0)
    assert d["ci95"] == pytest.approx([2 - half, 2 + half], rel=1e-6)
    assert 0.01 < d["p"] < 0.1  # t = 2 / (1 / sqrt 3) = 3.46 on 2 df: p = 0.074
    assert cmp.paired_difference({0: 1.0}, {0: 0.0}) is None


def test_head_seconds_to_reach_the_reference_uses_seed_mean_curves():
    def run(strategy, seed, accs, heads):
        return {"strategy": strategy, "seed": seed, "final_accuracy": accs[-1], "loss_head_s": heads[-1],
                "accuracy_curve": [[10 * i, a] for i, a in enumerate(accs)],
                "loss_head_s_curve": [[10 * i, h] for i, h in enumerate(heads)]}

    by = {"all": [run("all", 0, [0.1, 0.3, 0.5], [0, 5, 10]), run("all", 1, [0.1, 0.4, 0.6], [0, 6, 12])],
          "teachability": [run("teachability", 0, [0.1, 0.5, 0.6], [0, 1, 2]),
                           run("teachability", 1, [0.1, 0.7, 0.5], [0, 2, 4])]}
    got = cmp.head_seconds_to_reach(by)
    # target 0.55; teachability's seed-mean curve 0.1, 0.6, 0.55: first at step 10, after (1 + 2) / 2 s
    assert got == {"target_accuracy": pytest.approx(0.55), "reference_head_s": 11.0, "step": 10, "head_s": 1.5}
    by["teachability"] = [run("teachability", 0, [0.1, 0.2, 0.3], [0, 1, 2])]
    assert cmp.head_seconds_to_reach(by)["step"] is None
