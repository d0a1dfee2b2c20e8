"""Multi-process TA-OPD training: process group, FSDP2 sharding, global selection, DCP checkpoints.

Everything here also works in one process without ``torchrun`` (no process group): then nothing is
sharded, the "global" selection is the local one and checkpoints are written by the one process. The
pieces, in the order a training step uses them (docs/distributed.md has the full story):

- ``init_distributed``: process group from the torchrun environment (NCCL on CUDA, gloo on CPU).
- ``shard_model``: FSDP2 ``fully_shard`` per decoder layer, then the root (embeddings, final norm and
  lm_head, tied or not, stay in the root's group). Gradients are *summed* over ranks, not averaged:
  every rank's loss is already divided by the global kept count, so the sum is the single-process
  gradient. ``prepare_teacher`` shards a frozen teacher or keeps a full replica.
- ``call_with_full_head``: runs a function on (final hidden states, full lm_head weight, bias) inside
  the root module's FSDP forward, where the lm_head weight is unsharded; the fused loss head never sees
  a shard. ``teacher_forward`` uses it to return the teacher's hidden states and full weight.
- ``global_select``: SPEC section 3 over the positions of all ranks (all_gather of three statistics,
  validity and sequence ids per position; no logits cross the network), rank order = global order.
- ``opd_loss``: one step's loss: statistics, global selection, ``fused_teachability_kl`` with the
  global keep mask and normaliser.
- ``save_checkpoint`` / ``load_checkpoint``: torch.distributed.checkpoint (resharding across world
  sizes, one process included).
- ``shard_prompts``, ``hf_generate`` and ``make_rollout_engine`` (vLLM, optional).
"""

from __future__ import annotations

import json
import math
import os
import socket
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist

from taopd_kernels import fused_teachability_kl, select_top, strategy_scores, teachability_stats

HEAD_METHOD = "_taopd_call_head"
TRAIN_STATE_FILE = "train_state.json"


# --------------------------------------------------------------------------------------------------
# Process group


@dataclass
class DistContext:
    """Where this process stands: rank, world size, device; ``distributed`` when a group exists."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    distributed: bool = False
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """True under torchrun / torch.distributed.run (or any launcher setting RANK and WORLD_SIZE)."""
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(device: Optional[str] = None, backend: Optional[str] = None,
                     force: bool = False) -> DistContext:
    """Process group from the torchrun environment; world size 1 without torchrun.

    Without torchrun and without ``force`` no process group is created (plain single-process run).
    ``force=True`` makes a one-process group (the sharded path at world size 1, e.g. for
    train/throughput_fsdp.py). ``device``: "cuda", "cpu" or None (CUDA when available); on CUDA each
    rank takes cuda:LOCAL_RANK. ``backend``: default NCCL on CUDA, gloo on CPU.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    want_cuda = torch.cuda.is_available() if device is None else str(device).startswith("cuda")
    if want_cuda:
        if not torch.cuda.is_available():
            raise RuntimeError(f"device={device!r} was asked for, but CUDA is not available")
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if dist.is_available() and dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, dev, True, False)
    if not launched_by_torchrun() and not force:
        return DistContext(0, 1, 0, dev, False, False)
    backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
    if launched_by_torchrun():
        dist.init_process_group(backend=backend)
    else:  # one-process group, without touching the environment
        dist.init_process_group(backend=backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0,
                                world_size=1)
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, dev, True, True)


def destroy_distributed(ctx: Optional[DistContext] = None) -> None:
    """Destroy the process group if ``init_distributed`` created it (or, without ctx, if one exists)."""
    if dist.is_available() and dist.is_initialized() and (ctx is None or ctx.initialized_here):
        dist.destroy_process_group()


def _world(group=None) -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def rank_world(group=None) -> tuple[int, int]:
    """(rank, world size); (0, 1) without a process group."""
    return _world(group)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(x: torch.Tensor, group=None) -> torch.Tensor:
    """Sum of a (detached) tensor over ranks; the tensor itself without a process group."""
    x = x.detach().clone()
    if _world(group)[1] > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
    return x


