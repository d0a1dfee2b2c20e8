"""The fixed-context diagnostic (docs/math.md, The fixed-context diagnostic).

    python train/diagnose.py                                  # the built-in default pair, plain OPD from theta_0
    python train/diagnose.py --contexts 256 --train-steps 40 --out runs/diagnostic
    python train/diagnose.py --checkpoint runs/default/checkpoints/step_000100   # a student trained already

1. A bank of ``--contexts`` responses sampled by the initial student theta_0 (rollout temperature) is
   built once and frozen.
2. theta_tau: the student of ``--checkpoint``, or ``--train-steps`` steps of plain full-token OPD
   (``loss.strategy=all``) from theta_0 with the driver (train/run.py).
3. Both students are scored against the teacher on the same frozen contexts. Per response position:
   full-vocabulary KL_fwd before (theta_0) and after (theta_tau), from float64 log-softmaxes of the
   full logits (row chunks); the gain G = before - after, G_rel = G / before; at theta_0, for each
   ``--top-k`` K, H_s, D and the exact C from ``taopd_kernels.teachability_stats(..., strategy=None)``,
   their batch normalisations over the bank (``~x``, docs/math.md, Scores and selection),
   D_learn = ~D * ~C, D_incompat = ~D * (1 - ~C), the normalised position t / (L - 1) in the
   response and the normalised teacher entropy ~H_t.

The analysis, per K (``analyze``): standardised OLS coefficients (statsmodels; y and every regressor
z-scored, so a coefficient is in standard deviations of G per standard deviation of the regressor)
of G on [~H, D_learn, D_incompat, position, ~H_t] (``split``) and on the baseline
[~H, ~D, ~H*~D, position, ~H_t] (``baseline``) and the baseline + ~C (``baseline_C``), with 95%
percentile CIs from a bootstrap over prompts (clusters: every position of a resampled prompt goes in
together) and the incremental R^2 of each over the baseline; the Q3 gap (cell ~H <= median,
~D >= median: mean G of its top-tercile-C positions minus its bottom-tercile-C positions, terciles of
C within the cell) with its bootstrap CI; the within-prompt matched gap (every position with ~C above
the median is matched to the nearest position of the same prompt with ~C below it on (~H, ~D,
position); the mean difference in G), with its bootstrap CI.

For a task with position classes (``task.position_classes``: lookup's rule / known / brief / wrong /
separator / eos; "other" past its layout), every bank position gets the class of the token it predicts,
and per K (``analyze_classes``; docs/math.md, The fixed-context diagnostic): ``class_covariate``,
baseline and baseline_C over all rows with a dummy per class present but the first (beta_C beyond which
class a position is; the models without dummies stay under "models"); ``by_class``, per class and per
group of ``CLASS_GROUPS`` ("lookup" = known + brief + wrong), on its rows alone: n, the mean gain,
beta_C of baseline_C (skipped, with the reason, when the rows are too few or ~C is constant on them; with
the VIF of ~C), the Q3 gap (medians and terciles within the rows), each with its bootstrap CI over prompts.
The statistics stay normalised over the whole bank.

Writes DIR/diagnostic.json (everything, per K under "by_k"), DIR/tokens.csv (one row per position,
K = 16, or the first K given; with a ``class`` column for a task with classes) and DIR/diagnostic.png
(G by C tercile within Q3; the coefficients with their CIs for every K; with classes, beta_C and the Q3
gap within each class).
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from taopd_kernels import batch_normalize, teachability_stats

from .. import head, run
from ..config import DTYPES, cli_exit_code, Config, ConfigError, load_config
from ..lookup_task import GROUPS as LOOKUP_KEY_GROUPS
from ..rollout import Rollout
from .bank import Bank, build_bank, hidden_rows
from .common import parser, save_figure
from .theta0 import position_classes

SPLIT = ["H_norm", "D_learn", "D_incompat", "pos_norm", "Ht_norm"]
BASELINE = ["H_norm", "D_norm", "HxD", "pos_norm", "Ht_norm"]
BASELINE_C = BASELINE + ["C_norm"]
MODELS = {"split": SPLIT, "baseline": BASELINE, "baseline_C": BASELINE_C}
CSV_COLUMNS = ["prompt_id", "position", "gain", "gain_rel", "kl_fwd_before", "kl_fwd_after", "H_norm", "D_norm",
               "C_norm", "D_learn", "D_incompat", "pos_norm", "Ht_norm"]
# classes analysed together beside each class: lookup's key groups are the "lookup class"
CLASS_GROUPS = {"lookup": LOOKUP_KEY_GROUPS}
MIN_ROWS_PER_REGRESSOR = 10  # a within-class fit needs at least this many rows per regressor
NORMALISED, RAW = ("H_norm", "D_norm", "C_norm"), ("H", "D", "C")  # the Q3 gap's (H, D, C)


# ================================================================== statistics (pure numpy / statsmodels)


def zscore(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    sd = x.std(axis=0)
    return (x - x.mean(axis=0)) / np.where(sd > 0, sd, 1.0)


def standardized_ols(y: np.ndarray, X: np.ndarray, names: Sequence[str]) -> dict:
    """OLS of z-scored y on z-scored columns of X plus a constant (statsmodels). Returns
    {"beta": {name: coefficient}, "r2": R^2, "se": {name: classical standard error}}."""
    import statsmodels.api as sm

    fit = sm.OLS(zscore(y), sm.add_constant(zscore(X), has_constant="add")).fit()
    params, bse = np.asarray(fit.params), np.asarray(fit.bse)
    return {"beta": dict(zip(names, params[1:].tolist())), "se": dict(zip(names, bse[1:].tolist())),
            "r2": float(fit.rsquared)}


def _beta_lstsq(y: np.ndarray, X: np.ndarray) -> tuple:
    """The same standardised fit for the bootstrap's many refits: (betas, R^2). Least squares on the normal
    equations (the minimum-norm solution where a resample leaves a column constant): a (p x p) solve, not an
    (n x p) LAPACK call, which multi-threaded on a loaded 2-core machine took ~30 ms per refit instead of 0.1."""
    yz, Xz = zscore(y), zscore(X)
    A = np.column_stack([np.ones(len(yz)), Xz])
    coef, *_ = np.linalg.lstsq(A.T @ A, A.T @ yz, rcond=None)
    resid = yz - A @ coef
    tss = float(yz @ yz)
    return coef[1:], (1.0 - float(resid @ resid) / tss) if tss > 0 else float("nan")


def cluster_resamples(clusters: np.ndarray, n_boot: int, seed: int) -> List[np.ndarray]:
    """Row indices of ``n_boot`` cluster-bootstrap resamples: each draws as many clusters as there are,
    with replacement (numpy Generator ``seed``), and takes all rows of every drawn cluster."""
    clusters = np.asarray(clusters)
    ids, inverse = np.unique(clusters, return_inverse=True)
    members = [np.flatnonzero(inverse == i) for i in range(len(ids))]
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_boot):
        pick = rng.integers(0, len(ids), size=len(ids))
        out.append(np.concatenate([members[i] for i in pick]))
    return out


def percentile_ci(samples: Sequence[float], level: float = 0.95) -> List[float]:
    s = np.asarray([x for x in samples if np.isfinite(x)], dtype=np.float64)
    if s.size == 0:
        return [float("nan"), float("nan")]
    lo, hi = np.quantile(s, [(1 - level) / 2, 1 - (1 - level) / 2])
    return [float(lo), float(hi)]


def regression(table: Dict[str, np.ndarray], names: Sequence[str], resamples: List[np.ndarray], y: str = "gain",
               rows: Optional[np.ndarray] = None) -> dict:
    """Standardised OLS of ``y`` on ``names`` with cluster-bootstrap 95% CIs (``resamples``: row indices);
    ``rows``: a boolean mask, the fit (and each resample) restricted to those rows."""
    Y = np.asarray(table[y], dtype=np.float64)
    X = np.column_stack([np.asarray(table[n], dtype=np.float64) for n in names])
    ok = np.isfinite(Y) & np.isfinite(X).all(axis=1)
    if rows is not None:
        ok &= rows
    point = standardized_ols(Y[ok], X[ok], names)
    boots, r2s = [], []
    for idx in resamples:
        idx = idx[ok[idx]]
        b, r2 = _beta_lstsq(Y[idx], X[idx])
        boots.append(b)
        r2s.append(r2)
    boots = np.asarray(boots).reshape(len(resamples), len(names))
    coefs = {n: {"beta": point["beta"][n], "ci": percentile_ci(boots[:, j]), "se": point["se"][n]}
             for j, n in enumerate(names)}
    return {"coefficients": coefs, "r2": point["r2"], "r2_ci": percentile_ci(r2s), "n": int(ok.sum()),
            "_r2_boot": r2s}


def q3_gap(table: Dict[str, np.ndarray], idx: Optional[np.ndarray] = None, y: str = "gain",
           stats: Sequence[str] = NORMALISED) -> dict:
    """Q3 = {~H <= median, ~D >= median} (medians over the rows given); terciles of C within Q3; mean y of
    the top tercile minus the bottom tercile. ``stats``: the (H, D, C) columns, the normalised ones or
    ``RAW`` (the same order, without the ties the normalisation's clip makes)."""
    idx = np.arange(len(table[y])) if idx is None else idx
    if idx.size == 0:  # a class that a bootstrap resample does not hold
        return {"gap": float("nan"), "n_q3": 0, "tercile_means": [float("nan")] * 3}
    H, D, C, G = (np.asarray(table[k], dtype=np.float64)[idx] for k in (*stats, y))
    cell = (H <= np.median(H)) & (D >= np.median(D)) & np.isfinite(G)
    c, g = C[cell], G[cell]
    if c.size < 3:
        return {"gap": float("nan"), "n_q3": int(c.size), "tercile_means": [float("nan")] * 3}
    lo, hi = np.quantile(c, [1 / 3, 2 / 3])
    groups = [g[c <= lo], g[(c > lo) & (c < hi)], g[c >= hi]]
    means = [float(x.mean()) if x.size else float("nan") for x in groups]
    return {"gap": means[2] - means[0], "n_q3": int(c.size), "tercile_means": means,
            "tercile_sizes": [int(x.size) for x in groups]}


def matched_pairs(table: Dict[str, np.ndarray]) -> tuple:
    """Within-prompt nearest-neighbour matches: every row with ~C above the (global) median of ~C to the
    nearest row of the same prompt with ~C below it, on (~H, ~D, position). Returns (high rows, matched
    low rows)."""
    C = np.asarray(table["C_norm"], dtype=np.float64)
    feats = np.column_stack([np.asarray(table[k], dtype=np.float64) for k in ("H_norm", "D_norm", "pos_norm")])
    pid = np.asarray(table["prompt_id"])
    med = np.median(C)
    highs, lows = [], []
    for p in np.unique(pid):
        rows = np.flatnonzero(pid == p)
        hi, lo = rows[C[rows] > med], rows[C[rows] < med]
        if hi.size == 0 or lo.size == 0:
            continue
        dist = ((feats[hi, None, :] - feats[None, lo, :]) ** 2).sum(-1)
        highs.append(hi)
        lows.append(lo[dist.argmin(axis=1)])
    if not highs:
        return np.zeros(0, dtype=int), np.zeros(0, dtype=int)
    return np.concatenate(highs), np.concatenate(lows)


def matched_gap(table: Dict[str, np.ndarray], resample_prompts: List[np.ndarray], y: str = "gain") -> dict:
    G = np.asarray(table[y], dtype=np.float64)
    hi, lo = matched_pairs(table)
    diff = G[hi] - G[lo]
    ok = np.isfinite(diff)
    pid = np.asarray(table["prompt_id"])[hi][ok]
    diff = diff[ok]
    if diff.size == 0:
        return {"gap": float("nan"), "ci": [float("nan")] * 2, "n_pairs": 0}
    # bootstrap over prompts: per-prompt sums and counts, resampled with the same prompt draws
    ids = np.unique(np.asarray(table["prompt_id"]))
    sums = np.zeros(len(ids))
    counts = np.zeros(len(ids))
    where = np.searchsorted(ids, pid)
    np.add.at(sums, where, diff)
    np.add.at(counts, where, 1)
    boots = []
    for pick in resample_prompts:
        n = counts[pick].sum()
        boots.append(sums[pick].sum() / n if n else float("nan"))
    return {"gap": float(diff.mean()), "ci": percentile_ci(boots), "n_pairs": int(diff.size)}


def c_collinearity(table: Dict[str, np.ndarray], rows: np.ndarray, names: Sequence[str]) -> dict:
    """How far ~C is told apart from the other regressors ``names`` on ``rows``: its correlation with ~D and its
    variance inflation factor 1 / (1 - R^2 of ~C on the others). A beta_C with a large VIF is not identified."""
    col = {c: np.asarray(table[c], dtype=np.float64)[rows] for c in names}
    others = [col[c] for c in names if c != "C_norm"]
    r2 = _beta_lstsq(col["C_norm"], np.column_stack(others))[1] if others else 0.0
    corr = float(np.corrcoef(col["C_norm"], col["D_norm"])[0, 1]) if "D_norm" in col else None
    return {"corr_C_D": corr, "vif_C": 1.0 / max(1.0 - r2, 1e-12)}


def class_beta_c(table: Dict[str, np.ndarray], rows: np.ndarray, resamples: List[np.ndarray],
                 names: Sequence[str] = BASELINE_C) -> dict:
    """beta_C of the standardised fit of G on ``names`` (``baseline_C``) on ``rows`` alone, with its bootstrap CI
    and ``c_collinearity``; regressors constant on those rows are dropped (named); skipped, with the reason,
    where the rows are too few for the regressors or ~C is constant on them."""
    ok = rows & np.isfinite(np.asarray(table["gain"], dtype=np.float64))
    n = int(ok.sum())
    if n < MIN_ROWS_PER_REGRESSOR * len(names):
        return {"skipped": f"n={n} rows < {MIN_ROWS_PER_REGRESSOR} per regressor x {len(names)} regressors"}
    constant = [c for c in names if np.ptp(np.asarray(table[c], dtype=np.float64)[ok]) == 0]
    if "C_norm" in constant:
        return {"skipped": "C_norm has no variance on these rows"}
    used = [c for c in names if c not in constant]
    fit = regression(table, used, resamples, rows=ok)
    fit.pop("_r2_boot")
    coef = fit["coefficients"]["C_norm"]
    return {"beta": coef["beta"], "ci": coef["ci"], "se": coef["se"], **c_collinearity(table, ok, used),
            "regressors": used, "dropped_constant": constant, **fit}


def class_summary(table: Dict[str, np.ndarray], rows: np.ndarray, resamples: List[np.ndarray],
                  dummies: Sequence[str] = ()) -> dict:
    """One class (or group of classes), on its rows alone: n, the mean gain with its bootstrap CI, beta_C
    (``class_beta_c``; for a group also with its members' dummies; beside it ``beta_C_alone``, the fit on ~C
    alone, i.e. the correlation of G with ~C), the Q3 gap of G and of G_rel with medians and terciles
    computed within the rows, with its bootstrap CI. ``resamples``: the whole bank's prompt draws, each
    restricted to ``rows``."""
    G = np.asarray(table["gain"], dtype=np.float64)
    within = [idx[rows[idx]] for idx in resamples]

    def mean_gain(idx):
        g = G[idx][np.isfinite(G[idx])]
        return float(g.mean()) if g.size else float("nan")

    where = np.flatnonzero(rows)
    out = {"n": int(rows.sum()), "n_contexts": int(np.unique(np.asarray(table["prompt_id"])[rows]).size),
           "gain_mean": mean_gain(where), "gain_mean_ci": percentile_ci([mean_gain(i) for i in within]),
           "kl_fwd_before_mean": float(np.nanmean(np.asarray(table["kl_fwd_before"])[rows])),
           "C_mean": float(np.nanmean(np.asarray(table["C"])[rows])),
           "beta_C": class_beta_c(table, rows, resamples),
           "beta_C_alone": class_beta_c(table, rows, resamples, ["C_norm"])}
    if dummies:
        out["beta_C_with_class_dummies"] = class_beta_c(table, rows, resamples, BASELINE_C + list(dummies))
    # the normalisation over the bank clips many of a class's rows to the same ~C (0 or 1): terciles of C
    # itself, and medians of H and D, which the normalisation orders the same way, without those ties
    for y in ("gain", "gain_rel"):
        q = q3_gap(table, where, y=y, stats=RAW)
        q["ci"] = percentile_ci([q3_gap(table, i, y=y, stats=RAW)["gap"] for i in within])
        out["q3_gap" if y == "gain" else "q3_gap_rel"] = {"stats": list(RAW), **q}
    return out


def analyze_classes(table: Dict[str, np.ndarray], resamples: List[np.ndarray], classes: Sequence[str],
                    groups: Dict[str, Sequence[str]]) -> dict:
    """The class analysis of one K: ``class_covariate`` (baseline and baseline_C over all rows, with a dummy
    for every class present but the first: C's effect beyond which class a position is) and ``by_class``
    (``class_summary`` of every class present and of every group of ``groups`` whose members are present)."""
    labels = np.asarray(table["class"])
    present = [c for c in classes if (labels == c).any()]
    dummy = {c: f"class={c}" for c in present[1:]}
    table = dict(table, **{name: (labels == c).astype(np.float64) for c, name in dummy.items()})
    cov = {"note": "baseline / baseline_C with class dummies; by_k.<K>.models holds the same models without them",
           "reference_class": present[0], "dummies": list(dummy.values()), "models": {}}
    for name, cols in (("baseline", BASELINE), ("baseline_C", BASELINE_C)):
        cov["models"][name] = regression(table, cols + cov["dummies"], resamples)
    base_boot = cov["models"]["baseline"].pop("_r2_boot")
    fit = cov["models"]["baseline_C"]
    fit["incremental_r2"] = fit["r2"] - cov["models"]["baseline"]["r2"]
    fit["incremental_r2_ci"] = percentile_ci(np.asarray(fit.pop("_r2_boot")) - np.asarray(base_boot))
    finite = np.isfinite(np.asarray(table["gain"], dtype=np.float64))
    cov["beta_C"] = {**fit["coefficients"]["C_norm"], **c_collinearity(table, finite, BASELINE_C + cov["dummies"])}
    by_class = {c: class_summary(table, labels == c, resamples) for c in present}
    for name, members in groups.items():
        inside = [c for c in members if c in present]
        if inside:
            summary = class_summary(table, np.isin(labels, inside), resamples, [dummy[c] for c in inside[1:]])
            by_class[name] = {"members": inside, **summary}
    return {"class_covariate": cov, "by_class": by_class}


def analyze(table: Dict[str, np.ndarray], n_boot: int = 1000, seed: int = 0, classes: Optional[Sequence[str]] = None,
            groups: Optional[Dict[str, Sequence[str]]] = None) -> dict:
    """Every number of the diagnostic for one K (see the module docstring). ``classes``: the task's position
    classes in order, when ``table`` has a "class" column (then ``analyze_classes`` too, with ``groups``,
    default ``CLASS_GROUPS``)."""
    table = dict(table)
    table["HxD"] = np.asarray(table["H_norm"]) * np.asarray(table["D_norm"])
    pid = np.asarray(table["prompt_id"])
    resamples = cluster_resamples(pid, n_boot, seed)
    # the same draws, as prompt indices (for the matched gap's per-prompt sums)
    ids = np.unique(pid)
    rng = np.random.default_rng(seed)
    prompt_draws = [rng.integers(0, len(ids), size=len(ids)) for _ in range(n_boot)]
    out = {"n_positions": int(len(pid)), "n_contexts": int(len(ids)), "bootstrap": n_boot, "models": {}}
    for name, cols in MODELS.items():
        out["models"][name] = regression(table, cols, resamples)
    base_boot = out["models"]["baseline"].pop("_r2_boot")
    for name in ("split", "baseline_C"):
        m = out["models"][name]
        boot = m.pop("_r2_boot")
        m["incremental_r2"] = m["r2"] - out["models"]["baseline"]["r2"]
        m["incremental_r2_ci"] = percentile_ci(np.asarray(boot) - np.asarray(base_boot))
    out["coefficients"] = out["models"]["split"]["coefficients"]
    for y in ("gain", "gain_rel"):
        key = "q3_gap" if y == "gain" else "q3_gap_rel"
        point = q3_gap(table, y=y)
        point["ci"] = percentile_ci([q3_gap(table, idx, y=y)["gap"] for idx in resamples])
        out[key] = point
        out["matched_gap" if y == "gain" else "matched_gap_rel"] = matched_gap(table, prompt_draws, y=y)
    if classes is not None:
        out.update(analyze_classes(table, resamples, classes, CLASS_GROUPS if groups is None else groups))
    return out


# ================================================================== the scores (torch)


@torch.no_grad()
def reference_kl_and_entropy(h_t, w_t, students, vocab: int, tau: float, chunk: int = 128):
    """Full-vocabulary KL_fwd(p_t || p_s) for every student in ``students`` ((h, w) pairs) and the teacher's
    entropy: float32 logits, float64 log-softmaxes and sums, in row chunks (a plain reference, not the kernels)."""
    kls = [[] for _ in students]
    ent = []
    wt = w_t[:vocab].float()
    ws = [w[:vocab].float() for _, w in students]
    for s in range(0, h_t.shape[0], chunk):
        lpt = torch.log_softmax((h_t[s:s + chunk].float() @ wt.T).double() / tau, -1)
        pt = lpt.exp()
        ent.append(-(pt * lpt).sum(-1))
        for i, (h, _) in enumerate(students):
            lps = torch.log_softmax((h[s:s + chunk].float() @ ws[i].T).double() / tau, -1)
            kls[i].append((pt * (lpt - lps)).sum(-1))
    return [torch.cat(k) for k in kls], torch.cat(ent)


def position_features(bank: Bank):
    """(prompt id, position within the response, normalised position t / (L - 1)) per valid position."""
    valid = bank.valid
    idx = valid.long().cumsum(-1) - 1  # 0-based index among the row's response positions
    length = valid.sum(-1, keepdim=True).expand_as(valid)
    rows = torch.arange(valid.shape[0])[:, None].expand_as(valid)
    pos = idx[valid]
    L = length[valid]
    return rows[valid], pos, torch.where(L > 1, pos.double() / (L - 1).clamp_min(1).double(), torch.zeros_like(pos, dtype=torch.float64))


def load_student(path: str, cfg: Config, device):
    """A student from a HF directory, a driver step folder (with student/) or a checkpoint root (with latest)."""
    from transformers import AutoModelForCausalLM

    p = Path(path).expanduser()
    if (p / "latest").is_file():
        p = p / (p / "latest").read_text().strip()
    if (p / "student" / "config.json").is_file():
        p = p / "student"
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"--checkpoint {path}: neither a HF model directory nor a driver checkpoint "
                                "(step_NNNNNN/ with student/, or a checkpoints/ folder with latest)")
    model = AutoModelForCausalLM.from_pretrained(str(p), dtype=DTYPES[cfg.student.dtype],
                                                 attn_implementation=cfg.student.attn_implementation)
    return model.to(device).eval().requires_grad_(False), str(p)


