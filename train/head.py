"""What the fused loss head needs from a transformers causal LM: final hidden states and the lm_head,
from the library's adapter (``taopd_kernels.hf``), inside the (FSDP) forward.

- ``final_hidden``: the last hidden states after the final norm, [B, T, D] (what the lm_head
  multiplies; no logits are ever formed); ``lm_head``: the output embedding's (weight [V, D], bias or
  None), the input embedding matrix itself when embeddings are tied (``hf.lm_head_params``: a model
  that caps its logits is refused; a logit scale is folded into the hidden states and bias the loss
  head gets).
- ``call_with_full_head(model, ..., fn)``: ``fn(hidden, weight, bias)`` *inside* the model's forward,
  registered as an FSDP2 forward method, so a sharded model hands ``fn`` the full, all-gathered
  lm_head weight (and its gradient goes back through FSDP's reduce-scatter; for tied embeddings into
  the one shared parameter). A plain model works the same way.
- The one-position shift is the library's ``hf.next_token_shift``: the hidden state at position t
  predicts token t+1, so ``fn`` gets ``hidden[:, :-1]`` and ``loss_positions`` gives
  ``valid = response_mask[:, 1:]`` and ``sampled_ids = input_ids[:, 1:]``.
"""

from __future__ import annotations

import types
from typing import Callable, Optional

import torch

from taopd_kernels.hf import final_hidden_states, lm_head_params, next_token_shift

HEAD_METHOD = "_taopd_call_head"


def final_hidden(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor],
                 position_ids: Optional[torch.Tensor] = None, **model_kwargs) -> torch.Tensor:
    """Last hidden states after the final norm, [B, T, D]. Without ``position_ids`` they count real
    tokens (left-padded batches), as in generate()."""
    if position_ids is None and attention_mask is not None:
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    return final_hidden_states(model, input_ids, attention_mask, position_ids=position_ids, **model_kwargs)


def lm_head(model: torch.nn.Module) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(weight [V, D], bias or None) of the output embedding; tied embeddings: the embedding matrix."""
    weight, bias, _ = lm_head_params(model)
    return weight, bias


def lm_head_weight(model: torch.nn.Module) -> torch.Tensor:
    return lm_head(model)[0]


def loss_positions(input_ids: torch.Tensor, response_mask: torch.Tensor,
                   attention_mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(valid [B, T-1], sampled_ids [B, T-1]) of a [B, T] batch: position t predicts token t+1, and
    counts when that token is a response token (and not padding)."""
    valid = next_token_shift(targets=response_mask)[1].bool()
    if attention_mask is not None:
        valid = valid & next_token_shift(targets=attention_mask)[1].bool()
    return valid, next_token_shift(targets=input_ids)[1].contiguous()


def _head_method(self, input_ids, attention_mask, fn, position_ids=None, **model_kwargs):
    """Runs as (and inside) the root's FSDP forward: decoder -> hidden, then fn(hidden[:, :-1], W, b)."""
    hidden = final_hidden(self, input_ids, attention_mask, position_ids, **model_kwargs)
    weight, bias, scale = lm_head_params(self)
    check_full_weight(weight, self.config, what=f"{type(self).__name__}.lm_head.weight")
    if scale != 1.0:  # logits = scale * (h W^T + b) = (scale h) W^T + scale b
        hidden, bias = hidden * scale, None if bias is None else bias * scale
    return fn(next_token_shift(hidden)[0], weight, bias)  # position t predicts token t + 1 (see loss_positions)


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
    registration makes the method such a forward, so inside it ``lm_head.weight`` is the full weight.
    Call it after ``fully_shard`` (``parallel.shard_model`` does).
    """
    if getattr(model, "_taopd_head_attached", False):
        return model
    from torch.distributed.fsdp import register_fsdp_forward_method

    setattr(model, HEAD_METHOD, types.MethodType(_head_method, model))
    register_fsdp_forward_method(model, HEAD_METHOD)  # no-op for an unsharded model
    model._taopd_head_attached = True
    return model


def call_with_full_head(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor],
                        fn: Callable, position_ids: Optional[torch.Tensor] = None, **model_kwargs):
    """``fn(hidden [B, T-1, D], full lm_head weight [V, D], bias or None)`` inside the model's forward.

    ``hidden[:, t]`` predicts ``input_ids[:, t+1]``. Works for sharded and plain models alike; ``fn``
    may run collectives (every rank calls it)."""
    attach_head(model)
    return getattr(model, HEAD_METHOD)(input_ids, attention_mask, fn, position_ids=position_ids, **model_kwargs)


@torch.no_grad()
def teacher_forward(teacher: torch.nn.Module, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor],
                    position_ids: Optional[torch.Tensor] = None, **model_kwargs):
    """(hidden [B, T-1, D_t], full lm_head weight, bias), detached. A sharded teacher's weight is copied
    out of the forward (FSDP frees the all-gathered storage afterwards), so one full teacher lm_head
    per rank lives until the loss head has run."""
    from torch.distributed.fsdp import FSDPModule

    sharded = isinstance(teacher, FSDPModule)

    def grab(h, w, b):
        keep = (lambda t: None if t is None else t.detach().clone()) if sharded else \
            (lambda t: None if t is None else t.detach())
        return h.detach(), keep(w), keep(b)

    return call_with_full_head(teacher, input_ids, attention_mask, grab, position_ids=position_ids, **model_kwargs)
