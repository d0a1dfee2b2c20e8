"""What a run writes: JSONL metrics, TensorBoard events, a progress bar, the loss/accuracy plot.

Rank 0 logs (``Logger``); the other ranks get a ``_SilentLogger``.
"""

from __future__ import annotations

import json
import math
import resource
import sys
import time
from pathlib import Path
from typing import Dict, Optional

import torch


def class_metrics(names, classes: torch.Tensor, valid: torch.Tensor, kept: torch.Tensor, teacher_mass: torch.Tensor,
                  all_reduce=None) -> Dict[str, float]:
    """Which kinds of position a step trained on. ``classes``: [N] indices into ``names`` (the task says
    what each position is, e.g. lookup's rule / key group / separator), aligned with the flat ``valid``,
    ``kept`` and ``teacher_mass`` (C). Per class: ``kept_mix/<name>``, its share of the kept positions;
    ``kept_rate/<name>``, the fraction of its valid positions kept; ``C/<name>`` and ``C_kept/<name>``, its
    mean C over valid and over kept positions (NaN where none). Sums over ranks (``all_reduce``), one read."""
    valid = valid.reshape(-1).bool()
    kept = kept.reshape(-1).bool() & valid
    c = torch.nan_to_num(teacher_mass.reshape(-1).double())
    weights = torch.stack([valid.double(), kept.double(), c * valid, c * kept])  # [4, N]
    sums = torch.zeros(4, len(names), dtype=torch.float64, device=weights.device)
    sums.scatter_add_(1, classes.reshape(1, -1).long().expand(4, -1).to(weights.device), weights)
    if all_reduce is not None:
        sums = all_reduce(sums)
    n_valid, n_kept, c_valid, c_kept = sums.tolist()
    total_kept = sum(n_kept)
    nan = float("nan")
    out = {}
    for i, name in enumerate(names):
        out[f"kept_mix/{name}"] = n_kept[i] / total_kept if total_kept else nan
        out[f"kept_rate/{name}"] = n_kept[i] / n_valid[i] if n_valid[i] else nan
        out[f"C/{name}"] = c_valid[i] / n_valid[i] if n_valid[i] else nan
        out[f"C_kept/{name}"] = c_kept[i] / n_kept[i] if n_kept[i] else nan
    return out


def peak_memory_mb() -> float:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class Logger:
    """JSONL metrics (always), TensorBoard event files and a tqdm bar (optional), a PNG at the end."""

    def __init__(self, cfg, total: int, initial: int, resumed: bool = False):
        """``resumed``: a run resumed at step ``initial``: records after that step (written by the
        interrupted run after its checkpoint) are cut from metrics.jsonl and TensorBoard first."""
        self.cfg = cfg
        self.dir = Path(cfg.logging.out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        if resumed:
            truncate_jsonl(self.dir / "metrics.jsonl", initial)
        self.jsonl = open(self.dir / "metrics.jsonl", "a")
        self.tb = None
        if cfg.logging.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.dir / "tensorboard"), purge_step=initial + 1 if resumed else None)
            except ImportError:
                print("[log] tensorboard is not installed: no event files", file=sys.stderr)
        self.bar = None
        if cfg.logging.progress_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc="opd", dynamic_ncols=True, file=sys.stderr)
        self.wandb = _start_wandb(cfg, self.dir) if cfg.logging.wandb else None

    def log(self, step: int, metrics: Dict[str, object], kind: str = "train"):
        rec = {"kind": kind, "step": step, "time": time.time(), **metrics}
        self.jsonl.write(json.dumps(rec) + "\n")
        self.jsonl.flush()
        scalars = {f"{kind}/{k}": v for k, v in metrics.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None and scalars:
            self.wandb.log(scalars, step=step)

    def progress(self, metrics: Dict[str, float]):
        if self.bar is not None:
            self.bar.update(1)
            name = "surrogate" if "surrogate_loss" in metrics else "loss"
            self.bar.set_postfix({name: f"{metrics['loss']:.4f}", "kept": f"{metrics['kept_fraction']:.3f}",
                                  "kl": f"{metrics['kl/all']:.3f}", "tok_s": f"{metrics['tokens_per_s']:.0f}"})

    def write(self, msg: str):
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
        self.jsonl.close()


def _start_wandb(cfg, out_dir: Path):
    """A wandb run for this output folder. Its id is kept in ``wandb_id.txt`` there, so a resumed run
    continues the same wandb run (wandb's own resume), and the whole config is recorded."""
    import wandb

    from .config import to_dict

    id_file = out_dir / "wandb_id.txt"
    run_id = id_file.read_text().strip() if id_file.is_file() else None
    lg = cfg.logging
    run = wandb.init(project=lg.wandb_project, name=lg.wandb_run_name or out_dir.name, dir=str(out_dir),
                     config=to_dict(cfg), id=run_id, resume="allow", mode=lg.wandb_mode)
    if run_id is None and getattr(run, "id", None):
        id_file.write_text(str(run.id))
    return run


def truncate_jsonl(path: Path, step: int) -> int:
    """Keep the records of ``path`` up to ``step`` (a resume point): the interrupted run's records after
    its checkpoint, and its summary, are dropped (rewritten atomically). Returns how many were dropped."""
    path = Path(path)
    if not path.is_file():
        return 0
    keep, dropped = [], 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:  # a line cut by a crash
            dropped += 1
            continue
        s = rec.get("step", 0)
        if s > step or (rec.get("kind") == "summary" and s >= step):
            dropped += 1
            continue
        keep.append(line)
    if dropped:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(x + "\n" for x in keep))
        tmp.replace(path)
    return dropped


class _SilentLogger:
    """Ranks other than 0 log nothing."""

    bar = None

    def log(self, *a, **k):
        pass

    progress = write = close = log


def plot_curves(history: dict, path: Path, teacher_acc: Optional[float] = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    if history["train"]:
        steps, losses = zip(*history["train"])
        a1.plot(steps, losses, lw=1)
    a1.set_xlabel("step"), a1.set_ylabel("TA-OPD loss"), a1.set_title("training loss")
    if history["eval"]:
        steps, accs = zip(*history["eval"])
        a2.plot(steps, accs, marker="o", label="student")
    if teacher_acc is not None:
        a2.axhline(teacher_acc, color="gray", ls="--", label="teacher")
    a2.set_xlabel("step"), a2.set_ylabel("held-out accuracy"), a2.set_ylim(0, 1.02), a2.legend()
    a2.set_title("evaluation (greedy)")
    for ax in (a1, a2):  # steps are whole numbers, also on a short run's axis
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