# --------------------------------------------------------------------------------------------------
# FSDP2


def _fsdp():
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
    return FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method


def is_sharded(model: torch.nn.Module) -> bool:
    return isinstance(model, _fsdp()[0])


def decoder_layers(model: torch.nn.Module) -> Sequence[torch.nn.Module]:
    """The transformer blocks of a transformers causal LM (Qwen2/Qwen3 and most decoders)."""
    base = getattr(model, "base_model", model)
    layers = getattr(base, "layers", None)
    if layers is None:
        raise ValueError(f"cannot find the decoder layers of {type(model).__name__} (expected .model.layers)")
    return list(layers)


def shard_model(model: torch.nn.Module, *, param_dtype: Optional[torch.dtype] = torch.bfloat16,
                reduce_dtype: Optional[torch.dtype] = torch.float32, reshard_after_forward: bool = True,
                mesh=None) -> torch.nn.Module:
    """FSDP2: ``fully_shard`` every decoder layer, then the root; returns the (same) module.

    Parameters stay in their dtype (keep the student in float32: those are the optimizer's master
    weights); ``param_dtype`` is the compute dtype of the all-gathered copies (None: no cast) and
    ``reduce_dtype`` the dtype of the gradient reduce-scatter. The embeddings, the final norm and the
    lm_head are managed by the root, which keeps tied input/output embeddings in one group.
    Gradients are summed over ranks (see ``sum_gradients``). Also attaches the full-head method.
    """
    _, MixedPrecisionPolicy, fully_shard, _ = _fsdp()
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    kwargs = dict(mp_policy=mp, reshard_after_forward=reshard_after_forward)
    if mesh is not None:
        kwargs["mesh"] = mesh
    for layer in decoder_layers(model):
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    sum_gradients(model)
    attach_head(model)
    return model


def sum_gradients(model: torch.nn.Module) -> None:
    """Make FSDP2 sum gradients over ranks instead of averaging them.

    Each rank's loss is (sum of its kept rows) / (global kept count), so the global loss is the *sum*
    of the rank losses and its gradient the sum of the rank gradients: with FSDP2's default average
    every gradient would be 1/world_size too small. A plain SUM reduction also works with gloo, which
    has neither AVG nor PREMUL_SUM.
    """
    FSDPModule = _fsdp()[0]
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)


def prepare_teacher(model: torch.nn.Module, mode: str = "shard", *, param_dtype: Optional[torch.dtype] = None,
                    device=None) -> torch.nn.Module:
    """Freeze the teacher; ``mode`` "shard" (FSDP2, no gradients) or "replicate" (a full copy per rank).

    Without a process group (or at world size 1 with "replicate") the model is left unsharded.
    """
    if mode not in ("shard", "replicate"):
        raise ValueError(f"teacher mode must be 'shard' or 'replicate', got {mode!r}")
    model.requires_grad_(False)
    model.eval()
    if device is not None:
        model.to(device)
    if mode == "shard" and dist.is_available() and dist.is_initialized():
        shard_model(model, param_dtype=param_dtype, reduce_dtype=None)
    else:
        attach_head(model)
    return model


# --------------------------------------------------------------------------------------------------
# The full lm_head for the fused loss head


def _head_method(self, input_ids, attention_mask, fn, position_ids=None, **model_kwargs):
    """Runs as (and inside) the root's FSDP forward: decoder -> hidden, then fn(hidden, W, b)."""
    if position_ids is None and attention_mask is not None:
        # Left-padded batches: positions count real tokens, as in generate().
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    out = self.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=False, **model_kwargs)
    head = self.get_output_embeddings()
    weight, bias = head.weight, getattr(head, "bias", None)
    check_full_weight(weight, self.config, what=f"{type(self).__name__}.lm_head.weight")
    return fn(out.last_hidden_state, weight, bias)


