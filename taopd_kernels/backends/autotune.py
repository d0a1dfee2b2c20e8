"""The measured choice of ``backend="auto"`` (``resolve`` asks it; nothing else does).

Measured choice (hidden-state path on CUDA, when the caller passes the call's ``ShapeClass`` and more
than one backend is usable): ``"auto"`` takes the fastest usable backend for the call's shape class
(rows and vocabulary in power-of-two buckets, D_s, D_t, dtypes, top_k), timed once per device and
class: each usable candidate runs one forward + kept backward (5% of the rows) on a synthetic input of
the class (at most ``MEASURE_ROWS`` x ``MEASURE_VOCAB``), once to warm up (compiling, autotuning: the
first contact takes minutes for triton) and ``MEASURE_REPEATS`` times between CUDA events; the
smallest time wins. Results live in memory and in ``$TAOPD_CACHE_DIR`` (default ``~/.cache/taopd``)
``/auto_backend.json``, keyed by GPU name + torch, triton and taopd-kernels versions, then the class;
the file is read with json only, written atomically (``os.replace``) under a ``filelock`` lock when
that package is installed. A cached choice is reused while it is still usable and no backend that was
not measured has become usable; a corrupt file is ignored with a warning and rewritten. The fixed order
is used instead when measuring is off (``TAOPD_AUTO_MEASURE=0``) or impossible (no shape class, not
CUDA, during CUDA-graph capture or torch.compile tracing, or the measurement failed: a warning, and
that class keeps the fixed order for the process). Each process measures on its own, so ranks can pick
different backends (they compute the same statistics); set ``TAOPD_BACKEND`` to pin one.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch


def _next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


@dataclass(frozen=True)
class ShapeClass:
    """What the measured ``"auto"`` choice depends on: rows and vocabulary as power-of-two buckets, the
    hidden sizes, the dtypes of (h_s, W_s, h_t, W_t) and top_k."""

    rows: int
    vocab: int
    d_s: int
    d_t: int
    dtypes: tuple
    top_k: int

    @classmethod
    def of(cls, h_s, w_s, h_t, w_t, *, vocab_size: int, top_k: int) -> "ShapeClass":
        name = lambda t: str(t.dtype).replace("torch.", "")  # noqa: E731
        return cls(_next_pow2(h_s.shape[0]), _next_pow2(vocab_size), int(h_s.shape[1]), int(h_t.shape[1]),
                   tuple(name(t) for t in (h_s, w_s, h_t, w_t)), int(top_k))

    def key(self) -> str:
        dtypes = self.dtypes[0] if len(set(self.dtypes)) == 1 else "+".join(self.dtypes)
        return f"rows={self.rows},vocab={self.vocab},d_s={self.d_s},d_t={self.d_t},dtype={dtypes},top_k={self.top_k}"


# Rows up to 8192 measure at the class's own row bucket, so triton's autotuning there (keyed by the row
# bucket, not the vocabulary) also serves the real calls.
MEASURE_ROWS = 8192
MEASURE_VOCAB = 32768
MEASURE_REPEATS = 2
_CACHE_FILE = "auto_backend.json"
_CACHE_VERSION = 1
_CHOICES: dict = {}  # (device key, class key) -> backend name, this process


def measuring_enabled() -> bool:
    return os.environ.get("TAOPD_AUTO_MEASURE", "1") != "0"


def cache_path() -> str:
    root = os.environ.get("TAOPD_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "taopd")
    return os.path.join(root, _CACHE_FILE)


def _version(dist: str) -> str:
    try:
        from importlib.metadata import PackageNotFoundError, version
        return version(dist)
    except (ImportError, PackageNotFoundError):
        return "none"


def _device_key(device) -> str:
    """GPU name and the versions whose kernels are timed: a new torch, triton or taopd-kernels measures again."""
    from .. import __version__
    return (f"{torch.cuda.get_device_name(torch.device(device))}|torch={torch.__version__}|"
            f"triton={_version('triton')}|taopd={__version__}")


def _synthetic_inputs(shape: ShapeClass, device) -> dict:
    """A random input of the class, at most MEASURE_ROWS x MEASURE_VOCAB (logits of std ~3)."""
    rows, vocab = min(shape.rows, MEASURE_ROWS), min(shape.vocab, MEASURE_VOCAB)
    g = torch.Generator(device=torch.device(device)).manual_seed(0)
    dt = [getattr(torch, name) for name in shape.dtypes]
    rand = lambda *size, dtype, scale=1.0: (torch.randn(*size, generator=g, device=device) * scale).to(dtype)  # noqa: E731
    return dict(h_s=rand(rows, shape.d_s, dtype=dt[0]), w_s=rand(vocab, shape.d_s, dtype=dt[1], scale=3 / shape.d_s ** 0.5),
                h_t=rand(rows, shape.d_t, dtype=dt[2]), w_t=rand(vocab, shape.d_t, dtype=dt[3], scale=3 / shape.d_t ** 0.5),
                vocab_size=vocab, top_k=shape.top_k, kept=max(1, rows // 20))


def _event_timer(step: Callable[[], None], device) -> float:
    """Milliseconds of ``step`` on the device: one warm-up call, then the best of MEASURE_REPEATS between
    CUDA events (this syncs the device, once per shape class and process)."""
    with torch.cuda.device(torch.device(device)):
        step()
        best = float("inf")
        for _ in range(MEASURE_REPEATS):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end))
        return best


def _time_backend(name: str, shape: ShapeClass, device, timer: Optional[Callable] = None) -> float:
    """Milliseconds of one forward + kept backward of backend ``name`` on a synthetic input of ``shape``."""
    from . import module

    mod = module(name)
    x = _synthetic_inputs(shape, device)
    h_s, w_s, h_t, w_t, vocab, kept = x["h_s"], x["w_s"], x["h_t"], x["w_t"], x["vocab_size"], x["kept"]
    coef = torch.full((kept,), 1.0 / kept, device=device)

    def step():
        mod.forward_stats(h_s, w_s, None, h_t, w_t, None, vocab_size=vocab, top_k=x["top_k"],
                                  temperature=1.0, sampled_ids=None, chunk_rows=None, chunk_vocab=None)
        mod.backward_kept(h_s[:kept], w_s, None, h_t[:kept], w_t, None, vocab_size=vocab, temperature=1.0,
                          estimator="full", row_coef=coef, sampled_ids=None, sampled_weight=None, need_bias_grad=False,
                          chunk_rows=None, chunk_vocab=None)

    with torch.no_grad():
        return (timer or _event_timer)(step, device)


def _read_cache(path: str) -> dict:
    """The cache file's entries ({device key: {class key: entry}}), {} when absent; a corrupt file warns."""
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        warnings.warn(f"ignoring the backend cache {path} ({exc}); it will be rewritten", RuntimeWarning)
        return {}
    entries = data.get("entries") if isinstance(data, dict) and data.get("version") == _CACHE_VERSION else None
    if not isinstance(entries, dict) or not all(isinstance(v, dict) for v in entries.values()):
        warnings.warn(f"ignoring the backend cache {path} (not a version-{_CACHE_VERSION} cache); it will be "
                      "rewritten", RuntimeWarning)
        return {}
    return entries


