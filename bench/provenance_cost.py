"""What the provenance check (taopd_kernels/provenance.py) costs: one forward+backward of
``fused_teachability_kl`` from hidden states, timed in this checkout and in another one (the code before
the check, e.g. a ``git worktree`` of its parent commit), in the same run.

    git worktree add /tmp/before c10adc2^     # the commit before the provenance check
    python bench/provenance_cost.py --against /tmp/before --out bench/results

Each repeat runs one subprocess per checkout, alternating (A B A B ...) so that a load change on the machine
touches both alike; a subprocess imports its checkout's package (PYTHONPATH), does one untimed
forward+backward and then ``--inner`` timed ones. The figure per checkout is the median over repeats of each
subprocess's median; the ratio is taken from medians of the same run. Torch backend, float32 inputs, the
torch thread count of ``--threads``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from _meta import add_smoke_option, metadata, smoke_dir

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def time_one_checkout(n: int, vocab: int, d_s: int, d_t: int, inner: int, threads: int) -> list[float]:
    """``inner`` timed forward+backward calls (seconds) of the package this process imports."""
    import time

    import torch

    from taopd_kernels import fused_teachability_kl

    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    h_s = torch.randn(n, d_s, generator=gen).requires_grad_(True)
    w_s = (torch.randn(vocab, d_s, generator=gen) * d_s ** -0.5).requires_grad_(True)
    h_t = torch.randn(n, d_t, generator=gen)
    w_t = torch.randn(vocab, d_t, generator=gen) * d_t ** -0.5

    def step():
        h_s.grad = w_s.grad = None
        loss = fused_teachability_kl(h_s, w_s, h_t, w_t, backend="torch")
        loss = loss[0] if isinstance(loss, tuple) else loss
        loss.backward()

    step()  # untimed: first-call allocations
    times = []
    for _ in range(inner):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return times


def measure(checkout: Path, args) -> list[float]:
    """Times from a subprocess that imports ``checkout``'s taopd_kernels."""
    env = dict(os.environ, PYTHONPATH=str(checkout), OMP_NUM_THREADS=str(args.threads))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--n", str(args.n), "--vocab", str(args.vocab),
           "--d-s", str(args.d_s), "--d-t", str(args.d_t), "--inner", str(args.inner), "--threads", str(args.threads)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, cwd=checkout)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--against", type=Path, help="the other checkout (default: this one, a null comparison)")
    p.add_argument("--n", type=int, default=1024, help="positions")
    p.add_argument("--vocab", type=int, default=151_936)
    p.add_argument("--d-s", type=int, default=64, help="student hidden size (the built-in models')")
    p.add_argument("--d-t", type=int, default=128, help="teacher hidden size")
    p.add_argument("--repeats", type=int, default=5, help="subprocesses per checkout, alternating")
    p.add_argument("--inner", type=int, default=3, help="timed calls per subprocess")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, help="folder for provenance_cost_cpu.json (default: print only)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    add_smoke_option(p)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(time_one_checkout(args.n, args.vocab, args.d_s, args.d_t, args.inner, args.threads)))
        return
    if args.smoke:
        args.n, args.vocab, args.repeats, args.inner = 32, 1000, 2, 1
        args.out = args.out or smoke_dir("provenance_cost")
    checkouts = {"this": ROOT, "against": (args.against or ROOT).resolve()}
    runs = {name: [] for name in checkouts}
    for r in range(args.repeats):
        for name, path in checkouts.items():
            runs[name].append(statistics.median(measure(path, args)))
            print(f"repeat {r}: {name} {runs[name][-1]:.3f} s", flush=True)
    med = {name: statistics.median(v) for name, v in runs.items()}
    result = {
        **metadata("cpu"),
        "what": "forward+backward of fused_teachability_kl from hidden states, torch backend, float32",
        "shape": {"n": args.n, "vocab": args.vocab, "d_s": args.d_s, "d_t": args.d_t},
        "threads": args.threads, "repeats": args.repeats, "inner": args.inner,
        "against": str(checkouts["against"]),
        "seconds": runs, "median_s": med, "overhead": med["this"] / med["against"] - 1,
        "command": "python bench/provenance_cost.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    print(f"median this {med['this']:.3f} s, against {med['against']:.3f} s: "
          f"overhead {100 * result['overhead']:+.1f}%")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "provenance_cost_cpu.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
