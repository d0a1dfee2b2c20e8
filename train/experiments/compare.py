"""Strategies x seeds on the same prepared models, the same prompt stream and the same number of steps.

    python train/compare.py                                        # all 7 strategies x 3 seeds, built-in default
    python train/compare.py --strategies all,teachability --seeds 0,1 --steps 50 --out runs/cmp optim.lr=1e-4
    python train/compare.py --out runs/cmp                         # again: finished runs are kept, the rest run
    python train/compare.py --config lookup --seeds 100 --lrs 1e-4,2e-4,4e-4,8e-4 --kl-contexts 0 \
        --out runs/sweep eval.prompts=validation                   # an lr sweep, chosen on validation prompts
    python train/compare.py --config lookup --seeds 0,1,2,3,4 --best-lr-from runs/sweep/compare.json \
        --out runs/tuned                                           # each strategy at its best and the default lr

Every run is the driver's ``run.train`` with ``loss.strategy`` and ``seed`` set (the configured
keep_ratio for the selectors; ``all`` keeps every position), watched through the loop's callbacks
(``RunRecord``, a ``hooks.Hooks``). The run seed drives the prompt
stream, the rollouts and the ``random`` selector; the built-in models are prepared once, with
``sft.seed`` pinned to the config's seed, so every run starts from the same theta_0 against the same
teacher, and for a given seed every strategy sees the same prompts. The held-out KLs are measured on
one fixed bank of contexts sampled by theta_0 (``--kl-contexts``), shared by all runs: mean
full-vocabulary reverse and forward KL over its response positions, at every evaluation.

A run is one arm (strategy, lr) at one seed; without ``--lrs`` / ``--best-lr-from`` every strategy runs at
``optim.lr``. ``--best-lr-from`` reads a sweep's compare.json and adds, for each strategy it swept, the lr
with the highest final accuracy there (the sweep's seed only; ties go to the smaller lr). Every run
records the git commit it ran at, and compare.json the commit its first run started from.

Writes DIR/compare.json (after every run, so an interrupted comparison resumes: finished runs are
kept and not rerun), DIR/compare.md (mean and spread per strategy) and DIR/compare.png (accuracy
and held-out KL against step, mean and min-max over seeds). Per-run driver output: DIR/runs/<name>/.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from taopd_kernels import STRATEGIES

from .. import run as driver
from ..config import _flatten, _matches, cli_exit_code, Config, ConfigError, load_config, to_dict
from ..hooks import Hooks
from .bank import KLBank
from .common import parser, save_figure

DEFAULT_STRATEGIES = ("all", "teachability", "random", "entropy", "divergence", "tip", "incompatible")
DEFAULT_SEEDS = (0, 1, 2)
# Driver settings that leave a run's numbers as they are (where files go, what is displayed; compare
# sets the checkpoint settings itself): a comparison resumes across them. Every other key must match.
CLASS_METRICS = ("kept_mix/", "C_kept/")  # per-class step metrics (metrics.class_metrics) a run entry averages
NOT_RUN_DEFINING = ("logging.", "checkpoint.", "sft.cache_dir")


# ================================================================== what one driver run shows


def mean_defined(values: Sequence[float]) -> Optional[float]:
    """Mean over the values that are not NaN (a step that kept nothing of a kind); None where none is."""
    defined = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(defined)) if defined else None


class RunRecord(Hooks):
    """The loop's callbacks for one run: per-step kept fraction, mean C at the kept positions (``C/kept``),
    the loss head's time (the driver's ``loss_head_s``), the per-class kept metrics of a task with position
    classes (``kept_mix/<class>``, ``C_kept/<class>``), and at every student evaluation the held-out KLs
    on the bank ([step, accuracy, KL_rev, KL_fwd] in ``curve``). Teacher and theta_0 evaluations are the
    same for every run (greedy decoding, same models): they are computed once and kept in ``cache``,
    shared across runs."""

    def __init__(self, kl_bank: Optional[KLBank], cache: dict):
        self.kl_bank, self.cache = kl_bank, cache
        self.kept: List[float] = []
        self.c_kept: List[float] = []
        self.curve: List[list] = []
        self.head_s = 0.0
        self.by_class: Dict[str, List[float]] = {}
        self.last_eval: dict = {}  # the last student evaluation's per-class figures (accuracy/<class>, ...)

    def on_step_end(self, step: int, metrics: dict) -> None:
        self.kept.append(metrics["kept_fraction"])
        if "C/kept" in metrics:
            self.c_kept.append(metrics["C/kept"])
        self.head_s += metrics["loss_head_s"]
        for key, value in metrics.items():
            if key.startswith(CLASS_METRICS):
                self.by_class.setdefault(key, []).append(value)

    def class_means(self, prefix: str) -> Dict[str, Optional[float]]:
        """Per class: the mean over steps of ``prefix<class>``, steps where it is undefined (NaN: nothing
        of the class kept) left out; None where it is never defined."""
        return {key[len(prefix):]: mean_defined(values) for key, values in self.by_class.items()
                if key.startswith(prefix)}

    def _key(self, step: int, which: str) -> Optional[str]:
        return "teacher" if which == "teacher" else ("theta_0" if step == 0 and not self.curve else None)

    def reuse_evaluation(self, step: int, which: str) -> Optional[dict]:
        return self.cache.get(self._key(step, which))

    def on_evaluate(self, step: int, which: str, result: dict, model) -> None:
        key = self._key(step, which)
        if which == "teacher":
            self.cache[key] = result
            return
        if key == "theta_0" and "theta_0_kl" in self.cache:
            kl = self.cache["theta_0_kl"]
        else:
            kl = self.kl_bank.kl(model) if self.kl_bank is not None else (float("nan"), float("nan"))
        if key == "theta_0":
            self.cache.update(theta_0=result, theta_0_kl=kl)
        self.curve.append([step, result["accuracy"], kl[0], kl[1], self.head_s])
        self.last_eval = {k: v for k, v in result.items() if k.startswith("accuracy/") or k in ("exact_match", "n")}


# ================================================================== the comparison


def run_name(strategy: str, seed: int, lr: Optional[float] = None) -> str:
    """``<strategy>-seed<seed>`` at the config's lr, ``<strategy>-lr<lr>-seed<seed>`` at another one."""
    return f"{strategy}-seed{seed}" if lr is None else f"{strategy}-lr{lr:g}-seed{seed}"


