"""Fidelity of TA-OPD from a sparse teacher signal (docs/math.md, Sparse teacher signal): how well the
statistics and the selection that ``teachability_from_topk`` forms from the teacher's top-K_t log-probs
(what vLLM / SGLang return) match the exact ones from both models' full rows.

On the built-in default task (the driver's prepared student and teacher, ``taopd_train.run.build_models``)
the student samples responses to held-out-stream prompts (``taopd_train.run.rollout``); on those
positions, for each K_t, against the exact statistics (``teachability_stats``):
- Spearman rank correlation of the sparse and exact TA-OPD scores (``~D * ~C``) over the valid positions,
  and of C and D themselves;
- Jaccard overlap of the kept sets at keep_ratio (5%), one selection over the whole batch, as the driver;
- the lower bound C_lb (Eq. 17) against the exact C: means, mean and max gap, share of positions where
  it is exact; and the share of positions where the exact C lies in [C_lb, C_ub] (it must be 1).

    python bench/sparse_fidelity.py                    # writes bench/results/sparse_fidelity_cpu.{json,md}
    python bench/sparse_fidelity.py --smoke            # tiny random models, a temporary folder
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from _meta import HERE, add_smoke_option, metadata, smoke_dir

from taopd_kernels import select_positions, teachability_from_topk, teachability_stats
from taopd_kernels.selection import score_and_select
from taopd_kernels.stats import TeachabilityStats

K_TS = (16, 20, 32, 64)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--k-t", type=int, nargs="+", default=list(K_TS), help="teacher top-K_t sizes to measure")
    p.add_argument("--top-k", type=int, default=16, help="K of the statistics")
    p.add_argument("--keep-ratio", type=float, default=0.05)
    p.add_argument("--prompts", type=int, default=128, help="rollout prompts (positions: their response tokens)")
    p.add_argument("--config", default=None, help="driver config (default: the built-in default task)")
    p.add_argument("--out", default=None, help="output folder (default bench/results; smoke: a temporary one)")
    add_smoke_option(p)
    return p.parse_args(argv)


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a.double().numpy(), b.double().numpy()).statistic)


def _jaccard(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a & b).sum()) / max(float((a | b).sum()), 1.0)


def _tiny_models(folder: Path) -> list:
    """Overrides for two tiny random Qwen3 models (the driver's TinyArch), their configs written to ``folder``."""
    from taopd_train.config import TinyArch
    from taopd_train.models import tiny_qwen3_config

    out = []
    for role, arch in (("student", TinyArch(32, 1, 2, 1, 64)), ("teacher", TinyArch(48, 1, 2, 1, 96))):
        tiny_qwen3_config(arch).save_pretrained(folder / f"{role}_arch")
        out += [f"{role}.random_init=true", f"{role}.config_file={folder / f'{role}_arch' / 'config.json'}"]
    return out


def _driver_setup(args):
    """The driver's models and one rollout batch, as micro-batches with hidden states and lm_heads."""
    from taopd_train import head
    from taopd_train.config import load_config
    from taopd_train.run import build_models, micro_batches, rollout, sample_prompts

    overrides = ["rollout.micro_batch_size=16"]
    if args.smoke:  # random tiny models of the same task: no preparation, seconds on a CPU
        overrides += ["rollout.max_new_tokens=8"] + _tiny_models(args.out_dir)
    cfg = load_config(args.config, overrides)
    models = build_models(cfg, torch.device("cpu"), log=lambda *a, **k: None)
    examples = sample_prompts(cfg, models.task, step=10 ** 6, batch_size=args.prompts)
    ro = rollout(cfg, models, examples, step=10 ** 6)
    out = []
    with torch.no_grad():
        for mb in micro_batches(cfg, ro):
            parts = {}
            for role, model in (("student", models.student), ("teacher", models.teacher)):
                h = head.final_hidden(model, mb.input_ids, mb.attention_mask, mb.position_ids)[:, :-1]
                w, b = head.lm_head(model)
                parts[role] = (h.float(), w.float(), None if b is None else b.float())
            out.append((mb, parts))
    return cfg, out


def _logits(h, w, b, vocab):
    z = h @ w[:vocab].T
    return z if b is None else z + b[:vocab]


def _teacher_mass_float64(zt, ids_s, chunk=256) -> torch.Tensor:
    """C = sum of p_t over the student's top-K in float64, from the float32 teacher logits ``zt`` [R, V] that
    the engine's log-probs were formed from: the ground truth the bounds are checked against."""
    out = [(z.double().gather(1, i) - torch.logsumexp(z.double(), 1, keepdim=True)).exp().sum(1)
           for z, i in zip(zt.split(chunk), ids_s.split(chunk))]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def measure(args) -> dict:
    cfg, batches = _driver_setup(args)
    exact_parts, logits_parts, c64, c64_own = [], [], [], []
    for mb, parts in batches:
        (h_s, w_s, b_s), (h_t, w_t, b_t) = parts["student"], parts["teacher"]
        vocab = min(w_s.shape[0], w_t.shape[0])
        exact_parts.append(teachability_stats(h_s, w_s, h_t, w_t, student_bias=b_s, teacher_bias=b_t,
                                              valid_mask=mb.valid, top_k=args.top_k, strategy=None))
        zs, zt = _logits(h_s, w_s, b_s, vocab), _logits(h_t, w_t, b_t, vocab)
        top = torch.log_softmax(zt, -1).topk(max(args.k_t), -1)  # what the engine returns, K_t = max
        logits_parts.append((mb, zs, top))
        # The bounds hold for the student top-K the sparse path uses (from the plain matmul's logits); the
        # fused path's top-K can differ by one id at a near tie in 16th place, so C is taken over each.
        _, own = teachability_from_topk(teacher_topk_ids=top.indices, teacher_topk_logprobs=top.values,
                                        student_logits=zs, valid_mask=mb.valid, top_k=args.top_k, strategy="all")
        c64.append(_teacher_mass_float64(zt[mb.valid], exact_parts[-1].topk_ids_student[mb.valid]))
        c64_own.append(_teacher_mass_float64(zt[mb.valid], own.topk_ids_student[mb.valid]))
    exact = TeachabilityStats.concat(exact_parts)
    exact.c_float64, exact.c_own_float64 = torch.cat(c64), torch.cat(c64_own)
    seq = torch.cat([mb.sequence_ids.reshape(-1) for mb, _ in batches])
    score_x, kept_x = select_positions(exact, keep_ratio=args.keep_ratio, sequence_ids=seq)
    valid = exact.valid
    rows = {}
    for k_t in args.k_t:
        rows[k_t] = _one_k_t(args, k_t, logits_parts, exact, score_x, kept_x, valid, seq)
    task = "tiny random models (smoke)" if args.smoke else "built-in prepared models"
    return {"num_positions": int(valid.sum()), "num_kept": int(kept_x.sum()), "rows": rows,
            "config": f"{args.config or 'default'} config ({cfg.data.source}, {task})"}


def _one_k_t(args, k_t, logits_parts, exact, score_x, kept_x, valid, seq) -> dict:
    parts = []
    for mb, zs, top in logits_parts:
        _, st = teachability_from_topk(teacher_topk_ids=top.indices[..., :k_t],
                                       teacher_topk_logprobs=top.values[..., :k_t], student_logits=zs,
                                       valid_mask=mb.valid, top_k=args.top_k, strategy="all")
        parts.append(st)
    cat = lambda name: torch.cat([getattr(p, name).reshape(-1) for p in parts])  # noqa: E731
    c_lb, c_ub, d, h = cat("teacher_mass"), cat("teacher_mass_upper"), cat("disagreement"), cat("entropy_student")
    sparse_valid = cat("valid")
    assert torch.equal(sparse_valid, valid), "sparse and exact valid positions differ"
    score_s, kept_s = score_and_select("teachability", entropy=h, disagreement=d, teacher_mass=c_lb, valid=valid,
                                       keep_ratio=args.keep_ratio, sequence_ids=seq, min_per_sequence=1)
    c, c_own = exact.c_float64, exact.c_own_float64  # C over the exact path's / the sparse path's top-K
    lb, ub = c_lb[valid].double(), c_ub[valid].double()
    gap = c_own - lb
    return {
        "spearman_score": _spearman(score_s[valid], score_x[valid]),
        "spearman_C": _spearman(lb, c), "spearman_D": _spearman(d[valid], exact.disagreement[valid]),
        "jaccard_kept": _jaccard(kept_s, kept_x),
        "C_exact_mean": float(c.mean()), "C_lb_mean": float(lb.mean()), "C_ub_mean": float(ub.mean()),
        "C_gap_mean": float(gap.mean()), "C_gap_max": float(gap.max()),
        "C_lb_exact_share": float(cat("teacher_mass_exact")[valid].float().mean()),
        "C_below_lb_max": float((lb - c_own).max()), "C_above_ub_max": float((c_own - ub).max()),
        "C_in_bounds_share": float(((lb <= c_own + 1e-6) & (c_own <= ub + 1e-6)).double().mean()),
        "topk_differs_share": float((c_own != c).double().mean()),
        "D_exact_share": float(cat("disagreement_exact")[valid].float().mean()),
    }


def markdown(result: dict, command: str) -> str:
    meta = result["meta"]
    lines = [
        "# Sparse-teacher fidelity (CPU)", "",
        f"`{command}` on {meta['device']}, commit {meta['commit']}, {meta['date']}; torch {meta['torch']}. "
        f"{result['num_positions']} response positions of {result['prompts']} rollouts of the "
        f"{result['config']}; K = {result['top_k']}, keep_ratio = {result['keep_ratio']} "
        f"({result['num_kept']} kept, one selection over the batch); {result['seconds']:.0f} s.", "",
        "| K_t | Spearman score | Spearman C | Spearman D | Jaccard kept | mean C | mean C_lb | mean C_ub "
        "| mean C - C_lb | max C - C_lb | max C_lb - C | max C - C_ub | C_lb exact | D exact | top-K differs |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for k_t, r in result["rows"].items():
        lines.append(f"| {k_t} | {r['spearman_score']:.4f} | {r['spearman_C']:.4f} | {r['spearman_D']:.4f} | "
                     f"{r['jaccard_kept']:.3f} | {r['C_exact_mean']:.6f} | {r['C_lb_mean']:.6f} | "
                     f"{r['C_ub_mean']:.6f} | {r['C_gap_mean']:.2e} | {r['C_gap_max']:.2e} | "
                     f"{r['C_below_lb_max']:.1e} | {r['C_above_ub_max']:.1e} | "
                     f"{r['C_lb_exact_share']:.3f} | {r['D_exact_share']:.3f} | {r['topk_differs_share']:.4f} |")
    lines += ["", "Spearman: rank correlation over the valid positions (sparse vs exact); Jaccard: overlap of the "
              "kept sets; C: the exact teacher mass on the student's top-K (mean C and Spearman C: the exact pipeline's "
              "top-K; the bound columns: the top-K the sparse path used, from the same logits), in float64 from the "
              "float32 teacher logits the engine's log-probs come from; max C_lb - C and max C - C_ub: the largest "
              "bound violations, which the bounds cannot see: they take the engine's log-probs as given, and a "
              "float32 log-softmax over ~152k terms misplaces its normaliser by up to ~3e-4 of mass here; "
              "C_lb exact / D exact: "
              "share of positions where every needed teacher probability was returned (docs/math.md, Sparse "
              "teacher signal); top-K differs: share of positions where the two student top-K sets differ (near "
              "ties at the K-th place between the fused and the plain-matmul logits)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.smoke:
        args.prompts, args.k_t = 4, [16, 20]
    out = Path(args.out) if args.out else (smoke_dir("sparse_fidelity") if args.smoke else HERE / "results")
    out.mkdir(parents=True, exist_ok=True)
    args.out_dir = out
    t0 = time.time()
    result = measure(args)
    result.update(meta=metadata("cpu"), prompts=args.prompts, top_k=args.top_k, keep_ratio=args.keep_ratio,
                  seconds=time.time() - t0, smoke=args.smoke)
    command = "python bench/sparse_fidelity.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    result["command"] = command
    name = "sparse_fidelity_cpu"
    (out / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / f"{name}.md").write_text(markdown(result, command))
    print(markdown(result, command))
    print(f"wrote {out / name}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
