#!/usr/bin/env python
"""One OPD training step at the Qwen3-1.7B (student) / Qwen3-4B (teacher) architectures, random weights, bf16:
the fused loss head (hidden states + lm_head weights, never [N, V] logits) against naive heads that hold
full logits. Reports step time and peak GPU memory per head as JSON.

    python bench/throughput.py --out bench/throughput.json                # GPU (H100/H200), 8 x 1,024 tokens
    python bench/throughput.py --tiny --out /tmp/tp.json                  # CPU, tiny models
    python bench/throughput.py --smoke                                    # --tiny, one step, temporary folder

A step = teacher forward (no grad) + student forward + loss head + backward + AdamW step, on a synthetic
batch whose second half of every sequence is the "response" (rollout generation is not timed).
Heads: ``fused`` (fused_teachability_kl), ``logits`` (teachability_kl_from_logits on the models' full
logits: same loss and selection), ``torch`` (full float32 log-softmax reverse KL over the same kept rows).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from _meta import add_smoke_option, metadata, smoke_dir

from taopd_kernels import fused_teachability_kl, teachability_kl_from_logits
from taopd_train.config import TinyArch, load_config
from taopd_train import head as model_head
from taopd_train.models import load_model, tiny_qwen3_config


def build(args, device):
    if args.tiny:
        tmp = Path(args.tiny_dir)
        cfg_files = {}
        for role, arch in (("student", TinyArch(32, 1, 2, 1, 64)), ("teacher", TinyArch(64, 1, 2, 1, 128))):
            tiny_qwen3_config(arch).save_pretrained(tmp / role)
            cfg_files[role] = str(tmp / role / "config.json")
        over = [f"student.config_file={cfg_files['student']}", f"teacher.config_file={cfg_files['teacher']}",
                "student.dtype=float32", "teacher.dtype=float32"]
    else:
        over = ["student.dtype=bfloat16", "teacher.dtype=bfloat16"]
    cfg = load_config("qwen3", ["student.random_init=true", "teacher.random_init=true",
                                f"student.attn_implementation={args.attn}", f"teacher.attn_implementation={args.attn}",
                                *over])
    teacher = load_model(cfg.teacher, "teacher", device, seed=1).eval().requires_grad_(False)
    student = load_model(cfg.student, "student", device, seed=0).train()
    return cfg, student, teacher


def one_step(head, cfg, student, teacher, opt, batch, keep_ratio):
    ids, mask, pos, resp = batch
    lo = cfg.loss
    valid, sampled = model_head.loss_positions(ids, resp)
    h_t, w_t, _ = model_head.teacher_forward(teacher, ids, mask, pos)
    h_s, w_s, _ = model_head.call_with_full_head(student, ids, mask, lambda h, w, b: (h, w, b), pos)
    kw = dict(valid_mask=valid, sampled_ids=sampled, top_k=lo.top_k, keep_ratio=keep_ratio, strategy=lo.strategy,
              estimator=lo.estimator, temperature=lo.temperature, vocab_size=lo.vocab_size)
    if head == "fused":
        loss, _ = fused_teachability_kl(h_s, w_s, h_t, w_t, **kw)
    else:
        z_s = h_s @ w_s.T  # [B, T, V] full logits, as model(...).logits would give
        with torch.no_grad():
            z_t = h_t @ w_t.T
        if head == "logits":
            loss, _ = teachability_kl_from_logits(z_s, z_t, **kw)
        else:  # plain torch: float32 log-softmax of both, reverse KL over the kept rows of the same selection
            with torch.no_grad():
                _, st = teachability_kl_from_logits(z_s.detach(), z_t, **kw)
            keep = st.kept
            lp_s = torch.log_softmax(z_s[keep].float() / lo.temperature, -1)
            lp_t = torch.log_softmax(z_t[keep].float() / lo.temperature, -1)
            loss = (lp_s.exp() * (lp_s - lp_t)).sum(-1).sum() / keep.sum().clamp_min(1)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="where to write the JSON results (required but with --smoke)")
    ap.add_argument("--tiny", action="store_true", help="tiny models on CPU")
    ap.add_argument("--batch", type=int, default=None, help="sequences (default 8; --tiny: 2)")
    ap.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 1024; --tiny: 64)")
    ap.add_argument("--keep-ratio", type=float, default=0.10)
    ap.add_argument("--heads", default="fused,logits,torch")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per head (after one warm-up step)")
    ap.add_argument("--attn", default="sdpa")
    ap.add_argument("--tiny-dir", default="/tmp/taopd-throughput-tiny")
    add_smoke_option(ap)
    args = ap.parse_args(argv)
    if args.smoke:  # --tiny, one timed step, everything in a temporary folder
        folder = smoke_dir("throughput")
        args.tiny, args.steps, args.tiny_dir = True, 1, str(folder / "tiny")
        args.out = args.out or str(folder / "throughput.json")
    if args.out is None:
        ap.error("the following arguments are required: --out")
    return args


def synthetic_batch(B: int, T: int, device) -> tuple:
    """(ids, attention mask, positions, response mask): random tokens, the second half of every sequence
    the response."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 151_643, (B, T), generator=gen).to(device)
    mask = torch.ones_like(ids)
    pos = torch.arange(T, device=device).expand(B, T)
    resp = torch.zeros_like(ids)
    resp[:, T // 2:] = 1
    return ids, mask, pos, resp


def time_head(head: str, args, cfg, student, teacher, opt, batch, device) -> dict:
    """One warm-up step, then ``args.steps`` timed ones: the head's record (or its out-of-memory)."""
    B, T = batch[0].shape
    try:
        one_step(head, cfg, student, teacher, opt, batch, args.keep_ratio)  # warm-up (allocations, autotune)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        times, loss = [], None
        for _ in range(args.steps):
            t0 = time.perf_counter()
            loss = one_step(head, cfg, student, teacher, opt, batch, args.keep_ratio)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        rec = {"status": "ok", "step_time_s": sorted(times)[len(times) // 2], "step_times_s": times,
               "tokens_per_s": B * T / sorted(times)[len(times) // 2], "loss": loss}
        if device.type == "cuda":
            rec["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
    except torch.cuda.OutOfMemoryError as e:  # the naive heads can run out of memory: that is a result
        rec = {"status": "oom", "error": str(e).splitlines()[0]}
        opt.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
    return rec


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.tiny and not torch.cuda.is_available():
        print("throughput.py: no CUDA device; this measurement needs a GPU (use --tiny for a CPU smoke run)",
              file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.tiny else "cuda")
    B = args.batch or (2 if args.tiny else 8)
    T = args.seq_len or (64 if args.tiny else 1024)
    cfg, student, teacher = build(args, device)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-6, betas=(0.9, 0.98), weight_decay=0.1)
    batch = synthetic_batch(B, T, device)
    result = {
        **metadata(device),
        "setup": {"student": "tiny" if args.tiny else "Qwen3-1.7B (random init)",
                  "teacher": "tiny" if args.tiny else "Qwen3-4B (random init)",
                  "dtype": "float32" if args.tiny else "bfloat16", "batch": B, "seq_len": T,
                  "response_tokens": int(batch[3][:, 1:].sum()), "keep_ratio": args.keep_ratio,
                  "top_k": cfg.loss.top_k, "estimator": cfg.loss.estimator, "vocab_size": cfg.loss.vocab_size,
                  "optimizer": "AdamW"},
        "heads": {},
    }
    for head in args.heads.split(","):
        result["heads"][head] = rec = time_head(head, args, cfg, student, teacher, opt, batch, device)
        print(f"{head:>7}: {json.dumps(rec)}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