def run_config(cfg: Config, strategy: str, seed: int, out: Path, lr: Optional[float] = None) -> Config:
    """The driver config of one run; ``lr`` None: the config's ``optim.lr``."""
    name = run_name(strategy, seed, None if lr is None or lr == cfg.optim.lr else lr)
    return dataclasses.replace(
        cfg, seed=seed, loss=dataclasses.replace(cfg.loss, strategy=strategy),
        optim=dataclasses.replace(cfg.optim, lr=cfg.optim.lr if lr is None else lr),
        sft=dataclasses.replace(cfg.sft, seed=cfg.sft.seed if cfg.sft.seed is not None else cfg.seed),
        logging=dataclasses.replace(cfg.logging, out_dir=str(out / "runs" / name), progress_bar=False, tensorboard=False),
        checkpoint=dataclasses.replace(cfg.checkpoint, every=0, dir=None, resume=None, save_optimizer=False))


def best_lrs(sweep: dict) -> Dict[str, float]:
    """Per strategy of a sweep's compare.json: the lr with the highest mean final accuracy (ties: the
    smaller lr)."""
    default = sweep["config"]["driver"]["optim"]["lr"]
    scores: Dict[str, Dict[float, List[float]]] = {}
    for r in sweep["runs"]:
        scores.setdefault(r["strategy"], {}).setdefault(r.get("lr", default), []).append(r["final_accuracy"])
    return {s: max(sorted(by_lr), key=lambda lr: np.mean(by_lr[lr])) for s, by_lr in scores.items()}


