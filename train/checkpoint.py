"""Checkpoints, one name each: the driver's step folders and torch.distributed.checkpoint (DCP).

- ``save_training_checkpoint`` / ``find_checkpoint`` / ``load_training_checkpoint``: run.py's
  ``<root>/step_NNNNNN/`` folders (``student/`` in HF format, ``trainer_state.pt`` with scheduler,
  RNG, step, history and, in one process, the optimizer; ``<root>/latest`` names the newest). A
  sharded student is saved as ``dcp/`` inside the step folder (``save_dcp``).
- ``save_dcp`` / ``load_dcp`` / ``is_dcp_checkpoint``: DCP of a (possibly sharded) model and its
  optimizer; keys are parameter names, so a checkpoint loads at any world size, one process included.
- ``export_hf_folder`` / ``full_state_dict``: a transformers folder of a possibly sharded model,
  gathered on rank 0.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Optional

import torch

from taopd_train.config import Config, to_dict
from taopd_train.parallel import barrier, is_sharded, world

TRAIN_STATE_FILE = "train_state.json"

# --------------------------------------------------------------------------------------------------
# The driver's step folders


def rng_state() -> dict:
    st = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    random.setstate(st["python"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def checkpoint_root(cfg: Config) -> Path:
    return Path(cfg.checkpoint.dir or Path(cfg.logging.out_dir) / "checkpoints")


def save_training_checkpoint(cfg: Config, models, opt, sched, step: int, state: dict, export: bool = True) -> Path:
    """<root>/step_NNNNNN/{student/ (HF format), trainer_state.pt}; <root>/latest names the newest.

    A sharded student (torchrun) is saved as a torch.distributed.checkpoint in ``dcp/`` (weights and
    optimizer, written by every rank, resumable at any world size); ``student/`` is then exported only
    when ``export`` (the final checkpoint), gathered on rank 0. Collective under torchrun."""
    root = checkpoint_root(cfg)
    final = root / f"step_{step:06d}"
    tmp = root / f".tmp_step_{step:06d}"
    main = world()[0] == 0
    sharded = is_sharded(models.student)
    if main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    barrier()
    if sharded:
        save_dcp(tmp / "dcp", models.student, opt if cfg.checkpoint.save_optimizer else None, {"step": step})
        if export:
            export_hf_folder(models.student, tmp / "student")
    elif main:
        models.student.save_pretrained(tmp / "student")
    if not main:
        barrier()
        return final
    trainer = {"step": step, "rng": rng_state(), "scheduler": sched.state_dict(), "state": state,
               "config": to_dict(cfg)}
    if cfg.checkpoint.save_optimizer and not sharded:
        trainer["optimizer"] = opt.state_dict()
    torch.save(trainer, tmp / "trainer_state.pt")
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    (root / "latest").write_text(final.name)
    if cfg.checkpoint.keep_last:
        for old in sorted(root.glob("step_*"))[:-cfg.checkpoint.keep_last]:
            shutil.rmtree(old)
    barrier()
    return final


def find_checkpoint(cfg: Config) -> Optional[Path]:
    r = cfg.checkpoint.resume
    if not r:
        return None
    if r == "latest":
        root = checkpoint_root(cfg)
        if not (root / "latest").is_file():
            raise FileNotFoundError(f"checkpoint.resume=latest: no checkpoint under {root}")
        return root / (root / "latest").read_text().strip()
    p = Path(r).expanduser()
    if not (p / "trainer_state.pt").is_file():
        raise FileNotFoundError(f"checkpoint.resume={r!r}: {p} holds no trainer_state.pt")
    return p


def load_training_checkpoint(ckpt: Path, opt, sched, trainer: Optional[dict] = None) -> dict:
    if trainer is None:
        trainer = torch.load(ckpt / "trainer_state.pt", map_location="cpu", weights_only=False)
    if "optimizer" in trainer:
        opt.load_state_dict(trainer["optimizer"])
    sched.load_state_dict(trainer["scheduler"])
    set_rng_state(trainer["rng"])
    return trainer


# --------------------------------------------------------------------------------------------------
# DCP and HF export


def save_dcp(path, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                    train_state: Optional[dict] = None) -> None:
    """torch.distributed.checkpoint of the model (and optimizer) under ``path``; collective.

    Keys are parameter names (FQNs), values this rank's shards: DCP records the global layout, so the
    checkpoint loads at any world size, one process without a process group included. ``train_state``
    (JSON-serialisable: step, config, ...) is written by rank 0 next to it.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict as get_msd, \
        get_optimizer_state_dict as get_osd

    path = Path(path)
    state = {"model": get_msd(model)}
    if optimizer is not None:
        state["optim"] = get_osd(model, optimizer)
    dcp.save(state, checkpoint_id=str(path))
    if world()[0] == 0:
        meta = {**(train_state or {}), "optimizer": optimizer is not None}
        (path / TRAIN_STATE_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True))
    barrier()


def load_dcp(path, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer] = None) -> dict:
    """Load a ``save_dcp`` directory into ``model`` (and ``optimizer``), resharding as needed.

    Call after ``shard_model`` (if sharding) and after creating the optimizer. Returns the train_state.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict as get_msd, \
        get_optimizer_state_dict as get_osd, set_model_state_dict as set_msd, set_optimizer_state_dict as set_osd

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no checkpoint directory at {path}")
    meta_file = path / TRAIN_STATE_FILE
    meta = json.loads(meta_file.read_text()) if meta_file.exists() else {}
    if not meta.get("optimizer", True):
        optimizer = None  # saved without optimizer state: the optimizer keeps its fresh state
    state = {"model": get_msd(model)}
    if optimizer is not None:
        state["optim"] = get_osd(model, optimizer)
    dcp.load(state, checkpoint_id=str(path))
    set_msd(model, state["model"])
    if optimizer is not None:
        set_osd(model, optimizer, state["optim"])
    return {k: v for k, v in meta.items() if k != "optimizer"}


def is_dcp_checkpoint(path) -> bool:
    """A directory written by ``save_dcp`` (DCP keeps its global layout in ``.metadata``)."""
    return (Path(path) / ".metadata").is_file()


def export_hf_folder(model: torch.nn.Module, path) -> None:
    """Write a transformers checkpoint (config + weights) of a possibly sharded model from rank 0;
    collective when sharded (the full weights are gathered to rank 0's CPU)."""
    sd = full_state_dict(model)
    if world()[0] == 0:
        model.save_pretrained(str(path), state_dict=sd)
    barrier()


def full_state_dict(model: torch.nn.Module) -> dict:
    """Full (unsharded) CPU state dict on rank 0 (an empty dict elsewhere); collective when sharded."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict as get_msd

    if not is_sharded(model):
        return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    sd = get_msd(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return sd if world()[0] == 0 else {}
