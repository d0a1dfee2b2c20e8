"""Typed configuration: dataclasses, YAML files, dotted ``key=value`` overrides, validation.

The dataclass defaults ARE the built-in default run (tiny Qwen3-architecture models on the synthetic
long-response task ``long_arithmetic``, CPU-friendly); ``configs/*.yaml`` override them. Unknown keys and bad values raise
``ConfigError`` naming the dotted key.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import yaml

from taopd_kernels import BACKENDS, DEFAULTS, ESTIMATORS, STRATEGIES

from .task import BUILTIN_TASKS

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

# The one dtype table: config values are its keys, models.py and run.py look the dtypes up in it.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ConfigError(ValueError):
    """A bad configuration: the message names the dotted key."""


@dataclass
class TinyArch:
    """Architecture of a built-in model (``path: builtin``): Qwen3 with the full Qwen3 vocabulary."""

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 256


@dataclass
class ModelConfig:
    """``path``: a local HF directory, a hub id, or ``builtin`` (a tiny model prepared by SFT, cached)."""

    path: str = "builtin"
    dtype: str = "float32"
    attn_implementation: str = "sdpa"
    random_init: bool = False  # build the architecture from ``config_file`` (or path/config.json), random weights
    config_file: Optional[str] = None  # e.g. configs/qwen3-1.7b.json; relative paths: to train/configs/
    tiny: TinyArch = field(default_factory=TinyArch)


def _default_teacher() -> ModelConfig:
    return ModelConfig(tiny=TinyArch(hidden_size=128, num_layers=3, num_heads=4, num_kv_heads=2, intermediate_size=512))


@dataclass
class DataConfig:
    source: str = "long_arithmetic"  # "long_arithmetic" / "arithmetic" (built in), a .jsonl/.parquet file, or an HF dataset name
    max_operand: int = 99  # arithmetic: operands in [0, max_operand]
    digits: int = 4  # long_arithmetic: digits of the start number (each partial result takes digits + 4 tokens)
    chain: int = 4  # long_arithmetic: additions written out (the response has chain + 1 totals)
    prompt_field: str = "prompt"
    answer_field: str = "answer"
    split: str = "train"
    eval_source: Optional[str] = None  # default: held-out rows of ``source``
    eval_split: Optional[str] = None
    eval_size: int = 512  # held-out prompts (up to 1,024 leave the prepared models as they are: task.split_sizes)
    chat_template: bool = False  # wrap prompts in the tokenizer's chat template (HF tokenizers)
    system_prompt: Optional[str] = None
    enable_thinking: bool = False  # Qwen3 chat template switch
    max_prompt_tokens: int = 512  # longer prompts are cut from the left


@dataclass
class RolloutConfig:
    batch_size: int = 32  # prompts per optimizer step (one selection over all of them)
    micro_batch_size: int = 32  # sequences per forward/backward (gradient accumulation over the rest)
    max_new_tokens: int = 40
    temperature: float = 1.0
    top_p: float = 1.0
    engine: str = "hf"  # hf (the student's own forward, KV cache) | vllm (optional, synced after each step)
    vllm_gpu_memory_utilization: float = 0.3  # the vLLM engine's share of each GPU


@dataclass
class DistributedConfig:
    """Used when started by torchrun (docs/distributed.md); a plain ``python train/run.py`` ignores it."""

    teacher: str = "shard"  # shard (FSDP2, no gradients) | replicate (a full copy per rank)
    param_dtype: Optional[str] = None  # compute dtype of FSDP's all-gathered weights; null: the models' dtype
    reduce_dtype: str = "float32"  # dtype of the student's gradient reduce-scatter
    backend: Optional[str] = None  # process-group backend; null: nccl on CUDA, gloo on CPU


@dataclass
class LossConfig:
    """The loss head's options: their defaults and meaning are the library's (``LossHeadOptions``), but
    for ``check_finite``."""

    strategy: str = DEFAULTS.strategy
    keep_ratio: float = DEFAULTS.keep_ratio
    top_k: int = DEFAULTS.top_k
    estimator: str = DEFAULTS.estimator
    temperature: float = DEFAULTS.temperature
    vocab_size: Optional[int] = DEFAULTS.vocab_size
    min_per_sequence: int = DEFAULTS.min_per_sequence
    backend: str = DEFAULTS.backend
    chunk_rows: Optional[int] = DEFAULTS.chunk_rows
    chunk_vocab: Optional[int] = DEFAULTS.chunk_vocab
    # off in the driver: the check is a full pass over both lm_heads at every step (the library's calls check)
    check_finite: bool = False


@dataclass
class OptimConfig:
    steps: int = 60
    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: Tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-8
    warmup_steps: int = 5
    schedule: str = "constant"  # constant | cosine | linear (after warmup)
    min_lr_ratio: float = 0.0  # cosine / linear floor, as a fraction of lr
    max_grad_norm: Optional[float] = 1.0  # null: no clipping
    freeze_embeddings: bool = True  # train only the transformer blocks (the tied embedding / lm_head stays fixed)
    max_nonfinite_steps: int = 3  # a non-finite loss / gradient norm skips the step; this many in a row stop the run


@dataclass
class EvalConfig:
    every: int = 20  # steps; 0: only before and after training
    batch_size: int = 256
    max_new_tokens: int = 40
    at_start: bool = True
    # which prompts the student is scored on: "heldout" (the reported figures) or "validation" (the built-in
    # tasks' preparation prompts, never trained on: what an lr sweep may choose on without seeing heldout)
    prompts: str = "heldout"


@dataclass
class LoggingConfig:
    out_dir: str = "runs/default"
    every: int = 1
    tensorboard: bool = True
    progress_bar: bool = True
    plot: bool = True
    wandb: bool = False  # Weights & Biases (needs `pip install wandb`); the run resumes with its checkpoint
    wandb_project: str = "taopd"
    wandb_run_name: Optional[str] = None  # default: the output folder's name
    wandb_mode: Optional[str] = None  # online | offline (no network needed) | disabled; null: WANDB_MODE or wandb's default


@dataclass
class CheckpointConfig:
    every: int = 0  # steps; 0: only at the end
    dir: Optional[str] = None  # default: <logging.out_dir>/checkpoints
    resume: Optional[str] = None  # a checkpoint directory, or "latest" (newest under ``dir``)
    save_optimizer: bool = True
    keep_last: int = 2  # 0: keep all
    every_minutes: float = 30.0  # also save when this many minutes passed since the last save; 0: off
    allow_changes: bool = False  # resume even if run-defining settings (models, data, loss, seed, batch) changed
    verify: bool = True  # resume only checkpoints whose manifest.json (sha256 of every file) matches


@dataclass
class SFTConfig:
    """Preparation of built-in models: SFT of teacher and student on the task, cached on disk."""

    cache_dir: str = "~/.cache/taopd"
    batch_size: int = 64
    lr: float = 3e-3
    teacher_steps: int = 3000  # at most; stops early at teacher_target accuracy
    student_steps: int = 1000  # at most; stops early at student_target accuracy (a weaker start for OPD)
    teacher_target: float = 0.95
    student_target: float = 0.30
    eval_every: int = 25  # compact-model accuracy checks for the early stop
    # long_arithmetic: this fraction of the teacher's SFT examples has one wrong digit in a partial result
    # (not trained on; later totals continue from it), so the teacher continues correctly from a mistake
    teacher_noise: float = 0.5
    calib_steps: int = 0  # optional full-vocabulary CE steps after the expansion
    calib_lr: float = 1e-4
    calib_batch_size: int = 32
    seed: Optional[int] = None  # seed of the preparation; null: the run's ``seed`` (compare.py pins it across run seeds)
    shipped: bool = True  # use the compact weights in train/prepared/ that match this preparation (false: SFT here)


@dataclass
class Config:
    student: ModelConfig = field(default_factory=ModelConfig)
    teacher: ModelConfig = field(default_factory=_default_teacher)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: Optional[int] = None  # torch.set_num_threads on CPU
    # The student's precision: fp32 | bf16-mixed (fp32 master weights and AdamW state, bf16 compute:
    # autocast in one process, FSDP2 param_dtype=bf16 under torchrun) | bf16-pure (bf16 weights and
    # optimizer state: updates below bf16 resolution are lost; warned). null: as student.dtype says.
    precision: Optional[str] = None


# ------------------------------------------------------------------ building from dicts


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp, key: str):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {_type_name(tp)} fields, got {value!r}")
        return _build(tp, value, key)
    if origin in (tuple, Tuple):
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} numbers, got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    return value


def _build(cls, data: Dict[str, Any], prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in data:
        if k not in names:
            where = f"{prefix}.{k}" if prefix else k
            raise ConfigError(f"unknown config key {where!r}; valid keys here: {', '.join(sorted(names))}")
    base = cls()
    kwargs = {}
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        if f.name not in data:
            continue
        value = data[f.name]
        if dataclasses.is_dataclass(hints[f.name]) and isinstance(value, dict):
            # merge onto the default sub-config (so teacher keeps its own defaults)
            merged = dataclasses.asdict(getattr(base, f.name))
            _deep_update(merged, value)
            value = merged
        kwargs[f.name] = _coerce(value, hints[f.name], key)
    return dataclasses.replace(base, **kwargs)


def _deep_update(dst: dict, src: dict) -> dict:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _deep_update(dst[k], v)
        else:
            dst[k] = v
    return dst


def parse_overrides(overrides: List[str]) -> Dict[str, Any]:
    """``["loss.strategy=entropy", "optim.betas=[0.9,0.95]"]`` -> nested dict (values parsed as YAML)."""
    out: Dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like dotted.key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not p for p in key.split(".")):
            raise ConfigError(f"override {item!r}: bad key {key!r}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p!r} is set both as a value and as a section")
        node[parts[-1]] = value
    return out


def resolve_config_path(name: str) -> Path:
    """A path, or the name of a bundled config (``qwen3`` or ``qwen3.yaml`` in train/configs/)."""
    p = Path(name).expanduser()
    if p.is_file():
        return p
    for cand in (CONFIG_DIR / name, CONFIG_DIR / f"{name}.yaml", CONFIG_DIR / f"{name}.yml"):
        if cand.is_file():
            return cand
    bundled = sorted(x.stem for x in CONFIG_DIR.glob("*.yaml"))
    raise ConfigError(f"config {name!r} is neither a file nor a bundled config (bundled: {', '.join(bundled)})")


def load_config(path: Optional[str] = None, overrides: Optional[List[str]] = None) -> Config:
    data: Dict[str, Any] = {}
    if path:
        p = resolve_config_path(path)
        loaded = yaml.safe_load(p.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections")
        data = loaded
    if overrides:
        _deep_update(data, parse_overrides(overrides))
    cfg = _build(Config, data)
    validate(cfg)
    return cfg


def to_dict(cfg: Config) -> Dict[str, Any]:
    d = dataclasses.asdict(cfg)
    d["optim"]["betas"] = list(d["optim"]["betas"])
    return d


# ------------------------------------------------------------------ precision

PRECISIONS = ("fp32", "bf16-mixed", "bf16-pure")
# precision -> (dtype of the student's parameters and optimizer state, compute dtype)
_PRECISION_DTYPES = {"fp32": ("float32", "float32"), "bf16-mixed": ("float32", "bfloat16"),
                     "bf16-pure": ("bfloat16", "bfloat16")}


def student_precision(cfg: "Config") -> str:
    """The effective precision: ``cfg.precision``, or from ``student.dtype`` when that is null
    (float32 -> fp32, bfloat16 -> bf16-pure, float16 -> fp16-pure)."""
    if cfg.precision is not None:
        return cfg.precision
    return {"float32": "fp32", "bfloat16": "bf16-pure", "float16": "fp16-pure"}[cfg.student.dtype]


def student_dtypes(cfg: "Config") -> Tuple[str, str]:
    """(parameter dtype, compute dtype) of the student, as ``DTYPES`` keys."""
    p = student_precision(cfg)
    if p == "fp16-pure":
        return "float16", "float16"
    return _PRECISION_DTYPES[p]


# ------------------------------------------------------------------ value checks


EVAL_PROMPTS = ("heldout", "validation")


def _check(cond: bool, key: str, msg: str, value: Any):
    if not cond:
        raise ConfigError(f"{key}={value!r}: {msg}")


def validate(cfg: Config) -> None:
    """Every value in range, each error naming its dotted key (``ConfigError``)."""
    _check_models(cfg)
    _check_data_and_rollout(cfg)
    _check_distributed(cfg)
    _check_loss(cfg)
    _check_optim(cfg)
    _check_eval_and_logging(cfg)
    _check_checkpoint_and_precision(cfg)
    _check_sft(cfg)
    _check(cfg.device == "auto" or cfg.device == "cpu" or cfg.device.startswith("cuda"), "device",
           "must be auto, cpu, cuda or cuda:N", cfg.device)
    _check(cfg.threads is None or cfg.threads >= 1, "threads", "must be >= 1 or null", cfg.threads)


def _check_models(cfg: Config) -> None:
    """Student and teacher: dtype, path, attention, the built-in architecture."""
    for role in ("student", "teacher"):
        m: ModelConfig = getattr(cfg, role)
        _check(m.dtype in DTYPES, f"{role}.dtype", f"must be one of {tuple(DTYPES)}", m.dtype)
        _check(bool(m.path), f"{role}.path", "must name a model directory, a hub id or 'builtin'", m.path)
        _check(m.attn_implementation in ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention"),
               f"{role}.attn_implementation", "must be sdpa, eager, flash_attention_2/3 or flex_attention",
               m.attn_implementation)
        t = m.tiny
        for name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size"):
            _check(getattr(t, name) > 0, f"{role}.tiny.{name}", "must be > 0", getattr(t, name))
        _check(t.hidden_size % t.num_heads == 0, f"{role}.tiny.hidden_size", "must be divisible by num_heads",
               t.hidden_size)
        _check(t.num_heads % t.num_kv_heads == 0, f"{role}.tiny.num_kv_heads", "must divide num_heads",
               t.num_kv_heads)
        _check(not (m.random_init and m.path == "builtin" and not m.config_file), f"{role}.random_init",
               "needs a config_file (or a path holding config.json)", m.random_init)


def _check_data_and_rollout(cfg: Config) -> None:
    """The task's data and the rollouts."""
    d = cfg.data
    _check(d.max_operand >= 1, "data.max_operand", "must be >= 1", d.max_operand)
    _check(1 <= d.digits <= 12, "data.digits", "must be in [1, 12]", d.digits)
    _check(1 <= d.chain <= 64, "data.chain", "must be in [1, 64]", d.chain)
    _check(d.eval_size >= 1, "data.eval_size", "must be >= 1", d.eval_size)
    _check(d.max_prompt_tokens >= 1, "data.max_prompt_tokens", "must be >= 1", d.max_prompt_tokens)
    r = cfg.rollout
    _check(r.batch_size >= 1, "rollout.batch_size", "must be >= 1", r.batch_size)
    _check(r.micro_batch_size >= 1, "rollout.micro_batch_size", "must be >= 1", r.micro_batch_size)
    _check(r.max_new_tokens >= 1, "rollout.max_new_tokens", "must be >= 1", r.max_new_tokens)
    _check(r.temperature > 0 and math.isfinite(r.temperature), "rollout.temperature", "must be > 0", r.temperature)
    _check(0 < r.top_p <= 1, "rollout.top_p", "must be in (0, 1]", r.top_p)
    _check(r.engine in ("hf", "vllm"), "rollout.engine", "must be hf or vllm", r.engine)
    _check(0 < r.vllm_gpu_memory_utilization <= 1, "rollout.vllm_gpu_memory_utilization", "must be in (0, 1]",
           r.vllm_gpu_memory_utilization)


