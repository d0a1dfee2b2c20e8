"""Throughput of the sharded (FSDP2) TA-OPD training step on Qwen3 architectures with random weights.

No download: the models are built from the architecture numbers below with random weights. Rollouts
are random tokens (the step's cost does not depend on what the tokens are); ``--generate N`` also times
transformers generate() of N new tokens on the sharded student.

    # world size 1 on one GPU, the sharded path (a one-process group is created without torchrun):
    python train/throughput_fsdp.py --student qwen3-1.7b --teacher qwen3-4b --batch 8 \
        --prompt-len 256 --response-len 768
    # the same step without FSDP, for comparison:
    python train/throughput_fsdp.py --student qwen3-1.7b --teacher qwen3-4b --no-shard
    # several GPUs:
    torchrun --nproc_per_node=8 train/throughput_fsdp.py --student qwen3-4b --teacher qwen3-14b
    # CPU smoke test (tiny models, gloo):
    python train/throughput_fsdp.py --tiny --device cpu --steps 2 --warmup 1 --out /tmp/tp_fsdp.json

Per step (after ``--warmup`` steps): teacher forward, student forward + loss head (statistics, global
selection, fused loss), backward, optimizer step; tokens/s counts response tokens of all ranks.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from train import distributed as D  # noqa: E402

# Architecture numbers of the Qwen3 dense models (config.json of each; vocabulary 151,936).
QWEN3 = {
    "qwen3-0.6b": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, tie_word_embeddings=True),
    "qwen3-1.7b": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, tie_word_embeddings=True),
    "qwen3-4b": dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, tie_word_embeddings=True),
    "qwen3-8b": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, tie_word_embeddings=False),
    "qwen3-14b": dict(hidden_size=5120, intermediate_size=17408, num_hidden_layers=40, num_attention_heads=40,
                      num_key_value_heads=8, tie_word_embeddings=False),
    "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=True, vocab_size=1000, head_dim=8),
    "tiny-teacher": dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, tie_word_embeddings=False, vocab_size=1000, head_dim=8),
}
COMMON = dict(vocab_size=151936, head_dim=128, rms_norm_eps=1e-6, rope_theta=1_000_000.0,
              max_position_embeddings=40960, hidden_act="silu")


def build(name: str, dtype: torch.dtype, device: torch.device, seed: int, attn: str):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    if name not in QWEN3:
        raise SystemExit(f"unknown architecture {name!r}; choose from {sorted(QWEN3)}")
    cfg = Qwen3Config(**{**COMMON, **QWEN3[name]}, attn_implementation=attn)
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen3ForCausalLM(cfg)
    return model.to(dtype)


def _git_commit() -> str:
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT,
                              timeout=10).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def _version(mod: str):
    try:
        return __import__(mod).__version__
    except Exception:
        return None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--student", default="qwen3-1.7b")
    p.add_argument("--teacher", default="qwen3-4b")
    p.add_argument("--preset", choices=["tiny"], help="tiny student and teacher (CPU smoke test)")
    p.add_argument("--tiny", action="store_true", help="same as --preset tiny (as in train/throughput.py)")
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
    a = p.parse_args(argv)
    if a.tiny:
        a.preset = "tiny"
    if a.preset == "tiny":
        a.student, a.teacher = "tiny", "tiny-teacher"
        a.prompt_len, a.response_len, a.batch = min(a.prompt_len, 8), min(a.response_len, 24), min(a.batch, 2)

    ctx = D.init_distributed(device=a.device, force=not a.no_shard)
    dev = ctx.device
    compute = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    # Student: float32 master weights (the optimizer's), compute in `compute` through FSDP2's policy.
    student = build(a.student, torch.float32 if ctx.distributed else compute, dev, 0, a.attn)
    teacher = build(a.teacher, compute, dev, 1, a.attn)
    if ctx.distributed:
        D.shard_model(student, param_dtype=compute, reduce_dtype=torch.float32)
    else:
        D.attach_head(student)
    D.prepare_teacher(teacher, a.teacher_mode)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-6, betas=(0.9, 0.98), weight_decay=0.1)

    vocab = student.config.vocab_size
    seq_len = a.prompt_len + a.response_len
    g = torch.Generator(device="cpu").manual_seed(1000 + ctx.rank)
    ids = torch.randint(0, vocab, (a.batch, seq_len), generator=g).to(dev)
    attn = torch.ones_like(ids)
    resp = torch.zeros_like(ids)
    resp[:, a.prompt_len:] = 1

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def timed(fn):
        sync()
        t = time.perf_counter()
        out = fn()
        sync()
        return out, time.perf_counter() - t

    rows = []
    for step in range(a.warmup + a.steps):
        t_out, t_teacher = timed(lambda: D.teacher_forward(teacher, ids, attn))
        res, t_head = timed(lambda: D.opd_loss(student, ids, attn, resp, t_out, top_k=a.top_k,
                                               keep_ratio=a.keep_ratio, strategy=a.strategy,
                                               estimator=a.estimator, seed=step, backend=a.backend))
        _, t_back = timed(lambda: res.loss.backward())
        _, t_opt = timed(lambda: (opt.step(), opt.zero_grad(set_to_none=True)))
        del t_out
        row = dict(step=step, teacher_s=t_teacher, student_and_head_s=t_head, backward_s=t_back,
                   optimizer_s=t_opt, loss=float(res.global_loss), kept=res.selection.num_kept,
                   valid=res.selection.num_valid)
        row["step_s"] = t_teacher + t_head + t_back + t_opt
        if step >= a.warmup:
            rows.append(row)
        if ctx.is_main:
            print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)

    gen_s = None
    if a.generate:
        prompt = ids[:, : a.prompt_len]
        _, gen_s = timed(lambda: D.hf_generate(student, prompt, torch.ones_like(prompt), max_new_tokens=a.generate,
                                               min_new_tokens=a.generate, do_sample=True, pad_token_id=0))

    step_s = sum(r["step_s"] for r in rows) / max(len(rows), 1)
    summary = dict(
        student=a.student, teacher=a.teacher, world_size=ctx.world_size, sharded=ctx.distributed,
        teacher_mode=a.teacher_mode, dtype=a.dtype, batch_per_rank=a.batch, prompt_len=a.prompt_len,
        response_len=a.response_len, keep_ratio=a.keep_ratio, strategy=a.strategy, estimator=a.estimator,
        step_s=step_s, response_tokens_per_s=a.batch * a.response_len * ctx.world_size / max(step_s, 1e-12),
        **{f"mean_{k}": sum(r[k] for r in rows) / max(len(rows), 1)
           for k in ("teacher_s", "student_and_head_s", "backward_s", "optimizer_s")},
        generate_s=gen_s, device=str(dev),
        device_name=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        peak_memory_gib=torch.cuda.max_memory_allocated(dev) / 2 ** 30 if dev.type == "cuda" else None,
        git_commit=_git_commit(), torch=torch.__version__, transformers=_version("transformers"),
        date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    if ctx.is_main:
        print(json.dumps(summary, indent=1))
        if a.json:
            Path(a.json).write_text(json.dumps(summary, indent=1))
    D.destroy_distributed(ctx)
    return summary


if __name__ == "__main__":
    main()
