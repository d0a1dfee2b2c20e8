"""Resume checks: a saved config against this run's (what defines the run is refused unless
``checkpoint.allow_changes``; allowed changes take effect and are logged), applied to the optimizer."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from .config import Config, ConfigError, config_changes, to_dict


def check_resume_config(cfg: Config, saved: Optional[dict], ckpt: Path, start: int, log=print) -> Config:
    """Compare the checkpoint's config with this run's: changes that define the run are refused unless
    ``checkpoint.allow_changes``; allowed ones are logged and take effect. Returns the config to use
    (with allow_changes, the student's architecture stays the checkpoint's: its weights are loaded)."""
    if not saved:
        log(f"[resume] warning: {ckpt} records no config; nothing could be compared")
        return cfg
    changes = config_changes(saved, cfg)
    defining = [c for c in changes if c[3] in ("defining", "checkpoint")]
    if defining and not cfg.checkpoint.allow_changes:
        what = "; ".join(f"{k}: {o!r} -> {n!r}" for k, o, n, _ in defining)
        raise ConfigError(f"checkpoint.resume: {ckpt} was trained with other settings that define the run ({what}). "
                          "Resume with the checkpoint's settings, start a new run in another logging.out_dir, or set "
                          "checkpoint.allow_changes=true to resume with the changes")
    revert = {}
    for key, old, new, kind in changes:
        if kind == "allowed":
            log(f"[resume] {key}: {old!r} -> {new!r} (takes effect from step {start})")
        elif kind == "unknown":
            log(f"[resume] {key}: {old!r} in the checkpoint's config, {new!r} now (known to one driver version only)")
        elif kind == "checkpoint":
            revert[key] = old
            log(f"[resume] {key}: {old!r} -> {new!r} not applied: the checkpoint's student is loaded, so {key} stays "
                f"{old!r}")
        else:
            log(f"[resume] {key}: {old!r} -> {new!r} (a run-defining change, allowed by checkpoint.allow_changes: "
                f"takes effect from step {start})")
    if not revert:
        return cfg
    from .config import _build, validate

    d = to_dict(cfg)
    for key, old in revert.items():
        node = d
        *parents, last = key.split(".")
        for part in parents:
            node = node[part]
        node[last] = old
    cfg = _build(Config, d)
    validate(cfg)
    return cfg


def apply_optim_config(cfg: Config, opt, sched) -> None:
    """After loading a checkpoint's optimizer and scheduler: this config's lr (and schedule), betas, eps
    and weight decay take effect (a loaded state_dict would otherwise keep the saved ones)."""
    o = cfg.optim
    for i, g in enumerate(opt.param_groups):
        g["betas"] = tuple(o.betas)
        g["eps"] = o.eps
        g["weight_decay"] = o.weight_decay if i == 0 else 0.0
        g["initial_lr"] = o.lr
    sched.base_lrs = [o.lr for _ in opt.param_groups]
    lrs = [base * lam(sched.last_epoch) for base, lam in zip(sched.base_lrs, sched.lr_lambdas)]
    for g, lr in zip(opt.param_groups, lrs):
        g["lr"] = lr
    sched._last_lr = lrs