def check_full_weight(weight: torch.Tensor, config, what: str = "lm_head weight") -> None:
    """Refuse a sharded lm_head weight: a DTensor or fewer rows than the configured vocabulary."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        DTensor = ()
    if isinstance(weight, DTensor):
        raise RuntimeError(f"{what} is a DTensor shard {tuple(weight.to_local().shape)} of "
                           f"{tuple(weight.shape)}; call the loss head through call_with_full_head")
    vocab = getattr(config, "vocab_size", None)
    if vocab is not None and weight.shape[0] != vocab:
        raise RuntimeError(f"{what} has {weight.shape[0]} rows but the model's vocabulary is {vocab}: "
                           "a shard, not the full weight")


def attach_head(model: torch.nn.Module) -> torch.nn.Module:
    """Give ``model`` the method ``call_with_full_head`` uses, registered as an FSDP forward method.

    FSDP2 unshards the root's parameters (embeddings, norm, lm_head) only around a forward; the
    registration makes the method such a forward, so inside it ``lm_head.weight`` is the full,
    all-gathered weight, and its gradient goes back through FSDP's reduce-scatter to the shard (for
    tied embeddings: the one shared parameter, with the input-embedding gradient added).
    """
    if getattr(model, "_taopd_head_attached", False):
        return model
    setattr(model, HEAD_METHOD, types.MethodType(_head_method, model))
    _fsdp()[3](model, HEAD_METHOD)  # no-op for an unsharded model
    model._taopd_head_attached = True
    return model


def call_with_full_head(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor],
                        fn: Callable, **model_kwargs):
    """``fn(hidden [B, T, D], full lm_head weight [V, D], bias or None)`` inside the model's forward.

    Works for sharded and plain models alike. ``fn`` may run collectives (every rank calls it).
    """
    attach_head(model)
    return getattr(model, HEAD_METHOD)(input_ids, attention_mask, fn, **model_kwargs)


@torch.no_grad()
def teacher_forward(teacher: torch.nn.Module, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor],
                    **model_kwargs):
    """(hidden [B, T, D_t], full lm_head weight, bias): detached; a sharded teacher's weight is copied
    out of the forward (FSDP frees the all-gathered storage afterwards), so one full teacher lm_head
    per rank lives until the loss head has run."""
    sharded = is_sharded(teacher)

    def grab(h, w, b):
        keep = (lambda t: None if t is None else t.detach().clone()) if sharded else \
            (lambda t: None if t is None else t.detach())
        return h.detach(), keep(w), keep(b)

    return call_with_full_head(teacher, input_ids, attention_mask, grab, **model_kwargs)


@torch.no_grad()
def head_stats(student: torch.nn.Module, input_ids, attention_mask, teacher_hidden, teacher_weight,
               teacher_bias=None, *, position_ids=None, **stats_kwargs):
    """``teachability_stats`` of the student's positions 0..T-2 (position t predicts token t+1) against
    the teacher's ``teacher_hidden`` [B, T-1, D_t], with the student's full lm_head weight."""
    def fn(h, w, b):
        return teachability_stats(h[:, :-1], w, teacher_hidden, teacher_weight, student_bias=b,
                                  teacher_bias=teacher_bias, **stats_kwargs)

    return call_with_full_head(student, input_ids, attention_mask, fn, position_ids=position_ids)


def head_loss(student: torch.nn.Module, input_ids, attention_mask, teacher_hidden, teacher_weight,
              teacher_bias=None, *, position_ids=None, **loss_kwargs):
    """``fused_teachability_kl`` of positions 0..T-2 with the student's full lm_head weight, inside its
    (FSDP) forward; returns (loss, stats). Pass the global ``keep_mask`` and ``normalizer``."""
    def fn(h, w, b):
        return fused_teachability_kl(h[:, :-1], w, teacher_hidden, teacher_weight, student_bias=b,
                                     teacher_bias=teacher_bias, **loss_kwargs)

    return call_with_full_head(student, input_ids, attention_mask, fn, position_ids=position_ids)


# --------------------------------------------------------------------------------------------------
# Global selection


@dataclass
class GlobalSelection:
    """The selection over all ranks, seen from this rank."""

    keep_mask: torch.Tensor  # bool, this rank's positions (shape of ``valid``)
    score: torch.Tensor  # float32, this rank's slice of the global scores (NaN where not valid)
    num_kept: int  # kept positions over all ranks: the loss normaliser
    num_valid: int  # valid positions over all ranks
    offset: int  # where this rank's positions start in the global flat order
    num_positions: int  # positions (valid or not) over all ranks


def _gather_columns(x: torch.Tensor, group=None) -> list[torch.Tensor]:
    """all_gather of [C, n_r] tensors with different n_r (padded to the largest), in rank order."""
    rank, world = _world(group)
    if world == 1:
        return [x]
    n = torch.tensor([x.shape[1]], dtype=torch.long, device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n, group=group)
    sizes = [int(s) for s in sizes]
    width = max(sizes)
    if width == 0:
        return [x.new_zeros(x.shape[0], 0) for _ in range(world)]
    padded = x.new_zeros(x.shape[0], width)
    padded[:, : x.shape[1]] = x
    out = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(out, padded, group=group)
    return [o[:, :s] for o, s in zip(out, sizes)]


def default_sequence_ids(valid: torch.Tensor) -> Optional[torch.Tensor]:
    """The core's default: for [B, T] positions each row is a sequence; for [N], none."""
    if valid.dim() < 2:
        return None
    n = valid.numel()
    return torch.arange(n, device=valid.device).div(valid.shape[-1], rounding_mode="floor").view(valid.shape)


