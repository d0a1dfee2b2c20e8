#!/usr/bin/env python3
"""Measure the TA-OPD loss head over vocabulary sizes: time, peak extra memory, TFLOP/s, ratio to gemm.

    python bench/vocab_sweep.py                       # defaults for this machine (CPU or GPU)
    python bench/vocab_sweep.py --vocab 32000,151936 --impls naive,torch,gemm --repeats 5
    python bench/vocab_sweep.py --smoke               # any command, at tiny shapes on the CPU (a smoke test)

Writes <out>/<name>.json, .csv, .md (the table) and .png (time and peak memory against V), and prints
the table. See bench/README.md for what each column means and how memory is measured.

Exit status: 0 when every implementation that ran agreed with taopd_kernels.reference, 3 when one did
not (the results are still written), 2 for bad options.
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import datetime as _dt
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

from _meta import add_smoke_option, metadata, smoke_dir

HERE = Path(__file__).resolve().parent

QWEN_VOCABS = (32000, 65536, 128256, 151936, 152064, 262144)
CPU_DEFAULTS = dict(tokens=256, d_student=128, d_teacher=256, dtype="float32", repeats=3, warmup=1)
GPU_DEFAULTS = dict(tokens=8192, d_student=2048, d_teacher=4096, dtype="bfloat16", repeats=10, warmup=3)
# --smoke: what replaces the command's own sizes (its other options stay as given).
SMOKE = dict(device="cpu", vocab=[1000], tokens=64, d_student=32, d_teacher=48, repeats=1, warmup=0,
             no_progress=True)
DTYPES = ("float32", "bfloat16", "float16")
RESULT_TAG = "VOCAB_SWEEP_RESULT "
ROW_KEYS = ("impl", "vocab", "tokens", "d_student", "d_teacher", "dtype", "top_k", "keep_ratio", "fwd_ms",
            "fwd_bwd_ms", "peak_extra_mb", "peak_extra_fwd_mb", "fwd_tflops", "fwd_bwd_tflops",
            "fwd_ratio_gemm", "fwd_bwd_ratio_gemm", "kept", "repeats", "fwd_ms_min", "fwd_bwd_ms_min",
            "fwd_cpu_ms", "fwd_bwd_cpu_ms",
            "agree", "error")


# ----------------------------------------------------------------------------------------- options
def _positive_int(text: str) -> int:
    try:
        value = int(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _vocab_list(text: str) -> list[int]:
    items = [t for t in text.replace(" ", "").split(",") if t]
    if not items:
        raise argparse.ArgumentTypeError("give at least one vocabulary size, e.g. --vocab 32000,151936")
    return [_positive_int(t) for t in items]


def _impl_list(text: str) -> list[str]:
    from _sweep_impls import IMPLS

    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"give at least one of {','.join(IMPLS)}")
    unknown = [t for t in items if t not in IMPLS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown implementation(s) {', '.join(map(repr, unknown))}; choose from {','.join(IMPLS)}")
    return list(dict.fromkeys(items))


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (0.0 < value <= 1.0):
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from _sweep_impls import IMPLS

    p = argparse.ArgumentParser(
        prog="vocab_sweep.py",
        description="Time and peak extra memory of the TA-OPD loss head against the vocabulary size.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--vocab", type=_vocab_list, default=list(QWEN_VOCABS),
                   help="comma-separated vocabulary sizes")
    p.add_argument("--tokens", "-N", type=_positive_int, default=None,
                   help=f"positions N (default: {CPU_DEFAULTS['tokens']} on CPU, {GPU_DEFAULTS['tokens']} on GPU)")
    p.add_argument("--d-student", type=_positive_int, default=None,
                   help=f"student hidden size (default {CPU_DEFAULTS['d_student']} CPU / {GPU_DEFAULTS['d_student']} GPU)")
    p.add_argument("--d-teacher", type=_positive_int, default=None,
                   help=f"teacher hidden size (default {CPU_DEFAULTS['d_teacher']} CPU / {GPU_DEFAULTS['d_teacher']} GPU)")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="input dtype (default float32 CPU / bfloat16 GPU)")
    p.add_argument("--top-k", type=_positive_int, default=16, help="K of the top-K sets")
    p.add_argument("--keep-ratio", type=_ratio, default=0.05, help="rho, the kept fraction of positions")
    p.add_argument("--impls", type=_impl_list, default=list(IMPLS),
                   help="comma-separated implementations (unavailable ones are skipped with a reason)")
    p.add_argument("--repeats", type=_positive_int, default=None,
                   help=f"timed repeats per measurement; the median is reported (default {CPU_DEFAULTS['repeats']} CPU / {GPU_DEFAULTS['repeats']} GPU)")
    p.add_argument("--warmup", type=_non_negative_int, default=None,
                   help=f"untimed warm-up calls (default {CPU_DEFAULTS['warmup']} CPU / {GPU_DEFAULTS['warmup']} GPU)")
    p.add_argument("--out", type=Path, default=HERE / "results", help="output folder")
    p.add_argument("--name", default=None,
                   help="file stem of the outputs (default vocab_sweep-<cpu|gpu>-<date-time>)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--isolate", choices=("auto", "process", "none"), default="auto",
                   help="run each (implementation, V) in a fresh process; auto: on CPU (where peak memory "
                        "comes from the process's RSS), not on GPU (the allocator's peak is exact)")
    p.add_argument("--liger-compiled", choices=("auto", "on", "off"), default="auto",
                   help="Liger's torch.compile of its chunk step (auto: on for GPU, off for CPU)")
    p.add_argument("--chunk-rows", type=_positive_int, default=None, help="chunk_rows for the torch backend")
    p.add_argument("--chunk-vocab", type=_positive_int, default=None, help="chunk_vocab for the torch backend")
    p.add_argument("--no-check", action="store_true", help="skip the agreement check against the reference")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="torch CPU threads (default: torch's own choice)")
    p.add_argument("--replot", type=Path, default=None, metavar="JSON",
                   help="only redraw the PNG and the table (.md) of an earlier run's JSON, next to it")
    add_smoke_option(p)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.worker is not None:
        return args
    if args.replot is not None:
        if not args.replot.is_file():
            parser.error(f"--replot: no such file {str(args.replot)!r}")
        return args
    if args.smoke:
        vars(args).update(SMOKE)
        if args.out.resolve() == (HERE / "results").resolve():
            args.out = smoke_dir("vocab_sweep")
    import torch

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    elif args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible to torch")
    defaults = GPU_DEFAULTS if args.device == "cuda" else CPU_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.top_k > min(args.vocab):
        parser.error(f"--top-k {args.top_k} is larger than the smallest vocabulary size {min(args.vocab)}")
    if args.isolate == "auto":
        args.isolate = "process" if args.device == "cpu" else "none"
    if args.liger_compiled == "auto":
        args.liger_compiled = "on" if args.device == "cuda" else "off"
    if args.name is None:
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        args.name = f"vocab_sweep-{'gpu' if args.device == 'cuda' else 'cpu'}-{stamp}"
    if not args.name or any(c in args.name for c in "/\\") or args.name.startswith("."):
        parser.error(f"--name must be a plain file stem, got {args.name!r}")
    return args


# ----------------------------------------------------------------------------------------- memory
def _proc_status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


class CpuPeak:
    """Peak extra resident memory (RSS) of this process over one call, in bytes.

    Before the call: garbage-collect, ``malloc_trim(0)`` (return freed heap pages to the OS, so that
    RSS is the live memory), reset the kernel's high-water mark (``echo 5 > /proc/self/clear_refs``)
    and read RSS. After: high-water mark (VmHWM) minus that RSS. Page-granular and exact for what the
    process touched; includes allocator slack and any library workspace (which is real memory).
    """

    def __init__(self):
        try:
            self._libc = ctypes.CDLL("libc.so.6")
        except OSError:
            self._libc = None
        self.method = "rss-hwm"
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            _proc_status_kb("VmHWM")
        except OSError:
            self.method = "unsupported"

    def start(self) -> None:
        gc.collect()
        if self._libc is not None:
            self._libc.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        self._base = _proc_status_kb("VmRSS") * 1024

    def stop(self) -> int:
        return _proc_status_kb("VmHWM") * 1024 - self._base


def measure_peak(fn, device) -> int:
    """Peak extra bytes while fn() runs, over what was allocated before (the inputs); -1 if unknown.

    fn's return value is freed after the measurement; run_case subtracts the gradient outputs.
    """
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        tracker = CpuPeak()
        if tracker.method == "unsupported":
            return -1
        tracker.start()
        out = fn()
        peak = tracker.stop()
    del out
    return peak


def time_calls(fn, device, repeats: int, warmup: int) -> tuple[list[float], list[float]]:
    """Milliseconds of each of ``repeats`` calls after ``warmup`` untimed ones: (wall, process CPU).

    Wall time from CUDA events on GPU, ``perf_counter`` on CPU. On CPU the process's CPU time
    (``process_time``, all threads) is kept too: on a shared machine it shows the work done, which
    other processes' load does not inflate (with one thread it is close to the wall time a quiet
    machine would give).
    """
    import torch

    for _ in range(warmup):
        out = fn()
        del out
    wall, cpu = [], []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            end.synchronize()
            wall.append(start.elapsed_time(end))
        else:
            t0, c0 = time.perf_counter(), time.process_time()
            out = fn()
            wall.append((time.perf_counter() - t0) * 1e3)
            cpu.append((time.process_time() - c0) * 1e3)
        del out
    return wall, cpu


# ----------------------------------------------------------------------------------------- one case
def run_case(spec: dict) -> dict:
    """Measure one (implementation, V). ``spec`` is JSON-able (it crosses a process boundary)."""
    import torch

    from _sweep_impls import Case, Config, grad_bytes, kept_count

    device = torch.device(spec["device"])
    cfg = Config(tokens=spec["tokens"], d_student=spec["d_student"], d_teacher=spec["d_teacher"],
                 vocab=spec["vocab"], dtype=getattr(torch, spec["dtype"]), top_k=spec["top_k"],
                 keep_ratio=spec["keep_ratio"], liger_compiled=spec["liger_compiled"],
                 chunk_rows=spec.get("chunk_rows"), chunk_vocab=spec.get("chunk_vocab"))
    from _sweep_impls import make_inputs

    inputs = make_inputs(cfg, device, seed=spec.get("seed", 0))
    case = Case(spec["impl"], cfg, inputs)
    result = {"kept": kept_count(cfg.tokens, cfg.keep_ratio)}

    fwd_times, fwd_cpu = time_calls(case.forward, device, spec["repeats"], spec["warmup"])
    fb_times, fb_cpu = time_calls(case.forward_backward, device, spec["repeats"], spec["warmup"])
    result.update(fwd_ms=statistics.median(fwd_times), fwd_bwd_ms=statistics.median(fb_times),
                  fwd_ms_min=min(fwd_times), fwd_bwd_ms_min=min(fb_times))
    if fwd_cpu:
        result.update(fwd_cpu_ms=statistics.median(fwd_cpu), fwd_bwd_cpu_ms=statistics.median(fb_cpu))

    mb = 1024.0 * 1024.0
    peak_fwd = measure_peak(case.forward, device)
    # Gradient outputs are excluded: subtract the bytes of the tensors the backward returned.
    returned = {}

    def forward_backward():
        grads = case.forward_backward()
        returned["bytes"] = grad_bytes(grads)
        return grads

    peak_fb = measure_peak(forward_backward, device)
    if peak_fwd < 0 or peak_fb < 0:
        result.update(peak_extra_fwd_mb=None, peak_extra_mb=None)
    else:
        # One high-water mark cannot say whether the gradients were already allocated at the peak.
        # The forward's peak (before any gradient exists) and the whole step's peak minus the
        # gradients are both lower bounds of the true extra peak; the larger is reported. It is exact
        # when the step peaks in the forward, or in a backward that allocates its gradients first
        # (torch); otherwise (naive: gradients come at the end) it is low by at most their bytes.
        result.update(peak_extra_fwd_mb=max(0, peak_fwd) / mb, peak_total_fwd_bwd_mb=max(0, peak_fb) / mb,
                      grad_output_mb=returned["bytes"] / mb,
                      peak_extra_mb=max(0, peak_fwd, peak_fb - returned["bytes"]) / mb)
    result["memory_method"] = "cuda-allocator-peak" if device.type == "cuda" else "rss-hwm"
    return result


def worker_main(spec_json: str) -> int:
    spec = json.loads(spec_json)
    try:
        import torch

        if spec.get("threads"):
            torch.set_num_threads(spec["threads"])
        out = run_case(spec)
    except Exception as exc:  # reported as the row's error, the sweep goes on
        out = {"error": f"{type(exc).__name__}: {exc}".strip()[:500],
               "traceback": traceback.format_exc()[-2000:]}
    sys.stdout.write(RESULT_TAG + json.dumps(out) + "\n")
    sys.stdout.flush()
    return 0


def run_isolated(spec: dict, timeout: float | None = None) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in proc.stdout.splitlines()[::-1]:
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-3:]
    return {"error": f"worker exited with status {proc.returncode}: {' | '.join(tail)}"[:500]}


def run_inline(spec: dict) -> dict:
    import torch

    try:
        return run_case(spec)
    except torch.OutOfMemoryError as exc:
        return {"error": f"out of memory: {str(exc).splitlines()[0][:300]}"}
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"[:500], "traceback": traceback.format_exc()[-2000:]}
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------- metadata
def _cpu_seconds() -> float:
    """CPU seconds of this process and its finished worker processes."""
    import resource

    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        r = resource.getrusage(who)
        total += r.ru_utime + r.ru_stime
    return total


def _loadavg():
    """1-minute load average (other processes on a shared CPU slow every timing down)."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


