"""Preparation of the built-in teacher and student: SFT on the built-in task, cached on disk.

On a 2-core CPU a full-vocabulary (151,936-way) softmax would dominate every SFT step, so SFT runs on
an exactly equivalent compact model; the models that come out are ordinary full-vocabulary Qwen3 models.
1. Compact SFT: the same architecture with an embedding over the task's tokens (digits, '+', '=', EOS:
   their real Qwen ids mapped to 0..k-1) plus R "distractor" rows. Each distractor row stands for
   M / R of the M = 151,936 - k tokens the task never uses: its logit gets + log(M / R) in the
   softmax, so the compact cross-entropy equals the full-vocabulary cross-entropy of the expanded model.
   Cross-entropy on the answer tokens only.
2. Expansion: the task rows go to their Qwen ids in a 151,936-row (tied) embedding; every other row
   is a copy of its distractor row plus tiny noise (std 1e-3). An optional ``calib_steps`` of real
   full-vocabulary cross-entropy follow; the full-vocabulary CE is measured and logged either way.
The teacher (larger) gets many SFT steps, the student (smaller) few: a weaker start for OPD.
Results are cached under ``sft.cache_dir`` keyed by everything that affects them; later runs load them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import shutil
import time
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Optional

import torch
import torch.nn.functional as F

from .head import lm_head_weight
from .models import QWEN3_VOCAB, tiny_qwen3_config
from .rollout import generate

PREP_VERSION = 5  # 4: expansion noise from a CPU generator; shipped compact weights. 5: early stop on validation pairs
DISTRACTORS = 64


def task_token_ids(task, tokenizer) -> List[int]:
    if hasattr(task, "token_ids"):  # a task that lists its own tokens (lookup: hundreds of words)
        return task.token_ids(tokenizer)
    ids = {tokenizer.eos_id}
    if task.name == "long_arithmetic":  # every character is one token (checked on held-out and train samples)
        for ch in task.alphabet():
            ids.update(tokenizer.encode(ch))
        rng = random.Random(0)
        examples = task.eval_examples() + task.validation_examples() + [task.train_example(rng) for _ in range(256)]
        for ex in examples:
            got = set(tokenizer.prompt_ids(ex.prompt)) | set(tokenizer.encode(ex.target))
            if not got <= ids:
                raise ValueError(f"long_arithmetic: {ex.prompt!r} tokenizes outside the task alphabet")
        return sorted(ids)
    for ex in task.eval_examples() + task.validation_examples():
        ids.update(tokenizer.prompt_ids(ex.prompt))
        ids.update(tokenizer.encode(ex.target))
    for a in range(task.max_operand + 1):  # covers every train pair's tokens (digits and operators)
        ex = task.format(a, a)
        ids.update(tokenizer.prompt_ids(ex.prompt))
        ids.update(tokenizer.encode(ex.target))
    return sorted(ids)


def sft_batch(examples, tokenizer, device, id_map: Dict[int, int] = None):
    """Right-padded prompt+answer+EOS; ``targets``: positions t whose hidden state predicts an answer token."""
    seqs, starts = [], []
    skips = []
    for ex in examples:
        p = tokenizer.prompt_ids(ex.prompt)
        r = tokenizer.encode(ex.target) + [tokenizer.eos_id]
        if ex.unscored and len(r) != len(ex.target) + 1:
            raise ValueError(f"unscored characters need one token per character: {ex.target!r}")
        seqs.append(p + r)
        starts.append(len(p))
        # unscored: characters (one token each); unscored_tokens: response tokens (lookup's corrupted words)
        skips.append({len(p) + c for c in ex.unscored} | {len(p) + i for i in getattr(ex, "unscored_tokens", ())})
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), tokenizer.pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    rows, cols, labels = [], [], []
    for i, (s, st, skip) in enumerate(zip(seqs, starts, skips)):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
        for t in range(st, len(s)):
            if t in skip:
                continue
            rows.append(i)
            cols.append(t - 1)
            labels.append(s[t])
    if id_map is not None:
        ids = ids.apply_(lambda x: id_map.get(x, 0))
        labels = [id_map[x] for x in labels]
    return (ids.to(device), mask.to(device), torch.tensor(rows, device=device), torch.tensor(cols, device=device),
            torch.tensor(labels, device=device))


def _lr_lambda(steps: int, warmup: int = 20, floor: float = 0.1) -> Callable[[int], float]:
    def f(i):
        if i < warmup:
            return (i + 1) / warmup
        prog = (i - warmup) / max(1, steps - warmup)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(prog, 1.0)))
    return f


def _ce_step(model, opt, sched, batch, clip=1.0, logit_offset=None):
    ids, mask, rows, cols, labels = batch
    h = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
    logits = h[rows, cols] @ lm_head_weight(model).T  # answer positions only
    if logit_offset is not None:
        logits = logits + logit_offset
    loss = F.cross_entropy(logits.float(), labels)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    sched.step()
    return float(loss.detach())


def _adamw(params, lr, device):
    fused = device.type in ("cpu", "cuda")
    try:
        return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.0, fused=fused)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.0)


@torch.no_grad()
def compact_accuracy(model, task, tokenizer, id_map, device, score: Optional[Callable] = None) -> float:
    """Greedy accuracy on the task's validation pairs (never trained on, and not the held-out set the
    driver reports: the early stop that reads this number must not choose the models on the held-out set).
    ``score``: a phase's own measure of the (response, example) pairs (``SFTPhase``) instead of ``task.check``."""
    inv = {v: k for k, v in id_map.items()}
    examples = task.validation_examples()
    prompts = [[id_map[t] for t in tokenizer.prompt_ids(ex.prompt)] for ex in examples]
    ro = generate(model, prompts, max_new_tokens=getattr(task, "max_response_tokens", 6), eos_ids=[id_map[tokenizer.eos_id]], pad_id=id_map[tokenizer.eos_id],
                  greedy=True)
    texts = [tokenizer.decode([inv[t] for t in resp if inv[t] != tokenizer.eos_id]) for resp in ro.response_ids]
    if score is not None:
        return score(list(zip(texts, examples)))
    return sum(task.check(text, ex.answer) for text, ex in zip(texts, examples)) / len(examples)


