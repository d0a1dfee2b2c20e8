"""Benchmark of the CUDA statistics kernel (taopd_kernels._C) on logits, to run on a GPU machine.

    python bench/cuda_stats_bench.py                 # N=8192, V=151936, bf16, K=16
    python bench/cuda_stats_bench.py --n 4096 --k 32
    python bench/cuda_stats_bench.py --smoke          # CPU: tiny shapes, the stages that run without CUDA

Reports, for student and teacher logits [N, V]:
- the kernel's time and its effective bandwidth (bytes of both logit tensors, read once);
- a device-to-device copy of the same bytes (read + write counted, the usual peak figure) for scale;
- the same statistics with PyTorch ops (taopd_kernels.backends.pytorch, chunks of 1024 rows, one vocab tile);
- torch.topk on both tensors (the top-K part alone, which the kernel fuses into the same pass).
Exits with a message (no traceback) when there is no CUDA device or the extension is not built.
``--smoke`` runs on the CPU at N=8, V=1,000: the copy, top-K and PyTorch-statistics stages, and resolves the
CUDA kernel's functions without calling them.
"""

from __future__ import annotations

import argparse
import json
import sys


def _time_ms(fn, warmup: int, iters: int, device) -> float:
    """Median milliseconds of ``iters`` calls after ``warmup``: CUDA events on a GPU, perf_counter on a CPU."""
    import time

    import torch

    for _ in range(warmup):
        fn()
    if device.type != "cuda":
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return sorted(times)[len(times) // 2]
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(iters):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def library_functions() -> dict:
    """Every library function the benchmark calls, resolved before anything runs (a rename fails here,
    also in the CPU smoke run, which calls only the PyTorch one)."""
    from taopd_kernels.backends import cuda as cuda_backend, pytorch as torch_backend

    return {"build": cuda_backend.build_jit, "kernel_stats": cuda_backend.logits_forward_stats,
            "torch_stats": torch_backend.logits_forward_stats}


def run_benchmark(n: int = 8192, vocab: int = 151936, top_k: int = 16, dtype: str = "bfloat16",
                  warmup: int = 3, iters: int = 10, torch_baseline: bool = True, device: str = "cuda") -> dict:
    """Median times (ms) and bandwidths (GB/s); raises RuntimeError without CUDA or the extension.

    ``device="cpu"`` (the smoke run) leaves out the CUDA kernel's stage; its functions are still resolved.
    """
    import torch

    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("the CUDA statistics benchmark needs a CUDA device (none is visible)")
    fns = library_functions()
    dt = getattr(torch, dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    zs = (torch.randn(n, vocab, device=device, generator=gen) * 3).to(dt)
    zt = (torch.randn(n, vocab, device=device, generator=gen) * 3).to(dt)
    nbytes = 2 * zs.numel() * zs.element_size()
    res = {"n": n, "vocab": vocab, "top_k": top_k, "dtype": dtype,
           "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "bytes_read": nbytes}
    if device.type == "cuda":
        fns["build"]()  # the installed extension if there is one, else a JIT build
        res.update(_kernel_stage(fns["kernel_stats"], zs, zt, top_k, warmup, iters, nbytes))
    res.update(_copy_stage(zs, zt, warmup, iters, nbytes))
    if "kernel_GBps" in res:
        res["kernel_vs_copy_read_bw"] = res["kernel_GBps"] / (nbytes / res["copy_ms"] / 1e6)

    def topk():
        torch.topk(zs, top_k, dim=-1)
        torch.topk(zt, top_k, dim=-1)

    res["torch_topk_ms"] = _time_ms(topk, warmup, iters, device)

    if torch_baseline:
        def torch_stats():
            fns["torch_stats"](zs, zt, vocab_size=vocab, top_k=top_k, temperature=1.0, chunk_rows=1024,
                               chunk_vocab=vocab)

        res["torch_stats_ms"] = _time_ms(torch_stats, 1, max(2, iters // 3), device)
        if "kernel_ms" in res:
            res["speedup_vs_torch"] = res["torch_stats_ms"] / res["kernel_ms"]
    return res


def _kernel_stage(kernel_stats, zs, zt, top_k: int, warmup: int, iters: int, nbytes: int) -> dict:
    def kernel():
        kernel_stats(zs, zt, vocab_size=zs.shape[1], top_k=top_k, temperature=1.0)

    ms = _time_ms(kernel, warmup, iters, zs.device)
    return {"kernel_ms": ms, "kernel_GBps": nbytes / ms / 1e6}


def _copy_stage(zs, zt, warmup: int, iters: int, nbytes: int) -> dict:
    """A device-to-device copy of the same bytes, for scale (read + write counted: the usual peak figure)."""
    import torch

    dst_s, dst_t = torch.empty_like(zs), torch.empty_like(zt)

    def copy():
        dst_s.copy_(zs)
        dst_t.copy_(zt)

    ms = _time_ms(copy, warmup, iters, zs.device)
    return {"copy_ms": ms, "copy_GBps_read_plus_write": 2 * nbytes / ms / 1e6}


SMOKE = dict(n=8, vocab=1000, iters=2, device="cpu")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--no-torch-baseline", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="CPU, N=8, V=1,000, 2 iterations: no CUDA kernel run")
    args = ap.parse_args(argv)
    shape = dict(n=args.n, vocab=args.vocab, iters=args.iters, device="cuda")
    if args.smoke:
        shape.update(SMOKE)
    try:
        res = run_benchmark(shape["n"], shape["vocab"], args.k, args.dtype, iters=shape["iters"],
                            torch_baseline=not args.no_torch_baseline, device=shape["device"])
    except RuntimeError as exc:
        print(f"cuda_stats_bench: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