def global_select(stats, *, strategy: str = "teachability", keep_ratio: float = 0.05,
                  sequence_ids: Optional[torch.Tensor] = None, min_per_sequence: int = 1, seed: int = 0,
                  global_sequence_ids: bool = False, group=None) -> GlobalSelection:
    """SPEC section 3 over the positions of every rank, as one process would over the concatenation.

    ``stats``: this rank's ``TeachabilityStats`` (only entropy, D, C and ``valid`` are used). What
    crosses the network: per position five numbers (H_s, D, C, valid, local sequence number) as float64,
    padded to the longest rank. Every rank then computes the same global quantiles, scores, top-n (ties
    to the earlier position in rank order) and per-sequence top-up, and keeps its own slice.
    Sequence ids are made global by numbering each rank's sequences after the previous ranks' (so equal
    local ids on two ranks are two sequences); ``global_sequence_ids=True`` says the ids already are
    global (e.g. the prompt index), which also lets one sequence span two ranks. The
    global flat order is rank 0's positions (flattened), then rank 1's, ...: with [B_r, T] inputs padded
    to one T, that is the batch concatenated along B, so "random" draws the same numbers too.
    """
    valid = stats.valid
    shape = valid.shape
    device = valid.device
    if sequence_ids is None:
        sequence_ids = default_sequence_ids(valid)
    has_seq = sequence_ids is not None
    n = valid.numel()
    if has_seq and global_sequence_ids:
        seq_local = sequence_ids.reshape(-1).to(device).long()
        if seq_local.numel() and int(seq_local.abs().max()) >= 2 ** 53:
            raise ValueError("global sequence ids must be below 2**53 in magnitude")
    elif has_seq:
        _, seq_local = torch.unique(sequence_ids.reshape(-1).to(device), return_inverse=True)
    else:
        seq_local = torch.zeros(n, dtype=torch.long, device=device)
    packed = torch.stack([
        stats.entropy_student.reshape(-1).double(),
        stats.disagreement.reshape(-1).double(),
        stats.teacher_mass.reshape(-1).double(),
        valid.reshape(-1).double(),
        seq_local.double(),
    ])
    rank, world = _world(group)
    if world > 1:
        flags = torch.tensor([1 if has_seq else 0], dtype=torch.long, device=device)
        both = torch.stack([flags, -flags]).squeeze(1)
        dist.all_reduce(both, op=dist.ReduceOp.MIN, group=group)
        if int(both[0]) != -int(both[1]):
            raise ValueError("global_select: some ranks pass sequence ids and others do not "
                             "(use the same layout on every rank)")
    parts = _gather_columns(packed, group)
    sizes = [p.shape[1] for p in parts]
    offset = sum(sizes[:rank])
    seq_parts, base = [], 0
    for p in parts:
        s = p[4].long()
        if global_sequence_ids:
            seq_parts.append(s)
            continue
        seq_parts.append(s + base)
        base += int(s.max()) + 1 if s.numel() else 0
    allp = torch.cat(parts, dim=1)
    g_valid = allp[3] > 0.5
    score = strategy_scores(strategy, entropy=allp[0].float(), disagreement=allp[1].float(),
                            teacher_mass=allp[2].float(), valid=g_valid, seed=seed)
    if strategy == "all":
        kept = g_valid.clone()
    else:
        kept = select_top(score, g_valid, keep_ratio=keep_ratio,
                          sequence_ids=torch.cat(seq_parts) if has_seq else None,
                          min_per_sequence=min_per_sequence)
    mine = slice(offset, offset + n)
    return GlobalSelection(keep_mask=kept[mine].view(shape), score=score[mine].view(shape),
                           num_kept=int(kept.sum()), num_valid=int(g_valid.sum()), offset=offset,
                           num_positions=sum(sizes))


