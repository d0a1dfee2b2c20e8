"""The loss head's options with their defaults and meaning (``LossHeadOptions``, ``DEFAULTS``), the option
names (strategies, estimators, backends), the default vocabulary rule, all defined once, and the
argument checks shared by the public entry points: cheap, before any heavy work, naming the argument.

Every signature that takes one of these options writes its default as ``DEFAULTS.<name>``.
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass, field, fields
from typing import Callable, Optional

import torch

# docs/math.md, Scores and selection.
STRATEGIES = (
    "teachability",
    "incompatible",
    "divergence",
    "entropy",
    "tip",
    "compat",
    "teachability_entropy",
    "random",
    "all",
)
# docs/math.md, Loss and gradients.
ESTIMATORS = ("full", "sampled")
BACKENDS = ("auto", "torch", "triton", "cuda")


def _option(default, doc: str):
    return field(default=default, metadata={"doc": doc})


@dataclass(frozen=True)
class LossHeadOptions:
    """The loss head's options: each default and its meaning, written here and only here (docs/math.md)."""

    top_k: int = _option(16, "K of both top-K sets behind teacher_mass C and disagreement D")
    keep_ratio: float = _option(0.05, "rho: the kept fraction of the valid positions, in (0, 1]")
    strategy: str = _option("teachability", f"the selection score, one of {STRATEGIES} "
                                            "(docs/math.md, Scores and selection)")
    estimator: str = _option("full", f"the loss estimator, one of {ESTIMATORS} (docs/math.md, Loss and "
                                     "gradients; 'sampled' needs the sampled tokens)")
    temperature: float = _option(1.0, "tau, dividing both models' logits")
    vocab_size: Optional[int] = _option(None, "vocabulary columns used; None: the smaller of the two "
                                              "vocabularies (default_vocab_size)")
    min_per_sequence: int = _option(1, "kept positions every sequence gets at least")
    seed: int = _option(0, "seed of strategy 'random'")
    backend: str = _option("auto", f"one of {BACKENDS}: 'auto' chooses (triton, cuda, torch on CUDA; torch "
                                   "elsewhere), a name means that backend or an error saying why it cannot run")
    chunk_rows: Optional[int] = _option(None, "rows per tile (torch: positions; triton: the backward's row "
                                              "chunk); None: the backend's own choice")
    chunk_vocab: Optional[int] = _option(None, "vocabulary columns per tile (triton: the forward's split and "
                                               "the backward's column chunk); None: the backend's own choice")
    check_finite: bool = _option(True, "reject NaN/inf hidden states and weights (one extra read of each)")
    ignore_index: int = _option(-100, "the label of positions without loss (TeachabilityKLLoss, labels)")
    reduction: str = _option("mean", "TeachabilityKLLoss: 'mean' (over kept positions), 'sum' or 'none'")

    @staticmethod
    def doc(name: str) -> str:
        """The documentation of option ``name``."""
        return next(f.metadata["doc"] for f in fields(LossHeadOptions) if f.name == name)


DEFAULTS = LossHeadOptions()


def with_option_docs(fn):
    """Decorator: append the documentation of the options ``fn`` takes (each one's default and meaning, from
    ``LossHeadOptions``) to its docstring, so that ``help(fn)`` shows them and the source holds them once."""
    import inspect

    taken = inspect.signature(fn).parameters
    lines = [f"    {f.name} (default {f.default!r}): {f.metadata['doc']}." for f in fields(LossHeadOptions)
             if f.name in taken]
    fn.__doc__ = inspect.cleandoc(fn.__doc__ or "") + "\n\nOptions (``LossHeadOptions``):\n" + "\n".join(lines)
    return fn


_WARNED_VOCABS: set = set()  # (V_s, V_t) pairs already warned about, once per process


def default_vocab_size(v_student: int, v_teacher: int) -> int:
    """The vocabulary the loss head uses when ``vocab_size`` is None: the columns both models have."""
    return min(int(v_student), int(v_teacher))


def warn_vocabularies_differ(v_student: int, v_teacher: int) -> None:
    """Once per (V_s, V_t) pair: the larger vocabulary is sliced to the smaller (docs/math.md, Setting)."""
    pair = (int(v_student), int(v_teacher))
    if pair[0] != pair[1] and pair not in _WARNED_VOCABS:
        _WARNED_VOCABS.add(pair)
        warnings.warn(f"the student's vocabulary has {pair[0]} entries and the teacher's {pair[1]}: only the first "
                      f"{min(pair)} are used (padding rows no tokenizer emits); pass vocab_size= to say so and "
                      "silence this, or check that the two models share a tokenizer", UserWarning, stacklevel=4)


FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_tensor(name: str, x, *, dims: Optional[int] = None, min_dims: Optional[int] = None, floating=True):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if dims is not None and x.dim() != dims:
        raise ValueError(f"{name} must have {dims} dimensions, got shape {tuple(x.shape)}")
    if min_dims is not None and x.dim() < min_dims:
        raise ValueError(f"{name} must have at least {min_dims} dimensions ([..., D]), got shape {tuple(x.shape)}")
    if floating and x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor (float32, bfloat16, float16 or float64), "
                        f"got dtype {x.dtype}")


class DeferredChecks:
    """Checks whose outcome is a flag on the device. The host reads every pending flag together with the
    counts it needs anyway, in one transfer (one host sync), and raises the first failed check's error."""

    def __init__(self):
        self._flags: list = []
        self._errors: list = []

    def add(self, bad: torch.Tensor, error: Callable[[], Exception]) -> None:
        self._flags.append(bad.reshape(()))
        self._errors.append(error)

    def read(self, *counts: torch.Tensor) -> list:
        """The integer values of ``counts`` (device scalars); raises if a pending check failed."""
        parts = [c.reshape(()).long() for c in counts] + [f.long() for f in self._flags]
        values = torch.stack(parts).tolist() if parts else []  # the one host read
        flags, errors = values[len(counts):], self._errors
        self._flags, self._errors = [], []
        for bad, error in zip(flags, errors):
            if bad:
                raise error()
        return values[:len(counts)]


def nonfinite_flag(x: torch.Tensor, *, allow_neg_inf: bool = False) -> torch.Tensor:
    if allow_neg_inf:
        return (torch.isnan(x) | (x == math.inf)).any()
    return ~torch.isfinite(x).all()


def check_finite(checks: DeferredChecks, name: str, x: torch.Tensor, *, allow_neg_inf: bool = False) -> None:
    what = "NaN or +inf" if allow_neg_inf else "NaN or inf"
    checks.add(nonfinite_flag(x, allow_neg_inf=allow_neg_inf), lambda: ValueError(f"{name} contains {what} values"))


def check_same_device(**tensors) -> torch.device:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    first = next(iter(devices.values()))
    on_meta = [name for name, dev in devices.items() if dev.type == "meta"]
    if on_meta:
        raise ValueError(f"{', '.join(on_meta)} {'is' if len(on_meta) == 1 else 'are'} on the meta device (shapes "
                         "without values): materialise the model's weights (e.g. load the checkpoint, "
                         "model.to_empty(device=...) then load) before calling the loss head")
    for name, dev in devices.items():
        if dev != first:
            listing = ", ".join(f"{n}: {d}" for n, d in devices.items())
            raise ValueError(f"all tensors must be on one device; got {listing}")
    return first


def as_int(name: str, value, *, low: Optional[int] = None, high: Optional[int] = None) -> int:
    """``value`` as a Python int: ints, numpy integers and 0-d integer tensors are accepted (bool is not)."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_floating_point() \
            and value.dtype != torch.bool and not value.is_complex():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        lo = "-inf" if low is None else low
        hi = "inf" if high is None else high
        raise ValueError(f"{name} must be an int in [{lo}, {hi}], got {value}")
    return value


def as_float(name: str, value, *, positive: bool = False, finite: bool = True) -> float:
    """``value`` as a Python float: ints, floats, numpy scalars and 0-d real tensors are accepted."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and value.dtype != torch.bool and not value.is_complex():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    if (finite and not math.isfinite(value)) or (positive and not value > 0):
        raise ValueError(f"{name} must be a {'finite ' if finite else ''}number{' > 0' if positive else ''}, "
                         f"got {value!r}")
    return value


# Seeds feed torch.Generator.manual_seed, which takes [-2**63, 2**64).
SEED_RANGE = (-(2 ** 63), 2 ** 64 - 1)
# 1/tau must stay a finite float32 (it scales float32 logits), and tau itself too.
MIN_TEMPERATURE = 1.0 / float(torch.finfo(torch.float32).max)
MAX_TEMPERATURE = float(torch.finfo(torch.float32).max)


@dataclass(frozen=True)
class SelectionOptions:
    strategy: Optional[str]  # None: statistics only, no selection
    keep_ratio: float
    min_per_sequence: int
    seed: int


def check_keep_ratio(keep_ratio) -> float:
    keep_ratio = as_float("keep_ratio", keep_ratio, finite=False)
    if not 0.0 < keep_ratio <= 1.0:  # NaN fails too
        raise ValueError(f"keep_ratio must be a number in (0, 1] (the kept fraction), got {keep_ratio!r}")
    return keep_ratio


def check_seed(seed) -> int:
    return as_int("seed", seed, low=SEED_RANGE[0], high=SEED_RANGE[1])