class SFTPhase(NamedTuple):
    """One phase of a compact SFT: its examples, and its early stop (``score`` of the greedy validation
    (response, example) pairs reaching ``target``; None: the fraction ``task.check`` accepts)."""

    name: str
    example: Callable
    score: Optional[Callable]
    target: float


def sft_phases(task, role: str, rng: random.Random, target: float, noise: float) -> List[SFTPhase]:
    """The compact SFT of ``role`` as phases run in order: the task's own (``task.sft_phases``: role-specific
    example streams and early stops, as lookup's student needs), else one phase of training examples
    (corrupted ones, ``task.corrupted_example``, with probability ``noise``) until accuracy ``target``."""
    if hasattr(task, "sft_phases"):
        return [SFTPhase(*p) for p in task.sft_phases(role, rng, target, noise)]

    def example():
        return task.corrupted_example(rng) if noise and rng.random() < noise else task.train_example(rng)

    return [SFTPhase("sft", example, None, target)]


def compact_sft(arch, steps: int, task, tokenizer, sft, *, seed: int, device, log=print, tag="model",
                target: float = 1.0, noise: float = 0.0):
    """Compact SFT (step 1 of the module docstring) with its early stop. Returns (compact model, info).

    Seeded, on one thread (``prepare_builtin``), with deterministic algorithms: the same trajectory on
    machines whose float kernels agree. Kernels differ between CPUs (vector widths, BLAS builds), so
    the run is not bitwise reproducible across machines: that is what the shipped weights are for."""
    vocab = task_token_ids(task, tokenizer)
    id_map = {t: i for i, t in enumerate(vocab)}
    k, r = len(vocab), DISTRACTORS
    unused = QWEN3_VOCAB - k
    offset = torch.zeros(k + r, device=device)
    offset[k:] = math.log(unused / r)  # each distractor row stands for unused / r tokens
    torch.manual_seed(seed)
    compact_cfg = tiny_qwen3_config(arch, vocab_size=k + r, special_id=id_map[tokenizer.eos_id])
    from transformers import Qwen3ForCausalLM

    model = Qwen3ForCausalLM(compact_cfg).to(device)
    opt = _adamw(model.parameters(), sft.lr, device)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(steps))
    phases = sft_phases(task, tag, random.Random(seed), target, noise)
    t0 = time.time()
    loss = float("nan")
    acc_compact, done = 0.0, 0
    for phase in phases:  # one budget of ``steps`` for all phases
        name = f" ({phase.name})" if len(phases) > 1 else ""
        while done < steps:
            batch = sft_batch([phase.example() for _ in range(sft.batch_size)], tokenizer, device, id_map)
            loss = _ce_step(model, opt, sched, batch, logit_offset=offset)
            done += 1
            if done % sft.eval_every == 0 or done == steps:
                acc_compact = compact_accuracy(model, task, tokenizer, id_map, device, phase.score)
                if done % 250 == 0 or acc_compact >= phase.target or done == steps:
                    log(f"[prepare] {tag}: compact SFT{name} step {done}/{steps} loss {loss:.4f} "
                        f"validation accuracy {acc_compact:.3f} "
                        f"({time.time() - t0:.0f}s)")
                if acc_compact >= phase.target:  # early stop: the teacher is good enough / the student weak enough
                    break
    log(f"[prepare] {tag}: compact-model validation accuracy {acc_compact:.3f}")
    del opt
    return model, {"compact_accuracy": acc_compact, "compact_loss": loss, "steps": done, "sft_seconds": time.time() - t0,
                   "vocab": vocab}