def _check_distributed(cfg: Config) -> None:
    """Settings used under torchrun."""
    dd = cfg.distributed
    _check(dd.teacher in ("shard", "replicate"), "distributed.teacher", "must be shard or replicate", dd.teacher)
    _check(dd.param_dtype is None or dd.param_dtype in DTYPES, "distributed.param_dtype",
           f"must be one of {tuple(DTYPES)} or null", dd.param_dtype)
    _check(dd.reduce_dtype in DTYPES, "distributed.reduce_dtype", f"must be one of {tuple(DTYPES)}", dd.reduce_dtype)
    _check(dd.backend in (None, "nccl", "gloo"), "distributed.backend", "must be nccl, gloo or null", dd.backend)


def _check_loss(cfg: Config) -> None:
    """The loss head: strategy, estimator, selection and kernel options."""
    lo = cfg.loss
    _check(lo.strategy in STRATEGIES, "loss.strategy", f"must be one of {', '.join(STRATEGIES)}", lo.strategy)
    _check(lo.estimator in ESTIMATORS, "loss.estimator", f"must be one of {', '.join(ESTIMATORS)}", lo.estimator)
    _check(0 < lo.keep_ratio <= 1, "loss.keep_ratio", "must be in (0, 1]", lo.keep_ratio)
    _check(lo.top_k >= 1, "loss.top_k", "must be >= 1", lo.top_k)
    _check(lo.temperature > 0 and math.isfinite(lo.temperature), "loss.temperature", "must be > 0", lo.temperature)
    _check(lo.vocab_size is None or lo.vocab_size >= lo.top_k, "loss.vocab_size", "must be >= loss.top_k",
           lo.vocab_size)
    _check(lo.min_per_sequence >= 0, "loss.min_per_sequence", "must be >= 0", lo.min_per_sequence)
    _check(lo.backend in BACKENDS, "loss.backend", f"must be one of {', '.join(BACKENDS)}", lo.backend)
    for name in ("chunk_rows", "chunk_vocab"):
        v = getattr(lo, name)
        _check(v is None or v >= 1, f"loss.{name}", "must be >= 1 or null", v)