def arms(cfg: Config, strategies: Sequence[str], lrs: Optional[Sequence[float]] = None,
         extra_lr: Optional[Dict[str, float]] = None) -> List[tuple]:
    """(strategy, lr) pairs: each strategy at every lr of ``lrs`` (default: ``optim.lr``), and at
    ``extra_lr[strategy]`` where given (a tuned lr beside the default one)."""
    out = []
    for s in strategies:
        for lr in list(lrs or [cfg.optim.lr]) + ([extra_lr[s]] if extra_lr and s in extra_lr else []):
            if (s, float(lr)) not in out:
                out.append((s, float(lr)))
    return out


def settings_changes(old: dict, new: dict) -> List[str]:
    """'key: old -> new' for every setting of two comparisons that shapes their runs' numbers (the
    strategies, seeds and arms may differ: a comparison can grow)."""
    def flat(settings):
        f = _flatten({k: v for k, v in settings.items() if k not in ("strategies", "seeds", "arms")})
        return {k: v for k, v in f.items() if not (k.startswith("driver.") and _matches(k[7:], NOT_RUN_DEFINING))}

    a, b = flat(old), flat(new)
    return [f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}" for k in sorted(set(a) | set(b))
            if a.get(k, "<absent>") != b.get(k, "<absent>")]


def compare(cfg: Config, strategies: Sequence[str] = DEFAULT_STRATEGIES, seeds: Sequence[int] = DEFAULT_SEEDS,
            out: Path = Path("runs/compare"), kl_contexts: int = 64, log: Callable[[str], None] = print,
            progress: bool = True, lrs: Optional[Sequence[float]] = None,
            tuned_lr: Optional[Dict[str, float]] = None) -> dict:
    """Every arm (``arms``) at every seed; ``kl_contexts`` 0: no held-out KL bank (KLs NaN)."""
    for s in strategies:
        if s not in STRATEGIES:
            raise ConfigError(f"--strategies: {s!r} is not a strategy ({', '.join(STRATEGIES)})")
    out.mkdir(parents=True, exist_ok=True)
    if cfg.sft.seed is None:
        cfg = dataclasses.replace(cfg, sft=dataclasses.replace(cfg.sft, seed=cfg.seed))
    todo_arms = arms(cfg, strategies, lrs, tuned_lr)
    settings = {"driver": to_dict(cfg), "strategies": list(strategies), "seeds": list(seeds),
                "arms": [list(a) for a in todo_arms], "steps": cfg.optim.steps, "keep_ratio": cfg.loss.keep_ratio,
                "kl_contexts": kl_contexts, "tuned_lr": tuned_lr or {}}
    path = out / "compare.json"
    result = _earlier_result(path, settings)
    runs = result["runs"]
    done = {(r["strategy"], r.get("lr", cfg.optim.lr), r["seed"]) for r in runs}
    todo = [(st, lr, sd) for sd in seeds for st, lr in todo_arms if (st, lr, sd) not in done]
    if runs:
        log(f"[compare] resuming: {len(runs)} finished runs kept, {len(todo)} to run")
    if todo:
        result.setdefault("commit_at_start", git_commit())
        kl_bank = _kl_bank(cfg, strategies[0], out, kl_contexts, result, log) if kl_contexts else None
        caches: dict = {}  # teacher / theta_0 evaluations, per held-out set
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(todo) + len(runs), initial=len(runs), desc="compare", unit="run", dynamic_ncols=True)
        for strategy, lr, seed in todo:
            # long_arithmetic's held-out set is the same for every run seed; other tasks' splits follow the seed
            cache = caches.setdefault("any" if cfg.data.source == "long_arithmetic" else seed, {})
            entry = one_run(cfg, strategy, seed, out, kl_bank, cache, lr=lr)
            runs.append(entry)
            path.write_text(json.dumps(result, indent=1))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(last=f"{strategy}/lr{lr:g}/s{seed} acc={entry['final_accuracy']:.3f}")
            else:
                log(f"[compare] {strategy} lr {lr:g} seed {seed}: accuracy {entry['final_accuracy']:.3f}, kept "
                    f"{entry['kept_fraction']:.3f}, KL_rev {entry['heldout_kl_reverse']:.4f} ({entry['total_s']:.0f}s)")
        if bar is not None:
            bar.close()
    path.write_text(json.dumps(result, indent=1))
    (out / "compare.md").write_text(markdown_table(result))
    plot_compare(result, out / "compare.png")
    return result


