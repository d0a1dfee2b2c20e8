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

from dataclasses import dataclass, field, fields
from typing import Callable, List, Optional, Sequence

import torch
import torch.distributed as dist

from .backends._tiles import (
    KeptGrads,
    _OnlineSoftmax,
    accumulate_head_grads,
    head_grad_buffers,
    keys_to_ids,
    keys_to_values,
    row_chunks,
    safe_weighted,
    union_disagreement,
    vocab_tiles,
)
from .stats import RowStats

HIDDEN_GRAD = ("reduce", "partial")
EMPTY_KEY = torch.iinfo(torch.int64).min  # a candidate slot with no id (a shard narrower than K)


# ---------------------------------------------------------------------------- the per-shard partial state


@dataclass
class PartialRowState:
    """Per-row partial statistics of one vocabulary range (float32 [R]; keys int64 [R, K], logits [R, K]).

    Per model: ``max_*`` the largest scaled logit (-inf: none in the range), ``s0_*`` = sum e^(z - max),
    ``q_*`` = sum e^(z - max) (z - other) (docs/math.md, Per-position statistics), and the student's ``s1_s``
    = sum e^(z_s - max_s)(z_s - max_s). ``keys_*``: the range's top-K as ordered keys (value descending, global
    id ascending; ``EMPTY_KEY`` in unused slots), ``other_*``: the other model's logit at those ids.
    ``zs_y``, ``zt_y``: the logits at the sampled token, NaN where it lies outside the range.
    """

    max_s: torch.Tensor
    s0_s: torch.Tensor
    s1_s: torch.Tensor
    q_s: torch.Tensor
    max_t: torch.Tensor
    s0_t: torch.Tensor
    q_t: torch.Tensor
    keys_s: torch.Tensor
    other_s: torch.Tensor
    keys_t: torch.Tensor
    other_t: torch.Tensor
    zs_y: Optional[torch.Tensor] = None
    zt_y: Optional[torch.Tensor] = None

    @property
    def scalar_names(self) -> tuple:
        names = ("max_s", "s0_s", "s1_s", "q_s", "max_t", "s0_t", "q_t")
        return names + (("zs_y", "zt_y") if self.zs_y is not None else ())

    @classmethod
    def concat(cls, parts: List["PartialRowState"]) -> "PartialRowState":
        """The rows of ``parts`` (row chunks) in order."""
        return cls(**{f.name: None if getattr(parts[0], f.name) is None
                      else torch.cat([getattr(p, f.name) for p in parts]) for f in fields(cls)})

    def pack(self) -> torch.Tensor:
        """Everything in one int32 [R, 4 * (7 + 6 K) / 4 (+2)] tensor (float bits and key halves), for one
        collective."""
        scalars = torch.stack([getattr(self, n).float() for n in self.scalar_names], 1)
        floats = torch.cat([scalars, self.other_s.float(), self.other_t.float()], 1)
        keys = torch.cat([self.keys_s, self.keys_t], 1).contiguous()
        return torch.cat([floats.view(torch.int32), keys.view(torch.int32)], 1)

    def unpack(self, packed: torch.Tensor) -> "PartialRowState":
        """A state of this one's layout from another rank's ``pack()``."""
        n, k = len(self.scalar_names), self.keys_s.shape[1]
        floats = packed[:, :n + 2 * k].contiguous().view(torch.float32)
        keys = packed[:, n + 2 * k:].contiguous().view(torch.int64)
        values = dict(zip(self.scalar_names, floats[:, :n].unbind(1)))
        return PartialRowState(**values, other_s=floats[:, n:n + k], other_t=floats[:, n + k:],
                               keys_s=keys[:, :k], keys_t=keys[:, k:])

    def finish(self) -> RowStats:
        """RowStats from the state of the whole used vocabulary (docs/math.md, Per-position statistics)."""
        log_s0_s, log_s0_t = self.s0_s.log(), self.s0_t.log()
        ids_s, ids_t = keys_to_ids(self.keys_s), keys_to_ids(self.keys_t)
        zs_at_s, zt_at_s = keys_to_values(self.keys_s), self.other_s
        zt_at_t, zs_at_t = keys_to_values(self.keys_t), self.other_t
        # Cancellation-free: differences of logits near the row maxima are formed before the (large) maxima
        # meet the (small) log S0, so nothing of size |z| is subtracted from another number of size |z|.
        gap_s = self.q_s / self.s0_s  # E_ps[z_s - z_t]
        max_gap = self.max_s - self.max_t
        out = RowStats(
            lse_student=self.max_s + log_s0_s,
            lse_teacher=self.max_t + log_s0_t,
            entropy_student=log_s0_s - self.s1_s / self.s0_s,
            kl_reverse=(gap_s - max_gap) - (log_s0_s - log_s0_t),
            kl_forward=(self.q_t / self.s0_t + max_gap) - (log_s0_t - log_s0_s),  # E_pt[z_t - z_s] + ...
            topk_ids_student=ids_s,
            topk_ids_teacher=ids_t,
            teacher_mass=((zt_at_s - self.max_t[:, None]) - log_s0_t[:, None]).exp().sum(1),
            disagreement=union_disagreement(ids_s, zs_at_s, zt_at_s, ids_t, zs_at_t, zt_at_t),
            expected_gap=gap_s,
        )
        if self.zs_y is not None:
            out.logp_student_sampled = (self.zs_y - self.max_s) - log_s0_s
            out.logp_teacher_sampled = (self.zt_y - self.max_t) - log_s0_t
        return out


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