def train_theta_tau(cfg: Config, steps: int, out: Path, log=print):
    """Plain full-token OPD (loss.strategy=all) for ``steps`` steps from theta_0 with the driver."""
    tcfg = dataclasses.replace(
        cfg, loss=dataclasses.replace(cfg.loss, strategy="all"), optim=dataclasses.replace(cfg.optim, steps=steps),
        eval=dataclasses.replace(cfg.eval, every=0, at_start=False),
        logging=dataclasses.replace(cfg.logging, out_dir=str(out / "opd_all"), tensorboard=False, plot=False),
        checkpoint=dataclasses.replace(cfg.checkpoint, every=0, dir=None, resume=None, save_optimizer=False))
    summary = run.train(tcfg, log=log)
    return summary


def diagnose(cfg: Config, *, contexts: int = 256, checkpoint: Optional[str] = None, train_steps: int = 40,
             top_k: Sequence[int] = (8, 16, 32), n_boot: int = 1000, out: Path = Path("runs/diagnostic"),
             log: Callable[[str], None] = print) -> dict:
    t0 = time.time()
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    device = run.pick_device(cfg)
    models = run.build_models(cfg, device, log=log)
    models.student.eval().requires_grad_(False)
    vocab = run.vocab_limit(cfg, models)
    tau = cfg.loss.temperature
    bank_seed = run.step_seed(cfg.seed, 10 ** 6, 11)
    bank = build_bank(cfg, models, contexts, seed=bank_seed)
    chunk = cfg.rollout.micro_batch_size
    h_t = hidden_rows(models.teacher, bank, chunk)
    h_0 = hidden_rows(models.student, bank, chunk)
    w_t, w_0 = head.lm_head_weight(models.teacher).detach(), head.lm_head_weight(models.student).detach().clone()
    log(f"[diagnose] bank: {contexts} contexts, {h_t.shape[0]} response positions ({time.time() - t0:.0f}s)")

    student_tau, trained = theta_tau(cfg, checkpoint, train_steps, out, device, log)
    h_tau = hidden_rows(student_tau, bank, chunk)
    w_tau = head.lm_head_weight(student_tau).detach()
    t_ref = time.time()
    (kl_before, kl_after), ent_t = reference_kl_and_entropy(h_t, w_t, [(h_0, w_0), (h_tau, w_tau)], vocab, tau)
    log(f"[diagnose] full-vocabulary KL_fwd before {float(kl_before.mean()):.4f} after {float(kl_after.mean()):.4f} "
        f"({time.time() - t_ref:.0f}s)")

    base = position_table(bank, kl_before, kl_after, ent_t)
    classes = list(models.task.classes) + ["other"] if hasattr(models.task, "position_classes") else None
    result = {"config": {"contexts": contexts, "top_k": list(top_k), "bootstrap": n_boot, "seed": cfg.seed,
                         "temperature": tau, "vocab_size": vocab, "data_source": cfg.data.source,
                         "student": cfg.student.path, "teacher": cfg.teacher.path, **trained},
              "n_contexts": contexts, "n_positions": int(h_t.shape[0]),
              "kl_fwd_before_mean": float(kl_before.mean()), "kl_fwd_after_mean": float(kl_after.mean()),
              "gain_mean": float((kl_before - kl_after).mean()), "by_k": {}}
    if classes:
        base["class"] = bank_classes(models.task, bank, bank_seed)
        result["position_classes"] = {"classes": classes, "groups": {g: list(m) for g, m in CLASS_GROUPS.items()},
                                      "counts": {c: int((base["class"] == c).sum()) for c in classes}}
    csv_k = 16 if 16 in top_k else top_k[0]
    for k in top_k:
        st = teachability_stats(h_0, w_0, h_t, w_t, top_k=k, strategy=None, temperature=tau, vocab_size=vocab,
                                backend=cfg.loss.backend, check_finite=False)
        table = score_table(base, st)
        kres = analyze(table, n_boot=n_boot, seed=cfg.seed + k, classes=classes)
        kres["kernel_vs_reference_kl_fwd_max_abs"] = float((st.kl_forward.double() - kl_before).abs().max())
        result["by_k"][str(k)] = kres
        if k == csv_k:
            _write_csv(out / "tokens.csv", table)
            csv_table = table
        _log_k(log, k, kres)
    result["total_s"] = time.time() - t0
    (out / "diagnostic.json").write_text(json.dumps(result, indent=1))
    plot_diagnostic(result, csv_table, out / "diagnostic.png", csv_k)
    log(f"[diagnose] wrote {out / 'diagnostic.json'}, {out / 'tokens.csv'}, {out / 'diagnostic.png'} "
        f"({result['total_s']:.0f}s)")
    return result


