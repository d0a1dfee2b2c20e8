"""Argument checks shared by the public entry points: cheap, before any heavy work, naming the argument."""

from __future__ import annotations

import math
from typing import Optional

import torch

from .selection import STRATEGIES

ESTIMATORS = ("full", "sampled")
BACKENDS = ("auto", "torch", "triton", "cuda")


def check_tensor(name: str, x, *, dims: Optional[int] = None, min_dims: Optional[int] = None, floating=True):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if dims is not None and x.dim() != dims:
        raise ValueError(f"{name} must have {dims} dimensions, got shape {tuple(x.shape)}")
    if min_dims is not None and x.dim() < min_dims:
        raise ValueError(f"{name} must have at least {min_dims} dimensions ([..., D]), got shape {tuple(x.shape)}")
    if floating and not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")


def check_finite(name: str, x: torch.Tensor, *, allow_neg_inf: bool = False) -> None:
    if allow_neg_inf:
        bad = torch.isnan(x).any() | (x == math.inf).any()
        what = "NaN or +inf"
    else:
        bad = ~torch.isfinite(x).all()
        what = "NaN or inf"
    if bool(bad):
        raise ValueError(f"{name} contains {what} values")


def check_same_device(**tensors) -> torch.device:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    first = next(iter(devices.values()))
    for name, dev in devices.items():
        if dev != first:
            listing = ", ".join(f"{n}: {d}" for n, d in devices.items())
            raise ValueError(f"all tensors must be on one device; got {listing}")
    return first


def check_options(*, top_k, keep_ratio, strategy, estimator, temperature, vocab_size, max_vocab,
                  min_per_sequence, backend, chunk_rows=None, chunk_vocab=None, seed=0) -> int:
    """Validate scalar options; returns the effective vocab size."""
    if vocab_size is None:
        vocab_size = max_vocab
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise TypeError(f"vocab_size must be an int, got {type(vocab_size).__name__}")
    if not 1 <= vocab_size <= max_vocab:
        raise ValueError(
            f"vocab_size must be in [1, {max_vocab}] (the smaller of the two vocabularies), got {vocab_size}")
    if isinstance(top_k, bool) or not isinstance(top_k, int):
        raise TypeError(f"top_k must be an int, got {type(top_k).__name__}")
    if not 1 <= top_k <= vocab_size:
        raise ValueError(f"top_k must be in [1, vocab_size={vocab_size}], got {top_k}")
    if isinstance(keep_ratio, bool) or not isinstance(keep_ratio, (int, float)) or not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio must be a number in (0, 1], got {keep_ratio!r}")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if isinstance(min_per_sequence, bool) or not isinstance(min_per_sequence, int) or min_per_sequence < 0:
        raise ValueError(f"min_per_sequence must be an int >= 0, got {min_per_sequence!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    for name, value in (("chunk_rows", chunk_rows), ("chunk_vocab", chunk_vocab)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive int or None, got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    return vocab_size


def check_position_tensor(name: str, x, leading: tuple, device, *, kind: str):
    """A per-position tensor (mask, sequence ids, sampled ids) of the caller's leading shape."""
    if x is None:
        return None
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {leading}, got {type(x).__name__}")
    if tuple(x.shape) != tuple(leading):
        raise ValueError(f"{name} must have shape {tuple(leading)} (the hidden states' leading dims), "
                         f"got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but the hidden states are on {device}")
    if kind == "mask":
        if x.dtype != torch.bool and (x.is_floating_point() or x.is_complex()):
            raise TypeError(f"{name} must be bool (or integer 0/1), got {x.dtype}")
        if x.dtype != torch.bool and bool(((x != 0) & (x != 1)).any()):
            raise ValueError(f"{name} must hold only 0 and 1")
        return x.bool()
    if x.is_floating_point() or x.dtype == torch.bool or x.is_complex():
        raise TypeError(f"{name} must be an integer tensor, got {x.dtype}")
    return x.long()


def check_sampled_ids(sampled_ids: torch.Tensor, valid: torch.Tensor, vocab_size: int) -> None:
    ids = sampled_ids[valid]
    if ids.numel() and bool(((ids < 0) | (ids >= vocab_size)).any()):
        bad = ids[(ids < 0) | (ids >= vocab_size)][0].item()
        raise ValueError(f"sampled_ids must be in [0, vocab_size={vocab_size}) at valid positions; found {bad}")
