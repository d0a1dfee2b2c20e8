"""Vocabulary-parallel statistics: both lm_heads sharded by vocabulary over a process group (docs/math.md,
The vocabulary-parallel merge; docs/distributed.md, Vocabulary-parallel lm_head).

Rank r of ``group`` holds rows ``[start_r, start_r + n_r)`` of the student and of the teacher lm_head
(Megatron-LM's layout: contiguous, in rank order, uneven allowed; or DTensor weights sharded on dim 0) and
the same hidden states as every other rank. Each rank streams its shard into a per-row partial state
(``PartialRowState``: per model the running maximum, S0, S1, Q, and the top-K candidates as ordered keys with
the other model's logit); one all_gather brings every rank's state to every rank, and every rank merges them
in rank order with the same float operations on the same bits, so the merged statistics are bitwise
identical on every rank and every rank selects the same positions. The merged state is finished exactly as
one process finishes its vocabulary tiles (``PartialRowState.finish``). No logits row crosses the network.

Kept-row backward: each rank recomputes its shard's (max, S0, Q) of the kept rows, one all_gather and the
same merge give the rows' softmax over the whole vocabulary, and each rank forms the logit gradient of its
columns, its rows of dW and db, and its part of dh = G @ W; dh is summed over the group (``hidden_grad=
"reduce"``, an all_reduce of the kept rows) or left to the caller (``"partial"``: Megatron's output layer
all-reduces its input gradient itself), so nothing is counted twice.

Network per position (K = top_k; every rank contributes this much and receives it from each other rank):
    forward:  4 * (7 + 6 K) bytes (+ 8 with sampled ids): 7 float32 scalars, 2 K keys (int64), 2 K logits;
    backward: 12 bytes per kept row (max, S0, Q, float32), + 4 D_s bytes per kept row for dh ("reduce").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch
import torch.distributed as dist

from .backends._tiles import KeptGrads, PartialRowState, safe_weighted
from .stats import RowStats

HIDDEN_GRAD = ("reduce", "partial")


# ---------------------------------------------------------------------------- the merge


def merge_softmax(maxima: Sequence[torch.Tensor], sums: Sequence[Sequence[torch.Tensor]],
                  s1: Optional[Sequence[torch.Tensor]] = None):
    """Merge per-range (max, S0, sums...) of one model into the union's, the ranges in the order given.

    ``sums[r]`` = (S0_r, Q_r, ...): sums of e^(z - max_r) * x, rescaled by e^(max_r - max) (0 for an empty
    range, S0_r = 0); ``s1`` (optional) = sum e^(z - max_r)(z - max_r), which also gains S0_r (max_r - max).
    Returns (max, [S0, Q, ...], S1 or None). The same left-to-right sum on every rank: identical bits."""
    top = torch.stack(list(maxima)).amax(0)
    ok = torch.isfinite(top)
    merged, merged_s1 = None, None
    for r, m_r in enumerate(maxima):
        s0_r = sums[r][0]
        shift = torch.where(ok, m_r - top, torch.zeros_like(top))  # <= 0, or -inf for an empty range
        scale = torch.where(s0_r > 0, shift.exp(), torch.zeros_like(shift))
        terms = [scale * x for x in sums[r]]
        merged = terms if merged is None else [a + b for a, b in zip(merged, terms)]
        if s1 is not None:
            term = scale * (s1[r] + safe_weighted(s0_r, shift))
            merged_s1 = term if merged_s1 is None else merged_s1 + term
    return top, merged, merged_s1


def merge_states(parts: Sequence[PartialRowState]) -> PartialRowState:
    """The state of the union of the ranges of ``parts`` (disjoint), merged in the order given: exact top-K
    (the union's top-K lies in the union of the parts' top-Ks; keys order ties by the lower global id)."""
    max_s, (s0_s, q_s), s1_s = merge_softmax([p.max_s for p in parts], [(p.s0_s, p.q_s) for p in parts],
                                             [p.s1_s for p in parts])
    max_t, (s0_t, q_t), _ = merge_softmax([p.max_t for p in parts], [(p.s0_t, p.q_t) for p in parts])
    k = parts[0].keys_s.shape[1]

    def top(keys, other):
        keys, sel = torch.topk(torch.cat(keys, 1), k, dim=1)
        return keys, torch.cat(other, 1).gather(1, sel)

    keys_s, other_s = top([p.keys_s for p in parts], [p.other_s for p in parts])
    keys_t, other_t = top([p.keys_t for p in parts], [p.other_t for p in parts])
    out = PartialRowState(max_s, s0_s, s1_s, q_s, max_t, s0_t, q_t, keys_s, other_s, keys_t, other_t)
    if parts[0].zs_y is not None:  # the one range that holds the sampled token gives its logits
        out.zs_y, out.zt_y = parts[0].zs_y, parts[0].zt_y
        for p in parts[1:]:
            out.zs_y = torch.where(torch.isnan(out.zs_y), p.zs_y, out.zs_y)
            out.zt_y = torch.where(torch.isnan(out.zt_y), p.zt_y, out.zt_y)
    return out


# ---------------------------------------------------------------------------- collectives


def all_gather_rows(x: torch.Tensor, group) -> List[torch.Tensor]:
    """Every rank's ``x`` (same shape on every rank), in rank order."""
    out = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, x.contiguous(), group=group)
    return out


