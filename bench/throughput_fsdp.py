"""Throughput of the sharded (FSDP2) TA-OPD training step on Qwen3 architectures with random weights.

No download: the models are built with random weights from the bundled architectures
(train/configs/qwen3-*.json, or any config.json path). Rollouts are random tokens (the step's cost does not depend on what the tokens are); ``--generate N`` also times
transformers generate() of N new tokens on the sharded student.

    # world size 1 on one GPU, the sharded path (a one-process group is created without torchrun):
    python bench/throughput_fsdp.py --student qwen3-1.7b --teacher qwen3-4b --batch 8 \
        --prompt-len 256 --response-len 768
    # the same step without FSDP, for comparison:
    python bench/throughput_fsdp.py --student qwen3-1.7b --teacher qwen3-4b --no-shard
    # several GPUs:
    torchrun --nproc_per_node=8 bench/throughput_fsdp.py --student qwen3-1.7b --teacher qwen3-4b
    # CPU, tiny models, gloo:
    python bench/throughput_fsdp.py --tiny --device cpu --steps 2 --warmup 1 --out /tmp/tp_fsdp.json
    # smoke run: the same on 2 processes (torchrun on gloo), one step, generate() of 2 tokens, temporary folder
    python bench/throughput_fsdp.py --smoke

Per step (after ``--warmup`` steps), the driver's own phases (taopd_train.run): ``compute_stats``
(teacher and student forwards without grad, statistics), ``select`` (global selection),
``loss_backward`` (student forward, fused loss, backward), optimizer step; tokens/s counts response
tokens of all ranks.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from _meta import add_smoke_option, metadata, smoke_dir

import taopd_train.parallel as parallel
from taopd_train import run
from taopd_train.config import load_config
from taopd_train.models import resolve_config_file
from taopd_train.rollout import Rollout

# Tiny architectures for CPU smoke runs (the real shapes come from train/configs/*.json).
TINY = {
    "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=True, vocab_size=1000, head_dim=8),
    "tiny-teacher": dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, tie_word_embeddings=False, vocab_size=1000, head_dim=8),
}


def build(name: str, dtype: torch.dtype, device: torch.device, seed: int, attn: str):
    """``name``: a bundled architecture (qwen3-1.7b, qwen3-4b: train/configs/<name>.json), a config.json
    path, or tiny / tiny-teacher."""
    from transformers import AutoConfig, AutoModelForCausalLM, Qwen3Config

    if name in TINY:
        cfg = Qwen3Config(**TINY[name], attn_implementation=attn)
    else:
        try:
            path = resolve_config_file(name if name.endswith(".json") else f"{name}.json")
        except FileNotFoundError as e:
            raise SystemExit(f"unknown architecture {name!r}: {e}")
        cfg = AutoConfig.from_pretrained(str(path), attn_implementation=attn)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn)
    return model.to(dtype)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--student", default="qwen3-1.7b")
    p.add_argument("--teacher", default="qwen3-4b")
    p.add_argument("--preset", choices=["tiny"], help="tiny student and teacher (CPU smoke test)")
    p.add_argument("--tiny", action="store_true", help="same as --preset tiny (as in bench/throughput.py)")
    p.add_argument("--batch", type=int, default=8, help="sequences per rank")
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--response-len", type=int, default=768)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--strategy", default="teachability")
    p.add_argument("--estimator", default="sampled", choices=["full", "sampled"])
    p.add_argument("--keep-ratio", type=float, default=0.05)
    p.add_argument("--top-k", type=int, default=16)
    p.add_argument("--backend", default="auto")
    p.add_argument("--teacher-mode", default="shard", choices=["shard", "replicate"])
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"], help="compute dtype")
    p.add_argument("--attn", default="sdpa")
    p.add_argument("--no-shard", action="store_true", help="plain modules, no process group (world size 1)")
    p.add_argument("--generate", type=int, default=0, metavar="N", help="also time generate() of N tokens")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--json", "--out", dest="json", default=None, help="write the summary here (JSON)")
    add_smoke_option(p)
    a = p.parse_args(argv)
    if a.smoke:
        a.preset, a.device, a.dtype, a.steps, a.warmup, a.generate = "tiny", "cpu", "fp32", 1, 0, a.generate or 2
    if a.tiny:
        a.preset = "tiny"
    if a.preset == "tiny":
        a.student, a.teacher = "tiny", "tiny-teacher"
        a.prompt_len, a.response_len, a.batch = min(a.prompt_len, 8), min(a.response_len, 24), min(a.batch, 2)
    return a


def launch_smoke(argv) -> int:
    """--smoke outside torchrun: this command again on 2 processes (torchrun, gloo), its summary in a
    temporary folder unless --json names one."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not any(arg in ("--json", "--out") or arg.startswith(("--json=", "--out=")) for arg in argv):
        argv += ["--json", str(smoke_dir("throughput_fsdp") / "throughput_fsdp.json")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__, *argv]
    return subprocess.run(cmd).returncode


