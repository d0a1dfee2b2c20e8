"""The collectives of the selection across processes (``selection.select_parts``).

Without an initialised ``torch.distributed`` process group (or with one process) every function is the
single-process identity, so the same code runs in one process and under torchrun.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world(group=None) -> tuple[int, int]:
    """(rank, world size) in ``group`` (None: the default group); (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def gather_columns(x: torch.Tensor, group=None) -> list[torch.Tensor]:
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


def same_on_every_rank(flag: bool, device, group=None) -> bool:
    """Whether every rank of ``group`` passes the same ``flag`` (one all_reduce of two numbers)."""
    if world(group)[1] == 1:
        return True
    value = torch.tensor([1 if flag else 0], dtype=torch.long, device=device)
    both = torch.stack([value, -value]).squeeze(1)
    dist.all_reduce(both, op=dist.ReduceOp.MIN, group=group)
    return int(both[0]) == -int(both[1])