def _check_optim(cfg: Config) -> None:
    """AdamW, the schedule, clipping, the non-finite guard."""
    o = cfg.optim
    _check(o.steps >= 0, "optim.steps", "must be >= 0", o.steps)
    _check(math.isfinite(o.lr) and 0 < o.lr <= 10, "optim.lr", "must be a finite number in (0, 10]", o.lr)
    _check(math.isfinite(o.weight_decay) and 0 <= o.weight_decay <= 1, "optim.weight_decay",
           "must be a finite number in [0, 1] (AdamW multiplies the weights by 1 - lr * weight_decay)",
           o.weight_decay)
    _check(all(math.isfinite(b) and 0 <= b < 1 for b in o.betas), "optim.betas", "both must be in [0, 1)",
           list(o.betas))
    _check(math.isfinite(o.eps) and 0 < o.eps <= 1, "optim.eps", "must be a finite number in (0, 1]", o.eps)
    _check(o.max_nonfinite_steps >= 1, "optim.max_nonfinite_steps", "must be >= 1", o.max_nonfinite_steps)
    _check(o.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0", o.warmup_steps)
    _check(o.schedule in ("constant", "cosine", "linear"), "optim.schedule", "must be constant, cosine or linear",
           o.schedule)
    _check(0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio", "must be in [0, 1]", o.min_lr_ratio)
    _check(o.max_grad_norm is None or (o.max_grad_norm > 0 and math.isfinite(o.max_grad_norm)),
           "optim.max_grad_norm", "must be a finite number > 0 or null", o.max_grad_norm)


def _check_eval_and_logging(cfg: Config) -> None:
    """Evaluation and logging (wandb must be installed when asked for)."""
    e = cfg.eval
    _check(e.every >= 0, "eval.every", "must be >= 0", e.every)
    _check(e.batch_size >= 1, "eval.batch_size", "must be >= 1", e.batch_size)
    _check(e.max_new_tokens >= 1, "eval.max_new_tokens", "must be >= 1", e.max_new_tokens)
    _check(e.prompts in EVAL_PROMPTS, "eval.prompts", f"must be one of {', '.join(EVAL_PROMPTS)}", e.prompts)
    _check(e.prompts == "heldout" or cfg.data.source in BUILTIN_TASKS, "eval.prompts",
           f"'validation' needs a built-in task ({', '.join(BUILTIN_TASKS)}), not data.source={cfg.data.source!r}",
           e.prompts)
    _check(cfg.logging.every >= 1, "logging.every", "must be >= 1", cfg.logging.every)
    lg = cfg.logging
    _check(lg.wandb_mode in (None, "online", "offline", "disabled"), "logging.wandb_mode",
           "must be online, offline, disabled or null", lg.wandb_mode)
    if lg.wandb:
        import importlib.util

        try:
            found = importlib.util.find_spec("wandb") is not None
        except ValueError:  # a module object without a spec (e.g. a test's stand-in): it is there
            found = True
        _check(found, "logging.wandb", "needs the wandb package: `pip install wandb` (or logging.wandb=false); "
               "logging.wandb_mode=offline logs without a network", lg.wandb)


def _check_checkpoint_and_precision(cfg: Config) -> None:
    """Checkpoints, and a precision that agrees with student.dtype."""
    c = cfg.checkpoint
    _check(c.every >= 0, "checkpoint.every", "must be >= 0", c.every)
    _check(c.keep_last >= 0, "checkpoint.keep_last", "must be >= 0", c.keep_last)
    _check(math.isfinite(c.every_minutes) and c.every_minutes >= 0, "checkpoint.every_minutes",
           "must be a finite number >= 0 (0: off)", c.every_minutes)
    _check(cfg.precision is None or cfg.precision in PRECISIONS, "precision",
           f"must be one of {', '.join(PRECISIONS)} or null", cfg.precision)
    if cfg.precision is not None:
        want = _PRECISION_DTYPES[cfg.precision][0]
        _check(cfg.student.dtype in ("float32", want), "student.dtype",
               f"conflicts with precision={cfg.precision} (student parameters in {want}); drop student.dtype "
               "(precision decides the student's dtype) or choose the matching precision", cfg.student.dtype)


def _check_sft(cfg: Config) -> None:
    """Preparation of the built-in models."""
    s = cfg.sft
    for name in ("batch_size", "calib_batch_size"):
        _check(getattr(s, name) >= 1, f"sft.{name}", "must be >= 1", getattr(s, name))
    for name in ("teacher_steps", "student_steps", "calib_steps"):
        _check(getattr(s, name) >= 0, f"sft.{name}", "must be >= 0", getattr(s, name))
    _check(s.lr > 0, "sft.lr", "must be > 0", s.lr)
    _check(s.eval_every >= 1, "sft.eval_every", "must be >= 1", s.eval_every)
    _check(0 <= s.teacher_noise < 1, "sft.teacher_noise", "must be in [0, 1)", s.teacher_noise)
    for name in ("teacher_target", "student_target"):
        _check(0 < getattr(s, name) <= 1, f"sft.{name}", "must be in (0, 1]", getattr(s, name))
    _check(s.calib_lr > 0, "sft.calib_lr", "must be > 0", s.calib_lr)


# ------------------------------------------------------------------ resuming with a changed config

# Settings a resumed run may change: they take effect from the resumed step and are logged.
# Everything else defines the run (models, tokenizer, task/data, seed, strategy, estimator, K,
# vocabulary, batch sizes, sampling, precision) and is refused unless checkpoint.allow_changes=true.
RESUME_ALLOWED = (
    "optim.steps", "optim.lr", "optim.warmup_steps", "optim.schedule", "optim.min_lr_ratio", "optim.max_grad_norm",
    "optim.betas", "optim.eps", "optim.weight_decay", "optim.max_nonfinite_steps",
    "logging.", "eval.", "checkpoint.", "device", "threads", "distributed.",
    "loss.backend", "loss.chunk_rows", "loss.chunk_vocab", "loss.check_finite",
    "rollout.engine", "rollout.vllm_gpu_memory_utilization",
    "student.attn_implementation", "teacher.attn_implementation",
)
# With allow_changes, these are kept from the checkpoint: its weights are the student's.
RESUME_FROM_CHECKPOINT = ("student.path", "student.random_init", "student.config_file", "student.tiny.")


def _flatten(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = list(v) if isinstance(v, tuple) else v
    return out


def _matches(key: str, patterns) -> bool:
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in patterns)


def config_changes(saved: Dict[str, Any], cfg: Config) -> List[Tuple[str, Any, Any, str]]:
    """(key, saved value, new value, kind) for every setting that differs from a checkpoint's config;
    kind: "allowed" (takes effect), "defining" (refused unless allow_changes) or "checkpoint" (a
    defining student setting: with allow_changes the checkpoint's value is kept). Keys that only one
    side knows (other versions of the driver) are reported as kind "unknown"."""
    old, new = _flatten(saved), _flatten(to_dict(cfg))
    out = []
    for key in sorted(set(old) | set(new)):
        if key == "checkpoint.resume":
            continue
        if key not in old or key not in new:
            out.append((key, old.get(key, "<absent>"), new.get(key, "<absent>"), "unknown"))
            continue
        if old[key] == new[key]:
            continue
        kind = ("allowed" if _matches(key, RESUME_ALLOWED) else
                "checkpoint" if _matches(key, RESUME_FROM_CHECKPOINT) else "defining")
        out.append((key, old[key], new[key], kind))
    return out


def cli_exit_code(body) -> int:
    """Run a command-line entry point's body: 0, or 2 after a one-line message when the configuration is
    bad (``ConfigError``, naming the key) or a model or data path is missing (the message says what to do)."""
    import sys

    try:
        body()
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
