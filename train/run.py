#!/usr/bin/env python
"""On-policy distillation (OPD) with teachability-aware token selection (TA-OPD).

    python train/run.py                                   # built-in default: tiny Qwen3 models, CPU, < 10 min
    python train/run.py --config qwen3 student.path=/models/Qwen3-1.7B teacher.path=/models/Qwen3-4B
    python train/run.py loss.strategy=entropy optim.steps=100

One optimizer step, in order (each a small function below):
  sample_prompts -> rollout (student samples, KV cache) -> compute_stats (teacher + student forwards without
  grad, per-position statistics from hidden states and lm_head weights) -> select (one global selection over
  the whole rollout batch: keep mask + normaliser) -> loss_backward (per micro-batch: student forward with
  grad, fused loss head over the kept positions only, normalised by the batch's kept count) ->
  optimizer_step (clip, AdamW, schedule). Evaluation, logging and checkpoints around it.
Under torchrun the same pieces run on every rank (docs/distributed.md): FSDP2 student, the loss head
with the full lm_head weights (head.py), one selection over the positions of all ranks (parallel.py),
DCP checkpoints (checkpoint.py).
"""

from __future__ import annotations

if __name__ == "__main__":  # python train/run.py (torchrun too): a script has no package for the relative
    import sys  # imports below, so the package's own module runs (one copy of it)

    from taopd_train.run import main

    sys.exit(main())

import argparse
import contextlib
import dataclasses
import json
import math
import os
import random
import shlex
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from taopd_kernels import TeachabilityStats, default_vocab_size, fused_teachability_kl, teachability_stats
from taopd_kernels.estimators import sampled_weight
from taopd_kernels.selection import select_parts

from . import checkpoint, head, parallel
from .checkpoint import CheckpointError, LockError, NonFiniteError, StorageError
from .config import (DTYPES, Config, ConfigError, Problems, bundled_configs, describe_settings, read_config,
                     student_dtypes, student_precision, to_dict)
from .hooks import HeadClock, Hooks
from .metrics import Logger, _SilentLogger, class_metrics, peak_memory_mb, plot_curves
from .models import _hub_reachable, _local_or_raise, load_model, load_tokenizer, resolve_config_file
from .precision import changed_fraction, report_precision
from .resume import apply_optim_config, check_resume_config
from .rollout import Rollout, generate, make_rollout_engine, rollout_from_tokens
from .signals import Interrupted, Signals
from .task import build_task
from .vocab import check_vocab, check_vocab_config, compare_tokenizers, teacher_tokenizer

# ================================================================== set-up


def pick_device(cfg: Config) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for _, message in _device_problems(cfg):
        raise ConfigError(message)
    return torch.device(cfg.device)


def _device_problems(cfg: Config) -> List[Tuple[str, str]]:
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        return [("device", f"device={cfg.device!r}: CUDA is not available on this machine; run on a machine with "
                 "a GPU, or set device=cpu (or auto)")]
    return []


def _batch_problems(cfg: Config, world_size: int) -> List[Tuple[str, str]]:
    if cfg.rollout.batch_size % world_size:
        return [("rollout.batch_size", f"rollout.batch_size={cfg.rollout.batch_size}: must be divisible by the "
                 f"number of ranks ({world_size}), so that every rank runs the same number of micro-batches")]
    return []


def step_seed(seed: int, step: int, stream: int) -> int:
    """Independent, reproducible seeds per (run seed, step, stream): resume needs no RNG replay."""
    return (seed * 1_000_003 + step * 7919 + stream * 104_729) % (2 ** 63 - 1)


@dataclass
class Models:
    student: torch.nn.Module
    teacher: torch.nn.Module
    tokenizer: object
    task: object
    # bf16-mixed in one process: the student's forwards run under autocast to this dtype (None: no
    # autocast; under FSDP2 the MixedPrecisionPolicy casts instead). compute_dtype: the dtype the
    # student's hidden states and lm_head weight reach the loss head in (None: as they are).
    autocast_dtype: Optional[torch.dtype] = None
    compute_dtype: Optional[torch.dtype] = None


def student_compute(models: Models):
    """The context the student's forwards run in (autocast for bf16-mixed in one process)."""
    if models.autocast_dtype is None:
        return contextlib.nullcontext()
    device = next(models.student.parameters()).device
    return torch.autocast(device_type=device.type, dtype=models.autocast_dtype)


def _head_inputs(models: Models, h_s, w_s, b_s):
    """The student's hidden states / lm_head in the compute dtype (a differentiable cast: the gradient
    reaches the fp32 master weight), for a loss head that runs outside autocast."""
    cd = models.compute_dtype
    if cd is None:
        return h_s, w_s, b_s
    return h_s.to(cd), w_s.to(cd), None if b_s is None else b_s.to(cd)


def _no_autocast(models: Models):
    if models.autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=next(models.student.parameters()).device.type, enabled=False)


_DATA_SUFFIXES = (".jsonl", ".ndjson", ".json", ".parquet", ".csv", ".txt")


def check_data_files(cfg: Config) -> None:
    """A ``data.source`` / ``data.eval_source`` that names a local file must exist (else it would be
    tried as a Hugging Face dataset name and fail with a download error)."""
    missing = data_file_problems(cfg)
    if missing:
        raise FileNotFoundError("; ".join(msg for _, msg in missing))


def data_file_problems(cfg: Config) -> List[Tuple[str, str]]:
    """(key, message) of each ``data.source`` / ``data.eval_source`` that names a local file that is not there."""
    out = []
    for key in ("source", "eval_source"):
        src = getattr(cfg.data, key)
        if not src or src == "arithmetic":
            continue
        p = Path(src).expanduser()
        looks_local = (p.suffix.lower() in _DATA_SUFFIXES or src.startswith(("/", "./", "../", "~"))
                       or p.parent.is_dir() and p.parent != Path("."))
        if looks_local and not p.exists():
            out.append((f"data.{key}", f"data.{key}={src!r}: no such file ({p.resolve()}); point data.{key} at a "
                        "local .jsonl/.json/.parquet file (or name a Hugging Face dataset)"))
    return out