# ---------------------------------------------------------------------------- the shard layout


@dataclass(frozen=True)
class VocabParallel:
    """Option ``vocab_parallel=`` of the entry points: the lm_heads (or logits) given are this rank's
    vocabulary shard of a head sharded over ``group`` (None: the default group), contiguous in rank order.

    ``hidden_grad``: "reduce" sums the hidden states' gradient over the group here (each rank returns the
    full dh); "partial" returns this rank's part G_r @ W_r, for a caller whose own layer sums it (Megatron's
    ColumnParallelLinear all-reduces its input gradient). Pick the one that matches the caller: a second
    reduction counts dh tp times, none leaves only this rank's part. The hidden states must be the same on
    every rank of the group (not checked: that would cost a collective of them).
    """

    group: object = None
    hidden_grad: str = "reduce"
    # This rank's first student and teacher ids as DTensors place them (set by ``local_shards``), checked
    # against the layout (contiguous shards in the group's rank order).
    dtensor_starts: Optional[tuple] = field(default=None, repr=False)

    def __post_init__(self):
        if self.hidden_grad not in HIDDEN_GRAD:
            raise ValueError(f"vocab_parallel.hidden_grad must be one of {HIDDEN_GRAD}, got {self.hidden_grad!r}")


@dataclass(frozen=True)
class ShardLayout:
    """Where every rank's shard lies: row counts of both heads in rank order (from one all_gather)."""

    group: object
    rank: int
    rows_s: tuple
    rows_t: tuple
    hidden_grad: str

    @classmethod
    def gather(cls, option: VocabParallel, rows_s: int, rows_t: int, device) -> "ShardLayout":
        if not isinstance(option, VocabParallel):
            raise TypeError(f"vocab_parallel must be a taopd_kernels.vocab_parallel.VocabParallel or None, got "
                            f"{type(option).__name__}")
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("vocab_parallel needs an initialised torch.distributed process group")
        local = torch.tensor([rows_s, rows_t], dtype=torch.long, device=device)
        every = torch.stack(all_gather_rows(local, option.group)).tolist()  # a host read, once per call
        layout = cls(option.group, dist.get_rank(option.group), tuple(r[0] for r in every),
                     tuple(r[1] for r in every), option.hidden_grad)
        expected = (layout.start(), sum(layout.rows_t[:layout.rank]))
        if option.dtensor_starts is not None and option.dtensor_starts != expected:
            raise ValueError(f"vocab_parallel: the DTensor shards of rank {layout.rank} start at ids "
                             f"{option.dtensor_starts} (student, teacher), not after the lower ranks' shards "
                             f"{expected}; the shards must be contiguous in the group's rank order")
        return layout

    @property
    def world(self) -> int:
        return len(self.rows_s)

    @property
    def max_vocab(self) -> int:
        """The default vocabulary: the columns both whole heads have."""
        return min(sum(self.rows_s), sum(self.rows_t))

    def start(self, rank: Optional[int] = None) -> int:
        return sum(self.rows_s[:self.rank if rank is None else rank])

    def used_cols(self, vocab_size: int, rank: Optional[int] = None) -> int:
        """Columns of this rank's shard inside the used vocabulary [0, vocab_size)."""
        rank = self.rank if rank is None else rank
        return max(0, min(self.rows_s[rank], vocab_size - self.start(rank)))

    def check(self, vocab_size: int) -> None:
        """Both heads' shards must cover the same ids of the used vocabulary on every rank."""
        t_start = 0
        for r in range(self.world):
            s_lo, t_lo = self.start(r), t_start
            s_hi, t_hi = s_lo + self.rows_s[r], t_lo + self.rows_t[r]
            t_start = t_hi
            s_used = (min(s_lo, vocab_size), min(s_hi, vocab_size))
            t_used = (min(t_lo, vocab_size), min(t_hi, vocab_size))
            if s_used != t_used:
                raise ValueError(
                    f"vocab_parallel: rank {r}'s student shard holds ids [{s_lo}, {s_hi}) but its teacher shard "
                    f"[{t_lo}, {t_hi}); inside the used vocabulary [0, {vocab_size}) they must cover the same ids "
                    f"(student shards {list(self.rows_s)}, teacher shards {list(self.rows_t)} rows per rank): shard "
                    "both heads padded to the same size, or pass a vocab_size both cover alike")

    # -- the merges, with their collectives

    def merged_stats(self, part: PartialRowState) -> RowStats:
        """The whole vocabulary's RowStats from this rank's partial state: one all_gather, merge in rank order."""
        packed = all_gather_rows(part.pack(), self.group)
        return merge_states([part.unpack(p) for p in packed]).finish()

    def reduce_softmax(self, row_max: torch.Tensor, s0: torch.Tensor, q: torch.Tensor):
        """(max, S0, Q) of the kept rows over the whole vocabulary from this shard's: one all_gather."""
        every = all_gather_rows(torch.stack([row_max, s0, q], 1).float(), self.group)
        top, (s0, q), _ = merge_softmax([e[:, 0] for e in every], [(e[:, 1], e[:, 2]) for e in every])
        return top, s0, q

    def hidden_grad_total(self, d_h: torch.Tensor) -> torch.Tensor:
        if self.hidden_grad == "reduce" and self.world > 1:
            dist.all_reduce(d_h, group=self.group)
        return d_h