# --------------------------------------------------------------------------------------------------
# One step's loss


@dataclass
class OPDResult:
    loss: torch.Tensor  # this rank's share (global normaliser); call .backward() on it on every rank
    global_loss: torch.Tensor  # the loss of the whole batch (detached, summed over ranks)
    stats: object  # this rank's TeachabilityStats, with score/kept from the global selection
    selection: GlobalSelection


def response_positions(input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor],
                       response_mask: torch.Tensor):
    """Loss positions of a [B, T] rollout batch: position t predicts token t + 1.

    Returns (valid [B, T-1], sampled_ids [B, T-1]); valid = response token and not padding.
    """
    valid = response_mask[:, 1:].bool()
    if attention_mask is not None:
        valid = valid & attention_mask[:, 1:].bool()
    return valid, input_ids[:, 1:]


def opd_loss(student: torch.nn.Module, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor],
             response_mask: torch.Tensor, teacher_outputs, *, top_k: int = 16, keep_ratio: float = 0.05,
             strategy: str = "teachability", estimator: str = "full", temperature: float = 1.0,
             vocab_size: Optional[int] = None, min_per_sequence: int = 1, seed: int = 0,
             sequence_ids: Optional[torch.Tensor] = None, backend: str = "auto",
             chunk_rows: Optional[int] = None, chunk_vocab: Optional[int] = None, group=None) -> OPDResult:
    """The TA-OPD loss of this rank's rollouts with the selection taken over all ranks.

    ``teacher_outputs``: (hidden [B, T, D_t], weight, bias) from ``teacher_forward`` on the same tokens.
    The student's head runs inside its FSDP forward with the full lm_head weight; statistics are
    computed once (no autograd), the selection is global, and ``fused_teachability_kl`` gets the global
    keep mask and the global kept count as normaliser. Backward on ``result.loss`` on every rank (with
    ``shard_model``'s summed gradients) gives the single-process gradient of the whole batch.
    """
    h_t, w_t, b_t = teacher_outputs
    valid, sampled = response_positions(input_ids, attention_mask, response_mask)
    h_t = h_t[:, :-1]
    opts = dict(top_k=top_k, temperature=temperature, vocab_size=vocab_size, backend=backend,
                chunk_rows=chunk_rows, chunk_vocab=chunk_vocab)

    def head(h_s, w_s, b_s):
        h_s = h_s[:, :-1]
        stats = teachability_stats(h_s.detach(), w_s.detach(), h_t, w_t,
                                   student_bias=None if b_s is None else b_s.detach(), teacher_bias=b_t,
                                   valid_mask=valid, sequence_ids=sequence_ids, sampled_ids=sampled,
                                   keep_ratio=keep_ratio, strategy=strategy, min_per_sequence=min_per_sequence,
                                   seed=seed, **opts)
        sel = global_select(stats, strategy=strategy, keep_ratio=keep_ratio, sequence_ids=sequence_ids,
                            min_per_sequence=min_per_sequence, seed=seed, group=group)
        loss, stats = fused_teachability_kl(
            h_s, w_s, h_t, w_t, student_bias=b_s, teacher_bias=b_t, valid_mask=valid, sequence_ids=sequence_ids,
            sampled_ids=sampled, keep_ratio=keep_ratio, strategy=strategy, estimator=estimator,
            min_per_sequence=min_per_sequence, seed=seed, keep_mask=sel.keep_mask,
            normalizer=sel.num_kept if sel.num_kept > 0 else None, stats=stats, **opts)
        # The core stored a score from local quantiles; the global one is what was used.
        stats.score, stats.kept = sel.score, sel.keep_mask
        return loss, stats, sel

    loss, stats, sel = call_with_full_head(student, input_ids, attention_mask, head)
    return OPDResult(loss=loss, global_loss=all_reduce_sum(loss, group), stats=stats, selection=sel)