def git_commit() -> str:
    """``git describe --always --dirty`` of the checkout the driver runs from, or "unknown"."""
    import subprocess

    try:
        proc = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"], capture_output=True,
                              text=True, timeout=10, cwd=Path(__file__).resolve().parent)
        return proc.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _earlier_result(path: Path, settings: dict) -> dict:
    """An earlier comparison in the same folder, its runs kept (refused if its settings differ); else a new one."""
    if not path.is_file():
        return {"config": settings, "runs": []}
    old = json.loads(path.read_text())
    changed = settings_changes(old["config"], settings)
    if changed:
        raise ConfigError(f"{path} holds a comparison with other settings ({'; '.join(changed)}): use another "
                          "--out, or delete it")
    grown = {k: _union(old["config"].get(k, []), settings[k]) for k in ("strategies", "seeds", "arms")}
    return {**old, "config": {**settings, **grown}}


def _union(a: list, b: list) -> list:
    return a + [x for x in b if x not in a]


def _kl_bank(cfg: Config, strategy: str, out: Path, kl_contexts: int, result: dict, log) -> KLBank:
    """The held-out KL bank, sampled by theta_0 (models built once for it, then dropped)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t0 = time.time()
    device = driver.pick_device(cfg)
    torch.manual_seed(cfg.seed)
    models = driver.build_models(run_config(cfg, strategy, cfg.seed, out), device, log=log)
    kl_bank = KLBank(cfg, models, kl_contexts, seed=driver.step_seed(cfg.seed, 10 ** 6, 13))
    result["kl_bank"] = {"contexts": kl_contexts, "positions": kl_bank.n_positions}
    del models
    log(f"[compare] KL bank: {kl_contexts} contexts, {kl_bank.n_positions} positions ({time.time() - t0:.0f}s)")
    return kl_bank


def one_run(cfg: Config, strategy: str, seed: int, out: Path, kl_bank: Optional[KLBank], cache: dict,
            lr: Optional[float] = None) -> dict:
    """One driver run of the comparison (started over if an earlier one did not finish): its entry."""
    rcfg = run_config(cfg, strategy, seed, out, lr)
    shutil.rmtree(rcfg.logging.out_dir, ignore_errors=True)
    t = time.time()
    rec = RunRecord(kl_bank, cache)
    summary = driver.train(rcfg, log=lambda m: None, hooks=rec)
    curve = rec.curve
    return {
        "strategy": strategy, "seed": seed, "lr": rcfg.optim.lr, "commit": git_commit(),
        "keep_ratio": 1.0 if strategy == "all" else cfg.loss.keep_ratio,
        "kept_fraction": float(np.mean(rec.kept)) if rec.kept else float("nan"),
        "final_accuracy": summary["student_after"], "eval_prompts": rcfg.eval.prompts,
        "eval_n": rec.last_eval.get("n"), "final_by_class": {k: v for k, v in rec.last_eval.items() if k != "n"},
        "accuracy_curve": [[c[0], c[1]] for c in curve],
        "heldout_kl_reverse": curve[-1][2], "heldout_kl_forward": curve[-1][3],
        "kl_curve": [[c[0], c[2], c[3]] for c in curve],
        "loss_head_s_curve": [[c[0], c[4]] for c in curve],
        "teacher_accuracy": summary["teacher_accuracy"], "student_before": summary["student_before"],
        "gap_closed": summary.get("gap_closed"), "steps": summary["steps"],
        "loss_head_s": rec.head_s, "total_s": time.time() - t,
        "C_kept": mean_defined(rec.c_kept),
        "kept_class_mix": rec.class_means("kept_mix/"), "C_kept_by_class": rec.class_means("C_kept/"),
    }


# ================================================================== reports


HEADLINE, REFERENCE = "teachability", "all"  # the method the comparison is about; full-token OPD
RIVALS = ("divergence", "entropy", "tip")  # the informed selectors the method must beat (issue 25's headline)
CONTROL = ("incompatible", "random")  # the anti-teachability selector should do no better than chance
RUN_FIGURES = ("final_accuracy", "gap_closed", "kept_fraction", "C_kept", "heldout_kl_reverse", "heldout_kl_forward",
               "loss_head_s", "total_s")


def per_arm(result: dict) -> Dict[tuple, List[dict]]:
    """Runs grouped by arm (strategy, lr), in the order the comparison lists its strategies."""
    default = result["config"]["driver"]["optim"]["lr"]
    groups: Dict[tuple, List[dict]] = {}
    for r in result["runs"]:
        groups.setdefault((r["strategy"], r.get("lr", default)), []).append(r)
    rank = {s: i for i, s in enumerate(result["config"]["strategies"])}
    return dict(sorted(groups.items(), key=lambda kv: (rank.get(kv[0][0], len(rank)), kv[0][1])))


def _figure(runs: List[dict], key: str) -> list:
    return [r.get(key) if r.get(key) is not None else float("nan") for r in runs]


def _ms(xs, fmt="{:.3f}") -> str:
    a = np.asarray(xs, dtype=float)
    a = a[np.isfinite(a)]
    if len(a) == 0:
        return "n/a"
    if len(a) == 1:
        return fmt.format(a[0])
    return f"{fmt.format(a.mean())} ± {fmt.format(a.std(ddof=1))}"


def paired_difference(a: Dict[int, float], b: Dict[int, float]) -> Optional[dict]:
    """Mean of a - b over the seeds both have, with its 95% CI (paired t, n - 1 degrees of freedom) and
    the two-sided p-value; None with fewer than two shared seeds."""
    from scipy import stats

    seeds = sorted(set(a) & set(b))
    if len(seeds) < 2:
        return None
    d = np.array([a[s] - b[s] for s in seeds], dtype=float)
    half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))
    p = float(stats.ttest_1samp(d, 0.0).pvalue) if d.std(ddof=1) > 0 else float("nan")
    return {"n": len(d), "mean": float(d.mean()), "ci95": [float(d.mean() - half), float(d.mean() + half)], "p": p}


def chosen_arms(result: dict, tuned: bool) -> Dict[str, List[dict]]:
    """Per strategy, the runs of one arm: at its tuned lr (``tuned``, where the comparison has one) or
    at the config's lr."""
    default = result["config"]["driver"]["optim"]["lr"]
    tuned_lr = result["config"].get("tuned_lr") or {}
    out = {}
    for (s, lr), runs in per_arm(result).items():
        if lr == (tuned_lr.get(s, default) if tuned else default):
            out[s] = runs
    return out