def check_selection_options(*, strategy, keep_ratio, min_per_sequence, seed, allow_none=False) -> SelectionOptions:
    if not (allow_none and strategy is None) and (not isinstance(strategy, str) or strategy not in STRATEGIES):
        raise ValueError(f"strategy must be one of {STRATEGIES}{' or None' if allow_none else ''}, got {strategy!r}")
    keep_ratio = check_keep_ratio(keep_ratio)
    min_per_sequence = as_int("min_per_sequence", min_per_sequence, low=0)
    return SelectionOptions(strategy, keep_ratio, min_per_sequence, check_seed(seed))


@dataclass(frozen=True)
class HeadOptions:
    top_k: int
    estimator: str
    temperature: float
    vocab_size: int
    backend: str
    chunk_rows: Optional[int]
    chunk_vocab: Optional[int]


def check_head_options(*, top_k, estimator, temperature, vocab_size, max_vocab, backend,
                       chunk_rows=None, chunk_vocab=None) -> HeadOptions:
    """The loss head's options; ``vocab_size`` None means ``max_vocab`` (``default_vocab_size``)."""
    vocab_size = max_vocab if vocab_size is None else as_int("vocab_size", vocab_size)
    if not 1 <= vocab_size <= max_vocab:
        raise ValueError(
            f"vocab_size must be in [1, {max_vocab}] (the smaller of the two vocabularies), got {vocab_size}")
    top_k = as_int("top_k", top_k)
    if not 1 <= top_k <= vocab_size:
        raise ValueError(f"top_k must be in [1, vocab_size={vocab_size}], got {top_k}")
    if not isinstance(estimator, str) or estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    temperature = as_float("temperature", temperature, positive=True)
    if not MIN_TEMPERATURE <= temperature <= MAX_TEMPERATURE:
        raise ValueError(f"temperature must be in [{MIN_TEMPERATURE:.3g}, {MAX_TEMPERATURE:.3g}] (its "
                         f"reciprocal must be a finite float32), got {temperature!r}")
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    chunks = [None if v is None else as_int(name, v, low=1)
              for name, v in (("chunk_rows", chunk_rows), ("chunk_vocab", chunk_vocab))]
    return HeadOptions(top_k, estimator, temperature, vocab_size, backend, *chunks)


def check_loss_module_options(*, strategy, keep_ratio, top_k, estimator, temperature, vocab_size, min_per_sequence,
                               ignore_index, reduction, seed, backend, chunk_rows, chunk_vocab, reductions) -> None:
    """All of ``TeachabilityKLLoss``'s options, at construction (the vocabulary bound waits for the weights)."""
    check_selection_options(strategy=strategy, keep_ratio=keep_ratio, min_per_sequence=min_per_sequence, seed=seed)
    if vocab_size is not None:
        as_int("vocab_size", vocab_size, low=1)
    check_head_options(top_k=top_k, estimator=estimator, temperature=temperature, vocab_size=vocab_size,
                       max_vocab=max(as_int("top_k", top_k, low=1), 1 if vocab_size is None else int(vocab_size)),
                       backend=backend, chunk_rows=chunk_rows, chunk_vocab=chunk_vocab)
    as_int("ignore_index", ignore_index)
    if reduction not in reductions:
        raise ValueError(f"reduction must be one of {reductions}, got {reduction!r}")


def check_position_tensor(name: str, x, leading: tuple, device, *, kind: str,
                          checks: Optional[DeferredChecks] = None):
    """A per-position tensor (mask, sequence ids, sampled ids) of the caller's leading shape. Value checks
    (a mask of 0/1 only) go to ``checks`` when given (read later with the call's one sync)."""
    if x is None:
        return None
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {tuple(leading)}, got {type(x).__name__}")
    if tuple(x.shape) != tuple(leading):
        raise ValueError(f"{name} must have shape {tuple(leading)} (the inputs' leading dims), "
                         f"got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but the inputs are on {device}")
    if kind == "mask":
        if x.dtype != torch.bool and (x.is_floating_point() or x.is_complex()):
            raise TypeError(f"{name} must be bool (or integer 0/1), got {x.dtype}")
        if x.dtype != torch.bool:
            bad = ((x != 0) & (x != 1)).any()
            error = lambda: ValueError(f"{name} must hold only 0 and 1")  # noqa: E731
            if checks is None:
                if bool(bad):
                    raise error()
            else:
                checks.add(bad, error)
        return x.bool()
    if x.is_floating_point() or x.dtype == torch.bool or x.is_complex():
        raise TypeError(f"{name} must be an integer tensor, got {x.dtype}")
    return x.long()


def check_sampled_ids(checks: DeferredChecks, sampled_ids: torch.Tensor, valid: torch.Tensor, vocab_size: int) -> None:
    out_of_range = valid & ((sampled_ids < 0) | (sampled_ids >= vocab_size))

    def error():
        bad = sampled_ids[out_of_range][0].item()
        return ValueError(f"sampled_ids must be in [0, vocab_size={vocab_size}) at valid positions; found {bad}")

    checks.add(out_of_range.any(), error)