def pad_keys(keys: torch.Tensor, other: torch.Tensor, k: int):
    """Widen [R, k'] candidates (k' <= k: a range narrower than K) to [R, k] with empty slots."""
    missing = k - keys.shape[1]
    if missing <= 0:
        return keys, other
    rows = keys.shape[0]
    return (torch.cat([keys, keys.new_full((rows, missing), EMPTY_KEY)], 1),
            torch.cat([other, other.new_zeros(rows, missing)], 1))


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
    ColumnParallelLinear all-reduces its input gradient): choose one, or dh is counted tp times or once.
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
        if name == "torch" and not hasattr(impl, "forward_partial"):  # staging, until pytorch.py has it
            impl = TORCH_STAGING
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


# ---------------------------------------------------------------------------- staging: the torch backend's
# per-shard pieces, until backends/pytorch.py exposes them (forward_partial, softmax_reduce).

from .backends import pytorch as _pt  # noqa: E402


def _stream_partial(tile_fn, rows, cols, top_k, chunk_vocab, device, id_offset, sampled_ids, finite):
    soft_s, soft_t = _OnlineSoftmax(rows, device), _OnlineSoftmax(rows, device)
    top_s, top_t = _pt._RunningTopK(rows, top_k, device), _pt._RunningTopK(rows, top_k, device)
    zs_y = zt_y = None
    if sampled_ids is not None:
        y = sampled_ids.long()
        zs_y = torch.full((rows,), float("nan"), device=device)
        zt_y = torch.full((rows,), float("nan"), device=device)
    for v0, v1 in vocab_tiles(cols, chunk_vocab):
        zs, zt = tile_fn(v0, v1)
        gap = zs - zt
        soft_s.update(zs, gap, finite)
        soft_t.update(zt, gap.neg_(), finite)
        top_s.update(zs, zt, v0 + id_offset)
        top_t.update(zt, zs, v0 + id_offset)
        if sampled_ids is not None:
            here = (y >= v0) & (y < v1)
            col = (y - v0).clamp(0, v1 - v0 - 1)[:, None]
            zs_y = torch.where(here, zs.gather(1, col).squeeze(1), zs_y)
            zt_y = torch.where(here, zt.gather(1, col).squeeze(1), zt_y)
    keys_s, other_s = pad_keys(top_s.keys, top_s.other, top_k)
    keys_t, other_t = pad_keys(top_t.keys, top_t.other, top_k)
    return PartialRowState(soft_s.m, soft_s.s0, soft_s.s1, soft_s.q, soft_t.m, soft_t.s0, soft_t.q,
                           keys_s, other_s, keys_t, other_t, zs_y, zt_y)