def theta_tau(cfg: Config, checkpoint: Optional[str], train_steps: int, out: Path, device, log):
    """(theta_tau, what it is): the student of ``checkpoint``, or trained from theta_0 (``train_theta_tau``)."""
    if checkpoint:
        student_tau, where = load_student(checkpoint, cfg, device)
        return student_tau, {"checkpoint": where}
    summary = train_theta_tau(cfg, train_steps, out, log=log)
    student_tau, where = load_student(summary["checkpoint"], cfg, device)
    return student_tau, {"train_steps": train_steps, "strategy": "all", "checkpoint": where,
                         "student_after_accuracy": summary.get("student_after"), "train_s": summary.get("train_s")}


def bank_classes(task, bank: Bank, seed: int) -> np.ndarray:
    """The class of every bank position (``task.position_classes`` of the token it predicts, "other" past the
    task's layout; theta0.position_classes, as the driver's per-class metrics), in the flat order of the
    bank's positions. The examples are drawn again as ``build_bank`` drew them (``seed``), and checked
    against the bank's prompts."""
    rng = random.Random(seed)
    examples = [task.train_example(rng) for _ in bank.prompts]
    if [e.prompt for e in examples] != list(bank.prompts):
        raise RuntimeError("diagnose: the bank's examples could not be drawn again (build_bank changed its draw)")
    # the bank's rollout: responses start at the padded prompt width P, and the first valid position is P - 1
    response_mask = torch.zeros_like(bank.attention_mask)
    response_mask[:, 1:] = bank.valid
    prompt_len = int(bank.valid.int().argmax(-1).min()) + 1
    ro = Rollout(bank.input_ids, bank.attention_mask, response_mask, prompt_len)
    return np.asarray(position_classes(task, examples, ro))


