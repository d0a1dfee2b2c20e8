"""Multi-process pieces: process group, FSDP2 wrapping, sums over ranks, lockstep.

Everything here also works in one process without ``torchrun`` (no process group): then nothing is
sharded. docs/distributed.md has the full story; the pieces, in the order a training step uses them:

- ``init_distributed``: process group from the torchrun environment (NCCL on CUDA, gloo on CPU).
- ``shard_model``: FSDP2 ``fully_shard`` per decoder layer, then the root (embeddings, final norm and
  lm_head, tied or not, stay in the root's group). Gradients are *summed* over ranks, not averaged:
  every rank's loss is already divided by the global kept count, so the sum is the single-process
  gradient. ``prepare_teacher`` shards a frozen teacher or keeps a full replica. The loss head runs
  inside the root's forward with the full lm_head weight (head.py).
- ``shard_range``: this rank's contiguous block of the batch's prompts.
- the selection over the positions of all ranks is the library's ``taopd_kernels.selection.select_parts``
  (all_gather of three statistics, validity and sequence ids per position; no logits cross the network),
  rank order = global order; the global summary of the statistics is
  ``stats.summary(all_reduce=all_reduce_sum)``.
- ``all_ranks_done``: generation on a sharded model steps until every rank is done.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist

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
# Lockstep


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
