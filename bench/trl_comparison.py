"""Full-token OPD through the taopd_kernels loss head vs TRL's ChunkedDivergenceFunction (beta=1,
reverse KL), and TA-OPD at 5%, on the same inputs: per-token agreement, forward+backward time, peak
extra memory.

    python bench/trl_comparison.py                       # N=1024, V=151,936, D_s=256, D_t=512, fp32, 2 threads
    python bench/trl_comparison.py --tokens 256 --repeats 3
    python bench/trl_comparison.py --smoke               # N=16, V=1,500, D_s=16, D_t=24, 1 repeat, 1 thread

Writes bench/results/trl_comparison_<device>.json and .md (--smoke: a temporary folder). All implementations run in one process, in
turn, on the same tensors, so the ratios come from one run. Time: median of ``--repeats`` timed
forward+backward calls after one warm-up. Peak extra memory: CPU resident-set high-water mark over one
forward+backward (bench/vocab_sweep.py's CpuPeak), over the inputs; it includes the student's weight
gradient (V x D_s fp32, 156 MB at these sizes), which every implementation allocates.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


TRL = "trl_chunked_divergence"
SMOKE = dict(tokens=16, vocab=1500, d_student=16, d_teacher=24, repeats=1, threads=1)


def _machine(threads: int) -> dict:
    """bench/_meta.py's metadata (device, versions, commit, date), plus trl's version and the threads."""
    import trl
    from _meta import metadata  # bench/ is this script's folder

    return {**metadata("cpu"), "trl": trl.__version__, "threads": threads}


def parse_args(argv=None) -> argparse.Namespace:
    from _meta import add_smoke_option, smoke_dir

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=151_936)
    ap.add_argument("--d-student", type=int, default=256)
    ap.add_argument("--d-teacher", type=int, default=512)
    ap.add_argument("--keep-ratio", type=float, default=0.05)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None, help="output folder (default bench/results)")
    add_smoke_option(ap)
    args = ap.parse_args(argv)
    if args.smoke:
        vars(args).update(SMOKE)
    if args.out is None:
        args.out = smoke_dir("trl_comparison") if args.smoke else ROOT / "bench" / "results"
    return args


def make_inputs(n: int, v: int, d_s: int, d_t: int):
    """(h_s, W_s) with grad, (h_t, W_t) without: logits of standard deviation ~3, related models."""
    import torch

    g = torch.Generator().manual_seed(0)
    h_s = torch.randn(n, d_s, generator=g).requires_grad_()
    w_s = (torch.randn(v, d_s, generator=g) * 3.0 / d_s ** 0.5).requires_grad_()
    h_t = torch.randn(n, d_t, generator=g)
    w_t = torch.randn(v, d_t, generator=g) * 3.0 / d_t ** 0.5
    with torch.no_grad():  # related models, so top-K sets overlap as in real distillation
        h_t[:, :d_s] = 0.5 * h_t[:, :d_s] + 0.5 * h_s
        w_t[:, :d_s] = 0.5 * w_t[:, :d_s] + 0.5 * w_s
    return h_s, w_s, h_t, w_t


def implementations(inputs, keep_ratio: float) -> dict:
    """{name: step()}; each step is one forward+backward returning (loss, per-token output, gradients)."""
    import torch
    from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

    from taopd_kernels import TeachabilityKLLoss

    h_s, w_s, h_t, w_t = inputs
    full = TeachabilityKLLoss(strategy="all", backend="torch")
    ta = TeachabilityKLLoss(strategy="teachability", keep_ratio=keep_ratio, backend="torch")

    def trl_step():
        div, _ = ChunkedDivergenceFunction.apply(h_s, w_s, None, h_t, w_t, None, 1.0, 1.0)
        loss = div.mean()
        return loss, div.detach(), torch.autograd.grad(loss, [h_s, w_s])

    def ours(module):
        def step():
            loss, stats = module(h_s, w_s, h_t, w_t, return_stats=True)
            return loss, stats, torch.autograd.grad(loss, [h_s, w_s])
        return step

    return {TRL: trl_step, "taopd_full_opd": ours(full), f"taopd_ta_opd_{round(keep_ratio * 100)}pct": ours(ta)}


def measure(impls: dict, repeats: int) -> tuple[dict, dict]:
    """(results, outputs): per implementation the peak extra memory of a first (warm-up) call, whose output
    is kept, then the median of ``repeats`` timed calls."""
    from vocab_sweep import CpuPeak

    results, outputs = {}, {}
    for name, fn in impls.items():
        tracker = CpuPeak()
        tracker.start()
        out = fn()  # warm-up, and the peak-memory measurement
        peak = tracker.stop() if tracker.method != "unsupported" else -1
        outputs[name] = out
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            res = fn()
            times.append(time.perf_counter() - t0)
            del res
        results[name] = {"fwd_bwd_s_median": round(statistics.median(times), 3),
                         "fwd_bwd_s_all": [round(t, 3) for t in times],
                         "peak_extra_mb": round(peak / 2 ** 20, 1) if peak >= 0 else None,
                         "loss": float(out[0])}
        print(name, results[name], flush=True)
    return results, outputs


def agreement(outputs: dict, inputs) -> dict:
    """Full-token OPD against TRL (per-token KL, loss, gradients), and both against float64 on 64 rows."""
    import torch

    from taopd_kernels.reference import reference_logits, reference_row_stats

    trl_loss, trl_div, trl_grads = outputs[TRL]
    f_loss, f_stats, f_grads = outputs["taopd_full_opd"]
    per_token = (f_stats.kl_reverse.double() - trl_div.double()).abs()
    out = {
        "per_token_kl_max_abs_diff": float(per_token.max()),
        "per_token_kl_max_rel_diff": float((per_token / trl_div.double().abs().clamp_min(1e-12)).max()),
        "per_token_kl_mean": float(trl_div.double().mean()),
        "loss_abs_diff": abs(float(f_loss) - float(trl_loss)),
        "grad_hidden_max_rel_diff": float((f_grads[0] - trl_grads[0]).abs().max() / trl_grads[0].abs().max()),
        "grad_weight_max_rel_diff": float((f_grads[1] - trl_grads[1]).abs().max() / trl_grads[1].abs().max()),
    }
    # float64 ground truth on the first 64 rows (a [64, V] float64 reference is cheap; [N, V] is not).
    h_s, w_s, h_t, w_t = inputs
    rows, v = min(64, h_s.shape[0]), w_s.shape[0]
    truth = reference_row_stats(reference_logits(h_s.detach()[:rows], w_s.detach(), None, v, 1.0, torch.float64),
                                reference_logits(h_t[:rows], w_t, None, v, 1.0, torch.float64), 1).kl_reverse
    for key, val in (("trl", trl_div[:rows]), ("taopd", f_stats.kl_reverse[:rows])):
        out[f"per_token_kl_max_abs_err_vs_float64_{key}"] = float((val.double() - truth.double()).abs().max())
    return out


def table(report: dict) -> list[str]:
    """The Markdown written next to the JSON: the setting, one row per implementation, the agreement."""
    c, m, results, a = report["config"], report["machine"], report["results"], report["agreement_full_opd_vs_trl"]
    lines = [f"N={c['tokens']}, V={c['vocab']:,}, D_s={c['d_student']}, D_t={c['d_teacher']}, float32, "
             f"{m['device']}, torch {m['torch']}, trl {m['trl']}, "
             f"commit {report['commit'][:7]}; median of {c['repeats']} forward+backward calls.", "",
             "| implementation | fwd+bwd (s) | vs TRL | peak extra (MB) | vs TRL | loss |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['fwd_bwd_s_median']:.2f} | {r['time_vs_trl']:.2f}x | "
                     f"{r['peak_extra_mb']} | {r.get('peak_vs_trl', float('nan')):.2f}x | {r['loss']:.6f} |")
    lines += ["", f"Full-token OPD vs TRL (beta=1): per-token reverse KL max abs diff "
              f"{a['per_token_kl_max_abs_diff']:.2e} (max rel {a['per_token_kl_max_rel_diff']:.2e}, mean KL "
              f"{a['per_token_kl_mean']:.3f}); loss diff {a['loss_abs_diff']:.2e}; gradient max rel diff "
              f"{a['grad_hidden_max_rel_diff']:.2e} (hidden), {a['grad_weight_max_rel_diff']:.2e} (weight). Against float64 on the first 64 rows: "
              f"max abs error {a['per_token_kl_max_abs_err_vs_float64_taopd']:.2e} (taopd), "
              f"{a['per_token_kl_max_abs_err_vs_float64_trl']:.2e} (TRL)."]
    return lines


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    inputs = make_inputs(args.tokens, args.vocab, args.d_student, args.d_teacher)
    results, outputs = measure(implementations(inputs, args.keep_ratio), args.repeats)
    agree = agreement(outputs, inputs)
    base = results[TRL]["fwd_bwd_s_median"]
    for r in results.values():
        r["time_vs_trl"] = round(r["fwd_bwd_s_median"] / base, 3)
        if r["peak_extra_mb"] is not None and results[TRL]["peak_extra_mb"]:
            r["peak_vs_trl"] = round(r["peak_extra_mb"] / results[TRL]["peak_extra_mb"], 3)
    report = {"config": {"tokens": args.tokens, "vocab": args.vocab, "d_student": args.d_student,
                         "d_teacher": args.d_teacher, "dtype": "float32", "keep_ratio": args.keep_ratio,
                         "repeats": args.repeats, "device": "cpu", "trl_beta": 1.0, "taopd_backend": "torch"},
              "machine": (machine := _machine(args.threads)), "commit": machine["commit"],
              "agreement_full_opd_vs_trl": agree,
              "results": results}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "trl_comparison_cpu.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = table(report)
    (args.out / "trl_comparison_cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