def _model_problems(cfg: Config, role: str) -> List[Tuple[str, str]]:
    """Whether ``role``'s model (or the architecture file of a random init) is there, found without
    downloading or loading it: a local folder, the Hugging Face cache, or a hub that can be reached."""
    m = getattr(cfg, role)
    if m.random_init and m.config_file:
        try:
            resolve_config_file(m.config_file)
            return []
        except FileNotFoundError as e:
            return [(f"{role}.config_file", f"{role}.config_file={m.config_file!r}: {e}")]
    if m.path == "builtin" or Path(m.path).expanduser().is_dir() or _in_hf_cache(m.path) or _hub_reachable():
        return []  # from the hub: downloaded when it is loaded
    try:
        _local_or_raise(m.path, role)  # neither here nor reachable: the error that says what to do
        return []
    except FileNotFoundError as e:
        return [(f"{role}.path", f"{role}.path={m.path!r}: {e}")]


def _in_hf_cache(repo_id: str) -> bool:
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(repo_id, local_files_only=True)
        return True
    except Exception:  # not a hub id, not cached: huggingface_hub raises several kinds
        return False


def startup_problems(cfg: Config, problems: Optional[Problems] = None) -> Problems:
    """Add to ``problems`` everything that would stop the run and can be known before the heavy work
    (preparing or loading a model) and before anything is written: CUDA, the batch over the ranks, the data
    files, both models, the output folders. A check whose keys already have a problem is skipped."""
    p = Problems() if problems is None else problems
    known = p.keys()
    world = int(os.environ.get("WORLD_SIZE", "1")) if parallel.launched_by_torchrun() else 1
    rank0 = int(os.environ.get("RANK", "0")) == 0  # only rank 0 writes the run's folders
    root = checkpoint.checkpoint_root(cfg)
    checks = [
        (("device",), lambda: _device_problems(cfg)),
        (("rollout.batch_size",), lambda: _batch_problems(cfg, world)),
        (("data.source", "data.eval_source"), lambda: data_file_problems(cfg)),
        *(((f"{r}.path", f"{r}.random_init", f"{r}.config_file"), lambda r=r: _model_problems(cfg, r))
          for r in ("student", "teacher")),
        (("logging.out_dir", "checkpoint.dir"), lambda: checkpoint.storage_problems(
            [(Path(cfg.logging.out_dir), "logging.out_dir"), (root, "checkpoint.dir")]) if rank0 else []),
    ]
    for keys, check in checks:
        if known.isdisjoint(keys):
            for key, message in check():
                p.add(key, message)
    return p


def build_models(cfg: Config, device: torch.device, student_path: Optional[str] = None, log=print) -> Models:
    """Tokenizer, task and both models: the one place where models are constructed."""
    check_data_files(cfg)
    tokenizer = load_tokenizer(cfg)
    check_vocab_config(cfg, tokenizer)  # before any model is loaded or prepared
    task = build_task(cfg.data, cfg.seed)
    builtin = {}
    if "builtin" in (cfg.student.path, cfg.teacher.path) and not (cfg.student.random_init and cfg.teacher.random_init):
        from .prepare import prepare_builtin  # driver code (the built-in task's models); lazy: heavy

        builtin = prepare_builtin(cfg, task, tokenizer, device, log=log)
    scfg = dataclasses.replace(cfg.student, dtype=student_dtypes(cfg)[0])  # precision decides the student's dtype
    if student_path is not None:  # resuming: the checkpoint's weights
        scfg = dataclasses.replace(scfg, path=student_path, random_init=False)
    teacher = load_model(cfg.teacher, "teacher", device, builtin_dir=builtin.get("teacher"), seed=cfg.seed + 1)
    student = load_model(scfg, "student", device, builtin_dir=builtin.get("student"), seed=cfg.seed)
    teacher.eval().requires_grad_(False)
    student.train()
    return Models(student, teacher, tokenizer, task)


def wrap_models(cfg: Config, models: Models, ctx: parallel.DistContext) -> None:
    """Under torchrun: FSDP2 for the student, the teacher sharded or replicated (docs/distributed.md).
    In one process the models stay as they are (the loss head is called the same way)."""
    dc = cfg.distributed
    param_dtype = DTYPES[dc.param_dtype] if dc.param_dtype else None
    compute = DTYPES[student_dtypes(cfg)[1]]
    mixed = student_precision(cfg) == "bf16-mixed"
    if ctx.distributed:
        # bf16-mixed: fp32 parameters (master weights, AdamW state), bf16 all-gathers, fp32 reduce-scatter
        student_param_dtype = param_dtype or (compute if mixed else None)
        parallel.shard_model(models.student, param_dtype=student_param_dtype, reduce_dtype=DTYPES[dc.reduce_dtype])
        models.autocast_dtype = None
        models.compute_dtype = student_param_dtype if mixed else None
    else:
        models.autocast_dtype = compute if mixed else None
        models.compute_dtype = compute if mixed else None
    parallel.prepare_teacher(models.teacher, dc.teacher if ctx.distributed else "replicate", param_dtype=param_dtype)