def position_table(bank: Bank, kl_before: torch.Tensor, kl_after: torch.Tensor, ent_t: torch.Tensor) -> dict:
    """The columns that do not depend on K, one row per bank position: the gain and its parts, the
    position in the response, the teacher's entropy."""
    rows, pos, pos_norm = position_features(bank)
    allvalid = torch.ones(kl_before.shape[0], dtype=torch.bool)
    gain = kl_before - kl_after
    gain_rel = torch.where(kl_before > 1e-6, gain / kl_before.clamp_min(1e-12), torch.full_like(gain, float("nan")))
    return {"prompt_id": rows.numpy(), "position": pos.numpy(), "gain": gain.numpy(), "gain_rel": gain_rel.numpy(),
            "kl_fwd_before": kl_before.numpy(), "kl_fwd_after": kl_after.numpy(), "pos_norm": pos_norm.numpy(),
            "Ht_norm": batch_normalize(ent_t.float(), allvalid).double().numpy(), "Ht": ent_t.numpy()}


def score_table(base: dict, st) -> dict:
    """``base`` with theta_0's statistics for one K (``st``) and their batch normalisations."""
    allvalid = torch.ones(st.entropy_student.shape[0], dtype=torch.bool)
    H, D, C = st.entropy_student, st.disagreement, st.teacher_mass
    Hn, Dn, Cn = (batch_normalize(x, allvalid).double() for x in (H, D, C))
    return dict(base, H=H.double().numpy(), D=D.double().numpy(), C=C.double().numpy(), H_norm=Hn.numpy(),
                D_norm=Dn.numpy(), C_norm=Cn.numpy(), D_learn=(Dn * Cn).numpy(), D_incompat=(Dn * (1 - Cn)).numpy())


