"""Batched autoregressive generation with a KV cache (rollouts and evaluation).

Prompts are left-padded; every sequence stops at its first EOS or after ``max_new_tokens``. Sampling
draws from ``softmax(logits / temperature)`` over the first ``vocab_limit`` columns (the columns the
loss head uses), with an explicit ``torch.Generator`` so a step's rollout is reproducible.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch


@dataclass
class Rollout:
    """``input_ids``/``attention_mask``: [B, T] (prompt left-padded, response right-padded after EOS);
    ``response_mask``: [B, T], 1 on generated tokens up to and including EOS; ``prompt_len``: P (the
    padded prompt width: responses start at column P)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    prompt_len: int

    @property
    def response_ids(self) -> List[List[int]]:
        out = []
        for ids, m in zip(self.input_ids[:, self.prompt_len:].tolist(), self.response_mask[:, self.prompt_len:].tolist()):
            out.append([t for t, k in zip(ids, m) if k])
        return out

    def position_ids(self) -> torch.Tensor:
        return position_ids_from_mask(self.attention_mask)


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    return (mask.long().cumsum(-1) - 1).clamp_min(0)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device) -> tuple:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        if len(p):
            ids[i, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
            mask[i, width - len(p):] = 1
    return ids.to(device), mask.to(device)


def _cache_kwarg(model) -> str:
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"  # renamed in recent transformers


def _sample(logits: torch.Tensor, temperature: float, top_p: float, generator) -> torch.Tensor:
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sp, si = probs.sort(dim=-1, descending=True)
        drop = sp.cumsum(-1) - sp > top_p
        sp = sp.masked_fill(drop, 0.0)
        choice = torch.multinomial(sp, 1, generator=generator)
        return si.gather(-1, choice).squeeze(-1)
    # inverse-CDF sampling: exact, and much faster than torch.multinomial over 151,936 columns on CPU
    cdf = probs.cumsum(-1)
    u = torch.rand((probs.shape[0], 1), generator=generator, device=probs.device, dtype=cdf.dtype) * cdf[:, -1:]
    return torch.searchsorted(cdf, u).squeeze(-1).clamp_max(probs.shape[-1] - 1)


@torch.no_grad()
def generate(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, eos_ids: Sequence[int], pad_id: int,
             greedy: bool = False, temperature: float = 1.0, top_p: float = 1.0,
             generator: Optional[torch.Generator] = None, vocab_limit: Optional[int] = None,
             all_done: Optional[Callable[[torch.Tensor], bool]] = None) -> Rollout:
    """``all_done(done)``: when to stop (default: every local sequence is done). A sharded model passes
    ``distributed.all_ranks_done``: every forward is collective, so all ranks step until all are done."""
    from transformers.cache_utils import DynamicCache

    device = next(model.parameters()).device
    ids, mask = left_pad(prompts, pad_id, device)
    batch, width = ids.shape
    eos = torch.tensor(sorted(set(eos_ids)), device=device)
    cache = DynamicCache(config=model.config)
    cache_kw = _cache_kwarg(model)
    was_training = model.training
    model.eval()
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    pos = position_ids_from_mask(mask)
    step_ids, step_pos, full_mask = ids, pos, mask
    new_tokens, new_mask = [], []
    for _ in range(max_new_tokens):
        out = model(input_ids=step_ids, attention_mask=full_mask, position_ids=step_pos, use_cache=True,
                    logits_to_keep=1, **{cache_kw: cache})
        logits = out.logits[:, -1]
        if vocab_limit is not None:
            logits = logits[:, :vocab_limit]
        tok = logits.argmax(-1) if greedy else _sample(logits, temperature, top_p, generator)
        tok = torch.where(done, torch.full_like(tok, pad_id), tok)
        new_tokens.append(tok)
        new_mask.append((~done).long())
        done = done | torch.isin(tok, eos)
        if all_done(done) if all_done is not None else bool(done.all()):
            break
        step_ids = tok[:, None]
        step_pos = step_pos[:, -1:] + 1
        full_mask = torch.cat([full_mask, torch.ones((batch, 1), dtype=mask.dtype, device=device)], dim=1)
    if was_training:
        model.train()
    resp = torch.stack(new_tokens, 1)
    resp_mask = torch.stack(new_mask, 1)
    input_ids = torch.cat([ids, resp], 1)
    attention_mask = torch.cat([mask, resp_mask], 1)
    response_mask = torch.cat([torch.zeros_like(mask), resp_mask], 1)
    return Rollout(input_ids, attention_mask, response_mask, width)
