"""Chunked torch backend vs the float32 reference: one forward+backward, peak extra memory and time (CPU).

    python bench/core_vs_reference.py                 # N=2048, V=151,936, D_s=256, D_t=512, float32
    python bench/core_vs_reference.py --tokens 512    # smaller
    python bench/core_vs_reference.py --smoke         # N=16, V=1,000, D_s=16, D_t=24, 1 thread; JSON in a temp folder

Each implementation runs in its own process; peak extra memory is the process's peak resident set
(ru_maxrss) after the step minus before it, with the inputs and the gradient buffers allocated first.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from _meta import add_smoke_option, metadata, smoke_dir

SMOKE = dict(tokens=16, vocab=1000, d_student=16, d_teacher=24, threads=1)


def measure(impl: str, tokens: int, vocab: int, d_s: int, d_t: int, threads: int) -> dict:
    import torch

    from taopd_kernels import fused_teachability_kl
    from taopd_kernels.reference import reference_teachability_kl

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    h_s = torch.randn(tokens, d_s, generator=g).requires_grad_()
    w_s = (torch.randn(vocab, d_s, generator=g) * 0.05).requires_grad_()
    h_t = torch.randn(tokens, d_t, generator=g)
    w_t = torch.randn(vocab, d_t, generator=g) * 0.05
    h_s.grad, w_s.grad = torch.zeros_like(h_s), torch.zeros_like(w_s)
    fn = reference_teachability_kl if impl == "reference" else fused_teachability_kl
    kwargs = {} if impl == "reference" else {"backend": "torch"}
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    loss, _ = fn(h_s, w_s, h_t, w_t, **kwargs)
    loss.backward()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"impl": impl, "tokens": tokens, "vocab": vocab, "d_student": d_s, "d_teacher": d_t,
            "threads": threads, "fwd_bwd_s": round(seconds, 3), "peak_extra_mb": round((peak - before) / 1024, 1),
            "loss": float(loss)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=151_936)
    ap.add_argument("--d-student", type=int, default=256)
    ap.add_argument("--d-teacher", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--impl", choices=["reference", "torch"], help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    add_smoke_option(ap)
    args = ap.parse_args()
    if args.smoke and not args.impl:
        vars(args).update(SMOKE)
        args.out = args.out or smoke_dir("core_vs_reference") / "core_vs_reference.json"
    if min(args.tokens, args.vocab, args.d_student, args.d_teacher, args.threads) < 1:
        ap.error("sizes and --threads must be positive")
    if args.impl:  # worker
        print(json.dumps(measure(args.impl, args.tokens, args.vocab, args.d_student, args.d_teacher, args.threads)))
        return 0
    rows = []
    for impl in ("torch", "reference"):
        cmd = [sys.executable, __file__, "--impl", impl, "--tokens", str(args.tokens), "--vocab", str(args.vocab),
               "--d-student", str(args.d_student), "--d-teacher", str(args.d_teacher), "--threads", str(args.threads)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"{impl}: failed (exit {done.returncode}): {done.stderr.strip()[-500:]}", file=sys.stderr)
            continue
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(rows[-1])
    if len(rows) == 2:
        torch_row, ref = rows
        print(f"torch / reference: memory {torch_row['peak_extra_mb'] / ref['peak_extra_mb']:.3f}, "
              f"time {torch_row['fwd_bwd_s'] / ref['fwd_bwd_s']:.3f}; losses {torch_row['loss']:.6f} vs {ref['loss']:.6f}")
    if args.out:
        meta = metadata("cpu")
        args.out.write_text(json.dumps({**meta, "rows": rows}, indent=1))
    return 0 if len(rows) == 2 else 1


if __name__ == "__main__":
    sys.exit(main())