# ---------------------------------------------------------------------------- DTensor weights


def _dtensor_group(name: str, x):
    """(process group, global offset) of a DTensor sharded on dim 0 over one mesh dimension; None for a
    plain tensor."""
    try:
        from torch.distributed.tensor import DTensor, Replicate, Shard
    except ImportError:  # a torch without DTensor: every tensor is plain
        return None
    if not isinstance(x, DTensor):
        return None
    sharded = [i for i, p in enumerate(x.placements) if isinstance(p, Shard) and p.dim == 0]
    rest_ok = all(isinstance(p, Replicate) for i, p in enumerate(x.placements) if i not in sharded)
    if len(sharded) != 1 or not rest_ok:
        raise ValueError(f"{name}: a DTensor lm_head must be sharded on dim 0 over one mesh dimension "
                         f"(Shard(0), the rest Replicate), got placements {x.placements}")
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    _, offset = compute_local_shape_and_global_offset(x.shape, x.device_mesh, x.placements)
    return x.device_mesh.get_group(sharded[0]), int(offset[0])


HEAD_TENSORS = ("student_weight", "teacher_weight", "student_bias", "teacher_bias")


def local_shards(option: Optional[VocabParallel], *tensors):
    """(option, local tensors) for the entry points, ``tensors`` being ``HEAD_TENSORS`` (biases may be None):
    DTensor weights and biases sharded on dim 0 become their local shards (autograd flows back to the
    DTensor) and name the group; plain tensors pass through. DTensors without ``vocab_parallel`` turn it on
    (hidden_grad="reduce")."""
    found = {name: _dtensor_group(name, x) for name, x in zip(HEAD_TENSORS, tensors) if x is not None}
    found = {name: f for name, f in found.items() if f is not None}
    if not found:
        return option, tensors
    plain = [name for name, x in zip(HEAD_TENSORS, tensors) if x is not None and name not in found]
    if plain:
        raise ValueError(f"{', '.join(found)} are DTensors but {', '.join(plain)} are not: pass every lm_head "
                         "tensor as a DTensor sharded on dim 0, or every one as this rank's plain shard")
    ranks = lambda g: dist.get_process_group_ranks(g)  # noqa: E731
    group = found["student_weight"][0]
    if any(ranks(g) != ranks(group) for g, _ in found.values()):
        raise ValueError("the DTensor lm_heads are sharded over different process groups")
    option = option or VocabParallel()
    if option.group is not None and ranks(option.group) != ranks(group):
        raise ValueError("vocab_parallel.group differs from the DTensor weights' mesh group")
    starts = (found["student_weight"][1], found["teacher_weight"][1])
    return VocabParallel(group, option.hidden_grad, starts), tuple(None if x is None else x.to_local()
                                                                  for x in tensors)


