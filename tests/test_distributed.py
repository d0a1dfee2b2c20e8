"""Multi-process training (taopd_train.parallel, .head, .checkpoint) on CPU with gloo: 2 processes == 1.

Also the driver (train/run.py) under torchrun: its step functions on 2 ranks == 1 process on the same
global rollout batch, and its DCP checkpoints resume at 2 ranks and in 1 process.

The 2-process runs go through ``torchrun`` (python -m torch.distributed.run) with this file as the
worker script; the 1-process runs happen in the test process, without a process group. Tiny Qwen3
models (hidden 32, 2 layers, vocabulary 1000, tied student embeddings) in float32.

Checked:
- one OPD step (the driver's phases: compute_stats, select, loss_backward) on the same global batch
  (5 sequences, split 3 + 2 over the ranks): the same loss, the same kept positions, the same
  gradients and the same AdamW update (in units of lr, see ``_assert_updates_close``), then a second step with the "random"
  strategy, the sampled estimator and min_per_sequence=2 (the global random draw, sequence ids);
- resume: the checkpoint written by the 2 processes after step 1, loaded in 1 process, gives the
  same weights after step 2 as the 2-process run (optimizer state included), and the other way round
  (1-process checkpoint into 2 sharded processes);
- the selection over ranks (``select_parts``, the driver's) for every strategy on uneven ranks with many
  ties == ``select_top`` on the concatenation; a sharded teacher gives the hidden states and full weight of a replicated one; the
  lm_head weight outside the forward is refused as a shard; bfloat16 compute (MixedPrecisionPolicy)
  runs and stays close to float32.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import torch

import taopd_train.parallel as parallel
from taopd_train import checkpoint, head, run
from taopd_train.config import load_config
from taopd_train.rollout import Rollout

from helpers import tied_selection_inputs

ROOT = Path(__file__).resolve().parents[1]

VOCAB = 1000
SEQS, T = 5, 16
STEP_OPTS = [
    dict(strategy="teachability", estimator="full", keep_ratio=0.1, min_per_sequence=1),
    dict(strategy="random", estimator="sampled", keep_ratio=0.2, min_per_sequence=2),
]
LR = 1e-2


def opd_step(student, teacher, ids, attn, resp, seq_offset: int, step: int = 0, **loss_opts):
    """The driver's phases (run.compute_stats -> run.select -> run.loss_backward) on this rank's rows.

    Returns (loss of all ranks, this rank's statistics with the global score/kept, the normaliser)."""
    opts = dict(strategy="teachability", estimator="full", keep_ratio=0.1, min_per_sequence=1)
    opts.update(loss_opts)
    cfg = load_config(None, [f"loss.{k}={v}" for k, v in opts.items()] + [
        "loss.top_k=8", "loss.backend=torch", "loss.vocab_size=null", "rollout.micro_batch_size=8", "seed=7"])
    models = run.Models(student, teacher, tokenizer=None, task=None)
    mbs = run.micro_batches(cfg, Rollout(ids, attn, resp, prompt_len=0), seq_offset=seq_offset)
    stats, teacher_out = run.compute_stats(cfg, models, mbs)
    masks, normalizer, allstats = run.select(cfg, stats, mbs, step)
    loss = sum(run.loss_backward(cfg, models, mb, t, st, k, normalizer)
               for mb, t, st, k in zip(mbs, teacher_out, stats, masks))
    return float(parallel.all_reduce_sum(torch.tensor(float(loss), dtype=torch.float64))), allstats, normalizer


def tiny_models():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    common = dict(vocab_size=VOCAB, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=8, max_position_embeddings=64, attn_implementation="eager")
    torch.manual_seed(0)
    student = Qwen3ForCausalLM(Qwen3Config(hidden_size=32, intermediate_size=64, tie_word_embeddings=True,
                                           **common)).float()
    torch.manual_seed(1)
    teacher = Qwen3ForCausalLM(Qwen3Config(hidden_size=48, intermediate_size=96, tie_word_embeddings=False,
                                           **common)).float()
    return student, teacher


def global_batch(step: int):
    """Rollout-shaped batch: left padding, prompts of 3-4 tokens, some responses end early (right pad)."""
    g = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(0, VOCAB, (SEQS, T), generator=g)
    attn = torch.ones(SEQS, T, dtype=torch.long)
    resp = torch.zeros(SEQS, T, dtype=torch.long)
    for i in range(SEQS):
        pad = i % 3
        attn[i, :pad] = 0
        ids[i, :pad] = 0
        start = pad + 3 + i % 2
        resp[i, start:] = 1
        if i == 2:  # response ended early
            attn[i, -3:] = 0
            resp[i, -3:] = 0
            ids[i, -3:] = 0
    return ids, attn, resp


def run_steps(out_path: Path, ckpt: Path, mode: str, teacher_mode: str = "shard") -> dict:
    """mode "train": steps 1 and 2, checkpoint after step 1; mode "resume": load, then step 2 only."""
    ctx = parallel.init_distributed(device="cpu")
    rank, world = ctx.rank, ctx.world_size
    student, teacher = tiny_models()
    if ctx.distributed:
        parallel.shard_model(student, param_dtype=None)
    parallel.prepare_teacher(teacher, teacher_mode)
    opt = torch.optim.AdamW(student.parameters(), lr=LR, betas=(0.9, 0.98), weight_decay=0.1)
    mine = parallel.shard_range(SEQS, rank, world)
    res: dict = {"world": world}

    def step(k: int):
        ids, attn, resp = (x[mine.start:mine.stop] for x in global_batch(k))
        res[f"before{k}"] = checkpoint.full_state_dict(student)
        loss, stats, normalizer = opd_step(student, teacher, ids, attn, resp, mine.start, step=k, **STEP_OPTS[k])
        res[f"grads{k}"] = _full_grads(student, rank)
        opt.step()
        opt.zero_grad(set_to_none=True)
        kept = _gather_objects(stats.kept.cpu(), world)
        res[f"loss{k}"] = loss
        res[f"kept{k}"] = torch.cat(kept) if kept else None
        res[f"num_kept{k}"] = int(normalizer)
        res[f"weights{k}"] = checkpoint.full_state_dict(student)
        if k == 1:
            parts = _gather_objects(stats.to("cpu"), world)
            res["summaries"] = {"global": stats.summary(all_reduce=parallel.all_reduce_sum),
                                "reference": _concat_summary(parts)}

    if mode == "train":
        step(0)
        checkpoint.save_dcp(ckpt, student, opt, train_state={"step": 1})
    else:
        res["train_state"] = checkpoint.load_dcp(ckpt, student, opt)
    step(1)

    if mode == "train" and ctx.distributed:
        res.update(extra_checks(ctx, student, teacher))
    if rank == 0:
        torch.save(res, out_path)
    parallel.destroy_distributed(ctx)
    return res


def _full_grads(model, rank) -> dict:
    """Full gradients by parameter name on rank 0 (collective for a sharded model)."""
    out = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:  # e.g. the driver's frozen embeddings
            continue
        g = p.grad.full_tensor() if parallel.is_sharded(model) else p.grad
        out[name] = g.detach().cpu().clone()
    return out if rank == 0 else {}


def _concat_summary(parts) -> dict:
    from taopd_kernels import TeachabilityStats

    return TeachabilityStats.concat(parts).summary()


def _gather_objects(x, world):
    import torch.distributed as dist

    if world == 1:
        return [x]
    out = [None] * world
    dist.all_gather_object(out, x)
    return out


def generation_prompts(rank: int):
    g = torch.Generator().manual_seed(50 + rank)
    ids = torch.randint(1, VOCAB, (2, 5), generator=g)
    attn = torch.ones_like(ids)
    ids[0, :2], attn[0, :2] = 0, 0  # left padding
    return ids, attn


SELECT_SPLITS = {"local": 9, "global": 7}  # rank 0 gets positions [0, split): 9 ends sequence 1, 7 cuts it


def extra_checks(ctx, student, teacher) -> dict:
    from taopd_kernels import STRATEGIES
    from taopd_kernels.selection import select_parts

    rank, world = ctx.rank, ctx.world_size
    out = {}
    # the driver's selection (select_parts) on uneven ranks: "local": sequence ids renumbered from 0 on each rank (made global
    # by the library); "global": ids shared by the ranks, one sequence split between them.
    ent, dis, mass, valid, seq = tied_selection_inputs()
    for ids_kind, split in SELECT_SPLITS.items():
        part = slice(0, split) if rank == 0 else slice(split, None)
        ids = seq[part] - seq[part].min() if ids_kind == "local" else seq[part]
        fake = types.SimpleNamespace(entropy_student=ent[part], disagreement=dis[part], teacher_mass=mass[part],
                                     valid=valid[part])
        for strategy in STRATEGIES:
            sel = select_parts([fake], strategy=strategy, keep_ratio=0.3, sequence_ids=[ids], min_per_sequence=2,
                               seed=3, global_sequence_ids=ids_kind == "global")
            out[f"select/{ids_kind}/{strategy}"] = torch.cat(_gather_objects(sel.keep_masks[0], world))
            out[f"select_count/{ids_kind}/{strategy}"] = sel.num_kept
    # generate() on a sharded student: ranks stop at different lengths (synced_gpus keeps the early
    # rank stepping); greedy tokens are checked against a plain model in the test process.
    gen_model, _ = tiny_models()
    parallel.shard_model(gen_model, param_dtype=None)
    p_ids, p_attn = generation_prompts(rank)
    gen = gen_model.generate(input_ids=p_ids, attention_mask=p_attn, max_new_tokens=2 + 3 * rank, do_sample=False,
                             pad_token_id=0, synced_gpus=True)
    out["generated"] = _gather_objects(gen.cpu(), world)
    # all_ranks_done: only rank 1 still has a running sequence.
    out["all_done_mixed"] = parallel.all_ranks_done(torch.tensor([True, rank == 0]))
    out["all_done_both"] = parallel.all_ranks_done(torch.tensor([True, True]))
    # HF export of the sharded (tied) student.
    out["weights_at_export"] = checkpoint.full_state_dict(student)
    checkpoint.export_hf_folder(student, Path(os.environ["TAOPD_TEST_EXPORT"]))
    # A sharded teacher hands out what a replica would.
    _, replica = tiny_models()
    parallel.prepare_teacher(replica, "replicate")
    mine = parallel.shard_range(SEQS, rank, world)
    ids, attn, resp = (x[mine.start:mine.stop] for x in global_batch(0))
    h1, w1, _ = head.teacher_forward(teacher, ids, attn)
    h2, w2, _ = head.teacher_forward(replica, ids, attn)
    out["teacher_hidden_diff"] = float((h1 - h2).abs().max())
    out["teacher_weight_equal"] = bool(torch.equal(w1, w2))
    # Outside the forward the student's lm_head weight is a shard: refused.
    try:
        head.check_full_weight(student.lm_head.weight, student.config)
        out["shard_refused"] = False
    except RuntimeError:
        out["shard_refused"] = True
    # bfloat16 compute, float32 reduction: runs, close to float32.
    s16, t16 = tiny_models()
    parallel.shard_model(s16, param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    parallel.prepare_teacher(t16, "shard")
    out["bf16_loss"], _, _ = opd_step(s16, t16, ids, attn, resp, mine.start, strategy="all")
    out["bf16_grad_finite"] = bool(torch.isfinite(s16.lm_head.weight.grad.full_tensor()).all())
    return out


# --------------------------------------------------------------------------------------------------
# pytest side


def _torchrun(tmp_path: Path, *args: str, nproc: int = 2) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", TAOPD_TEST_EXPORT=str(tmp_path / "hf"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), __file__, *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _assert_updates_close(one: tuple, two: tuple, grads: dict, lr: float, what: str):
    """One AdamW step of two runs, ``(weights before, weights after)`` each, measured in units of lr.

    Adam divides by |g|: where a gradient element is at the float32 noise level (the runs sum it in a
    different order) its update can be anything in about [-lr, lr] in either run, on any machine. So
    where |g| >= 1% of the tensor's largest gradient (~300x the observed noise, 50x the gradient
    tolerance of ``_assert_grads_close``) the updates must agree to 0.05 lr; elsewhere they must stay
    within about one step of each other. Absolute weights are not compared: a near-zero gradient
    element may legitimately end up ~2 lr apart."""
    (b1, a1), (b2, a2) = one, two
    assert a1.keys() == a2.keys() == b1.keys() == b2.keys(), what
    for k in a1:
        d1 = (a1[k].double() - b1[k].double()) / lr
        d2 = (a2[k].double() - b2[k].double()) / lr
        g = grads.get(k)
        if g is None:  # a tied alias (lm_head.weight is embed_tokens.weight) or frozen
            g = next((grads[n] for n in grads if torch.equal(b1[n], b1[k]) and torch.equal(a1[n], a1[k])), None)
        if g is None:
            assert not d1.any() and not d2.any(), f"{what}: {k} moved without a gradient"
            continue
        sure = g.abs() >= 1e-2 * float(g.abs().max())
        assert sure.any(), f"{what}: {k}: no well-determined gradient element"
        torch.testing.assert_close(d1[sure], d2[sure], rtol=0, atol=0.05, msg=lambda m: f"{what}: {k}: {m}")
        assert float((d1 - d2).abs().max()) <= 2.5, f"{what}: {k}: updates more than one step apart"


def _assert_grads_close(a: dict, b: dict, what: str):
    """Gradients before the optimizer step: float32 reduction-order noise only (observed: <= 3e-5 of the
    largest element of each tensor)."""
    assert a.keys() == b.keys(), what
    for k in a:
        scale = float(a[k].abs().max())
        assert scale > 0, f"{what}: {k} has no gradient"
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=2e-4 * scale, msg=lambda m: f"{what}: {k}: {m}")


def _weights_moved(before: dict, after: dict) -> bool:
    return any(not torch.allclose(before[k], after[k]) for k in before)


_CACHE: dict = {}


def _two_process_run(tmp_path_factory):
    if "two" not in _CACHE:
        d = tmp_path_factory.mktemp("dist2")
        _torchrun(d, "--out", str(d / "two.pt"), "--ckpt", str(d / "ckpt"), "--mode", "train")
        _CACHE["two"] = (d, torch.load(d / "two.pt", weights_only=False))
    return _CACHE["two"]


def _one_process_run(tmp_path_factory):
    if "one" not in _CACHE:
        d = tmp_path_factory.mktemp("dist1")
        _CACHE["one"] = (d, run_steps(d / "one.pt", d / "ckpt", "train"))
    return _CACHE["one"]


def test_two_processes_equal_one(tmp_path_factory):
    _, two = _two_process_run(tmp_path_factory)
    _, one = _one_process_run(tmp_path_factory)
    assert two["world"] == 2 and one["world"] == 1
    init = tiny_models()[0].state_dict()
    for k in (0, 1):
        assert one[f"num_kept{k}"] == two[f"num_kept{k}"] > 0
        assert torch.equal(one[f"kept{k}"], two[f"kept{k}"]), f"step {k}: kept positions differ"
        # Step 1 starts from weights that agree up to near-zero-gradient elements (_assert_updates_close).
        tol = dict(rel_tol=1e-5, abs_tol=1e-6) if k == 0 else dict(rel_tol=1e-4, abs_tol=1e-5)
        assert math.isclose(one[f"loss{k}"], two[f"loss{k}"], **tol), (k, one[f"loss{k}"], two[f"loss{k}"])
        _assert_grads_close(one[f"grads{k}"], two[f"grads{k}"], f"step {k} gradients")
        _assert_updates_close((one[f"before{k}"], one[f"weights{k}"]), (two[f"before{k}"], two[f"weights{k}"]),
                              one[f"grads{k}"], LR, f"step {k} update")
    assert _weights_moved({k: v.float() for k, v in init.items()}, one["weights0"])
    # min_per_sequence=2 in step 1: every sequence with >= 2 valid positions keeps >= 2.
    ids, attn, resp = global_batch(1)
    valid = resp[:, 1:].bool() & attn[:, 1:].bool()
    kept = one["kept1"].view(SEQS, T - 1)
    assert bool((kept <= valid).all())
    assert bool((kept.sum(1) >= torch.clamp(valid.sum(1), max=2)).all())


def test_resume_two_process_checkpoint_in_one_process(tmp_path_factory, tmp_path):
    d, two = _two_process_run(tmp_path_factory)
    resumed = run_steps(tmp_path / "resumed.pt", d / "ckpt", "resume")
    assert resumed["world"] == 1 and resumed["train_state"] == {"step": 1}
    assert torch.equal(resumed["kept1"], two["kept1"])
    assert math.isclose(resumed["loss1"], two["loss1"], rel_tol=1e-5, abs_tol=1e-6)
    _assert_grads_close(resumed["grads1"], two["grads1"], "resumed step 1 gradients")
    _assert_updates_close((resumed["before1"], resumed["weights1"]), (two["before1"], two["weights1"]),
                          two["grads1"], LR, "resumed step 1 update")


def test_resume_one_process_checkpoint_in_two_processes(tmp_path_factory, tmp_path):
    d, one = _one_process_run(tmp_path_factory)
    _torchrun(tmp_path, "--out", str(tmp_path / "resumed2.pt"), "--ckpt", str(d / "ckpt"), "--mode", "resume")
    resumed = torch.load(tmp_path / "resumed2.pt", weights_only=False)
    assert resumed["world"] == 2 and resumed["train_state"] == {"step": 1}
    assert torch.equal(resumed["kept1"], one["kept1"])
    assert math.isclose(resumed["loss1"], one["loss1"], rel_tol=1e-5, abs_tol=1e-6)
    _assert_grads_close(one["grads1"], resumed["grads1"], "resumed (2 processes) step 1 gradients")
    _assert_updates_close((one["before1"], one["weights1"]), (resumed["before1"], resumed["weights1"]),
                          one["grads1"], LR, "resumed (2 processes) step 1 update")


def test_selection_over_ranks_matches_concatenation(tmp_path_factory):
    from taopd_kernels import STRATEGIES, select_top, strategy_scores

    _, two = _two_process_run(tmp_path_factory)
    ent, dis, mass, valid, seq = tied_selection_inputs()
    for strategy in STRATEGIES:
        score = strategy_scores(strategy, entropy=ent, disagreement=dis, teacher_mass=mass, valid=valid, seed=3)
        ref = valid.clone() if strategy == "all" else select_top(
            score, valid, keep_ratio=0.3, sequence_ids=seq, min_per_sequence=2)
        for ids_kind in SELECT_SPLITS:
            assert torch.equal(two[f"select/{ids_kind}/{strategy}"], ref), (ids_kind, strategy)
            assert two[f"select_count/{ids_kind}/{strategy}"] == int(ref.sum())


def test_helpers_under_two_processes(tmp_path_factory):
    from transformers import Qwen3ForCausalLM

    d, two = _two_process_run(tmp_path_factory)
    assert two["all_done_mixed"] is False and two["all_done_both"] is True
    exported = Qwen3ForCausalLM.from_pretrained(str(d / "hf")).state_dict()
    for k, v in two["weights_at_export"].items():
        assert torch.equal(exported[k], v), k
    # stats.summary(all_reduce=) == the single-process summary of the same (concatenated) statistics
    summaries = two["summaries"]
    assert summaries["global"]["num_kept"] == two["num_kept1"]
    for key, ref in summaries["reference"].items():
        assert math.isclose(summaries["global"][key], ref, rel_tol=1e-9, abs_tol=1e-12), key


def test_sharded_teacher_full_weight_and_bf16(tmp_path_factory):
    _, two = _two_process_run(tmp_path_factory)
    assert two["teacher_weight_equal"]
    assert two["teacher_hidden_diff"] < 1e-5
    assert two["shard_refused"]
    assert two["bf16_grad_finite"]
    assert math.isclose(two["bf16_loss"], _fp32_all_loss(), rel_tol=0.05, abs_tol=1e-2)


def test_generate_on_sharded_student(tmp_path_factory):
    _, two = _two_process_run(tmp_path_factory)
    plain, _ = tiny_models()
    for rank, got in enumerate(two["generated"]):
        ids, attn = generation_prompts(rank)
        want = plain.generate(input_ids=ids, attention_mask=attn, max_new_tokens=2 + 3 * rank, do_sample=False,
                              pad_token_id=0)
        assert torch.equal(got, want), rank


def _fp32_all_loss() -> float:
    s, t = tiny_models()
    ids, attn, resp = global_batch(0)
    return opd_step(s, parallel.prepare_teacher(t, "replicate"), ids, attn, resp, 0, strategy="all")[0]


def test_full_head_is_the_shifted_forward():
    """head.call_with_full_head on a plain model: hidden[:, :-1] of the final-norm states, the tied weight."""
    s, _ = tiny_models()
    ids, attn, resp = global_batch(0)
    h, w, b = head.call_with_full_head(s, ids, attn, lambda h, w, b: (h, w, b))
    assert torch.equal(h, head.final_hidden(s, ids, attn)[:, :-1]) and b is None
    assert w is s.get_input_embeddings().weight  # tied
    valid, sampled = head.loss_positions(ids, resp, attn)
    assert valid.shape == sampled.shape == h.shape[:2] and torch.equal(sampled, ids[:, 1:])


def test_unit_helpers():
    from taopd_train.rollout import make_rollout_engine

    assert [list(parallel.shard_range(5, r, 2)) for r in range(2)] == [[0, 1, 2], [3, 4]]
    assert [len(parallel.shard_range(2, r, 4)) for r in range(4)] == [1, 1, 0, 0]
    assert make_rollout_engine("hf") is None
    try:
        import vllm  # noqa: F401
    except ImportError:
        import pytest

        with pytest.raises(RuntimeError, match="vllm"):
            make_rollout_engine("vllm", "some/path")
    ctx = parallel.init_distributed(device="cpu")
    assert not ctx.distributed and ctx.world_size == 1


# --------------------------------------------------------------------------------------------------
# The driver (train/run.py) under torchrun


def _driver_args(tmp_path: Path) -> list:
    from taopd_train.config import TinyArch
    from taopd_train.models import tiny_qwen3_config

    files = {}
    for role, arch in (("student", TinyArch(32, 1, 2, 1, 64)), ("teacher", TinyArch(48, 1, 2, 1, 96))):
        d = tmp_path / f"{role}_arch"
        tiny_qwen3_config(arch).save_pretrained(d)
        files[role] = str(d / "config.json")
    return [f"student.random_init=true", f"student.config_file={files['student']}",
            "teacher.random_init=true", f"teacher.config_file={files['teacher']}",
            "rollout.batch_size=6", "rollout.micro_batch_size=2", "rollout.max_new_tokens=4", "loss.keep_ratio=0.2",
            "data.eval_size=8", "eval.batch_size=8", "eval.max_new_tokens=4", "eval.at_start=false", "eval.every=0",
            "logging.tensorboard=false", "logging.progress_bar=false", "logging.plot=false", "threads=1",
            "optim.warmup_steps=1", "checkpoint.keep_last=0", "optim.steps=2"]


def _run_driver(args: list, nproc: int) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    script = str(ROOT / "train" / "run.py")
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
               "127.0.0.1", "--master_port", str(_free_port()), script, *args]
    else:
        cmd = [sys.executable, script, *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


def _train_losses(out: Path) -> dict:
    import json

    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    assert len(train) == len({r["step"] for r in train}), "metrics written by more than one rank"
    return {r["step"]: r for r in train}


def test_driver_two_processes_checkpoint_resume(tmp_path):
    """torchrun train/run.py: FSDP2 student, sharded teacher, DCP checkpoints; a 2-process run resumed
    from its step-1 checkpoint (2 processes) reproduces step 2; 1 process resumes the same checkpoint."""
    args = _driver_args(tmp_path)
    _run_driver([*args, "checkpoint.every=1", f"logging.out_dir={tmp_path / 'two'}"], nproc=2)
    full = _train_losses(tmp_path / "two")
    assert sorted(full) == [1, 2] and all(r["num_kept"] > 0 for r in full.values())
    assert all(r["num_valid"] > 0 and math.isfinite(r["loss"]) for r in full.values())
    ckpt = tmp_path / "two" / "checkpoints" / "step_000001"
    assert (ckpt / "dcp" / ".metadata").is_file() and (ckpt / "trainer_state.pt").is_file()
    assert (tmp_path / "two" / "checkpoints" / "step_000002" / "student" / "model.safetensors").is_file()

    _run_driver([*args, f"checkpoint.resume={ckpt}", f"logging.out_dir={tmp_path / 'two_resumed'}"], nproc=2)
    resumed = _train_losses(tmp_path / "two_resumed")
    assert sorted(resumed) == [2]
    assert math.isclose(resumed[2]["loss"], full[2]["loss"], rel_tol=1e-6, abs_tol=1e-9)
    assert resumed[2]["num_kept"] == full[2]["num_kept"]

    _run_driver([*args, f"checkpoint.resume={ckpt}", f"logging.out_dir={tmp_path / 'one_resumed'}"], nproc=1)
    one = _train_losses(tmp_path / "one_resumed")
    assert sorted(one) == [2] and math.isfinite(one[2]["loss"])


def test_driver_bf16_mixed_two_processes_resume_is_bit_identical(tmp_path):
    """precision=bf16-mixed under torchrun: fp32 parameters (master weights) sharded by FSDP2 with bf16
    all-gathers; a 2-process run resumed from its step-1 DCP checkpoint ends with the same weights,
    bit for bit, as the uninterrupted run; the export is a complete fp32 HF folder with a manifest."""
    from safetensors.torch import load_file

    from taopd_train import checkpoint as ck

    args = [*_driver_args(tmp_path), "precision=bf16-mixed", "checkpoint.every=1"]
    _run_driver([*args, f"logging.out_dir={tmp_path / 'full'}"], nproc=2)
    step1 = tmp_path / "full" / "checkpoints" / "step_000001"
    assert ck.verify_checkpoint(step1) is None
    _run_driver([*args, f"checkpoint.resume={step1}", f"logging.out_dir={tmp_path / 'resumed'}"], nproc=2)
    a = load_file(str(tmp_path / "full" / "checkpoints" / "step_000002" / "student" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "checkpoints" / "step_000002" / "student" / "model.safetensors"))
    assert all(v.dtype == torch.float32 for v in a.values())  # fp32 master weights
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "resume is not bit-identical"
    assert (tmp_path / "full" / "checkpoints" / "step_000002" / "student" / "tokenizer.json").is_file()
    full, resumed = _train_losses(tmp_path / "full"), _train_losses(tmp_path / "resumed")
    assert resumed[2]["loss"] == full[2]["loss"]


def driver_step(out_path: Path, cfg_args: list) -> dict:
    """One step of train/run.py's pieces (micro_batches -> compute_stats -> select -> loss_backward ->
    optimizer_step) on a fixed global rollout batch, this rank's rows of it."""
    ctx = parallel.init_distributed(device="cpu")
    rank, world = ctx.rank, ctx.world_size
    cfg = load_config(None, cfg_args)
    models = run.build_models(cfg, torch.device("cpu"), log=lambda m: None)
    run.wrap_models(cfg, models, ctx)
    opt, sched = run.build_optimizer(cfg, models.student)
    ids, attn, resp = global_batch(3)
    mine = parallel.shard_range(SEQS, rank, world)
    rows = slice(mine.start, mine.stop)
    ro = Rollout(ids[rows], attn[rows], resp[rows], prompt_len=5)
    mbs = run.micro_batches(cfg, ro, seq_offset=mine.start)
    stats, teacher_out = run.compute_stats(cfg, models, mbs)
    masks, normalizer, _ = run.select(cfg, stats, mbs, step=0)
    loss = sum(run.loss_backward(cfg, models, mb, t, st, k, normalizer)
               for mb, t, st, k in zip(mbs, teacher_out, stats, masks))
    res = {"world": world, "normalizer": normalizer, "loss": float(parallel.all_reduce_sum(torch.as_tensor(loss)))}
    res["kept"] = torch.cat(_gather_objects(torch.cat([m.reshape(-1) for m in masks]), world))
    res["grads"] = _full_grads(models.student, rank)
    res["before"] = checkpoint.full_state_dict(models.student)
    res["lr"] = sched.get_last_lr()[0]
    res["grad_norm"] = run.optimizer_step(cfg, models.student, opt, sched)
    res["weights"] = checkpoint.full_state_dict(models.student)
    if rank == 0:
        torch.save(res, out_path)
    parallel.destroy_distributed(ctx)
    return res


def test_driver_step_two_processes_equal_one(tmp_path):
    """train/run.py's step functions with an FSDP2 student and a sharded teacher on 2 ranks (3 + 2
    sequences, one micro-batch each: every rank must run the same number of collective forwards) ==
    the same functions in one process (two micro-batches of 3 + 2, gradient accumulation), with
    gradient clipping."""
    args = [*_driver_args(tmp_path), "rollout.micro_batch_size=3", "loss.estimator=sampled",
            "optim.max_grad_norm=1e-3", "optim.warmup_steps=0"]
    import json

    (tmp_path / "args.json").write_text(json.dumps(args))
    _torchrun(tmp_path, "--out", str(tmp_path / "two.pt"), "--ckpt", str(tmp_path / "unused"), "--mode", "driver",
              "--driver-args", str(tmp_path / "args.json"))
    two = torch.load(tmp_path / "two.pt", weights_only=False)
    one = driver_step(tmp_path / "one.pt", args)
    assert two["world"] == 2 and one["world"] == 1
    assert one["normalizer"] == two["normalizer"] > 0
    assert torch.equal(one["kept"], two["kept"])
    assert math.isclose(one["loss"], two["loss"], rel_tol=1e-5, abs_tol=1e-7)
    assert math.isclose(one["grad_norm"], two["grad_norm"], rel_tol=1e-4)
    assert one["grad_norm"] > 1e-3  # clipping was active
    _assert_grads_close(one["grads"], two["grads"], "driver step gradients")
    _assert_updates_close((one["before"], one["weights"]), (two["before"], two["weights"]), one["grads"],
                          one["lr"], "driver step update")


def _main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--mode", default="train", choices=["train", "resume", "driver"])
    p.add_argument("--driver-args", default=None, help="JSON list of config overrides (mode driver)")
    a = p.parse_args()
    if a.mode == "driver":
        import json

        driver_step(Path(a.out), json.loads(Path(a.driver_args).read_text()))
    else:
        run_steps(Path(a.out), Path(a.ckpt), a.mode)


if __name__ == "__main__":
    _main()