def all_ranks_done(done: torch.Tensor, group=None) -> bool:
    """For generation loops on a sharded model: stop only when every sequence of every rank is done
    (every forward is collective, so a rank that stops early would leave the others waiting)."""
    flag = (~done.bool()).any().to(torch.int32).reshape(1)
    if _world(group)[1] > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    return not bool(flag.item())


_SUMMARY_FIELDS = ("entropy_student", "kl_reverse", "kl_forward", "teacher_mass", "disagreement")


def global_summary(stats, group=None) -> dict:
    """``TeachabilityStats.summary()`` over the positions of all ranks (sums and counts all-reduced).

    ``stats.kept`` should be the global selection's local mask. Same keys as ``summary()``."""
    groups = {"all": stats.valid.bool()}
    if stats.kept is not None:
        groups["kept"] = stats.kept.bool()
    values = []
    for name in _SUMMARY_FIELDS:
        v = getattr(stats, name).double()
        for mask in groups.values():
            values += [v[mask].sum(), mask.sum().double()]
    values += [groups["all"].sum().double(), groups["kept"].sum().double() if "kept" in groups else
               torch.zeros((), dtype=torch.float64, device=stats.valid.device)]
    tot = all_reduce_sum(torch.stack(values), group).tolist()
    out = {"num_valid": int(tot[-2]), "num_kept": int(tot[-1])}
    out["kept_fraction"] = out["num_kept"] / max(out["num_valid"], 1)
    i = 0
    for name in _SUMMARY_FIELDS:
        for g in groups:
            s_, n_ = tot[i], tot[i + 1]
            out[f"{name}/{g}"] = s_ / n_ if n_ else float("nan")
            i += 2
    return out


# --------------------------------------------------------------------------------------------------
# Prompts and rollouts


def shard_range(n: int, rank: int, world_size: int) -> range:
    """Contiguous block of ``n`` items for ``rank``: the first n % world ranks get one more.

    Contiguous (not strided) so that concatenating the ranks' shards in rank order is the global
    order, which is the order the global selection uses.
    """
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def shard_prompts(prompts: Sequence, rank: Optional[int] = None, world_size: Optional[int] = None) -> list:
    if rank is None or world_size is None:
        rank, world_size = _world()
    return [prompts[i] for i in shard_range(len(prompts), rank, world_size)]