def expand(model, vocab: List[int], arch, *, seed: int, device):
    """Step 2 of the module docstring: the compact model's rows to their Qwen ids in a 151,936-row tied
    embedding, every other row its distractor's plus noise of std 1e-3. The noise comes from a seeded
    CPU generator, so the expansion is the same on every machine and device."""
    from transformers import Qwen3ForCausalLM

    k, r = len(vocab), DISTRACTORS
    torch.manual_seed(seed + 1)
    full = Qwen3ForCausalLM(tiny_qwen3_config(arch, vocab_size=QWEN3_VOCAB)).to(device)
    state = {n: v for n, v in model.state_dict().items() if "embed_tokens" not in n and "lm_head" not in n}
    _, unexpected = full.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    with torch.no_grad():
        small = model.get_input_embeddings().weight.to(device)
        emb = full.get_input_embeddings().weight  # tied: also the lm_head weight
        is_task = torch.zeros(QWEN3_VOCAB, dtype=torch.bool, device=device)
        is_task[torch.tensor(vocab, device=device)] = True
        others = (~is_task).nonzero().squeeze(1)
        gen = torch.Generator(device="cpu").manual_seed(seed + 2)
        noise = torch.randn(others.numel(), emb.shape[1], generator=gen, dtype=torch.float32)
        emb[others] = small[k + torch.arange(others.numel(), device=device) % r] + 1e-3 * noise.to(device, emb.dtype)
        emb[torch.tensor(vocab, device=device)] = small[:k]
    return full


def train_builtin(arch, steps: int, task, tokenizer, sft, *, seed: int, device, log=print, tag="model",
                  target: float = 1.0, shipped: Optional[Path] = None, noise: float = 0.0):
    """Compact SFT (or the shipped compact weights ``shipped``), expansion to the Qwen3 vocabulary,
    full-vocabulary calibration. Returns (model, info)."""
    t0 = time.time()
    if shipped is not None:
        model, info = load_compact(shipped, arch, device, tokenizer.eos_id)
        vocab = info["vocab"]
        if vocab != task_token_ids(task, tokenizer):
            raise ValueError(f"{shipped}: its vocabulary is not this task's tokens")
        id_map = {t: i for i, t in enumerate(vocab)}
        final = sft_phases(task, tag, random.Random(0), target, noise)[-1]  # what the record's accuracy measured
        acc = compact_accuracy(model, task, tokenizer, id_map, device, final.score)
        log(f"[prepare] {tag}: shipped compact weights {shipped.name} (validation accuracy {acc:.3f}, "
            f"recorded {info['compact_accuracy']:.3f} after {info['steps']} SFT steps)")
        info = dict(info, compact_accuracy_measured=acc, source="shipped")
    else:
        model, info = compact_sft(arch, steps, task, tokenizer, sft, seed=seed, device=device, log=log, tag=tag,
                                  target=target, noise=noise)
        vocab = info["vocab"]
        info["source"] = "trained"
    full = expand(model, vocab, arch, seed=seed, device=device)
    compact_state = model.state_dict()
    del model
    rng = random.Random(seed + 11)
    calib_loss = calibrate(full, task, tokenizer, sft, rng, device)
    full_ce = full_vocab_ce(full, task, tokenizer, sft, random.Random(seed + 7), device)
    log(f"[prepare] {tag}: expanded to {QWEN3_VOCAB} rows; full-vocabulary CE {full_ce:.4f} "
        f"(compact {info['compact_loss']:.4f}) ({time.time() - t0:.0f}s)")
    full.generation_config.eos_token_id = tokenizer.eos_id
    full.generation_config.pad_token_id = tokenizer.pad_id
    info = dict(info, full_vocab_ce=full_ce, calib_loss=calib_loss, seconds=time.time() - t0)
    return full, info, compact_state


