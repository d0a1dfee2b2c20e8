"""theta_0 of a prepared teacher/student pair, per position class, on the validation prompts (never the held-out ones).

    python train/theta0.py                                  # the lookup config's prepared models
    python train/theta0.py --config lookup --prompts 64 --samples 2 --out runs/theta0

The student samples ``--samples`` responses to each of the first ``--prompts`` validation prompts
(the driver's rollout: rollout temperature and top-p). At every response position, from
``taopd_kernels.teachability_stats(..., strategy=None)`` at the loss's top-K and temperature: C (the
teacher's mass on the student's top-K), D and the student's entropy H_s; from the full teacher
distribution, its mass on the ids the task never uses (``task.token_ids``); the share of never-used
ids in each model's top-K. Per class (``task.position_classes``, the token each position predicts;
"other" past the task's layout): n, the means, and the Spearman rank correlations (scipy) of 1 - C and
of D with the teacher's never-used mass. Beside them, greedy per-class accuracy of both models on the
same validation prompts (``task.slot_accuracy``). Writes DIR/theta0.json and prints a table.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

from taopd_kernels import teachability_stats

from .. import head, run
from ..config import cli_exit_code, Config, ConfigError, load_config
from ..rollout import generate
from .bank import Bank, hidden_rows
from .common import parser

ROLLOUT_STEP = 10 ** 6  # the rollout's seed stream: a step no training run reaches
PER_CLASS = ("C", "D", "H_s", "teacher_unused_mass", "unused_top_share_student", "unused_top_share_teacher")


def check_task(task) -> None:
    for need in ("position_classes", "token_ids", "slot_accuracy", "validation_examples"):
        if not hasattr(task, need):
            raise ConfigError(f"theta0: the task {type(task).__name__} has no {need}() (the lookup task has all)")


def validation_rollout(cfg: Config, models, prompts: Optional[int], samples: int):
    """The student's sampled responses to the first ``prompts`` validation prompts, ``samples`` each."""
    examples = models.task.validation_examples()[:prompts] * samples
    return examples, run.rollout(cfg, models, examples, step=ROLLOUT_STEP)


def position_classes(task, examples, ro) -> List[str]:
    """The class of every loss position of ``ro`` (the token it predicts), in row-major order of the
    valid positions (``run.position_class_grid``, as the driver's per-class metrics)."""
    valid, _ = head.loss_positions(ro.input_ids, ro.response_mask)
    names, classes = run.position_class_grid(task, examples, ro)
    return [names[i] for i in classes[valid].tolist()]


@torch.no_grad()
def unused_mass(h: torch.Tensor, w: torch.Tensor, unused: torch.Tensor, tau: float, chunk: int = 128) -> torch.Tensor:
    """Per row: the model's probability (temperature ``tau``, float64 softmax) on the ids in ``unused``."""
    out = []
    for s in range(0, h.shape[0], chunk):
        logp = ((h[s:s + chunk] @ w.T).double() / tau).log_softmax(-1)
        out.append(logp[:, unused].logsumexp(-1).exp())
    return torch.cat(out)


@torch.no_grad()
def position_stats(cfg: Config, models, ro, vocab: int) -> Dict[str, torch.Tensor]:
    """C, D, H_s, the teacher's never-used mass and the never-used share of each top-K, per valid position."""
    valid, _ = head.loss_positions(ro.input_ids, ro.response_mask)
    bank = Bank(ro.input_ids, ro.attention_mask, ro.position_ids(), valid, [])
    chunk = cfg.rollout.micro_batch_size
    h_s, h_t = hidden_rows(models.student, bank, chunk), hidden_rows(models.teacher, bank, chunk)
    w_s = head.lm_head_weight(models.student).detach()[:vocab].float()
    w_t = head.lm_head_weight(models.teacher).detach()[:vocab].float()
    st = teachability_stats(h_s, w_s, h_t, w_t, strategy=None, top_k=cfg.loss.top_k, temperature=cfg.loss.temperature,
                            vocab_size=vocab, backend=cfg.loss.backend, check_finite=False)
    unused = torch.ones(vocab, dtype=torch.bool)
    unused[torch.tensor([i for i in models.task.token_ids(models.tokenizer) if i < vocab])] = False
    return {"C": st.teacher_mass.double(), "D": st.disagreement.double(), "H_s": st.entropy_student.double(),
            "teacher_unused_mass": unused_mass(h_t, w_t, unused, cfg.loss.temperature),
            "unused_top_share_student": unused[st.topk_ids_student.long()].double().mean(-1),
            "unused_top_share_teacher": unused[st.topk_ids_teacher.long()].double().mean(-1)}


def spearman(x: torch.Tensor, y: torch.Tensor) -> Optional[float]:
    """scipy's Spearman rank correlation; None (JSON null) where it is undefined: fewer than two
    positions, or a constant side (no ranking to compare)."""
    from scipy.stats import spearmanr

    if x.numel() < 2:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rho = float(spearmanr(x.numpy(), y.numpy()).statistic)
    return None if math.isnan(rho) else rho