def setup(a, ctx):
    """(config, models, optimizer): the student sharded (FSDP2) when a process group is up."""
    dev = ctx.device
    compute = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    # Student: float32 master weights (the optimizer's), compute in `compute` through FSDP2's policy.
    student = build(a.student, torch.float32 if ctx.distributed else compute, dev, 0, a.attn)
    teacher = build(a.teacher, compute, dev, 1, a.attn)
    if ctx.distributed:
        parallel.shard_model(student, param_dtype=compute, reduce_dtype=torch.float32)
    parallel.prepare_teacher(teacher, a.teacher_mode)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-6, betas=(0.9, 0.98), weight_decay=0.1)
    cfg = load_config(None, [f"loss.strategy={a.strategy}", f"loss.estimator={a.estimator}",
                             f"loss.keep_ratio={a.keep_ratio}", f"loss.top_k={a.top_k}", f"loss.backend={a.backend}",
                             f"rollout.micro_batch_size={a.batch}", "loss.vocab_size=null"])
    return cfg, run.Models(student, teacher, tokenizer=None, task=None), opt


def synthetic_rollout(a, ctx, vocab: int) -> Rollout:
    """Random tokens (the step's cost does not depend on them), each rank its own; the last
    ``response_len`` tokens of every sequence are the response."""
    seq_len = a.prompt_len + a.response_len
    g = torch.Generator(device="cpu").manual_seed(1000 + ctx.rank)
    ids = torch.randint(0, vocab, (a.batch, seq_len), generator=g).to(ctx.device)
    resp = torch.zeros_like(ids)
    resp[:, a.prompt_len:] = 1
    return Rollout(ids, torch.ones_like(ids), resp, a.prompt_len)


def timer(dev):
    """``timed(fn) -> (fn(), seconds)``, synchronising a CUDA device before and after."""
    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def timed(fn):
        sync()
        t = time.perf_counter()
        out = fn()
        sync()
        return out, time.perf_counter() - t

    return timed


def timed_steps(a, ctx, cfg, models, opt, mbs, timed) -> list[dict]:
    """``a.warmup + a.steps`` training steps, each phase timed; the rows of the timed steps."""
    rows = []
    for step in range(a.warmup + a.steps):
        (stats, t_out), t_stats = timed(lambda: run.compute_stats(cfg, models, mbs))
        (masks, norm, _), t_select = timed(lambda: run.select(cfg, stats, mbs, step))
        loss, t_loss = timed(lambda: sum(run.loss_backward(cfg, models, mb, t, st, k, norm)
                                         for mb, t, st, k in zip(mbs, t_out, stats, masks)))
        _, t_opt = timed(lambda: (opt.step(), opt.zero_grad(set_to_none=True)))
        del t_out
        row = dict(step=step, stats_s=t_stats, select_s=t_select, loss_backward_s=t_loss, optimizer_s=t_opt,
                   loss=float(parallel.all_reduce_sum(torch.as_tensor(loss, dtype=torch.float64))), kept=int(norm),
                   valid=int(parallel.all_reduce_sum(sum(mb.valid.sum() for mb in mbs))))
        row["step_s"] = t_stats + t_select + t_loss + t_opt
        if step >= a.warmup:
            rows.append(row)
        if ctx.is_main:
            print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
    return rows


def summarize(a, ctx, rows: list[dict], gen_s) -> dict:
    step_s = sum(r["step_s"] for r in rows) / max(len(rows), 1)
    dev = ctx.device
    return dict(
        student=a.student, teacher=a.teacher, world_size=ctx.world_size, sharded=ctx.distributed,
        teacher_mode=a.teacher_mode, dtype=a.dtype, batch_per_rank=a.batch, prompt_len=a.prompt_len,
        response_len=a.response_len, keep_ratio=a.keep_ratio, strategy=a.strategy, estimator=a.estimator,
        step_s=step_s, response_tokens_per_s=a.batch * a.response_len * ctx.world_size / max(step_s, 1e-12),
        **{f"mean_{k}": sum(r[k] for r in rows) / max(len(rows), 1)
           for k in ("stats_s", "select_s", "loss_backward_s", "optimizer_s")},
        generate_s=gen_s,
        peak_memory_gib=torch.cuda.max_memory_allocated(dev) / 2 ** 30 if dev.type == "cuda" else None,
        **metadata(dev),
    )


def main(argv=None):
    a = parse_args(argv)
    if a.smoke and not a.no_shard and not parallel.launched_by_torchrun():
        raise SystemExit(launch_smoke(argv))
    ctx = parallel.init_distributed(device=a.device, force=not a.no_shard)
    cfg, models, opt = setup(a, ctx)
    ro = synthetic_rollout(a, ctx, models.student.config.vocab_size)
    mbs = run.micro_batches(cfg, ro, seq_offset=ctx.rank * a.batch)
    timed = timer(ctx.device)
    rows = timed_steps(a, ctx, cfg, models, opt, mbs, timed)
    gen_s = None
    if a.generate:
        prompt = ro.input_ids[:, : a.prompt_len]
        _, gen_s = timed(lambda: models.student.generate(
            input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=a.generate,
            min_new_tokens=a.generate, do_sample=True, pad_token_id=0, synced_gpus=ctx.world_size > 1))
    summary = summarize(a, ctx, rows, gen_s)
    if ctx.is_main:
        print(json.dumps(summary, indent=1))
        if a.json:
            Path(a.json).write_text(json.dumps(summary, indent=1))
    parallel.destroy_distributed(ctx)
    return summary


if __name__ == "__main__":
    main()
