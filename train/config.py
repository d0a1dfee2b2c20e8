"""Typed configuration: dataclasses, YAML files, dotted ``key=value`` overrides, validation.

The dataclass defaults ARE the built-in default run (tiny Qwen3-architecture models on the synthetic
long-response task ``long_arithmetic``, CPU-friendly); ``configs/*.yaml`` override them. Unknown keys and bad values raise
``ConfigError`` naming the dotted key.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import math
import textwrap
import tokenize
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import yaml

from taopd_kernels import BACKENDS, DEFAULTS, ESTIMATORS, STRATEGIES, LossHeadOptions

from .task import BUILTIN_TASKS

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

# The one dtype table: config values are its keys, models.py and run.py look the dtypes up in it.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ConfigError(ValueError):
    """A bad configuration: the message names the dotted key. ``problems``: (dotted key, message) of each
    problem (one, or all that were found at once: ``Problems``)."""

    def __init__(self, message: str, problems: Optional[List[Tuple[str, str]]] = None):
        super().__init__(message)
        self.problems = problems or [("", message)]


class Problems:
    """Configuration problems collected, each (dotted key, message naming the key and what to do), so that
    a start reports every one it can find in one ``ConfigError`` rather than one per run."""

    def __init__(self):
        self.items: List[Tuple[str, str]] = []

    def add(self, key: str, message: str) -> None:
        self.items.append((key, message))

    def check(self, cond: bool, key: str, msg: str, value: Any) -> None:
        if not cond:
            self.add(key, f"{key}={value!r}: {msg}")

    def keys(self) -> set:
        return {k for k, _ in self.items}

    def __bool__(self) -> bool:
        return bool(self.items)

    def raise_if_any(self) -> None:
        if len(self.items) == 1:
            raise ConfigError(self.items[0][1], self.items)
        if self.items:
            listed = "\n".join(f"  - {m}" for _, m in self.items)
            raise ConfigError(f"{len(self.items)} problems, all to fix before the run can start:\n{listed}", self.items)


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
    source: str = "long_arithmetic"  # "long_arithmetic" / "arithmetic" / "lookup" (built in), a .jsonl/.parquet file, or an HF dataset name
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


def _coerce(value: Any, tp, key: str, problems: Problems):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key, problems)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {_type_name(tp)} fields, got {value!r}")
        return _build(tp, value, key, problems)
    if origin in (tuple, Tuple):
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} numbers, got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]", problems) for i, (v, a) in enumerate(zip(value, args)))
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


def _build(cls, data: Dict[str, Any], prefix: str = "", problems: Optional[Problems] = None):
    """``cls`` from a nested dict. Unknown keys and values of the wrong type are added to ``problems`` (the
    field keeps its default); without ``problems``, the first one raises ``ConfigError``."""
    found = Problems() if problems is None else problems
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in data:
        if k not in names:
            where = f"{prefix}.{k}" if prefix else k
            found.add(where, f"unknown config key {where!r}; valid keys here: {', '.join(sorted(names))}")
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
        try:
            kwargs[f.name] = _coerce(value, hints[f.name], key, found)
        except ConfigError as e:
            found.add(key, str(e))
    if problems is None:
        found.raise_if_any()
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
    bundled = [stem for stem, _ in bundled_configs()]
    raise ConfigError(f"config {name!r} is neither a file nor a bundled config (bundled: {', '.join(bundled)})")


def read_config(path: Optional[str] = None, overrides: Optional[List[str]] = None) -> Tuple[Config, Problems]:
    """The config and every problem found in it (unknown keys, wrong types: the default is kept; values out of
    range). A missing config file or a malformed override raises ``ConfigError`` at once."""
    data: Dict[str, Any] = {}
    if path:
        p = resolve_config_path(path)
        loaded = yaml.safe_load(p.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections")
        data = loaded
    if overrides:
        _deep_update(data, parse_overrides(overrides))
    problems = Problems()
    cfg = _build(Config, data, problems=problems)
    check_values(cfg, problems)
    return cfg, problems


def load_config(path: Optional[str] = None, overrides: Optional[List[str]] = None) -> Config:
    """``read_config``; its problems, all of them, in one ``ConfigError``."""
    cfg, problems = read_config(path, overrides)
    problems.raise_if_any()
    return cfg


def to_dict(cfg: Config) -> Dict[str, Any]:
    d = dataclasses.asdict(cfg)
    d["optim"]["betas"] = list(d["optim"]["betas"])
    return d


# ------------------------------------------------------------------ the settings, described (--help)


def bundled_configs() -> List[Tuple[str, str]]:
    """(name for ``--config``, the file's first comment line) of every YAML config in train/configs/; a
    line that ends mid-sentence ends in "..."."""
    out = []
    for path in sorted(CONFIG_DIR.glob("*.y*ml")):
        first = next((ln.lstrip("#").strip() for ln in path.read_text().splitlines() if ln.startswith("#")), "")
        out.append((path.stem, first if not first or first[-1] in ".:!?)" else first.rstrip(",;") + " ..."))
    return out


def field_docs(cls) -> Dict[str, str]:
    """The comment of each field of dataclass ``cls``, read from its source: the comment lines right above
    the field and the one on its line, joined (the source is the one place they are written)."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # no source (a frozen build): no comments to show
        return {}
    comments = {tok.start[0]: tok.string.lstrip("#").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    lines = source.splitlines()
    docs = {}
    for node in _ast_fields(source):
        above, row = [], node.lineno - 1
        while row >= 1 and row in comments and lines[row - 1].lstrip().startswith("#"):
            above.insert(0, comments[row])
            row -= 1
        own = [comments[r] for r in range(node.lineno, node.end_lineno + 1) if r in comments]
        text = " ".join(above + own).replace("``", "")
        if text:
            docs[node.target.id] = text
    return docs


def _ast_fields(class_source: str):
    """The annotated assignments (dataclass fields) of the one class in ``class_source``."""
    cls_node = ast.parse(class_source).body[0]
    return [n for n in cls_node.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)]


def _yaml_scalar(value: Any) -> str:
    value = list(value) if isinstance(value, tuple) else value
    return yaml.safe_dump(value, default_flow_style=True, width=10 ** 6).strip().removesuffix("...").strip()


def _settings_rows(obj, prefix: str, nested: bool = True) -> List[Tuple[str, str]]:
    """(``key = default``, meaning) of the leaf settings of the dataclass instance ``obj``, in field order
    (``nested=False``: only its own, not those of its sections)."""
    docs = field_docs(type(obj))
    rows = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            rows += _settings_rows(value, f"{prefix}{f.name}.") if nested else []
            continue
        doc = docs.get(f.name, "")
        if not doc and isinstance(obj, LossConfig):  # the loss head's options: the library documents them
            doc = LossHeadOptions.doc(f.name)
        rows.append((f"{prefix}{f.name} = {_yaml_scalar(value)}", doc))
    return rows


def describe_settings(width: int = 100) -> str:
    """Every setting as ``dotted.key = default`` with its meaning, grouped by section: generated from the
    dataclasses above, their comments and the built-in defaults (e.g. the teacher's own architecture)."""
    cfg = Config()
    sections = [(f.name, getattr(cfg, f.name)) for f in dataclasses.fields(cfg)
                if dataclasses.is_dataclass(getattr(cfg, f.name))]
    blocks = [(" ".join([f"{name}:", _doc_line(section)]).strip(), _settings_rows(section, f"{name}."))
              for name, section in sections]
    blocks.append(("top level:", _settings_rows(cfg, "", nested=False)))
    out = []
    for title, rows in blocks:
        out.append(textwrap.fill(title, width, subsequent_indent="    "))
        column = min(max(len(k) for k, _ in rows), width // 2 - 4) + 4
        for setting, doc in rows:
            if not doc:
                out.append(f"  {setting}")
                continue
            lead = f"  {setting}".ljust(column) if len(setting) + 4 <= column else f"  {setting}\n" + " " * column
            body = textwrap.wrap(doc, max(20, width - column))
            out.append(lead + body[0] + "".join("\n" + " " * column + more for more in body[1:]))
        out.append("")
    return "\n".join(out).rstrip()


def _doc_line(section) -> str:
    """A section's docstring on one line ("" for dataclass's generated one)."""
    doc = type(section).__doc__ or ""
    return "" if doc.startswith(type(section).__name__ + "(") else " ".join(doc.split()).replace("``", "")


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


def validate(cfg: Config) -> None:
    """Every value in range: all problems at once in one ``ConfigError``, each naming its dotted key."""
    problems = Problems()
    check_values(cfg, problems)
    problems.raise_if_any()


def check_values(cfg: Config, p: Problems) -> None:
    """Add every value out of range to ``p``."""
    _check_models(cfg, p)
    _check_data_and_rollout(cfg, p)
    _check_distributed(cfg, p)
    _check_loss(cfg, p)
    _check_optim(cfg, p)
    _check_eval_and_logging(cfg, p)
    _check_checkpoint_and_precision(cfg, p)
    _check_sft(cfg, p)
    p.check(cfg.device == "auto" or cfg.device == "cpu" or cfg.device.startswith("cuda"), "device",
            "must be auto, cpu, cuda or cuda:N", cfg.device)
    p.check(cfg.threads is None or cfg.threads >= 1, "threads", "must be >= 1 or null", cfg.threads)


def _check_models(cfg: Config, p: Problems) -> None:
    """Student and teacher: dtype, path, attention, the built-in architecture."""
    for role in ("student", "teacher"):
        m: ModelConfig = getattr(cfg, role)
        p.check(m.dtype in DTYPES, f"{role}.dtype", f"must be one of {tuple(DTYPES)}", m.dtype)
        p.check(bool(m.path), f"{role}.path", "must name a model directory, a hub id or 'builtin'", m.path)
        p.check(m.attn_implementation in ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention"),
                f"{role}.attn_implementation", "must be sdpa, eager, flash_attention_2/3 or flex_attention",
                m.attn_implementation)
        t = m.tiny
        for name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size"):
            p.check(getattr(t, name) > 0, f"{role}.tiny.{name}", "must be > 0", getattr(t, name))
        if t.num_heads > 0 and t.num_kv_heads > 0:  # (a zero is reported above)
            p.check(t.hidden_size % t.num_heads == 0, f"{role}.tiny.hidden_size", "must be divisible by num_heads",
                    t.hidden_size)
            p.check(t.num_heads % t.num_kv_heads == 0, f"{role}.tiny.num_kv_heads", "must divide num_heads",
                    t.num_kv_heads)
        p.check(not (m.random_init and m.path == "builtin" and not m.config_file), f"{role}.random_init",
                "needs a config_file (or a path holding config.json)", m.random_init)


def _check_data_and_rollout(cfg: Config, p: Problems) -> None:
    """The task's data and the rollouts."""
    d = cfg.data
    p.check(d.max_operand >= 1, "data.max_operand", "must be >= 1", d.max_operand)
    p.check(1 <= d.digits <= 12, "data.digits", "must be in [1, 12]", d.digits)
    p.check(1 <= d.chain <= 64, "data.chain", "must be in [1, 64]", d.chain)
    p.check(d.eval_size >= 1, "data.eval_size", "must be >= 1", d.eval_size)
    p.check(d.max_prompt_tokens >= 1, "data.max_prompt_tokens", "must be >= 1", d.max_prompt_tokens)
    r = cfg.rollout
    p.check(r.batch_size >= 1, "rollout.batch_size", "must be >= 1", r.batch_size)
    p.check(r.micro_batch_size >= 1, "rollout.micro_batch_size", "must be >= 1", r.micro_batch_size)
    p.check(r.max_new_tokens >= 1, "rollout.max_new_tokens", "must be >= 1", r.max_new_tokens)
    p.check(r.temperature > 0 and math.isfinite(r.temperature), "rollout.temperature", "must be > 0", r.temperature)
    p.check(0 < r.top_p <= 1, "rollout.top_p", "must be in (0, 1]", r.top_p)
    p.check(r.engine in ("hf", "vllm"), "rollout.engine", "must be hf or vllm", r.engine)
    p.check(0 < r.vllm_gpu_memory_utilization <= 1, "rollout.vllm_gpu_memory_utilization", "must be in (0, 1]",
            r.vllm_gpu_memory_utilization)


def _check_distributed(cfg: Config, p: Problems) -> None:
    """Settings used under torchrun."""
    dd = cfg.distributed
    p.check(dd.teacher in ("shard", "replicate"), "distributed.teacher", "must be shard or replicate", dd.teacher)
    p.check(dd.param_dtype is None or dd.param_dtype in DTYPES, "distributed.param_dtype",
            f"must be one of {tuple(DTYPES)} or null", dd.param_dtype)
    p.check(dd.reduce_dtype in DTYPES, "distributed.reduce_dtype", f"must be one of {tuple(DTYPES)}", dd.reduce_dtype)
    p.check(dd.backend in (None, "nccl", "gloo"), "distributed.backend", "must be nccl, gloo or null", dd.backend)


def _check_loss(cfg: Config, p: Problems) -> None:
    """The loss head: strategy, estimator, selection and kernel options."""
    lo = cfg.loss
    p.check(lo.strategy in STRATEGIES, "loss.strategy", f"must be one of {', '.join(STRATEGIES)}", lo.strategy)
    p.check(lo.estimator in ESTIMATORS, "loss.estimator", f"must be one of {', '.join(ESTIMATORS)}", lo.estimator)
    p.check(0 < lo.keep_ratio <= 1, "loss.keep_ratio", "must be in (0, 1]", lo.keep_ratio)
    p.check(lo.top_k >= 1, "loss.top_k", "must be >= 1", lo.top_k)
    p.check(lo.temperature > 0 and math.isfinite(lo.temperature), "loss.temperature", "must be > 0", lo.temperature)
    p.check(lo.vocab_size is None or lo.vocab_size >= lo.top_k, "loss.vocab_size", "must be >= loss.top_k",
            lo.vocab_size)
    p.check(lo.min_per_sequence >= 0, "loss.min_per_sequence", "must be >= 0", lo.min_per_sequence)
    p.check(lo.backend in BACKENDS, "loss.backend", f"must be one of {', '.join(BACKENDS)}", lo.backend)
    for name in ("chunk_rows", "chunk_vocab"):
        v = getattr(lo, name)
        p.check(v is None or v >= 1, f"loss.{name}", "must be >= 1 or null", v)


def _check_optim(cfg: Config, p: Problems) -> None:
    """AdamW, the schedule, clipping, the non-finite guard."""
    o = cfg.optim
    p.check(o.steps >= 0, "optim.steps", "must be >= 0", o.steps)
    p.check(math.isfinite(o.lr) and 0 < o.lr <= 10, "optim.lr", "must be a finite number in (0, 10]", o.lr)
    p.check(math.isfinite(o.weight_decay) and 0 <= o.weight_decay <= 1, "optim.weight_decay",
            "must be a finite number in [0, 1] (AdamW multiplies the weights by 1 - lr * weight_decay)",
            o.weight_decay)
    p.check(all(math.isfinite(b) and 0 <= b < 1 for b in o.betas), "optim.betas", "both must be in [0, 1)",
            list(o.betas))
    p.check(math.isfinite(o.eps) and 0 < o.eps <= 1, "optim.eps", "must be a finite number in (0, 1]", o.eps)
    p.check(o.max_nonfinite_steps >= 1, "optim.max_nonfinite_steps", "must be >= 1", o.max_nonfinite_steps)
    p.check(o.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0", o.warmup_steps)
    p.check(o.schedule in ("constant", "cosine", "linear"), "optim.schedule", "must be constant, cosine or linear",
            o.schedule)
    p.check(0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio", "must be in [0, 1]", o.min_lr_ratio)
    p.check(o.max_grad_norm is None or (o.max_grad_norm > 0 and math.isfinite(o.max_grad_norm)),
            "optim.max_grad_norm", "must be a finite number > 0 or null", o.max_grad_norm)


def _check_eval_and_logging(cfg: Config, p: Problems) -> None:
    """Evaluation and logging (wandb must be installed when asked for)."""
    e = cfg.eval
    p.check(e.every >= 0, "eval.every", "must be >= 0", e.every)
    p.check(e.batch_size >= 1, "eval.batch_size", "must be >= 1", e.batch_size)
    p.check(e.max_new_tokens >= 1, "eval.max_new_tokens", "must be >= 1", e.max_new_tokens)
    p.check(e.prompts in EVAL_PROMPTS, "eval.prompts", f"must be one of {', '.join(EVAL_PROMPTS)}", e.prompts)
    p.check(e.prompts == "heldout" or cfg.data.source in BUILTIN_TASKS, "eval.prompts",
            f"'validation' needs a built-in task ({', '.join(BUILTIN_TASKS)}), not data.source={cfg.data.source!r}",
            e.prompts)
    p.check(cfg.logging.every >= 1, "logging.every", "must be >= 1", cfg.logging.every)
    lg = cfg.logging
    p.check(lg.wandb_mode in (None, "online", "offline", "disabled"), "logging.wandb_mode",
            "must be online, offline, disabled or null", lg.wandb_mode)
    if lg.wandb:
        import importlib.util

        try:
            found = importlib.util.find_spec("wandb") is not None
        except ValueError:  # a module object without a spec (e.g. a test's stand-in): it is there
            found = True
        p.check(found, "logging.wandb", "needs the wandb package: `pip install wandb` (or logging.wandb=false); "
                "logging.wandb_mode=offline logs without a network", lg.wandb)


def _check_checkpoint_and_precision(cfg: Config, p: Problems) -> None:
    """Checkpoints, and a precision that agrees with student.dtype."""
    c = cfg.checkpoint
    p.check(c.every >= 0, "checkpoint.every", "must be >= 0", c.every)
    p.check(c.keep_last >= 0, "checkpoint.keep_last", "must be >= 0", c.keep_last)
    p.check(math.isfinite(c.every_minutes) and c.every_minutes >= 0, "checkpoint.every_minutes",
            "must be a finite number >= 0 (0: off)", c.every_minutes)
    p.check(cfg.precision is None or cfg.precision in PRECISIONS, "precision",
            f"must be one of {', '.join(PRECISIONS)} or null", cfg.precision)
    if cfg.precision in PRECISIONS:
        want = _PRECISION_DTYPES[cfg.precision][0]
        p.check(cfg.student.dtype in ("float32", want), "student.dtype",
                f"conflicts with precision={cfg.precision} (student parameters in {want}); drop student.dtype "
                "(precision decides the student's dtype) or choose the matching precision", cfg.student.dtype)


def _check_sft(cfg: Config, p: Problems) -> None:
    """Preparation of the built-in models."""
    s = cfg.sft
    for name in ("batch_size", "calib_batch_size"):
        p.check(getattr(s, name) >= 1, f"sft.{name}", "must be >= 1", getattr(s, name))
    for name in ("teacher_steps", "student_steps", "calib_steps"):
        p.check(getattr(s, name) >= 0, f"sft.{name}", "must be >= 0", getattr(s, name))
    p.check(s.lr > 0, "sft.lr", "must be > 0", s.lr)
    p.check(s.eval_every >= 1, "sft.eval_every", "must be >= 1", s.eval_every)
    p.check(0 <= s.teacher_noise < 1, "sft.teacher_noise", "must be in [0, 1)", s.teacher_noise)
    for name in ("teacher_target", "student_target"):
        p.check(0 < getattr(s, name) <= 1, f"sft.{name}", "must be in (0, 1]", getattr(s, name))
    p.check(s.calib_lr > 0, "sft.calib_lr", "must be > 0", s.calib_lr)


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