# ---------------------------------------------------------------- shipped compact weights

SHIPPED_DIR = Path(__file__).resolve().parent / "prepared"


def save_compact(path: Path, state: dict, info: dict) -> None:
    """The compact model's weights (float32 safetensors) with its SFT record in the metadata."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {k: info[k] for k in ("compact_accuracy", "compact_loss", "steps", "vocab")}
    tensors = {n: v.detach().float().cpu().contiguous() for n, v in state.items() if n != "lm_head.weight"}
    save_file(tensors, str(path), metadata={"info": json.dumps(meta)})


def load_compact(path: Path, arch, device, eos_id: int):
    from safetensors import safe_open
    from safetensors.torch import load_file
    from transformers import Qwen3ForCausalLM

    with safe_open(str(path), framework="pt") as f:
        info = json.loads(f.metadata()["info"])
    state = load_file(str(path))
    vocab = info["vocab"]
    # as in compact_sft: the special (EOS / pad) id is EOS's compact id
    cfg = tiny_qwen3_config(arch, vocab_size=state["model.embed_tokens.weight"].shape[0],
                            special_id=vocab.index(eos_id))
    model = Qwen3ForCausalLM(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all("lm_head" in m for m in missing), (missing, unexpected)
    model.tie_weights()
    return model.to(device).eval(), info


def calibrate(full, task, tokenizer, sft, rng, device) -> float:
    """Optional: ``sft.calib_steps`` steps of full-vocabulary cross-entropy on answer positions (all weights)."""
    if sft.calib_steps == 0:
        return float("nan")
    opt = _adamw(full.parameters(), sft.calib_lr, device)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0)
    loss = float("nan")
    for _ in range(sft.calib_steps):
        batch = sft_batch([task.train_example(rng) for _ in range(sft.calib_batch_size)], tokenizer, device)
        loss = _ce_step(full, opt, sched, batch)
    return loss


@torch.no_grad()
def full_vocab_ce(full, task, tokenizer, sft, rng, device) -> float:
    ids, mask, rows, cols, labels = sft_batch([task.train_example(rng) for _ in range(sft.calib_batch_size)],
                                              tokenizer, device)
    h = full.model(input_ids=ids, attention_mask=mask).last_hidden_state[rows, cols]
    return float(F.cross_entropy(h @ lm_head_weight(full).T, labels))


def prep_seed(cfg) -> int:
    """The seed the built-in models are prepared with: ``sft.seed``, else the run's ``seed``."""
    return cfg.seed if cfg.sft.seed is None else cfg.sft.seed


def _noise(cfg, role: str) -> list:
    """The corrupted-context share of this role's SFT as a key part: [sft.teacher_noise] for the teacher
    of a task with corrupted contexts (long_arithmetic, lookup), else []."""
    return [cfg.sft.teacher_noise] if role == "teacher" and cfg.data.source in ("long_arithmetic", "lookup") else []


def _data_key(cfg) -> list:
    """The task as a key part: its size and its split (reserved held-out and validation pair counts), not
    ``data.eval_size`` itself, since any held-out set within the reserve trains on the same pairs."""
    from .task import build_task

    d = cfg.data
    task = build_task(d, cfg.seed)
    return ([d.source, d.max_operand, list(task.split)]
            + ([d.digits, d.chain] if d.source == "long_arithmetic" else []) + list(getattr(task, "prep_key", ())))


def cache_key(cfg, role: str) -> str:
    """Everything that affects one prepared model (so changing the student's SFT keeps the cached teacher)."""
    sft = dataclasses.asdict(cfg.sft)
    blob = {
        "v": PREP_VERSION, "role": role, "arch": dataclasses.asdict(getattr(cfg, role).tiny),
        "steps": sft[f"{role}_steps"], "target": sft[f"{role}_target"],
        "sft": {k: v for k, v in sft.items() if k not in ("cache_dir", "teacher_steps", "student_steps",
                                                          "teacher_target", "student_target", "seed", "shipped",
                                                          "teacher_noise")},
        "noise": _noise(cfg, role),
        "data": _data_key(cfg), "seed": prep_seed(cfg),
        "distractors": DISTRACTORS, "torch": torch.__version__.split("+")[0],
    }
    if cfg.sft.seed is not None and cfg.data.source == "arithmetic":  # its held-out split follows the run's seed
        blob["split_seed"] = cfg.seed
    blob = json.dumps(blob, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def compact_key(cfg, role: str) -> str:
    """Everything that affects one compact SFT run (the name of its shipped weights): not the torch version,
    the cache folder or the calibration after the expansion."""
    sft = cfg.sft
    blob = {"v": 2, "role": role, "arch": dataclasses.asdict(getattr(cfg, role).tiny),
            "steps": getattr(sft, f"{role}_steps"), "target": getattr(sft, f"{role}_target"),
            "sft": [sft.batch_size, sft.lr, sft.eval_every] + _noise(cfg, role),
            "data": _data_key(cfg), "seed": prep_seed(cfg), "distractors": DISTRACTORS}
    if cfg.data.source == "arithmetic":  # its held-out split (never trained on) follows the run's seed
        blob["split_seed"] = cfg.seed
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:12]