def headline_differences(by_strategy: Dict[str, List[dict]]) -> Dict[str, dict]:
    """``HEADLINE`` minus every other strategy, final accuracy paired over seeds."""
    if HEADLINE not in by_strategy:
        return {}
    acc = {s: {r["seed"]: r["final_accuracy"] for r in runs} for s, runs in by_strategy.items()}
    out = {s: paired_difference(acc[HEADLINE], acc[s]) for s in by_strategy if s != HEADLINE}
    return {s: d for s, d in out.items() if d is not None}


def head_seconds_to_reach(by_strategy: Dict[str, List[dict]]) -> Optional[dict]:
    """Loss-head seconds for ``HEADLINE`` to reach ``REFERENCE``'s final seed-mean accuracy (its seed-mean
    curve's first evaluation at or above it), against ``REFERENCE``'s total: seed means."""
    if HEADLINE not in by_strategy or REFERENCE not in by_strategy:
        return None
    target = float(np.mean([r["final_accuracy"] for r in by_strategy[REFERENCE]]))
    runs = [r for r in by_strategy[HEADLINE] if "loss_head_s_curve" in r]
    if not runs:
        return None
    steps = [p[0] for p in runs[0]["accuracy_curve"]]
    acc = np.mean([[p[1] for p in r["accuracy_curve"]] for r in runs], axis=0)
    head = np.mean([[p[1] for p in r["loss_head_s_curve"]] for r in runs], axis=0)
    reached = [i for i, a in enumerate(acc) if a >= target]
    return {"target_accuracy": target, "reference_head_s": float(np.mean([r["loss_head_s"] for r in by_strategy[REFERENCE]])),
            "step": steps[reached[0]] if reached else None, "head_s": float(head[reached[0]]) if reached else None}