# ----------------------------------------------------------------------------------------- outputs
def _fmt(value, digits=2):
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def table_lines(rows: list[dict]) -> list[str]:
    with_cpu = any(r.get("fwd_cpu_ms") is not None for r in rows)
    head = ["impl", "V", "fwd ms", "fwd+bwd ms"] + (["fwd CPU ms", "f+b CPU ms"] if with_cpu else []) + [
        "peak extra MB", "fwd TFLOP/s", "f+b TFLOP/s", "fwd / gemm", "f+b / gemm", "agrees"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r.get("error"):
            cells = [r["impl"], _fmt(r["vocab"]), f"error: {r['error'][:60]}"] + [""] * (len(head) - 3)
        else:
            agree = {True: "yes", False: "NO", None: "-"}[r.get("agree")]
            cells = [r["impl"], _fmt(r["vocab"]), _fmt(r["fwd_ms"]), _fmt(r["fwd_bwd_ms"])]
            if with_cpu:
                cells += [_fmt(r.get("fwd_cpu_ms")), _fmt(r.get("fwd_bwd_cpu_ms"))]
            cells += [_fmt(r["peak_extra_mb"], 1), _fmt(r.get("fwd_tflops"), 3), _fmt(r.get("fwd_bwd_tflops"), 3),
                      _fmt(r.get("fwd_ratio_gemm")), _fmt(r.get("fwd_bwd_ratio_gemm")), agree]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def add_derived(rows: list[dict]) -> None:
    """TFLOP/s and the ratios to the gemm row of the same V."""
    gemm = {r["vocab"]: r for r in rows if r["impl"] == "gemm" and not r.get("error")}
    for r in rows:
        if r.get("error"):
            continue
        for key, flop_key in (("fwd", "flops_fwd"), ("fwd_bwd", "flops_fwd_bwd")):
            ms = r[f"{key}_ms"]
            r[f"{key}_tflops"] = r[flop_key] / (ms * 1e-3) / 1e12 if ms and ms > 0 else None
            g = gemm.get(r["vocab"])
            r[f"{key}_ratio_gemm"] = ms / g[f"{key}_ms"] if g and g[f"{key}_ms"] > 0 else None


def write_results(meta: dict, rows: list[dict], out: Path, name: str) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    paths = {ext: out / f"{name}.{ext}" for ext in ("json", "csv", "md")}
    doc = dict(meta)
    doc["rows"] = rows
    paths["json"].write_text(json.dumps(doc, indent=1, default=str) + "\n")
    keys = list(ROW_KEYS) + sorted({k for r in rows for k in r} - set(ROW_KEYS))
    with paths["csv"].open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in keys})
    cfg = meta["config"]
    md = [f"Device: {meta['device']}; torch {meta['torch']}, triton {meta['triton']}; commit {meta['commit']}; "
          f"{meta['date']}.",
          f"N = {cfg['tokens']:,}, D_s = {cfg['d_student']:,}, D_t = {cfg['d_teacher']:,}, {cfg['dtype']}, "
          f"K = {cfg['top_k']}, keep_ratio = {cfg['keep_ratio']}; median of {cfg['repeats']} "
          f"(warm-up {cfg['warmup']}); {meta.get('threads')} torch thread(s); 1-minute load average "
          f"{meta.get('loadavg_start')} at the start, {meta.get('loadavg_end', '-')} at the end; "
          f"peak memory: {meta.get('memory_method')}.", ""]
    md += table_lines(rows)
    if meta.get("skipped"):
        md += ["", "Skipped: " + "; ".join(f"{k}: {v}" for k, v in meta["skipped"].items())]
    paths["md"].write_text("\n".join(md) + "\n")
    return paths