@torch.no_grad()
def hf_generate(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, **gen_kwargs):
    """transformers ``generate``; a sharded model needs every rank in every forward, so ranks keep
    stepping (``synced_gpus``) until all of them are done."""
    if is_sharded(model) and _world()[1] > 1:
        gen_kwargs.setdefault("synced_gpus", True)
    return model.generate(input_ids=input_ids, attention_mask=attention_mask, **gen_kwargs)


class VLLMRollout:
    """Optional vLLM rollouts: one colocated engine per rank (tensor parallel 1) on this rank's GPU.

    ``generate`` takes prompt token ids; ``sync_weights`` pushes the current student weights into the
    engine (call after each optimizer step, on every rank: it all-gathers the shards layer by layer).
    """

    def __init__(self, model_path: str, *, seed: int = 0, gpu_memory_utilization: float = 0.3,
                 dtype: str = "bfloat16", max_model_len: Optional[int] = None, **engine_kwargs):
        vllm = import_vllm()
        # In-process engine (so its model object is reachable for the weight sync) that reuses the
        # torchrun environment instead of starting its own workers (the colocated set-up TRL uses).
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        kwargs = dict(model=model_path, tensor_parallel_size=1, seed=seed, dtype=dtype,
                      gpu_memory_utilization=gpu_memory_utilization, enable_prefix_caching=False)
        if dist.is_available() and dist.is_initialized():
            kwargs["distributed_executor_backend"] = "external_launcher"
        if max_model_len is not None:
            kwargs["max_model_len"] = max_model_len
        kwargs.update(engine_kwargs)
        self._vllm = vllm
        self.llm = vllm.LLM(**kwargs)

    def generate(self, prompt_token_ids: Sequence[Sequence[int]], *, max_new_tokens: int,
                 temperature: float = 1.0, top_p: float = 1.0, seed: Optional[int] = None) -> list[list[int]]:
        params = self._vllm.SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                           seed=seed)
        prompts = [{"prompt_token_ids": list(map(int, p))} for p in prompt_token_ids]
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    def _loader(self):
        engine = self.llm.llm_engine
        for path in ("model_executor.driver_worker.worker.model_runner.model",
                     "engine_core.engine_core.model_executor.driver_worker.worker.model_runner.model",
                     "model_executor.driver_worker.model_runner.model"):
            obj = engine
            try:
                for part in path.split("."):
                    obj = getattr(obj, part)
                return obj.load_weights
            except AttributeError:
                continue
        return None

    def sync_weights(self, model: torch.nn.Module) -> None:
        def weights():
            for name, p in model.named_parameters():
                full = p.full_tensor() if hasattr(p, "full_tensor") else p
                yield name, full.detach()

        load = self._loader()
        if load is None:
            raise RuntimeError("cannot reach the vLLM engine's model to load weights into (this vLLM version "
                               "keeps it elsewhere); use rollout engine 'hf' or a vLLM version whose in-process "
                               "engine exposes llm_engine.model_executor.driver_worker.worker.model_runner.model")
        load(weights())


def import_vllm():
    try:
        import vllm  # noqa: F401
    except ImportError as e:
        raise RuntimeError(
            "rollouts are configured to use vLLM (rollout engine 'vllm'), but the vllm package is not "
            "installed in this environment: `pip install vllm`, or set the rollout engine to 'hf' "
            "(transformers generate)") from e
    return vllm


def make_rollout_engine(engine: str, model_path: Optional[str] = None, **kwargs):
    """None for "hf" (use ``hf_generate`` on the training student); a ``VLLMRollout`` for "vllm"."""
    if engine in (None, "hf"):
        return None
    if engine != "vllm":
        raise ValueError(f"rollout engine must be 'hf' or 'vllm', got {engine!r}")
    import_vllm()  # the clear error first, before anything else is checked
    if not model_path:
        raise ValueError("rollout engine 'vllm' needs the student's model path (a HF checkpoint directory)")
    return VLLMRollout(model_path, **kwargs)


# --------------------------------------------------------------------------------------------------
# Checkpoints