# ---------------------------------------------------------------------------- the backend wrapper


class ShardedBackend:
    """A backend as the API sees it (backends/__init__.py) for a vocabulary-sharded head: the wrapped
    backend computes this rank's partial state or kept-row gradients over its shard's used columns, with
    global ids; this object merges over the group. ``vocab_size`` in the calls is the global one."""

    def __init__(self, name: str, impl, layout: ShardLayout, vocab_size: int):
        missing = [fn for fn in ("forward_partial", "logits_forward_partial") if not hasattr(impl, fn)]
        if missing:
            raise ValueError(f"vocab_parallel: the {name} backend has no per-shard partial state "
                             f"({', '.join(missing)}); use backend='torch'")
        layout.check(vocab_size)
        self.impl, self.layout = impl, layout
        self.cols, self.offset = layout.used_cols(vocab_size), layout.start()

    def _local(self, kw: dict) -> dict:
        """The call's options for this shard: its used columns, its ids (sampled ids shifted; a token outside
        the shard falls outside [0, cols) and contributes nothing here)."""
        kw = dict(kw, vocab_size=self.cols)
        if kw.get("sampled_ids") is not None:
            kw["sampled_ids"] = kw["sampled_ids"] - self.offset
        return kw

    def forward_stats(self, h_s, w_s, b_s, h_t, w_t, b_t, **kw) -> RowStats:
        part = self.impl.forward_partial(h_s, w_s, b_s, h_t, w_t, b_t, id_offset=self.offset, **self._local(kw))
        return self.layout.merged_stats(part)

    def logits_forward_stats(self, zs, zt, **kw) -> RowStats:
        part = self.impl.logits_forward_partial(zs, zt, id_offset=self.offset, **self._local(kw))
        return self.layout.merged_stats(part)

    def backward_kept(self, h_s, w_s, b_s, h_t, w_t, b_t, **kw):
        grads = self.impl.backward_kept(h_s, w_s, b_s, h_t, w_t, b_t, softmax_reduce=self.layout.reduce_softmax,
                                        **self._local(kw))
        d_h, d_w, d_b = grads
        return KeptGrads(self.layout.hidden_grad_total(d_h), d_w, d_b, getattr(grads, "lse", None))

    def logits_grad_kept(self, zs, zt, **kw):
        return self.impl.logits_grad_kept(zs, zt, softmax_reduce=self.layout.reduce_softmax, **self._local(kw))