def _cached_entry(entries: dict, device_key: str, class_key: str, candidates: list) -> Optional[str]:
    entry = entries.get(device_key, {}).get(class_key)
    if not isinstance(entry, dict) or not isinstance(entry.get("ms"), dict):
        return None
    backend = entry.get("backend")
    # Still usable, and nothing usable now went unmeasured then.
    if backend in candidates and set(candidates) <= set(entry["ms"]):
        return backend
    return None


def _write_cache(path: str, device_key: str, class_key: str, entry: dict) -> None:
    """Merge one entry into the file: re-read under the lock (another process may have added some), write a
    temporary file beside it, os.replace it in (readers see the old or the new file, never half of one)."""
    try:
        from filelock import FileLock
        lock = FileLock(path + ".lock", timeout=60)
    except ImportError:
        import contextlib
        lock = contextlib.nullcontext()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with lock:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # already warned about when it was read
                entries = _read_cache(path)
            entries.setdefault(device_key, {})[class_key] = entry
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".auto_backend.", suffix=".tmp")
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump({"version": _CACHE_VERSION, "entries": entries}, f, indent=1, sort_keys=True)
                os.replace(tmp, path)
            except BaseException:
                os.unlink(tmp)
                raise
    except Exception as exc:  # a read-only home or a held lock: the choice still holds in memory
        warnings.warn(f"could not write the backend cache {path} ({exc})", RuntimeWarning)


def can_measure(device) -> bool:
    """Measuring enabled, a CUDA device, and not inside torch.compile tracing or a CUDA-graph capture
    (timing syncs the device, which neither allows)."""
    if not measuring_enabled() or torch.device(device).type != "cuda":
        return False
    compiling = getattr(getattr(torch, "compiler", None), "is_compiling", lambda: False)
    capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
    return not compiling() and not capturing


def measured_choice(candidates: list, device, shape: ShapeClass) -> Optional[str]:
    """The fastest of ``candidates`` (usable backend names, fixed order) for ``shape`` on ``device``, from the
    memory or file cache or a new measurement; None when it cannot be measured (then the fixed order)."""
    device_key = _device_key(device)
    key = (device_key, shape.key())
    if key in _CHOICES and _CHOICES[key] in candidates:
        return _CHOICES[key]
    path = cache_path()
    cached = _cached_entry(_read_cache(path), device_key, shape.key(), candidates)
    if cached is not None:
        _CHOICES[key] = cached
        return cached
    times = {}
    try:
        for name in candidates:
            times[name] = float(_time_backend(name, shape, device))
    except Exception as exc:  # out of memory, a kernel that fails to compile...: keep the fixed order
        warnings.warn(f'backend="auto": could not time {name} for {shape.key()} ({type(exc).__name__}: {exc}); '
                      f"using the fixed order ({candidates[0]}) for this shape class", RuntimeWarning)
        _CHOICES[key] = candidates[0]
        return None
    best = min(candidates, key=lambda n: times[n])  # ties: the earlier in the fixed order
    _CHOICES[key] = best
    _write_cache(path, device_key, shape.key(), {"backend": best, "ms": times})
    return best