def shipped_path(cfg, role: str) -> Path:
    return SHIPPED_DIR / f"{cfg.data.source}-{role}-{compact_key(cfg, role)}.safetensors"


def prepare_builtin(cfg, task, tokenizer, device, log=print) -> Dict[str, str]:
    """Directories of the built-in models the config asks for, training and caching them if needed.

    With ``sft.shipped`` (default) and compact weights for exactly this preparation in train/prepared/,
    no SFT runs: the shipped weights are expanded (deterministically), so every machine gets the same
    models. Otherwise compact SFT runs here (seeded, one thread, deterministic algorithms)."""
    from .task import BUILTIN_TASKS

    if cfg.data.source not in BUILTIN_TASKS:
        raise ValueError(f"student.path/teacher.path=builtin need a built-in task: data.source in {BUILTIN_TASKS}")
    root = Path(cfg.sft.cache_dir).expanduser()
    out = {}
    for role, arch, steps, target, seed_off in (
            ("teacher", cfg.teacher.tiny, cfg.sft.teacher_steps, cfg.sft.teacher_target, 1),
            ("student", cfg.student.tiny, cfg.sft.student_steps, cfg.sft.student_target, 2)):
        if getattr(cfg, role).path != "builtin":
            continue
        ship = shipped_path(cfg, role)
        use_shipped = getattr(cfg.sft, "shipped", True) and ship.is_file()
        final = root / f"{role}-{cache_key(cfg, role)}{'-shipped' if use_shipped else ''}"
        if (final / "prepared.json").is_file():
            log(f"[prepare] {role}: cached at {final}")
        else:
            log(f"[prepare] {role}: " + (f"expanding the shipped compact weights {ship.name}" if use_shipped else
                                         f"SFT from scratch ({steps} compact steps)") + f", caching at {final}")
            threads = torch.get_num_threads()
            deterministic = torch.are_deterministic_algorithms_enabled()
            torch.set_num_threads(1)  # tiny tensors: one thread is faster and deterministic
            torch.use_deterministic_algorithms(True, warn_only=True)
            try:
                model, info, compact = train_builtin(arch, steps, task, tokenizer, cfg.sft,
                                                     seed=prep_seed(cfg) * 1000 + seed_off, device=device, log=log,
                                                     tag=role, target=target, shipped=ship if use_shipped else None,
                                                     noise=sum(_noise(cfg, role)))
            finally:
                torch.set_num_threads(threads)
                torch.use_deterministic_algorithms(deterministic)
            tmp = root / f".{final.name}.tmp-{time.time_ns()}"
            model.save_pretrained(tmp)
            save_compact(tmp / "compact.safetensors", compact, info)
            info["compact_key"] = compact_key(cfg, role)
            (tmp / "prepared.json").write_text(json.dumps(info, indent=1))
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
        out[role] = str(final)
    return out


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m taopd_train.prepare [--export] [key=value ...]``: prepare (and cache) the built-in models
    of a config; ``--export`` also copies their compact weights into train/prepared/ for shipping."""
    import argparse

    from .config import load_config
    from .models import load_tokenizer
    from .task import build_task

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--config", default=None)
    ap.add_argument("--export", action="store_true")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args(argv)
    cfg = load_config(a.config, a.overrides)
    dirs = prepare_builtin(cfg, build_task(cfg.data, cfg.seed), load_tokenizer(cfg), torch.device("cpu"))
    for role, d in dirs.items():
        info = json.loads((Path(d) / "prepared.json").read_text())
        print(f"{role}: {d} (compact accuracy {info['compact_accuracy']:.3f}, {info['source']})")
        if a.export:
            dst = shipped_path(cfg, role)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(Path(d) / "compact.safetensors", dst)
            print(f"  exported {dst}")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