def per_class(stats: Dict[str, torch.Tensor], classes: List[str], names: List[str]) -> Dict[str, dict]:
    """Per class present: n, the mean of every statistic, and the rank correlations with the never-used mass."""
    labels = np.array(classes)
    out = {}
    for name in names:
        m = torch.from_numpy(labels == name)
        if not m.any():
            continue
        row = {"n": int(m.sum())}
        row.update({k: float(stats[k][m].mean()) for k in PER_CLASS})
        mass = stats["teacher_unused_mass"][m]
        row["spearman_1mC_unused_mass"] = spearman(1 - stats["C"][m], mass)
        row["spearman_D_unused_mass"] = spearman(stats["D"][m], mass)
        out[name] = row
    return out


@torch.no_grad()
def greedy_validation_accuracy(cfg: Config, model, models, examples) -> Dict[str, float]:
    """Greedy answers to ``examples`` (the driver's eval decoding), scored by ``task.slot_accuracy``:
    the headline and each answer class. (run.evaluate does the same on the held-out prompts only.)"""
    pairs = []
    for s in range(0, len(examples), cfg.eval.batch_size):
        chunk = examples[s:s + cfg.eval.batch_size]
        with run.student_compute(models) if model is models.student else contextlib.nullcontext():
            ro = generate(model, run.encode_prompts(cfg, models.tokenizer, chunk),
                          max_new_tokens=cfg.eval.max_new_tokens, eos_ids=models.tokenizer.eos_ids,
                          pad_id=models.tokenizer.pad_id, greedy=True, vocab_limit=run.vocab_limit(cfg, models))
        pairs += [(models.tokenizer.decode(resp), ex) for ex, resp in zip(chunk, ro.response_ids)]
    return models.task.slot_accuracy(pairs)


def theta0(cfg: Config, *, prompts: Optional[int] = None, samples: int = 1, out: Path = Path("runs/theta0"),
           log: Callable[[str], None] = print) -> dict:
    t0 = time.time()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    models = run.build_models(cfg, run.pick_device(cfg), log=log)
    check_task(models.task)
    models.student.eval().requires_grad_(False)
    vocab = run.vocab_limit(cfg, models)
    examples, ro = validation_rollout(cfg, models, prompts, samples)
    stats = position_stats(cfg, models, ro, vocab)
    classes = position_classes(models.task, examples, ro)
    validation = models.task.validation_examples()[:prompts]
    result = {"config": {"data_source": cfg.data.source, "student": cfg.student.path, "teacher": cfg.teacher.path,
                         "seed": cfg.seed, "top_k": cfg.loss.top_k, "temperature": cfg.loss.temperature,
                         "rollout_temperature": cfg.rollout.temperature, "vocab_size": vocab,
                         "prompts": len(validation), "samples": samples, "split": "validation"},
              "n_positions": len(classes),
              "classes": per_class(stats, classes, list(models.task.classes) + ["other"]),
              "accuracy": {role: greedy_validation_accuracy(cfg, model, models, validation)
                           for role, model in (("teacher", models.teacher), ("student", models.student))}}
    result["total_s"] = time.time() - t0
    out.mkdir(parents=True, exist_ok=True)
    (out / "theta0.json").write_text(json.dumps(result, indent=1, allow_nan=False))
    log(format_table(result))
    log(f"[theta0] wrote {out / 'theta0.json'} ({result['total_s']:.0f}s)")
    return result


def format_table(result: dict) -> str:
    """The per-class table and the greedy accuracies, as text."""
    cols = ["n", *PER_CLASS, "spearman_1mC_unused_mass", "spearman_D_unused_mass"]
    short = ["n", "C", "D", "H_s", "T_unused", "unusedTop_s", "unusedTop_t", "rho(1-C)", "rho(D)"]
    lines = [f"{'class':10s}" + "".join(f"{s:>12s}" for s in short)]
    for name, row in result["classes"].items():
        cells = (f"{row[c]:12.4g}" if row[c] is not None else f"{'-':>12s}" for c in cols[1:])  # None: undefined rho
        lines.append(f"{name:10s}{row['n']:12d}" + "".join(cells))
    for role, acc in result["accuracy"].items():
        lines.append(f"greedy validation accuracy, {role}: " + ", ".join(f"{k} {v:.3f}" for k, v in acc.items()))
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    ap = parser(__doc__)
    ap.set_defaults(config="lookup")
    ap.add_argument("--prompts", type=int, default=None, help="the first N validation prompts (default: all)")
    ap.add_argument("--samples", type=int, default=1, help="student responses per prompt")
    ap.add_argument("--out", default="runs/theta0")
    ap.add_argument("overrides", nargs="*", help="driver key=value overrides")
    a = ap.parse_args(argv)

    def body():
        if a.samples < 1 or (a.prompts is not None and a.prompts < 1):
            raise ConfigError("--samples and --prompts need positive integers")
        cfg = load_config(a.config, a.overrides)
        theta0(cfg, prompts=a.prompts, samples=a.samples, out=Path(a.out), log=lambda m: print(m, flush=True))

    return cli_exit_code(body)