def _log_k(log, k: int, kres: dict) -> None:
    c = kres["coefficients"]
    log(f"[diagnose] K={k}: beta D_learn {c['D_learn']['beta']:+.3f} {_ci(c['D_learn']['ci'])} | D_incompat "
        f"{c['D_incompat']['beta']:+.3f} {_ci(c['D_incompat']['ci'])} | Q3 gap {kres['q3_gap']['gap']:+.4f} "
        f"{_ci(kres['q3_gap']['ci'])} | matched {kres['matched_gap']['gap']:+.4f}")
    if "by_class" not in kres:
        return
    plain, cov = kres["models"]["baseline_C"]["coefficients"]["C_norm"], kres["class_covariate"]["beta_C"]
    log(f"[diagnose] K={k}: beta_C {plain['beta']:+.3f} {_ci(plain['ci'])}, with class dummies "
        f"{cov['beta']:+.3f} {_ci(cov['ci'])}")
    for name, row in kres["by_class"].items():
        b, q = row["beta_C"], row["q3_gap"]
        beta = f"{b['beta']:+.3f} {_ci(b['ci'])} VIF {b['vif_C']:.3g}" if "beta" in b else f"skipped ({b['skipped']})"
        log(f"[diagnose] K={k} {name:>9} n={row['n']:5d} mean G {row['gain_mean']:+.4f} {_ci(row['gain_mean_ci'], 4)} "
            f"| beta_C {beta} | Q3 gap {q['gap']:+.4f} {_ci(q['ci'], 4)}")


