"""Benchmark of the CUDA statistics kernel (taopd_kernels._C) on logits, to run on a GPU machine.

    python bench/cuda_stats_bench.py                 # N=8192, V=151936, bf16, K=16
    python bench/cuda_stats_bench.py --n 4096 --k 32

Reports, for student and teacher logits [N, V]:
- the kernel's time and its effective bandwidth (bytes of both logit tensors, read once);
- a device-to-device copy of the same bytes (read + write counted, the usual peak figure) for scale;
- the same statistics with PyTorch ops (taopd_kernels.torch_backend, chunks of 1024 rows, one vocab tile);
- torch.topk on both tensors (the top-K part alone, which the kernel fuses into the same pass).
Exits with a message (no traceback) when there is no CUDA device or the extension is not built.
"""

from __future__ import annotations

import argparse
import json
import sys


def _time_ms(fn, warmup: int, iters: int) -> float:
    import torch

    for _ in range(warmup):
        fn()
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


def run_benchmark(n: int = 8192, vocab: int = 151936, top_k: int = 16, dtype: str = "bfloat16",
                  warmup: int = 3, iters: int = 10, torch_baseline: bool = True) -> dict:
    """Median times (ms) and bandwidths (GB/s); raises RuntimeError without CUDA or the extension."""
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("the CUDA statistics benchmark needs a CUDA device (none is visible)")
    from taopd_kernels import cuda_backend, torch_backend

    if cuda_backend._load() is None:
        cuda_backend.build_jit()
    dt = getattr(torch, dtype)
    gen = torch.Generator(device="cuda").manual_seed(0)
    zs = (torch.randn(n, vocab, device="cuda", generator=gen) * 3).to(dt)
    zt = (torch.randn(n, vocab, device="cuda", generator=gen) * 3).to(dt)
    nbytes = 2 * zs.numel() * zs.element_size()
    res = {"n": n, "vocab": vocab, "top_k": top_k, "dtype": dtype, "device": torch.cuda.get_device_name(),
           "bytes_read": nbytes}

    def kernel():
        cuda_backend.logits_forward_stats(zs, zt, vocab_size=vocab, top_k=top_k, temperature=1.0)

    res["kernel_ms"] = _time_ms(kernel, warmup, iters)
    res["kernel_GBps"] = nbytes / res["kernel_ms"] / 1e6

    dst_s, dst_t = torch.empty_like(zs), torch.empty_like(zt)

    def copy():
        dst_s.copy_(zs)
        dst_t.copy_(zt)

    res["copy_ms"] = _time_ms(copy, warmup, iters)
    res["copy_GBps_read_plus_write"] = 2 * nbytes / res["copy_ms"] / 1e6
    res["kernel_vs_copy_read_bw"] = res["kernel_GBps"] / (nbytes / res["copy_ms"] / 1e6)
    del dst_s, dst_t

    def topk():
        torch.topk(zs, top_k, dim=-1)
        torch.topk(zt, top_k, dim=-1)

    res["torch_topk_ms"] = _time_ms(topk, warmup, iters)

    if torch_baseline:
        def torch_stats():
            torch_backend.logits_forward_stats(zs, zt, vocab_size=vocab, top_k=top_k, temperature=1.0,
                                               chunk_rows=1024, chunk_vocab=vocab)

        res["torch_stats_ms"] = _time_ms(torch_stats, 1, max(2, iters // 3))
        res["speedup_vs_torch"] = res["torch_stats_ms"] / res["kernel_ms"]
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--no-torch-baseline", action="store_true")
    args = ap.parse_args(argv)
    try:
        res = run_benchmark(args.n, args.vocab, args.k, args.dtype, iters=args.iters,
                            torch_baseline=not args.no_torch_baseline)
    except RuntimeError as exc:
        print(f"cuda_stats_bench: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