STYLE = {"naive": ("tab:red", "o", "-"), "torch": ("tab:blue", "s", "-"), "triton": ("tab:green", "^", "-"),
         "cuda": ("tab:purple", "D", "-"), "liger": ("tab:orange", "v", "-"), "gemm": ("black", "x", "--")}


def plot(meta: dict, rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = meta["config"]
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.2))
    panels = (("fwd_ms", "forward time (ms, median)"), ("fwd_bwd_ms", "forward + backward time (ms, median)"),
              ("peak_extra_mb", "peak extra memory, forward + backward (MB)"))
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    for ax, (key, title) in zip(axes, panels):
        for impl in impls:
            pts = sorted((r["vocab"], r[key]) for r in rows
                         if r["impl"] == impl and not r.get("error") and r.get(key) is not None)
            if not pts:
                continue
            color, marker, line = STYLE.get(impl, ("gray", ".", "-"))
            ax.plot([p[0] for p in pts], [max(p[1], 1e-3) for p in pts], marker=marker, linestyle=line,
                    color=color, label=impl)
            cpu_key = key.replace("_ms", "_cpu_ms")
            cpu_pts = sorted((r["vocab"], r[cpu_key]) for r in rows if key != "peak_extra_mb"
                             and r["impl"] == impl and not r.get("error") and r.get(cpu_key) is not None)
            if cpu_pts:  # CPU runs: the process's CPU time, which other processes' load does not inflate
                ax.plot([p[0] for p in cpu_pts], [max(p[1], 1e-3) for p in cpu_pts], linestyle=":",
                        color=color, alpha=0.8, linewidth=1.2)
            failed = [r["vocab"] for r in rows if r["impl"] == impl and r.get("error")]
            for v in failed:
                ax.axvline(v, color=color, alpha=0.25, linestyle=":")
        ax.set_yscale("log")
        ax.set_xlabel("vocabulary size V")
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x / 1000:,.0f}k"))
        for v in (151936,):
            if min(r["vocab"] for r in rows) <= v <= max(r["vocab"] for r in rows):
                ax.axvline(v, color="gray", alpha=0.35, linewidth=0.8)
    axes[0].legend(loc="best", fontsize=9)
    skipped = meta.get("skipped") or {}
    note = ("not run: " + ", ".join(skipped)) if skipped else ""
    cpu_note = ("; dotted: process CPU time (load average "
                f"{meta.get('loadavg_start')} -> {meta.get('loadavg_end', '-')})"
                if any(r.get("fwd_cpu_ms") is not None for r in rows) else "")
    fig.suptitle(f"TA-OPD loss head on {meta['device']}: N={cfg['tokens']:,}, D_s={cfg['d_student']:,}, "
                 f"D_t={cfg['d_teacher']:,}, {cfg['dtype']}, K={cfg['top_k']}, keep_ratio={cfg['keep_ratio']}"
                 f"   {note}\n(gray line: Qwen3 V=151,936; lower is better; gemm = bare logits GEMMs, "
                 f"the floor; solid: wall-clock median{cpu_note})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def replot(path: Path) -> int:
    doc = json.loads(path.read_text())
    rows = doc.pop("rows")
    add_derived(rows)
    paths = write_results(doc, rows, path.parent, path.stem)
    plot(doc, rows, path.with_suffix(".png"))
    print("\n".join(table_lines(rows)))
    print(f"wrote {paths['md']}, {paths['csv']}, {path.with_suffix('.png')}")
    return 0


# ----------------------------------------------------------------------------------------- main
def run_metadata(args, device) -> dict:
    import torch

    return {"threads": torch.get_num_threads(), **metadata(device), "host": platform.node(),
            "loadavg_start": _loadavg(),
            "memory_method": "cuda-allocator-peak" if device.type == "cuda" else "rss-hwm",
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "worker"}}