def _state_dict_api():
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions, get_model_state_dict, get_optimizer_state_dict, set_model_state_dict,
        set_optimizer_state_dict)
    return StateDictOptions, get_model_state_dict, get_optimizer_state_dict, set_model_state_dict, \
        set_optimizer_state_dict


def save_checkpoint(path, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                    train_state: Optional[dict] = None) -> None:
    """torch.distributed.checkpoint of the model (and optimizer) under ``path``; collective.

    Keys are parameter names (FQNs), values this rank's shards: DCP records the global layout, so the
    checkpoint loads at any world size, one process without a process group included. ``train_state``
    (JSON-serialisable: step, config, ...) is written by rank 0 next to it.
    """
    import torch.distributed.checkpoint as dcp
    _, get_msd, get_osd, _, _ = _state_dict_api()
    path = Path(path)
    state = {"model": get_msd(model)}
    if optimizer is not None:
        state["optim"] = get_osd(model, optimizer)
    dcp.save(state, checkpoint_id=str(path))
    if _world()[0] == 0:
        meta = {**(train_state or {}), "optimizer": optimizer is not None}
        (path / TRAIN_STATE_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True))
    barrier()


def load_checkpoint(path, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer] = None) -> dict:
    """Load a ``save_checkpoint`` directory into ``model`` (and ``optimizer``), resharding as needed.

    Call after ``shard_model`` (if sharding) and after creating the optimizer. Returns the train_state.
    """
    import torch.distributed.checkpoint as dcp
    _, get_msd, get_osd, set_msd, set_osd = _state_dict_api()
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no checkpoint directory at {path}")
    meta_file = path / TRAIN_STATE_FILE
    meta = json.loads(meta_file.read_text()) if meta_file.exists() else {}
    if not meta.get("optimizer", True):
        optimizer = None  # saved without optimizer state: the optimizer keeps its fresh state
    state = {"model": get_msd(model)}
    if optimizer is not None:
        state["optim"] = get_osd(model, optimizer)
    dcp.load(state, checkpoint_id=str(path))
    set_msd(model, state["model"])
    if optimizer is not None:
        set_osd(model, optimizer, state["optim"])
    return {k: v for k, v in meta.items() if k != "optimizer"}


def is_dcp_checkpoint(path) -> bool:
    """A directory written by ``save_checkpoint`` (DCP keeps its global layout in ``.metadata``)."""
    return (Path(path) / ".metadata").is_file()


def export_hf(model: torch.nn.Module, path) -> None:
    """Write a transformers checkpoint (config + weights) of a possibly sharded model from rank 0;
    collective when sharded (the full weights are gathered to rank 0's CPU)."""
    sd = full_state_dict(model)
    if _world()[0] == 0:
        model.save_pretrained(str(path), state_dict=sd)
    barrier()


def full_state_dict(model: torch.nn.Module) -> dict:
    """Full (unsharded) CPU state dict on rank 0 (an empty dict elsewhere); collective when sharded."""
    StateDictOptions, get_msd, _, _, _ = _state_dict_api()
    if not is_sharded(model):
        return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    sd = get_msd(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return sd if _world()[0] == 0 else {}


__all__ = [
    "DistContext", "init_distributed", "destroy_distributed", "launched_by_torchrun", "rank_world", "barrier",
    "all_reduce_sum",
    "shard_model", "sum_gradients", "prepare_teacher", "is_sharded", "decoder_layers",
    "attach_head", "call_with_full_head", "teacher_forward", "check_full_weight", "head_stats", "head_loss",
    "GlobalSelection", "global_select", "default_sequence_ids",
    "OPDResult", "opd_loss", "response_positions",
    "shard_range", "shard_prompts", "hf_generate", "VLLMRollout", "make_rollout_engine", "import_vllm",
    "save_checkpoint", "load_checkpoint", "full_state_dict", "is_dcp_checkpoint", "export_hf",
    "all_ranks_done", "global_summary",
]
