"""Multi-process pieces: process group, FSDP2 wrapping, the global selection and summary, lockstep.

Everything here also works in one process without ``torchrun`` (no process group): then nothing is
sharded, the "global" selection is the local one over the same positions. docs/distributed.md has the
full story; the pieces, in the order a training step uses them:

- ``init_distributed``: process group from the torchrun environment (NCCL on CUDA, gloo on CPU).
- ``shard_model``: FSDP2 ``fully_shard`` per decoder layer, then the root (embeddings, final norm and
  lm_head, tied or not, stay in the root's group). Gradients are *summed* over ranks, not averaged:
  every rank's loss is already divided by the global kept count, so the sum is the single-process
  gradient. ``prepare_teacher`` shards a frozen teacher or keeps a full replica. The loss head runs
  inside the root's forward with the full lm_head weight (head.py).
- ``shard_range``: this rank's contiguous block of the batch's prompts.
- ``global_select``: docs/math.md, Scores and selection over the positions of all ranks (all_gather of three statistics,
  validity and sequence ids per position; no logits cross the network), rank order = global order.
  The global summary of the statistics is ``stats.summary(all_reduce=all_reduce_sum)``.
- ``all_ranks_done``: generation on a sharded model steps until every rank is done.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from taopd_kernels import DEFAULTS
from taopd_kernels.selection import score_and_select
from .head import attach_head

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
    bench/throughput_fsdp.py). ``device``: "cuda", "cpu" or None (CUDA when available); on CUDA each
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


def world(group=None) -> tuple[int, int]:
    """(rank, world size); (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(x: torch.Tensor, group=None) -> torch.Tensor:
    """Sum of a (detached) tensor over ranks; the tensor itself without a process group."""
    x = x.detach().clone()
    if world(group)[1] > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
    return x


# --------------------------------------------------------------------------------------------------
# FSDP2


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


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
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

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
    from torch.distributed.fsdp import FSDPModule

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
# Global selection and lockstep


@dataclass
class GlobalSelection:
    """The selection over all ranks, seen from this rank."""

    keep_mask: torch.Tensor  # bool, this rank's positions (shape of ``valid``)
    score: torch.Tensor  # float32, this rank's slice of the global scores (NaN where not valid)
    num_kept: int  # kept positions over all ranks: the loss normaliser
    num_valid: int  # valid positions over all ranks


def _gather_columns(x: torch.Tensor, group=None) -> list[torch.Tensor]:
    """all_gather of [C, n_r] tensors with different n_r (padded to the largest), in rank order."""
    rank, n_ranks = world(group)
    if n_ranks == 1:
        return [x]
    n = torch.tensor([x.shape[1]], dtype=torch.long, device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(n_ranks)]
    dist.all_gather(sizes, n, group=group)
    sizes = [int(s) for s in sizes]
    width = max(sizes)
    if width == 0:
        return [x.new_zeros(x.shape[0], 0) for _ in range(n_ranks)]
    padded = x.new_zeros(x.shape[0], width)
    padded[:, : x.shape[1]] = x
    out = [torch.empty_like(padded) for _ in range(n_ranks)]
    dist.all_gather(out, padded, group=group)
    return [o[:, :s] for o, s in zip(out, sizes)]


def global_select(stats, *, strategy: str = DEFAULTS.strategy, keep_ratio: float = DEFAULTS.keep_ratio,
                  sequence_ids: Optional[torch.Tensor] = None, min_per_sequence: int = DEFAULTS.min_per_sequence,
                  seed: int = DEFAULTS.seed, global_sequence_ids: bool = False, group=None) -> GlobalSelection:
    """docs/math.md, Scores and selection over the positions of every rank, as one process would over the concatenation.

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
    if sequence_ids is None and valid.dim() >= 2:
        raise ValueError("global_select: pass sequence_ids for [B, T] statistics (None means no sequences, "
                         "as for [N] positions)")
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
    rank, n_ranks = world(group)
    if n_ranks > 1:
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
    score, kept = score_and_select(strategy, entropy=allp[0].float(), disagreement=allp[1].float(),
                                   teacher_mass=allp[2].float(), valid=g_valid, keep_ratio=keep_ratio,
                                   sequence_ids=torch.cat(seq_parts) if has_seq else None,
                                   min_per_sequence=min_per_sequence, seed=seed)
    mine = slice(offset, offset + n)
    num_kept, num_valid = torch.stack([kept.sum(), g_valid.sum()]).tolist()  # one host read: the normaliser
    return GlobalSelection(keep_mask=kept[mine].view(shape), score=score[mine].view(shape),
                           num_kept=num_kept, num_valid=num_valid)


def all_ranks_done(done: torch.Tensor, group=None) -> bool:
    """For generation loops on a sharded model: stop only when every sequence of every rank is done
    (every forward is collective, so a rank that stops early would leave the others waiting)."""
    flag = (~done.bool()).any().to(torch.int32).reshape(1)
    if world(group)[1] > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    return not bool(flag.item())


def shard_range(n: int, rank: int, world_size: int) -> range:
    """Contiguous block of ``n`` items for ``rank``: the first n % world ranks get one more.

    Contiguous (not strided) so that concatenating the ranks' shards in rank order is the global
    order, which is the order the global selection uses.
    """
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))