def runnable(requested: list[str], device) -> tuple[list[str], dict]:
    """(the implementations that can run here, {implementation: why not} for the others)."""
    from _sweep_impls import available

    impls, skipped = [], {}
    for impl in requested:
        ok, reason = available(impl, device)
        if ok:
            impls.append(impl)
        else:
            skipped[impl] = reason
            print(f"  skipping {impl}: {reason}", flush=True)
    return impls, skipped


def check_agreement(impls: list[str], device, args) -> dict:
    """Each implementation (but gemm) against taopd_kernels.reference at a small size, printed as it goes."""
    from _sweep_impls import agreement

    agree = {}
    for impl in impls:
        if impl == "gemm":
            continue
        try:
            # liger eager: the check is of the math, and a compile here would only cost time
            agree[impl] = agreement(impl, device, top_k=args.top_k, keep_ratio=args.keep_ratio,
                                    liger_compiled=False)
        except Exception as exc:
            agree[impl] = {"impl": impl, "ok": False, "error": f"{type(exc).__name__}: {exc}"[:500]}
        a = agree[impl]
        if "error" in a:
            print(f"  agreement {impl}: FAILED to run: {a['error']}", flush=True)
        else:
            print(f"  agreement {impl}: loss {a['loss']:.6g} vs reference {a['reference']:.6g} "
                  f"(rel err {a['rel_err']:.1e}, dW rel err {a['grad_w_rel_err']:.1e}) "
                  f"{'ok' if a['ok'] else 'MISMATCH'}", flush=True)
    return agree


