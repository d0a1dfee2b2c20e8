"""Strategies x seeds on the same prepared models, the same prompt stream and the same number of steps.

    python train/compare.py                                        # all 7 strategies x 3 seeds, built-in default
    python train/compare.py --strategies all,teachability --seeds 0,1 --steps 50 --out runs/cmp optim.lr=1e-4
    python train/compare.py --out runs/cmp                         # again: finished runs are kept, the rest run

Every run is the driver's ``run.train`` with ``loss.strategy`` and ``seed`` set (the configured
keep_ratio for the selectors; ``all`` keeps every position), watched through the loop's callbacks
(``RunRecord``, a ``hooks.Hooks``). The run seed drives the prompt
stream, the rollouts and the ``random`` selector; the built-in models are prepared once, with
``sft.seed`` pinned to the config's seed, so every run starts from the same theta_0 against the same
teacher, and for a given seed every strategy sees the same prompts. The held-out KLs are measured on
one fixed bank of contexts sampled by theta_0 (``--kl-contexts``), shared by all runs: mean
full-vocabulary reverse and forward KL over its response positions, at every evaluation.

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


class RunRecord(Hooks):
    """The loop's callbacks for one run: per-step kept fraction, the loss head's time (the driver's
    ``loss_head_s``), the per-class kept metrics of a task with position classes (``kept_mix/<class>``,
    ``C_kept/<class>``), and at every student evaluation the held-out KLs on the bank ([step, accuracy,
    KL_rev, KL_fwd] in ``curve``). Teacher and theta_0 evaluations are the same for every run (greedy
    decoding, same models): they are computed once and kept in ``cache``, shared across runs."""

    def __init__(self, kl_bank: Optional[KLBank], cache: dict):
        self.kl_bank, self.cache = kl_bank, cache
        self.kept: List[float] = []
        self.curve: List[list] = []
        self.head_s = 0.0
        self.by_class: Dict[str, List[float]] = {}

    def on_step_end(self, step: int, metrics: dict) -> None:
        self.kept.append(metrics["kept_fraction"])
        self.head_s += metrics["loss_head_s"]
        for key, value in metrics.items():
            if key.startswith(CLASS_METRICS):
                self.by_class.setdefault(key, []).append(value)

    def class_means(self, prefix: str) -> Dict[str, Optional[float]]:
        """Per class: the mean over steps of ``prefix<class>``, steps where it is undefined (NaN: nothing
        of the class kept) left out; None where it is never defined."""
        out = {}
        for key, values in self.by_class.items():
            if key.startswith(prefix):
                defined = [v for v in values if not math.isnan(v)]
                out[key[len(prefix):]] = float(np.mean(defined)) if defined else None
        return out

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
        self.curve.append([step, result["accuracy"], kl[0], kl[1]])


# ================================================================== the comparison


def run_name(strategy: str, seed: int) -> str:
    return f"{strategy}-seed{seed}"


def run_config(cfg: Config, strategy: str, seed: int, out: Path) -> Config:
    return dataclasses.replace(
        cfg, seed=seed, loss=dataclasses.replace(cfg.loss, strategy=strategy),
        sft=dataclasses.replace(cfg.sft, seed=cfg.sft.seed if cfg.sft.seed is not None else cfg.seed),
        logging=dataclasses.replace(cfg.logging, out_dir=str(out / "runs" / run_name(strategy, seed)),
                                    progress_bar=False, tensorboard=False),
        checkpoint=dataclasses.replace(cfg.checkpoint, every=0, dir=None, resume=None, save_optimizer=False))


def settings_changes(old: dict, new: dict) -> List[str]:
    """'key: old -> new' for every setting of two comparisons that shapes their runs' numbers (the
    strategies and seeds may differ: a comparison can grow)."""
    def flat(settings):
        f = _flatten({k: v for k, v in settings.items() if k not in ("strategies", "seeds")})
        return {k: v for k, v in f.items() if not (k.startswith("driver.") and _matches(k[7:], NOT_RUN_DEFINING))}

    a, b = flat(old), flat(new)
    return [f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}" for k in sorted(set(a) | set(b))
            if a.get(k, "<absent>") != b.get(k, "<absent>")]


def compare(cfg: Config, strategies: Sequence[str] = DEFAULT_STRATEGIES, seeds: Sequence[int] = DEFAULT_SEEDS,
            out: Path = Path("runs/compare"), kl_contexts: int = 64, log: Callable[[str], None] = print,
            progress: bool = True) -> dict:
    for s in strategies:
        if s not in STRATEGIES:
            raise ConfigError(f"--strategies: {s!r} is not a strategy ({', '.join(STRATEGIES)})")
    out.mkdir(parents=True, exist_ok=True)
    if cfg.sft.seed is None:
        cfg = dataclasses.replace(cfg, sft=dataclasses.replace(cfg.sft, seed=cfg.seed))
    settings = {"driver": to_dict(cfg), "strategies": list(strategies), "seeds": list(seeds),
                "steps": cfg.optim.steps, "keep_ratio": cfg.loss.keep_ratio, "kl_contexts": kl_contexts}
    path = out / "compare.json"
    runs = _finished_runs(path, settings)
    done = {(r["strategy"], r["seed"]) for r in runs}
    todo = [(st, sd) for sd in seeds for st in strategies if (st, sd) not in done]
    if runs:
        log(f"[compare] resuming: {len(runs)} finished runs kept, {len(todo)} to run")
    result = {"config": settings, "runs": runs}
    if todo:
        kl_bank = _kl_bank(cfg, strategies[0], out, kl_contexts, result, log)
        caches: dict = {}  # teacher / theta_0 evaluations, per held-out set
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(seeds) * len(strategies), initial=len(done), desc="compare", unit="run",
                       dynamic_ncols=True)
        for strategy, seed in todo:
            # long_arithmetic's held-out set is the same for every run seed; other tasks' splits follow the seed
            cache = caches.setdefault("any" if cfg.data.source == "long_arithmetic" else seed, {})
            entry = one_run(cfg, strategy, seed, out, kl_bank, cache)
            runs.append(entry)
            path.write_text(json.dumps(result, indent=1))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(last=f"{strategy}/s{seed} acc={entry['final_accuracy']:.3f}")
            else:
                log(f"[compare] {strategy} seed {seed}: accuracy {entry['final_accuracy']:.3f}, kept "
                    f"{entry['kept_fraction']:.3f}, KL_rev {entry['heldout_kl_reverse']:.4f} ({entry['total_s']:.0f}s)")
        if bar is not None:
            bar.close()
    path.write_text(json.dumps(result, indent=1))
    (out / "compare.md").write_text(markdown_table(result))
    plot_compare(result, out / "compare.png")
    return result


def _finished_runs(path: Path, settings: dict) -> List[dict]:
    """The runs of an earlier comparison in the same folder (refused if its settings differ)."""
    if not path.is_file():
        return []
    old = json.loads(path.read_text())
    changed = settings_changes(old["config"], settings)
    if changed:
        raise ConfigError(f"{path} holds a comparison with other settings ({'; '.join(changed)}): use another "
                          "--out, or delete it")
    return [r for r in old["runs"]]


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


def one_run(cfg: Config, strategy: str, seed: int, out: Path, kl_bank: KLBank, cache: dict) -> dict:
    """One driver run of the comparison (started over if an earlier one did not finish): its entry."""
    rcfg = run_config(cfg, strategy, seed, out)
    shutil.rmtree(rcfg.logging.out_dir, ignore_errors=True)
    t = time.time()
    rec = RunRecord(kl_bank, cache)
    summary = driver.train(rcfg, log=lambda m: None, hooks=rec)
    curve = rec.curve
    return {
        "strategy": strategy, "seed": seed,
        "keep_ratio": 1.0 if strategy == "all" else cfg.loss.keep_ratio,
        "kept_fraction": float(np.mean(rec.kept)) if rec.kept else float("nan"),
        "final_accuracy": summary["student_after"],
        "accuracy_curve": [[s, a] for s, a, _, _ in curve],
        "heldout_kl_reverse": curve[-1][2], "heldout_kl_forward": curve[-1][3],
        "kl_curve": [[s, r, f] for s, _, r, f in curve],
        "teacher_accuracy": summary["teacher_accuracy"], "student_before": summary["student_before"],
        "gap_closed": summary.get("gap_closed"), "steps": summary["steps"],
        "loss_head_s": rec.head_s, "total_s": time.time() - t,
        "kept_class_mix": rec.class_means("kept_mix/"), "C_kept_by_class": rec.class_means("C_kept/"),
    }


# ================================================================== reports


def per_strategy(result: dict) -> Dict[str, Dict[str, list]]:
    groups: Dict[str, Dict[str, list]] = {}
    for r in result["runs"]:
        g = groups.setdefault(r["strategy"], {})
        for k in ("final_accuracy", "gap_closed", "kept_fraction", "heldout_kl_reverse", "heldout_kl_forward",
                  "loss_head_s", "total_s"):
            g.setdefault(k, []).append(r.get(k) if r.get(k) is not None else float("nan"))
    order = [s for s in result["config"]["strategies"] if s in groups] + \
        [s for s in groups if s not in result["config"]["strategies"]]
    return {s: groups[s] for s in order}


def _ms(xs, fmt="{:.3f}") -> str:
    a = np.asarray(xs, dtype=float)
    a = a[np.isfinite(a)]
    if len(a) == 0:
        return "n/a"
    if len(a) == 1:
        return fmt.format(a[0])
    return f"{fmt.format(a.mean())} ± {fmt.format(a.std(ddof=1))}"


def markdown_table(result: dict) -> str:
    cfg = result["config"]
    runs = result["runs"]
    t = next((r["teacher_accuracy"] for r in runs if r.get("teacher_accuracy") is not None), None)
    b = next((r["student_before"] for r in runs if r.get("student_before") is not None), None)
    lines = [f"Strategies x seeds, {cfg['steps']} OPD steps each, keep_ratio {cfg['keep_ratio']} for the selectors, "
             f"data.source={cfg['driver']['data']['source']}; teacher accuracy {t}, student before {b}. "
             f"Mean ± sample standard deviation over seeds (n per row); held-out KLs on one fixed bank of "
             f"{cfg['kl_contexts']} theta_0 contexts.", "",
             "| strategy | n | final accuracy | gap closed | kept fraction | held-out KL_rev | held-out KL_fwd | "
             "loss head s | total s |", "|---|---|---|---|---|---|---|---|---|"]
    for s, g in per_strategy(result).items():
        lines.append(f"| {s} | {len(g['final_accuracy'])} | {_ms(g['final_accuracy'])} | {_ms(g['gap_closed'], '{:.2f}')} "
                     f"| {_ms(g['kept_fraction'])} | {_ms(g['heldout_kl_reverse'], '{:.4f}')} | "
                     f"{_ms(g['heldout_kl_forward'], '{:.4f}')} | {_ms(g['loss_head_s'], '{:.1f}')} | "
                     f"{_ms(g['total_s'], '{:.0f}')} |")
    return "\n".join(lines) + "\n"


def plot_compare(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    by: Dict[str, list] = {}
    for r in result["runs"]:
        by.setdefault(r["strategy"], []).append(r)
    for s, rs in by.items():
        for ax, key in ((a1, "accuracy_curve"), (a2, "kl_curve")):  # [step, accuracy] / [step, KL_rev, KL_fwd]
            steps = sorted({p[0] for r in rs for p in r[key]})
            vals = np.full((len(rs), len(steps)), np.nan)
            for i, r in enumerate(rs):
                for p in r[key]:
                    vals[i, steps.index(p[0])] = p[1]
            mean = np.nanmean(vals, 0)
            line, = ax.plot(steps, mean, marker="o", ms=3, label=f"{s} (n={len(rs)})")
            if len(rs) > 1:
                ax.fill_between(steps, np.nanmin(vals, 0), np.nanmax(vals, 0), color=line.get_color(), alpha=0.15)
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
    ap.add_argument("--kl-contexts", type=int, default=64, help="size of the fixed held-out KL bank")
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
        if not strategies or not seeds or a.kl_contexts < 1:
            raise ConfigError("--strategies and --seeds need at least one entry, --kl-contexts >= 1")
        res = compare(cfg, strategies, seeds, Path(a.out), kl_contexts=a.kl_contexts,
                      log=lambda m: print(m, flush=True), progress=not a.no_progress)
        print(markdown_table(res))

    return cli_exit_code(body)