def build_optimizer(cfg: Config, student: torch.nn.Module):
    """AdamW (decay on matrices only) and a warmup + constant/cosine/linear schedule."""
    o = cfg.optim
    if o.freeze_embeddings:
        student.get_input_embeddings().weight.requires_grad_(False)
        student.get_output_embeddings().weight.requires_grad_(False)
    decay = [p for p in student.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in student.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kwargs = dict(lr=o.lr, betas=tuple(o.betas), eps=o.eps)
    dev = next(student.parameters()).device.type
    try:
        opt = torch.optim.AdamW(groups, fused=dev in ("cpu", "cuda"), **kwargs)
    except (RuntimeError, TypeError):
        opt = torch.optim.AdamW(groups, **kwargs)

    def factor(i: int) -> float:
        if i < o.warmup_steps:
            return (i + 1) / (o.warmup_steps + 1)
        if o.schedule == "constant":
            return 1.0
        prog = min(1.0, (i - o.warmup_steps) / max(1, o.steps - o.warmup_steps))
        shape = 0.5 * (1 + math.cos(math.pi * prog)) if o.schedule == "cosine" else 1.0 - prog
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * shape

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


# ================================================================== one OPD step


def sample_prompts(cfg: Config, task, step: int, batch_size: Optional[int] = None):
    rng = random.Random(step_seed(cfg.seed, step, 1))
    return [task.train_example(rng) for _ in range(batch_size or cfg.rollout.batch_size)]


def encode_prompts(cfg: Config, tokenizer, examples) -> List[List[int]]:
    out = []
    for ex in examples:
        ids = tokenizer.prompt_ids(ex.prompt)
        out.append(ids[-cfg.data.max_prompt_tokens:])
    return out


def vocab_limit(cfg: Config, models: Models) -> int:
    v = default_vocab_size(head.lm_head_weight(models.student).shape[0], head.lm_head_weight(models.teacher).shape[0])
    return cfg.loss.vocab_size or v


def rollout(cfg: Config, models: Models, examples, step: int, engine=None) -> Rollout:
    """The student samples one response per prompt (temperature, KV cache, stop at EOS / max_new_tokens).

    Each rank samples its own prompts with its own stream (rank 0's is the single-process one); a
    sharded student steps until every rank is done. ``engine``: a vLLM engine (rollout.engine=vllm)."""
    device = next(models.student.parameters()).device
    rank = parallel.world()[0]
    prompts = encode_prompts(cfg, models.tokenizer, examples)
    if engine is not None:
        resp = engine.generate(prompts, max_new_tokens=cfg.rollout.max_new_tokens, temperature=cfg.rollout.temperature,
                               top_p=cfg.rollout.top_p, seed=step_seed(cfg.seed, step, 2 + 1000 * rank))
        return rollout_from_tokens(prompts, resp, models.tokenizer.pad_id, models.tokenizer.eos_ids, device)
    gen = torch.Generator(device=device).manual_seed(step_seed(cfg.seed, step, 2 + 1000 * rank))
    with student_compute(models):
        return generate(models.student, prompts,
                        max_new_tokens=cfg.rollout.max_new_tokens, eos_ids=models.tokenizer.eos_ids,
                        pad_id=models.tokenizer.pad_id, temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                        generator=gen, vocab_limit=vocab_limit(cfg, models), all_done=parallel.all_ranks_done)


@dataclass
class MicroBatch:
    """Sequences [b, T] and the per-position loss inputs [b, T-1] (``head.loss_positions``: the hidden
    state at t predicts token t+1)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    valid: torch.Tensor  # response tokens (incl. EOS), shifted: valid[:, t] = response_mask[:, t+1]
    sampled_ids: torch.Tensor  # input_ids[:, 1:]
    sequence_ids: torch.Tensor  # global sequence index of every position (for min_per_sequence)


def micro_batches(cfg: Config, ro: Rollout, seq_offset: int = 0) -> List[MicroBatch]:
    pos = ro.position_ids()
    out = []
    n = ro.input_ids.shape[0]
    for s in range(0, n, cfg.rollout.micro_batch_size):
        e = min(n, s + cfg.rollout.micro_batch_size)
        ids = ro.input_ids[s:e]
        valid, sampled = head.loss_positions(ids, ro.response_mask[s:e])
        seq = torch.arange(s, e, device=ids.device)[:, None].expand_as(valid) + seq_offset
        out.append(MicroBatch(ids, ro.attention_mask[s:e], pos[s:e], valid, sampled, seq.contiguous()))
    return out


def _head_kwargs(cfg: Config, models: Models, mb: MicroBatch) -> dict:
    """Options shared by the statistics and the loss (the selection is the driver's: ``select``)."""
    lo = cfg.loss
    return dict(valid_mask=mb.valid, sequence_ids=mb.sequence_ids, sampled_ids=mb.sampled_ids, top_k=lo.top_k,
                temperature=lo.temperature, vocab_size=vocab_limit(cfg, models), backend=lo.backend,
                chunk_rows=lo.chunk_rows, chunk_vocab=lo.chunk_vocab)


@torch.no_grad()
def compute_stats(cfg: Config, models: Models, mbs: List[MicroBatch], clock: Optional[HeadClock] = None):
    """Teacher and student forwards without grad; per-position statistics (docs/math.md, Per-position statistics) per micro-batch.

    Returns (stats per micro-batch, teacher (hidden, lm_head weight, bias) per micro-batch: reused by
    ``loss_backward``). Statistics only (``strategy=None``): the selection is ``select``'s, over the whole
    batch. Both lm_head weights are the full ones, also when FSDP shards them (``head.call_with_full_head``);
    a sharded teacher's full weight is fetched once per step. ``clock``: times the statistics calls."""
    clock = clock or HeadClock()
    stats, teacher_out = [], []
    w_t = b_t = None
    for mb in mbs:
        h_t, w, b = head.teacher_forward(models.teacher, mb.input_ids, mb.attention_mask, mb.position_ids)
        if w_t is None:
            w_t, b_t = w, b

        def stats_head(h_s, w_s, b_s):
            h_s, w_s, b_s = _head_inputs(models, h_s, w_s, b_s)
            with _no_autocast(models):
                return clock.forward(lambda: teachability_stats(
                    h_s, w_s, h_t, w_t, student_bias=b_s, teacher_bias=b_t, strategy=None,
                    check_finite=cfg.loss.check_finite, **_head_kwargs(cfg, models, mb)))

        with student_compute(models):
            stats.append(head.call_with_full_head(models.student, mb.input_ids, mb.attention_mask, stats_head,
                                                  mb.position_ids))
        teacher_out.append((h_t, w_t, b_t))
    return stats, teacher_out


def select(cfg: Config, stats: List[TeachabilityStats], mbs: List[MicroBatch], step: int):
    """One selection over the whole rollout batch (docs/math.md, Scores and selection). Returns (keep masks per micro-batch,
    normaliser = the batch's kept count, the concatenated statistics with score/kept filled in)."""
    # Under torchrun: over the positions of all ranks, in rank order; sequence ids are global batch
    # indices (micro_batches' seq_offset).
    sel = select_parts(stats, strategy=cfg.loss.strategy, keep_ratio=cfg.loss.keep_ratio,
                       min_per_sequence=cfg.loss.min_per_sequence, seed=step_seed(cfg.seed, step, 3),
                       sequence_ids=[mb.sequence_ids for mb in mbs], global_sequence_ids=True)
    allstats = TeachabilityStats.concat(stats)
    allstats.score = torch.cat([s.reshape(-1) for s in sel.scores])
    allstats.kept = torch.cat([k.reshape(-1) for k in sel.keep_masks])
    return sel.keep_masks, float(sel.num_kept), allstats


def loss_backward(cfg: Config, models: Models, mb: MicroBatch, teacher_out: tuple,
                  stats: TeachabilityStats, keep_mask: torch.Tensor, normalizer: float,
                  clock: Optional[HeadClock] = None) -> torch.Tensor:
    """Student forward with grad, fused loss head on this micro-batch, backward. The micro-batch losses
    of one step sum to the batch loss (each is divided by the batch's kept count; under torchrun by the
    count over all ranks, and FSDP sums the ranks' gradients). ``teacher_out``: from ``compute_stats``;
    ``clock``: times the loss head's forward and backward."""
    clock = clock or HeadClock()
    if normalizer <= 0:
        return torch.zeros((), dtype=torch.float64, device=mb.input_ids.device)
    h_t, w_t, b_t = teacher_out
    lo = cfg.loss

    def loss_head(h_s, w_s, b_s):  # inside the student's forward: the full lm_head weight, even under FSDP
        h_s, w_s, b_s = _head_inputs(models, h_s, w_s, b_s)
        with _no_autocast(models):
            return clock.loss(lambda h: _loss(h, w_s, b_s), h_s)

    def _loss(h_s, w_s, b_s):
        loss, _ = fused_teachability_kl(
            h_s, w_s, h_t, w_t, student_bias=b_s, teacher_bias=b_t, strategy=lo.strategy, estimator=lo.estimator,
            keep_ratio=lo.keep_ratio, min_per_sequence=lo.min_per_sequence, seed=0, keep_mask=keep_mask,
            normalizer=normalizer, stats=stats,
            check_finite=False,  # the same weights were checked by ``compute_stats`` when loss.check_finite is set
            **_head_kwargs(cfg, models, mb))
        return loss

    with student_compute(models):
        loss = head.call_with_full_head(models.student, mb.input_ids, mb.attention_mask, loss_head, mb.position_ids)
    loss.backward()
    return loss.detach().double()  # a device scalar: the step reads all its micro-batches' losses at once


def optimizer_step(cfg: Config, student, opt, sched, loss: float = 0.0) -> float:
    """Clip, AdamW, schedule. A non-finite gradient norm (or ``loss``) skips the AdamW step (the
    gradients are dropped, the schedule advances) and is returned as it is: the caller logs it."""
    params = [p for p in student.parameters() if p.grad is not None]
    # clip_grad_norm_ also handles FSDP's sharded (DTensor) gradients; its norm is then a DTensor.
    max_norm = cfg.optim.max_grad_norm if cfg.optim.max_grad_norm is not None else math.inf
    gnorm = torch.nn.utils.clip_grad_norm_(params, max_norm) if params else torch.zeros(())
    gnorm = float(gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm)
    if math.isfinite(gnorm) and math.isfinite(loss):
        opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return gnorm


def _skip_step(opt, sched) -> None:
    opt.zero_grad(set_to_none=True)
    sched.step()


def train_step(cfg: Config, models: Models, opt, sched, step: int, engine=None) -> Dict[str, float]:
    """One OPD step over one rollout batch. Returns the step's metrics (over all ranks under torchrun:
    each rank rolls out its contiguous block of the batch's prompts)."""
    t0 = time.perf_counter()
    examples = sample_prompts(cfg, models.task, step)
    rank, world = parallel.world()
    mine = parallel.shard_range(len(examples), rank, world)
    ro = rollout(cfg, models, examples[mine.start:mine.stop], step, engine)
    t_roll = time.perf_counter()
    device = ro.input_ids.device
    lr = sched.get_last_lr()[0]
    bad_rollouts = float(ro.nonfinite.sum()) if ro.nonfinite is not None else 0.0
    bad_rollouts = float(parallel.all_reduce_sum(torch.tensor([bad_rollouts], dtype=torch.float64, device=device)))
    if bad_rollouts:  # the student's logits are not finite: nothing of this step can be trusted
        _skip_step(opt, sched)
        return {"loss": float("nan"), "grad_norm": float("nan"), "lr": lr, "skipped": True,
                "nonfinite": f"{int(bad_rollouts)} rollouts met non-finite student logits", "kept_fraction": 0.0,
                "kl/all": float("nan"), "tokens_per_s": 0.0, "step_time_s": time.perf_counter() - t0,
                "loss_head_s": 0.0}
    clock = HeadClock()
    mbs = micro_batches(cfg, ro, seq_offset=mine.start)
    stats, teacher_hidden = compute_stats(cfg, models, mbs, clock=clock)
    masks, normalizer, allstats = select(cfg, stats, mbs, step)
    loss = 0.0
    for mb, h_t, st, keep in zip(mbs, teacher_hidden, stats, masks):
        loss += loss_backward(cfg, models, mb, h_t, st, keep, normalizer, clock=clock)
    loss, resp_total, tokens, dropped, kl_sum, kl_n = _step_totals(loss, ro, allstats)
    # the decision is the same on every rank: the loss is the global sum, the gradient norm global
    gnorm = optimizer_step(cfg, models.student, opt, sched, loss=loss if not dropped else float("nan"))
    skipped = not (math.isfinite(loss) and math.isfinite(gnorm)) or bool(dropped)
    if engine is not None and not skipped:
        engine.sync_weights(models.student)
    dt = time.perf_counter() - t0
    s = allstats.summary(all_reduce=parallel.all_reduce_sum)
    by_class = _class_metrics(models.task, examples[mine.start:mine.stop], ro, allstats)
    resp_len = torch.tensor(resp_total / len(examples))
    extra = {}
    if skipped:
        why = [f"{name} {v}" for name, v in (("loss", loss), ("grad_norm", gnorm)) if not math.isfinite(v)]
        if dropped:
            why.append(f"{int(dropped)} positions without a finite logit")
        extra = {"skipped": True, "nonfinite": ", ".join(why)}
    if cfg.loss.estimator == "sampled":  # the loss is a surrogate: say so, and log the KL estimate beside it
        extra["surrogate_loss"] = loss
    extra["kl_sampled/kept"] = kl_sum / kl_n if kl_n else float("nan")
    return {
        **extra,
        "loss": loss, "kept_fraction": s["kept_fraction"], "num_kept": s["num_kept"], "num_valid": s["num_valid"],
        "kl/all": s["kl_reverse/all"], "kl/kept": s["kl_reverse/kept"],
        "kl_forward/all": s["kl_forward/all"], "kl_forward/kept": s["kl_forward/kept"],
        "C/all": s["teacher_mass/all"], "C/kept": s["teacher_mass/kept"],
        "D/all": s["disagreement/all"], "D/kept": s["disagreement/kept"],
        "entropy/all": s["entropy_student/all"], "entropy/kept": s["entropy_student/kept"],
        "response_length": float(resp_len.mean()), "lr": lr, "grad_norm": gnorm,
        "tokens_per_s": tokens / dt, "step_time_s": dt, "rollout_time_s": t_roll - t0, "peak_mem_mb": peak_memory_mb(),
        **by_class,
        "loss_head_s": clock.seconds(),
    }


def position_class_grid(task, examples, ro: Rollout) -> Tuple[List[str], torch.Tensor]:
    """For a task that says what each response position is (``task.position_classes``, from the names
    ``task.classes``; e.g. lookup's rule / key group / separator): the names (``task.classes`` + "other")
    and the class index of every loss position, int64 [B, T - 1]. Position t predicts token t + 1, so
    response token j is scored at t = prompt_len + j - 1; positions past the task's layout (and the
    prompt's) are "other"."""
    names = list(task.classes) + ["other"]
    classes = torch.full((ro.input_ids.shape[0], ro.input_ids.shape[1] - 1), len(names) - 1, dtype=torch.long)
    for b, ex in enumerate(examples):
        for j, name in enumerate(task.position_classes(ex)[:classes.shape[1] - ro.prompt_len + 1]):
            classes[b, ro.prompt_len + j - 1] = names.index(name)
    return names, classes


def _class_metrics(task, examples, ro: Rollout, allstats: TeachabilityStats) -> Dict[str, float]:
    """What the step kept, per position class (``position_class_grid``): metrics.class_metrics."""
    if not hasattr(task, "position_classes"):
        return {}
    names, classes = position_class_grid(task, examples, ro)
    kept = allstats.kept if allstats.kept is not None else allstats.valid
    return class_metrics(names, classes, allstats.valid, kept, allstats.teacher_mass,
                         all_reduce=parallel.all_reduce_sum)


def _step_totals(loss, ro: Rollout, allstats: TeachabilityStats) -> List[float]:
    """The step's sums over all ranks, read in one transfer: (loss, response tokens, tokens, positions
    without a finite logit, and the sampled estimator's KL estimate: sum and count over kept positions)."""
    device = ro.input_ids.device
    # the KL estimate of the sampled estimator: the mean of its weight logp_s(y) - logp_t(y) over kept positions
    kept = allstats.kept.bool() if allstats.kept is not None else allstats.valid.bool()
    if allstats.logp_student_sampled is not None and allstats.logp_teacher_sampled is not None:
        w = sampled_weight(allstats.logp_student_sampled, allstats.logp_teacher_sampled).double()
        kl_sum, kl_n = torch.where(kept, w, 0.0).sum(), kept.sum().double()
    else:
        kl_sum = kl_n = torch.zeros((), dtype=torch.float64, device=device)
    dropped = allstats.dropped.sum().double() if allstats.dropped is not None else kl_n.new_zeros(())
    totals = torch.stack([torch.as_tensor(loss, dtype=torch.float64).to(device),
                          ro.response_mask.sum().double(), ro.attention_mask.sum().double(),
                          dropped.to(device), kl_sum.to(device), kl_n.to(device)])
    return parallel.all_reduce_sum(totals).tolist()


# ================================================================== evaluation


@torch.no_grad()
def evaluate(cfg: Config, model, models: Models, limit: Optional[int] = None) -> Dict[str, object]:
    """Greedy decoding on the held-out prompts (``eval.prompts``: or the validation prompts); the task's answer
    check. Returns accuracy and a few samples."""
    prompts = models.task.eval_examples() if cfg.eval.prompts == "heldout" else models.task.validation_examples()
    examples = prompts[:limit]
    correct, samples, nonfinite, pairs = 0, [], 0, []
    for s in range(0, len(examples), cfg.eval.batch_size):
        chunk = examples[s:s + cfg.eval.batch_size]
        with student_compute(models) if model is models.student else contextlib.nullcontext():
            ro = generate(model, encode_prompts(cfg, models.tokenizer, chunk), max_new_tokens=cfg.eval.max_new_tokens,
                          eos_ids=models.tokenizer.eos_ids, pad_id=models.tokenizer.pad_id, greedy=True,
                          vocab_limit=vocab_limit(cfg, models), all_done=parallel.all_ranks_done)
        if ro.nonfinite is not None:
            nonfinite += int(ro.nonfinite.sum())
        for ex, resp in zip(chunk, ro.response_ids):
            text = models.tokenizer.decode(resp)
            ok = models.task.check(text, ex.answer)
            correct += ok
            pairs.append((text, ex))
            if len(samples) < 4:
                samples.append({"prompt": ex.prompt[-200:], "response": text[-200:], "answer": ex.answer, "ok": ok})
    out = {"accuracy": correct / max(1, len(examples)), "n": len(examples), "samples": samples}
    if hasattr(models.task, "slot_accuracy"):  # answer slots by class (lookup): the headline is the slot fraction
        out.update(models.task.slot_accuracy(pairs))
    if nonfinite:
        out["nonfinite_sequences"] = nonfinite  # the model's logits were NaN/inf: its answers mean nothing
    return out


def _rank0_first(ctx, fn):
    """Run ``fn`` on rank 0 only; every rank raises if it failed (no rank is left waiting)."""
    err = None
    if ctx.is_main:
        try:
            fn()
        except (StorageError, LockError, OSError) as e:
            err = e
    if ctx.distributed:
        flag = parallel.all_reduce_sum(torch.tensor([1.0 if err else 0.0], device=ctx.device))
        if float(flag) and err is None:
            raise RuntimeError("rank 0 could not start the run (its message says why)")
    if err is not None:
        raise err


# ================================================================== the loop


def train(cfg: Config, log=None, hooks: Optional[Hooks] = None) -> dict:
    """One run: set up (or resume), train ``optim.steps`` steps, evaluate, checkpoint; returns the summary.
    ``log``: where messages go (default: print); ``hooks``: callbacks for code that watches the run
    (``hooks.Hooks``)."""
    t_start = time.time()
    startup_problems(cfg).raise_if_any()  # all of them at once, before anything is written or loaded
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    # Under torchrun: one process per rank (docs/distributed.md); otherwise no process group.
    ctx = parallel.init_distributed(device=None if cfg.device == "auto" else cfg.device,
                                    backend=cfg.distributed.backend) \
        if parallel.launched_by_torchrun() else parallel.DistContext(device=pick_device(cfg))
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    out_dir = Path(cfg.logging.out_dir)
    root = checkpoint.checkpoint_root(cfg)
    say = (log or (lambda m: print(m, flush=True))) if ctx.is_main else (lambda m: None)
    locks: List[checkpoint.RunLock] = []

    def claim():  # storage first (before any model is loaded or prepared), then one run per folder
        checkpoint.check_writable(out_dir, "logging.out_dir")
        checkpoint.check_writable(root, "checkpoint.dir")
        locks.append(checkpoint.RunLock(out_dir).acquire(say))
        if out_dir.resolve() not in root.resolve().parents:
            locks.append(checkpoint.RunLock(root).acquire(say))

    # the folders this run creates: a run that fails leaves none of them behind empty
    created = checkpoint.missing_folders([out_dir, root]) if ctx.is_main else []
    signals = Signals()
    summary = None
    try:
        _rank0_first(ctx, claim)
        summary = _train(cfg, ctx, out_dir, say, log, signals, t_start, hooks or Hooks())
    finally:
        signals.restore()
        for lk in locks:
            lk.release(remove_file=summary is None)
        if summary is None:
            checkpoint.remove_empty_folders(created)
    if ctx.initialized_here:
        parallel.destroy_distributed(ctx)
    return summary


def _find(cfg: Config, ctx, say):
    """(checkpoint path, trainer state) or (None, None): rank 0 verifies, every rank loads the same one."""
    if not ctx.distributed:
        return checkpoint.find_checkpoint_and_state(cfg, log=say) or (None, None)
    import torch.distributed as dist

    found, box = None, [None]
    if ctx.is_main:
        try:
            found = checkpoint.find_checkpoint_and_state(cfg, log=say)
            box = [None if found is None else ("ok", str(found[0]))]
        except Exception as e:  # every rank stops with it, none waits
            box = [("error", type(e).__name__, str(e))]
            dist.broadcast_object_list(box, src=0)
            raise
    dist.broadcast_object_list(box, src=0)
    if box[0] is None:
        return None, None
    if box[0][0] == "error":
        raise CheckpointError(f"rank 0 found no usable checkpoint ({box[0][1]}: {box[0][2]})")
    ckpt = Path(box[0][1])
    return ckpt, (found[1] if ctx.is_main else checkpoint.load_trainer_state(ckpt))


@dataclass
class _Resume:
    """Where a run starts: step 0, or a checkpoint (its folder, trainer state and the weights' format)."""

    cfg: Config  # with the checkpoint's run-defining settings where changes were allowed
    start: int = 0
    ckpt: Optional[Path] = None
    trainer: Optional[dict] = None
    dcp_dir: Optional[Path] = None  # a sharded run's DCP weights
    hf_dir: Optional[str] = None  # a single-process run's HF student folder


def _resume_point(cfg: Config, ctx, say) -> _Resume:
    ckpt, trainer = _find(cfg, ctx, say)
    if ckpt is None:
        return _Resume(cfg)
    start = int(trainer["step"])
    if start > cfg.optim.steps:
        raise ConfigError(f"optim.steps={cfg.optim.steps}: the checkpoint {ckpt} is already at step {start}; "
                          f"raise optim.steps above {start} to continue it, or resume an earlier checkpoint")
    cfg = check_resume_config(cfg, trainer.get("config"), ckpt, start, log=say)
    dcp_dir = ckpt / "dcp" if checkpoint.is_dcp_checkpoint(ckpt / "dcp") else None
    return _Resume(cfg, start, ckpt, trainer, dcp_dir, str(ckpt / "student") if dcp_dir is None else None)


def _setup_models(cfg: Config, ctx, res: _Resume, say) -> Models:
    """Both models built (rank 0 first: it prepares the built-in ones), checked and wrapped."""
    if ctx.distributed and not ctx.is_main:
        parallel.barrier()  # rank 0 first: it prepares (and caches on disk) the built-in models if needed
    models = build_models(cfg, ctx.device, student_path=res.hf_dir, log=say)
    if ctx.distributed and ctx.is_main:
        parallel.barrier()
    check_vocab(cfg, models, log=say)
    t_tok = teacher_tokenizer(cfg)
    say(compare_tokenizers(models.tokenizer, t_tok) if t_tok is not None else
        "[vocab] the teacher has no tokenizer of its own (built-in / random init): it reads the student's tokens")
    wrap_models(cfg, models, ctx)
    return models


def _restore(cfg: Config, ctx, res: _Resume, models: Models, opt, sched, say) -> dict:
    """The loop's state (history, teacher and theta_0 accuracies): fresh, or the checkpoint's, whose
    weights, optimizer and schedule are loaded."""
    if res.ckpt is None:
        return {"history": {"train": [], "eval": []}, "teacher_accuracy": None, "student_before": None}
    trainer = res.trainer
    if res.dcp_dir is not None:  # written by a sharded run: reshards to this world size (one process too)
        checkpoint.load_dcp(res.dcp_dir, models.student, opt)
    if "optimizer" in trainer and ctx.distributed:
        say("[resume] warning: the optimizer state of a single-process checkpoint is not loaded into a "
            "sharded run (its moments start from zero); the weights are")
        trainer.pop("optimizer")
    trainer = checkpoint.load_training_checkpoint(res.ckpt, opt, sched, trainer)
    apply_optim_config(cfg, opt, sched)
    say(f"[resume] from {res.ckpt} at step {res.start}")
    return trainer["state"]


def _rollout_engine(cfg: Config, res: _Resume, models: Models):
    """None (the student generates), or the vLLM engine with the student's weights."""
    if cfg.rollout.engine == "hf":
        return None
    path = res.hf_dir or cfg.student.path
    if path == "builtin" or cfg.student.random_init and res.hf_dir is None:
        raise ConfigError("rollout.engine=vllm: the student must be a HF checkpoint directory (student.path)")
    engine = make_rollout_engine(cfg.rollout.engine, model_path=path, seed=cfg.seed,
                                 gpu_memory_utilization=cfg.rollout.vllm_gpu_memory_utilization)
    engine.sync_weights(models.student)
    return engine


def _train(cfg: Config, ctx, out_dir: Path, say, log, signals: Signals, t_start: float, hooks: Hooks) -> dict:
    res = _resume_point(cfg, ctx, say)
    cfg = res.cfg
    models = _setup_models(cfg, ctx, res, say)
    pure_sample = report_precision(cfg, models, log=say)
    opt, sched = build_optimizer(cfg, models.student)
    state = _restore(cfg, ctx, res, models, opt, sched, say)
    if cfg.loss.estimator == "sampled":
        say("[loss] estimator=sampled: the logged 'loss' (also 'surrogate_loss') is the policy-gradient surrogate "
            "sum m*(logp_s(y)-logp_t(y))*logp_s(y)/sum m, whose gradient estimates the reverse KL's; it is not a KL. "
            "'kl_sampled/kept' (mean logp_s(y)-logp_t(y) over kept positions) is the KL estimate, 'kl/kept' the "
            "exact reverse KL")
    engine = _rollout_engine(cfg, res, models)
    if ctx.is_main:
        (out_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=1))
    t_prep = time.time() - t_start

    logger = Logger(cfg, total=cfg.optim.steps, initial=res.start, resumed=res.ckpt is not None) if ctx.is_main \
        else _SilentLogger()
    if logger.bar is None or log is not None:
        logger.write = say
    loop = _Loop(cfg, ctx, models, opt, sched, engine, state, res.start, res.ckpt, logger, say, signals, hooks,
                 out_dir, t_start, t_prep, pure_sample, last_ckpt=res.ckpt)
    try:
        return _loop(loop)
    finally:
        logger.close()


@dataclass
class _Loop:
    """What the loop works with, and what it carries from step to step."""

    cfg: Config
    ctx: parallel.DistContext
    models: Models
    opt: torch.optim.Optimizer
    sched: object
    engine: object  # None: the student generates
    state: dict  # checkpointed: history, teacher_accuracy, student_before
    start: int
    ckpt: Optional[Path]  # the checkpoint resumed from
    logger: object
    say: object
    signals: Signals
    hooks: Hooks
    out_dir: Path
    t_start: float
    t_prep: float
    pure_sample: object  # report_precision's sample of weights, checked after the first step, then None
    last_ckpt: Optional[Path] = None
    last_save: float = dataclasses.field(default_factory=time.time)
    streak: int = 0  # non-finite steps in a row


def _loop(r: _Loop) -> dict:
    if r.state["teacher_accuracy"] is None and r.cfg.eval.at_start:
        _evaluate_at_start(r)
    r.signals.install()
    r.last_save = time.time()
    t_loop = time.time()
    for step in range(r.start, r.cfg.optim.steps):
        metrics = train_step(r.cfg, r.models, r.opt, r.sched, step, r.engine)
        done = step + 1
        r.hooks.on_step_end(done, metrics)
        _record_step(r, done, metrics)
        if r.cfg.eval.every and done % r.cfg.eval.every == 0 and done != r.cfg.optim.steps:
            ev = _evaluation(r, "student", done)
            r.state["history"]["eval"].append((done, ev["accuracy"]))
            r.logger.log(done, {k: v for k, v in ev.items() if k != "n"}, kind="eval")
            r.logger.write(f"[eval] step {done}: student accuracy {ev['accuracy']:.3f}")
        if _checkpoint_or_stop(r, done):
            break
    return _finish(r, time.time() - t_loop)


def _evaluation(r: _Loop, which: str, step: int) -> dict:
    """The teacher's or the student's evaluation, or the one the hooks give for it; reported to them."""
    model = r.models.teacher if which == "teacher" else r.models.student
    ev = r.hooks.reuse_evaluation(step, which)
    if ev is None:
        ev = evaluate(r.cfg, model, r.models)
    r.hooks.on_evaluate(step, which, ev, model)
    return ev


def _evaluate_at_start(r: _Loop) -> None:
    ev = _evaluation(r, "teacher", 0)
    r.state["teacher_accuracy"] = ev["accuracy"]
    r.logger.log(0, {"accuracy": ev["accuracy"], "samples": ev["samples"]}, kind="eval_teacher")
    ev = _evaluation(r, "student", 0)
    r.state["student_before"] = ev["accuracy"]
    r.state["history"]["eval"].append((0, ev["accuracy"]))
    r.logger.log(0, {"accuracy": ev["accuracy"], "samples": ev["samples"]}, kind="eval")
    r.logger.write(f"[eval] teacher accuracy {r.state['teacher_accuracy']:.3f} | student before "
                   f"{r.state['student_before']:.3f} (n={ev['n']})")


def _record_step(r: _Loop, done: int, metrics: dict) -> None:
    """History and logs of one step; a non-finite step counts towards the streak that stops the run."""
    r.state["history"]["train"].append((done, metrics["loss"]))
    limit = r.cfg.optim.max_nonfinite_steps
    if metrics.get("skipped"):
        r.streak += 1
        r.logger.log(done, metrics)
        r.logger.write(f"[nonfinite] step {done}: {metrics['nonfinite']}: the optimizer step was skipped ({r.streak} "
                       f"in a row; the run stops at optim.max_nonfinite_steps={limit})")
        if r.streak >= limit:
            raise NonFiniteError(
                f"{r.streak} steps in a row with non-finite values (last: step {done}, {metrics['nonfinite']}); the "
                f"run stops. Those steps did not change the weights; the last good checkpoint is "
                f"{r.last_ckpt or 'none (none was saved)'}. Lower optim.lr, or use precision=bf16-mixed / fp32")
        return
    r.streak = 0
    if r.pure_sample is not None:  # the measured counterpart of report_precision's estimate
        frac = changed_fraction(r.models.student, r.pure_sample)
        r.say(f"[precision] after the first step, {frac:.1%} of the sampled student weights changed"
              + ("" if frac >= 0.5 else f"; warning: {student_precision(r.cfg)} rounds most updates away at "
                 f"optim.lr={r.cfg.optim.lr:g}: use precision=bf16-mixed"))
        r.pure_sample = None
    if done % r.cfg.logging.every == 0 or done == r.cfg.optim.steps:
        r.logger.log(done, metrics)
    r.logger.progress(metrics)


def _checkpoint_or_stop(r: _Loop, done: int) -> bool:
    """A periodic, timed or signalled checkpoint after step ``done``; raises ``Interrupted`` on a signal
    (True: a signal at the last step, which ends normally)."""
    c = r.cfg.checkpoint
    periodic = bool(c.every and done % c.every == 0)
    timed = bool(c.every_minutes and time.time() - r.last_save >= 60 * c.every_minutes)
    stop = r.signals.signum
    if r.ctx.distributed:  # every rank takes the same decision (rank 0's clock, anyone's signal)
        flags = parallel.all_reduce_sum(torch.tensor(
            [float(timed and r.ctx.is_main), float(stop or 0), float(stop is not None)], dtype=torch.float64,
            device=r.ctx.device)).tolist()
        timed = flags[0] > 0
        stop = stop or (int(flags[1] / flags[2]) if flags[2] else None)
    if r.streak and not stop:  # in a non-finite streak: no periodic checkpoint rotates a good one out
        periodic = timed = False
    if done != r.cfg.optim.steps and (periodic or timed or stop):
        r.last_ckpt = checkpoint.save_training_checkpoint(r.cfg, r.models, r.opt, r.sched, done, r.state,
                                                          export=bool(stop))
        r.last_save = time.time()
        if timed and not periodic:
            r.logger.write(f"[checkpoint] step {done}: {r.last_ckpt} ({c.every_minutes:g} minutes since the last)")
    if stop:
        if done == r.cfg.optim.steps:  # the last step: the regular end follows (it saves)
            r.say(f"[signal] {signal.Signals(stop).name} at the last step: finishing normally")
            return True
        raise Interrupted(stop, r.last_ckpt, done)
    return False


def _finish(r: _Loop, train_time: float) -> dict:
    """The final evaluation and checkpoint, the plot, the summary (summary.json and the [done] line)."""
    final = _evaluation(r, "student", r.cfg.optim.steps)
    end_step = r.cfg.optim.steps
    history = r.state["history"]
    if not history["eval"] or history["eval"][-1][0] != end_step:
        history["eval"].append((end_step, final["accuracy"]))
    r.logger.log(end_step, {k: v for k, v in final.items() if k != "n"}, kind="eval")
    if r.ckpt is not None and r.start == end_step:
        ckpt_path = r.ckpt  # nothing trained since this checkpoint
    else:
        ckpt_path = checkpoint.save_training_checkpoint(r.cfg, r.models, r.opt, r.sched, end_step, r.state)
    if r.cfg.logging.plot and r.ctx.is_main:
        plot_curves(history, r.out_dir / "curves.png", r.state["teacher_accuracy"])
    summary = {"teacher_accuracy": r.state["teacher_accuracy"], "student_before": r.state["student_before"],
               "student_after": final["accuracy"], "steps": end_step, "strategy": r.cfg.loss.strategy,
               "keep_ratio": r.cfg.loss.keep_ratio, "prepare_s": r.t_prep, "train_s": train_time,
               "total_s": time.time() - r.t_start, "checkpoint": str(ckpt_path)}
    t, b, a = summary["teacher_accuracy"], summary["student_before"], summary["student_after"]
    if t is not None and b is not None and t > b:
        summary["gap_closed"] = (a - b) / (t - b)
    r.logger.log(end_step, summary, kind="summary")
    if r.ctx.is_main:
        (r.out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    gap = f" | gap closed {summary['gap_closed'] * 100:.0f}%" if "gap_closed" in summary else ""
    measured = [f"{name} {v:.3f}" for name, v in (("teacher", t), ("student before", b)) if v is not None]
    r.say(f"[done] {' | '.join(measured + [f'student after {a:.3f}'])}{gap} | {summary['total_s']:.0f}s total "
          f"({r.t_prep:.0f}s preparation)")  # an accuracy not measured (eval.at_start=false) is left out, not 'None'
    return summary


def _resume_command(argv: List[str], ckpt: Optional[Path]) -> str:
    keep = [a for a in argv if not a.startswith("checkpoint.resume=")]
    target = str(ckpt) if ckpt is not None else "latest"
    cmd = "python train/run.py " + " ".join(shlex.quote(a) for a in keep + [f"checkpoint.resume={target}"])
    if parallel.launched_by_torchrun():
        cmd += "   (under torchrun: the same torchrun command with this checkpoint.resume=)"
    return cmd


def _help_epilog() -> str:
    """The overrides, every setting with its default and meaning, and the bundled configs (from config.py)."""
    import functools
    import shutil
    import textwrap

    width = min(max(shutil.get_terminal_size((100, 24)).columns - 2, 60), 120)
    bundled = [textwrap.fill(first, width, initial_indent=f"  {name:<12}", subsequent_indent=" " * 14)
               for name, first in bundled_configs()]
    fill = functools.partial(textwrap.fill, width=width)
    return "\n".join([
        fill("Overrides: dotted key=value after the options, values in YAML (null, true, [0.9, 0.95]), e.g."),
        "  python train/run.py --config arithmetic loss.strategy=entropy optim.lr=1e-4", "",
        fill("Settings (key = default, then what it means; train/config.py):"), "", describe_settings(width), "",
        fill("Bundled configs (--config NAME: train/configs/NAME.yaml; a path to a YAML file works too):"),
        *bundled])


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_help_epilog())
    ap.add_argument("--config", default=None, help="a YAML file or a bundled config's name (listed below)")
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides (settings listed below)")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = ap.parse_args(argv)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    err = (lambda m: print(m, file=sys.stderr, flush=True)) if rank0 else (lambda m: None)
    try:
        cfg, problems = read_config(args.config, args.overrides)
        if problems:  # reported with the start-up's own (which train() checks otherwise)
            startup_problems(cfg, problems).raise_if_any()
        train(cfg)
    except ConfigError as e:
        err(f"config error: {e}")
        return 2
    except (FileNotFoundError, CheckpointError, LockError, StorageError) as e:
        # a model, data or checkpoint that is not there or not usable; a folder in use or not writable
        err(f"error: {e}")
        return 2
    except NonFiniteError as e:
        err(f"error: non-finite training: {e}")
        return 3
    except Interrupted as e:
        where = f"checkpoint {e.checkpoint}" if e.checkpoint is not None else "no checkpoint"
        err(f"[signal] stopped after step {e.step} ({signal.Signals(e.signum).name}); saved {where}. Resume with:\n  "
            + _resume_command(argv, e.checkpoint))
        return e.exit_code
    except KeyboardInterrupt:
        err("[signal] interrupted before the first training step finished: nothing was saved")
        return 130
    return 0