def measure_row(impl: str, vocab: int, args, agree: dict, threads: int) -> tuple[dict, str | None]:
    """One (implementation, V) measured (in its own process with --isolate process): (the result row, the
    traceback of its error or None)."""
    import torch

    from _sweep_impls import Config, flops

    spec = {"impl": impl, "vocab": vocab, "tokens": args.tokens, "d_student": args.d_student,
            "d_teacher": args.d_teacher, "dtype": args.dtype, "top_k": args.top_k,
            "keep_ratio": args.keep_ratio, "repeats": args.repeats, "warmup": args.warmup,
            "device": args.device, "liger_compiled": args.liger_compiled == "on",
            "chunk_rows": args.chunk_rows, "chunk_vocab": args.chunk_vocab, "threads": threads}
    result = run_isolated(spec) if args.isolate == "process" else run_inline(spec)
    cfg = Config(tokens=args.tokens, d_student=args.d_student, d_teacher=args.d_teacher, vocab=vocab,
                 dtype=getattr(torch, args.dtype), top_k=args.top_k, keep_ratio=args.keep_ratio)
    f_fwd, f_fb = flops(impl, cfg)
    row = {"impl": impl, "vocab": vocab, "tokens": args.tokens, "d_student": args.d_student,
           "d_teacher": args.d_teacher, "dtype": args.dtype, "top_k": args.top_k,
           "keep_ratio": args.keep_ratio, "fwd_ms": None, "fwd_bwd_ms": None, "peak_extra_mb": None,
           "repeats": args.repeats, "flops_fwd": f_fwd, "flops_fwd_bwd": f_fb,
           "agree": agree.get(impl, {}).get("ok") if impl in agree else None}
    row.update({k: val for k, val in result.items() if k != "traceback"})
    return row, result.get("traceback")