class _TorchStaging:
    @staticmethod
    def _partial(tile_fns, rows, *, vocab_size, top_k, sampled_ids, chunk_rows, chunk_vocab, finite, device,
                 id_offset):
        chunk_rows, chunk_vocab = _pt._chunk_sizes(rows, chunk_rows, chunk_vocab)
        parts = []
        with torch.no_grad():
            for sl in row_chunks(rows, chunk_rows):
                y = None if sampled_ids is None else sampled_ids[sl]
                parts.append(_stream_partial(tile_fns(sl), sl.stop - sl.start, vocab_size, top_k, chunk_vocab,
                                             device, id_offset, y, finite))
        if not parts:
            parts.append(_stream_partial(None, 0, 0, top_k, 1, device, id_offset, sampled_ids, finite))
        return PartialRowState.concat(parts)

    def forward_partial(self, h_s, w_s, b_s, h_t, w_t, b_t, *, vocab_size, top_k, temperature, id_offset=0,
                        sampled_ids=None, chunk_rows=None, chunk_vocab=None):
        finite = b_s is None and b_t is None
        return self._partial(lambda sl: _pt.hidden_tile_fn(h_s[sl], w_s, b_s, h_t[sl], w_t, b_t, temperature),
                             h_s.shape[0], vocab_size=vocab_size, top_k=top_k, sampled_ids=sampled_ids,
                             chunk_rows=chunk_rows, chunk_vocab=chunk_vocab, finite=finite, device=h_s.device,
                             id_offset=id_offset)

    def logits_forward_partial(self, zs, zt, *, vocab_size, top_k, temperature, id_offset=0, sampled_ids=None,
                               chunk_rows=None, chunk_vocab=None):
        return self._partial(lambda sl: _pt.logits_tile_fn(zs[sl, :vocab_size], zt[sl, :vocab_size], temperature),
                             zs.shape[0], vocab_size=vocab_size, top_k=top_k, sampled_ids=sampled_ids,
                             chunk_rows=chunk_rows, chunk_vocab=chunk_vocab, finite=False, device=zs.device,
                             id_offset=id_offset)

    @staticmethod
    def _row_kwargs(tile_fn, sl, vocab_size, chunk_vocab, finite, estimator, row_coef, sampled_ids,
                    sampled_weight, softmax_reduce):
        soft = _OnlineSoftmax(sl.stop - sl.start, row_coef.device)
        for v0, v1 in vocab_tiles(vocab_size, chunk_vocab):
            zs, zt = tile_fn(v0, v1)
            soft.update(zs, zs - zt if zt is not None else zs, finite)
        m, s0, q = soft.m, soft.s0, soft.q
        if softmax_reduce is not None:
            m, s0, q = softmax_reduce(m, s0, q)
        pick = lambda x: None if x is None else x[sl]  # noqa: E731
        return dict(estimator=estimator, row_max=m, log_s0=s0.log(),
                    expected_gap=q / s0 if estimator == "full" else None,
                    row_coef=row_coef[sl], sampled_ids=pick(sampled_ids), sampled_weight=pick(sampled_weight))

    def backward_kept(self, h_s, w_s, b_s, h_t, w_t, b_t, *, vocab_size, temperature, estimator, row_coef,
                      sampled_ids=None, sampled_weight=None, need_bias_grad=False, chunk_rows=None,
                      chunk_vocab=None, softmax_reduce=None, **_):
        chunk_rows, chunk_vocab = _pt._chunk_sizes(h_s.shape[0], chunk_rows, chunk_vocab)
        d_h, d_w, d_b = head_grad_buffers(h_s, w_s, need_bias_grad)
        need_teacher = estimator == "full"
        lse = []
        with torch.no_grad():
            for sl in row_chunks(h_s.shape[0], chunk_rows):
                hs = h_s[sl].float()
                tile_fn = _pt.hidden_tile_fn(hs, w_s, b_s, h_t[sl] if need_teacher else None, w_t, b_t,
                                             temperature, need_teacher)
                per_row = self._row_kwargs(tile_fn, sl, vocab_size, chunk_vocab, b_s is None and b_t is None,
                                           estimator, row_coef, sampled_ids, sampled_weight, softmax_reduce)
                lse.append(per_row["row_max"] + per_row["log_s0"])
                for v0, v1 in vocab_tiles(vocab_size, chunk_vocab):
                    zs, zt = tile_fn(v0, v1)
                    accumulate_head_grads(_pt.logit_grad_tile(zs, zt, v0, **per_row), hs, w_s, v0, v1, d_h[sl],
                                          d_w, d_b)
        return KeptGrads(d_h, d_w, d_b, torch.cat(lse) if lse else h_s.new_zeros(0, dtype=torch.float32))

    def logits_grad_kept(self, zs, zt, *, vocab_size, temperature, estimator, row_coef, sampled_ids=None,
                         sampled_weight=None, chunk_rows=None, chunk_vocab=None, softmax_reduce=None, **_):
        chunk_rows, chunk_vocab = _pt._chunk_sizes(zs.shape[0], chunk_rows, chunk_vocab)
        grad = torch.zeros(zs.shape, dtype=torch.float32, device=zs.device)
        need_teacher = estimator == "full"
        with torch.no_grad():
            for sl in row_chunks(zs.shape[0], chunk_rows):
                tile_fn = _pt.logits_tile_fn(zs[sl], zt[sl] if need_teacher else None, temperature, need_teacher)
                per_row = self._row_kwargs(tile_fn, sl, vocab_size, chunk_vocab, False, estimator, row_coef,
                                           sampled_ids, sampled_weight, softmax_reduce)
                for v0, v1 in vocab_tiles(vocab_size, chunk_vocab):
                    tile_s, tile_t = tile_fn(v0, v1)
                    grad[sl, v0:v1] = _pt.logit_grad_tile(tile_s, tile_t, v0, **per_row)
        return grad


TORCH_STAGING = _TorchStaging()