def _ci(ci, digits: int = 3) -> str:
    return f"[{ci[0]:+.{digits}f}, {ci[1]:+.{digits}f}]"


def _write_csv(path: Path, table: dict) -> None:
    import csv

    names = CSV_COLUMNS + (["class"] if "class" in table else [])
    cols = [np.asarray(table[c]) for c in names]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(names)
        for row in zip(*cols):
            w.writerow([int(v) if i < 2 else f"{float(v):.6g}" for i, v in enumerate(row[:len(CSV_COLUMNS)])]
                       + list(row[len(CSV_COLUMNS):]))


def plot_diagnostic(result: dict, table: dict, path: Path, k: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kres = result["by_k"][str(k)]
    by_class = "by_class" in kres
    fig, axes = plt.subplots(2 if by_class else 1, 2, figsize=(11, 8 if by_class else 4), squeeze=False)
    (a1, a2) = axes[0]
    if by_class:
        _plot_classes(kres, k, *axes[1])
    q3 = kres["q3_gap"]
    a1.bar(["low C", "mid C", "high C"], q3["tercile_means"], color=["#bbb", "#888", "#2a7"])
    a1.set_title(f"Q3 (~H <= med, ~D >= med), K={k}: gain by C tercile\n"
                 f"gap {q3['gap']:+.4f} [{q3['ci'][0]:+.4f}, {q3['ci'][1]:+.4f}], n={q3['n_q3']}")
    a1.set_ylabel("mean G = KL_fwd(theta_0) - KL_fwd(theta_tau)")
    names = SPLIT
    ks = list(result["by_k"])
    width = 0.8 / len(ks)
    for i, kk in enumerate(ks):
        coefs = result["by_k"][kk]["coefficients"]
        b = np.array([coefs[n]["beta"] for n in names])
        ci = np.array([coefs[n]["ci"] for n in names])
        x = np.arange(len(names)) + (i - (len(ks) - 1) / 2) * width
        a2.errorbar(x, b, yerr=[b - ci[:, 0], ci[:, 1] - b], fmt="o", capsize=3, label=f"K={kk}")
    a2.axhline(0, color="k", lw=0.5)
    a2.set_xticks(range(len(names)), names)
    a2.set_ylabel("standardised beta (95% prompt-cluster bootstrap CI)")
    a2.set_title("G ~ ~H + D_learn + D_incompat + position + ~H_t")
    a2.legend()
    save_figure(fig, path)


def _plot_classes(kres: dict, k: int, a_beta, a_q3) -> None:
    """beta_C within each class (and group) with its CI, beside the all-rows fit with class dummies; the Q3
    gap within each class with its CI. A skipped fit is drawn as no point."""
    rows = kres["by_class"]
    names = list(rows)
    nan2 = [float("nan")] * 2
    beta = [(r["beta_C"].get("beta", float("nan")), r["beta_C"].get("ci", nan2)) for r in rows.values()]
    gap = [(r["q3_gap"]["gap"], r["q3_gap"]["ci"]) for r in rows.values()]
    labels = [f"{n}\nn={r['n']}\nG={r['gain_mean']:.3g}" for n, r in rows.items()]
    vif = [f"VIF {r['beta_C']['vif_C']:.3g}" if "vif_C" in r["beta_C"] else "skipped" for r in rows.values()]
    for ax, values, what, ticks in (
            (a_beta, beta, "beta_C, baseline_C fit within the class", [f"{a}\n{v}" for a, v in zip(labels, vif)]),
            (a_q3, gap, "Q3 gap within the class", labels)):
        for x, (name, (v, ci)) in enumerate(zip(names, values)):
            ax.errorbar([x], [v], yerr=[[v - ci[0]], [ci[1] - v]], fmt="o", capsize=3,
                        color="#2a7" if name in CLASS_GROUPS else "#36c")
        ax.axhline(0, color="k", lw=0.5)
        ax.set_xticks(range(len(names)), ticks, fontsize=7)
        ax.set_ylabel("95% prompt-cluster bootstrap CI")
        title = f"K={k}: {what}"
        for group in CLASS_GROUPS:
            if group in rows:
                v, ci = values[names.index(group)]
                title += f"\n{group}: {v:+.4f} [{ci[0]:+.4f}, {ci[1]:+.4f}]"
        ax.set_title(title, fontsize=9)
    lo, hi = a_beta.get_ylim()
    if hi - lo > 6:  # an unidentified beta_C (large VIF) would flatten the others
        a_beta.set_ylim(max(lo, -3), min(hi, 3))
        a_beta.set_ylabel("95% prompt-cluster bootstrap CI (axis cut at +-3)")
    cov = kres["class_covariate"]["beta_C"]
    a_beta.axhline(cov["beta"], color="#c63", ls="--", lw=1,
                   label=f"all rows, with class dummies: {cov['beta']:+.3f} {_ci(cov['ci'])}")
    a_beta.legend(fontsize=7)


def main(argv: Optional[List[str]] = None) -> int:
    ap = parser(__doc__)
    ap.add_argument("--contexts", type=int, default=256, help="bank size (contexts sampled by theta_0)")
    ap.add_argument("--checkpoint", default=None, help="a trained student (HF dir or driver checkpoint); "
                                                        "otherwise plain OPD for --train-steps from theta_0")
    ap.add_argument("--train-steps", type=int, default=40)
    ap.add_argument("--top-k", default="8,16,32")
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--out", default="runs/diagnostic")
    ap.add_argument("overrides", nargs="*", help="driver key=value overrides")
    a = ap.parse_args(argv)

    def body():
        cfg = load_config(a.config, a.overrides)
        top_k = [int(x) for x in a.top_k.split(",") if x.strip()]
        if not top_k or min(top_k) < 1 or a.contexts < 2 or a.bootstrap < 1:
            raise ConfigError("--top-k needs positive integers, --contexts >= 2, --bootstrap >= 1")
        diagnose(cfg, contexts=a.contexts, checkpoint=a.checkpoint, train_steps=a.train_steps, top_k=top_k,
                 n_boot=a.bootstrap, out=Path(a.out), log=lambda m: print(m, flush=True))

    return cli_exit_code(body)