def sweep(args, impls: list[str], agree: dict, meta: dict) -> list[dict]:
    """Every (implementation, V), the results rewritten after each (a killed run keeps its rows)."""
    import torch

    jobs = [(impl, v) for v in args.vocab for impl in impls]
    try:
        from tqdm import tqdm

        bar = tqdm(jobs, desc="vocab sweep", unit="case", disable=args.no_progress, dynamic_ncols=True)
    except ImportError:
        bar = jobs
    rows = []
    for impl, v in bar:
        if hasattr(bar, "set_postfix_str"):
            bar.set_postfix_str(f"{impl} V={v:,}")
        row, trace = measure_row(impl, v, args, agree, torch.get_num_threads())
        if row.get("error"):
            msg = f"  {impl} V={v:,}: {row['error']}"
            (bar.write if hasattr(bar, "write") else print)(msg)
            if trace:
                print(trace, file=sys.stderr)
        rows.append(row)
        add_derived(rows)
        write_results(meta, rows, args.out, args.name)
    if hasattr(bar, "close"):
        bar.close()
    return rows


def finish(args, meta: dict, rows: list[dict], t_start: float) -> dict:
    """The final JSON, CSV, table and plot; prints the table and the paths written."""
    meta["loadavg_end"] = _loadavg()
    meta["wall_s"] = round(time.perf_counter() - t_start, 1)
    meta["cpu_s"] = round(_cpu_seconds(), 1)
    paths = write_results(meta, rows, args.out, args.name)
    png = args.out / f"{args.name}.png"
    try:
        plot(meta, rows, png)
        paths["png"] = png
    except Exception as exc:
        print(f"vocab_sweep: the plot failed: {type(exc).__name__}: {exc}", file=sys.stderr)
    print()
    print("\n".join(table_lines(rows)))
    print()
    for path in paths.values():
        print(f"wrote {path}")
    return paths


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        return worker_main(args.worker)
    if args.replot is not None:
        return replot(args.replot)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    device = torch.device(args.device)
    meta = run_metadata(args, device)
    print(f"vocab_sweep: {meta['device']}, torch {meta['torch']}, N={args.tokens}, D_s={args.d_student}, "
          f"D_t={args.d_teacher}, {args.dtype}, K={args.top_k}, keep_ratio={args.keep_ratio}, "
          f"V={','.join(map(str, args.vocab))}", flush=True)
    impls, meta["skipped"] = runnable(args.impls, device)
    if not impls:
        print("vocab_sweep: nothing to run", file=sys.stderr)
        return 2
    agree = meta["agreement"] = {} if args.no_check else check_agreement(impls, device, args)
    rows = sweep(args, impls, agree, meta)
    paths = finish(args, meta, rows, t_start)
    bad = [impl for impl, a in agree.items() if not a.get("ok")]
    if bad:
        print(f"vocab_sweep: the loss of {', '.join(bad)} does not agree with taopd_kernels.reference "
              f"(see 'agreement' in {paths['json']})", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