def markdown_table(result: dict) -> str:
    cfg = result["config"]
    runs = result["runs"]
    t = next((r["teacher_accuracy"] for r in runs if r.get("teacher_accuracy") is not None), None)
    b = next((r["student_before"] for r in runs if r.get("student_before") is not None), None)
    kl = f"held-out KLs on one fixed bank of {cfg['kl_contexts']} theta_0 contexts" if cfg["kl_contexts"] else "no KL bank"
    lines = [f"Strategies x seeds, {cfg['steps']} OPD steps each, keep_ratio {cfg['keep_ratio']} for the selectors, "
             f"data.source={cfg['driver']['data']['source']}, evaluated on the {cfg['driver']['eval'].get('prompts', 'heldout')} "
             f"prompts; teacher accuracy {t}, student before {b}. Mean ± sample standard deviation over seeds "
             f"(n per row); {kl}. Commit at the first run: {result.get('commit_at_start', 'not recorded')}.", "",
             "| strategy | lr | n | final accuracy | gap closed | kept fraction | C kept | held-out KL_rev | "
             "held-out KL_fwd | loss head s | total s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for (s, lr), g in per_arm(result).items():
        f = {k: _figure(g, k) for k in RUN_FIGURES}
        lines.append(f"| {s} | {lr:g} | {len(g)} | {_ms(f['final_accuracy'])} | {_ms(f['gap_closed'], '{:.2f}')} "
                     f"| {_ms(f['kept_fraction'])} | {_ms(f['C_kept'])} | {_ms(f['heldout_kl_reverse'], '{:.4f}')} | "
                     f"{_ms(f['heldout_kl_forward'], '{:.4f}')} | {_ms(f['loss_head_s'], '{:.1f}')} | "
                     f"{_ms(f['total_s'], '{:.0f}')} |")
    lines += _sweep_lines(result) + _class_lines(result)
    for tuned in ((False, True) if cfg.get("tuned_lr") else (False,)):
        lines += _difference_lines(result, tuned)
    return "\n".join(lines) + "\n"


def _sweep_lines(result: dict) -> List[str]:
    """Strategy x lr of mean final accuracy, the best lr per strategy in bold (where a strategy has several)."""
    lrs = sorted({lr for (_, lr) in per_arm(result)})
    if len(lrs) < 2:
        return []
    best = best_lrs(result)
    lines = ["", "Final accuracy by lr (mean over seeds; bold: the strategy's best, what --best-lr-from takes):", "",
             "| strategy | " + " | ".join(f"{lr:g}" for lr in lrs) + " |", "|---|" + "---|" * len(lrs)]
    table: Dict[str, Dict[float, float]] = {}
    for (s, lr), g in per_arm(result).items():
        table.setdefault(s, {})[lr] = float(np.mean(_figure(g, "final_accuracy")))
    for s, row in table.items():
        cells = [("**{:.3f}**" if lr == best.get(s) and len(row) > 1 else "{:.3f}").format(row[lr]) if lr in row else ""
                 for lr in lrs]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return lines


def _class_lines(result: dict) -> List[str]:
    """Per arm, for a task with position classes: final accuracy per class, kept mix and C at kept positions."""
    groups = per_arm(result)
    classes = sorted({k for g in groups.values() for r in g for k in (r.get("final_by_class") or {})})
    mix = sorted({k for g in groups.values() for r in g for k in (r.get("kept_class_mix") or {})})
    if not classes and not mix:
        return []

    def mean(g, field, key):
        xs = [r[field][key] for r in g if (r.get(field) or {}).get(key) is not None]
        return f"{np.mean(xs):.3f}" if xs else "n/a"

    lines = ["", "Per class, mean over seeds: final accuracy (answer slots), the share of kept positions "
             "(kept mix) and the mean C at kept positions:", "",
             "| strategy | lr | " + " | ".join(classes) + " | " + " | ".join(f"mix {c}" for c in mix) + " | "
             + " | ".join(f"C {c}" for c in mix) + " |", "|---|---|" + "---|" * (len(classes) + 2 * len(mix))]
    for (s, lr), g in groups.items():
        lines.append(f"| {s} | {lr:g} | " + " | ".join(mean(g, "final_by_class", c) for c in classes) + " | "
                     + " | ".join(mean(g, "kept_class_mix", c) for c in mix) + " | "
                     + " | ".join(mean(g, "C_kept_by_class", c) for c in mix) + " |")
    return lines


def _difference_lines(result: dict, tuned: bool) -> List[str]:
    by = chosen_arms(result, tuned)
    diffs = headline_differences(by)
    if not diffs:
        return []
    which = "each strategy at its tuned lr (the config's where none)" if tuned else "every strategy at the config's lr"
    lines = ["", f"{HEADLINE} minus each strategy, {which}: final accuracy paired over seeds, 95% CI (paired t, "
             "n - 1 degrees of freedom):", "", "| against | lr | n | mean difference | 95% CI | p |", "|---|---|---|---|---|---|"]
    for s, d in diffs.items():
        lines.append(f"| {s} | {by[s][0].get('lr', result['config']['driver']['optim']['lr']):g} | {d['n']} | "
                     f"{d['mean']:+.3f} | [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}] | {d['p']:.3f} |")
    rivals = [s for s in RIVALS if s in diffs]
    if rivals:
        best = max(rivals, key=lambda s: np.mean(_figure(by[s], "final_accuracy")))
        d = diffs[best]
        lines += ["", f"{HEADLINE} minus the best of {', '.join(rivals)} by seed mean ({best}): {d['mean']:+.3f}, "
                  f"95% CI [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}] (n = {d['n']})."]
    if all(s in by for s in CONTROL):
        d = paired_difference(*({r["seed"]: r["final_accuracy"] for r in by[s]} for s in CONTROL))
        if d is not None:
            lines += ["", f"{CONTROL[0]} minus {CONTROL[1]}: {d['mean']:+.3f}, 95% CI [{d['ci95'][0]:+.3f}, "
                      f"{d['ci95'][1]:+.3f}] (n = {d['n']})."]
    reach = head_seconds_to_reach(by)
    if reach is not None:
        got = (f"reached at step {reach['step']} after {reach['head_s']:.1f} s of loss head" if reach["step"] is not None
               else "not reached")
        lines += ["", f"{HEADLINE} to {REFERENCE}'s final seed-mean accuracy ({reach['target_accuracy']:.3f}): {got}; "
                  f"{REFERENCE} spent {reach['reference_head_s']:.1f} s of loss head in all."]
    return lines


def plot_compare(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    several_lrs = len({lr for (_, lr) in per_arm(result)}) > 1
    default = result["config"]["driver"]["optim"]["lr"]
    colours = {s: plt.get_cmap("tab10")(i % 10) for i, s in enumerate(dict.fromkeys(s for s, _ in per_arm(result)))}
    for (s, lr), rs in per_arm(result).items():
        label = f"{s} lr {lr:g}" if several_lrs else s
        # one colour per strategy; dashed: an lr other than the config's (e.g. the strategy's tuned one)
        style = dict(color=colours[s], ls="-" if lr == default else "--")
        for ax, key in ((a1, "accuracy_curve"), (a2, "kl_curve")):  # [step, accuracy] / [step, KL_rev, KL_fwd]
            steps = sorted({p[0] for r in rs for p in r[key]})
            vals = np.full((len(rs), len(steps)), np.nan)
            for i, r in enumerate(rs):
                for p in r[key]:
                    vals[i, steps.index(p[0])] = p[1]
            if np.isnan(vals).all():  # no KL bank (--kl-contexts 0)
                continue
            mean = np.nanmean(vals, 0)
            ax.plot(steps, mean, marker="o", ms=3, label=f"{label} (n={len(rs)})", **style)
            if len(rs) > 1:
                ax.fill_between(steps, np.nanmin(vals, 0), np.nanmax(vals, 0), color=style["color"], alpha=0.1)
    t = next((r["teacher_accuracy"] for r in result["runs"] if r.get("teacher_accuracy") is not None), None)
    if t is not None:
        a1.axhline(t, color="k", ls="--", lw=0.8, label="teacher")
    a1.set_xlabel("step")
    a1.set_ylabel("held-out accuracy (greedy)")
    a1.set_title("accuracy: mean over seeds, band = min..max")
    a2.set_xlabel("step")
    a2.set_ylabel("held-out reverse KL (fixed theta_0 bank)")
    a2.set_title("held-out KL_rev: mean over seeds, band = min..max")
    a1.legend(fontsize=7)
    save_figure(fig, path)


def main(argv: Optional[List[str]] = None) -> int:
    ap = parser(__doc__)
    ap.add_argument("--strategies", default=",".join(DEFAULT_STRATEGIES))
    ap.add_argument("--seeds", default=",".join(map(str, DEFAULT_SEEDS)), help="comma-separated run seeds")
    ap.add_argument("--steps", type=int, default=None, help="OPD steps per run (default: optim.steps)")
    ap.add_argument("--kl-contexts", type=int, default=64, help="size of the fixed held-out KL bank (0: none)")
    ap.add_argument("--lrs", default=None, help="comma-separated lrs: every strategy at each (an lr sweep)")
    ap.add_argument("--best-lr-from", default=None, metavar="COMPARE_JSON",
                    help="a sweep's compare.json: each strategy it swept also runs at its best lr there")
    ap.add_argument("--out", default="runs/compare")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("overrides", nargs="*", help="driver key=value overrides")
    a = ap.parse_args(argv)

    def body():
        overrides = list(a.overrides) + ([f"optim.steps={a.steps}"] if a.steps is not None else [])
        cfg = load_config(a.config, overrides)
        strategies = [s.strip() for s in a.strategies.split(",") if s.strip()]
        try:
            seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
        except ValueError:
            raise ConfigError(f"--seeds {a.seeds!r}: comma-separated integers") from None
        if not strategies or not seeds or a.kl_contexts < 0:
            raise ConfigError("--strategies and --seeds need at least one entry, --kl-contexts >= 0")
        try:
            lrs = [float(x) for x in a.lrs.split(",") if x.strip()] if a.lrs else None
        except ValueError:
            raise ConfigError(f"--lrs {a.lrs!r}: comma-separated numbers") from None
        if lrs is not None and (not lrs or min(lrs) <= 0):
            raise ConfigError(f"--lrs {a.lrs!r}: at least one lr, each > 0")
        tuned = best_lrs(json.loads(Path(a.best_lr_from).read_text())) if a.best_lr_from else None
        res = compare(cfg, strategies, seeds, Path(a.out), kl_contexts=a.kl_contexts,
                      log=lambda m: print(m, flush=True), progress=not a.no_progress, lrs=lrs,
                      tuned_lr={s: lr for s, lr in (tuned or {}).items() if s in strategies} or None)
        print(markdown_table(res))

    return cli_exit_code(body)

