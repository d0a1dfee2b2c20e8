"""Hugging Face causal LMs -> the loss head's inputs, without computing logits.

    from taopd_kernels import TeachabilityKLLoss, hf
    s = hf.student_head_inputs(student, input_ids, attention_mask)   # with gradients
    t = hf.teacher_head_inputs(teacher, input_ids, attention_mask)   # no_grad, detached
    loss = TeachabilityKLLoss()(s.hidden, s.weight, t.hidden, t.weight, labels, shift_labels=True,
                                student_bias=s.bias, teacher_bias=t.bias)      # HF labels: shift_labels=True

The one-position shift lives in ``next_token_shift`` and only there: the hidden state at position ``t``
predicts token ``t + 1``.

``final_hidden_states`` runs the model's backbone (``model.base_model``: the decoder stack including
its final norm, e.g. ``Qwen3Model``), not the ``lm_head``, so no ``[B, T, V]`` tensor is built.
``lm_head_params`` returns the output embedding's weight (the input embedding itself for tied
embeddings: gradients reach it) and bias. The contract is ``logits == hidden @ weight.T + bias``;
the tests check it against ``model(...).logits`` on tiny Qwen3 (tied and untied) and Llama models.

Models whose logits are transformed before the softmax:
- a multiplicative logit scale (Cohere ``logit_scale``, Granite ``logits_scaling``, Falcon-H1
  ``lm_head_multiplier``, ``output_multiplier``) is folded into the returned hidden states and bias
  (``s * (h W^T + b) = (s h) W^T + s b``, a differentiable [B, T, D] multiply);
- final logit softcapping (Gemma 2/3 ``final_logit_softcapping``) is refused: the loss head computes
  ``softmax((h W^T + b) / tau)`` and has no tanh cap (``UnsupportedLogitTransform``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch


class UnsupportedLogitTransform(ValueError):
    """The model transforms its logits before the softmax in a way the loss head cannot reproduce."""


@dataclass
class HeadInputs:
    """What the loss head needs from one model: logits == hidden @ weight.T + bias (bias may be None)."""

    hidden: torch.Tensor  # [B, T, D]
    weight: torch.Tensor  # [V, D]
    bias: Optional[torch.Tensor]  # [V] or None
    logit_scale: float = 1.0  # already folded into hidden and bias


def next_token_shift(hidden: Optional[torch.Tensor] = None, targets: Optional[torch.Tensor] = None, *,
                     first_target: int = 1, num_targets: Optional[int] = None):
    """(hidden states, targets) paired by the next-token shift: the hidden state at position ``t`` predicts
    token ``t + 1``. For the targets (tokens, labels, masks) ``[..., T]`` at positions ``first_target`` to
    ``first_target + num_targets - 1`` (default: all of 1 .. T-1) returns ``hidden[..., first_target - 1 :
    first_target - 1 + num_targets, :]`` and ``targets[..., first_target : first_target + num_targets]``;
    either argument may be None (then None in its place)."""
    if first_target < 1:
        raise ValueError(f"first_target must be >= 1 (token 0 has no position predicting it), got {first_target}")
    length = hidden.shape[-2] if hidden is not None else targets.shape[-1]
    stop = length if num_targets is None else first_target + num_targets
    shifted = None if hidden is None else hidden[..., first_target - 1: stop - 1, :]
    return shifted, None if targets is None else targets[..., first_target: stop]


def _unwrap(model):
    """The plain transformers model under a PEFT / DDP wrapper."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, torch.nn.Module) and not hasattr(model, "config"):
            model = model.module  # DDP and similar
        elif hasattr(model, "get_base_model") and callable(model.get_base_model):
            model = model.get_base_model()  # PEFT
        else:
            return model


def _text_config(model):
    config = getattr(model, "config", None)
    if config is None:
        raise TypeError(f"expected a transformers PreTrainedModel, got {type(model).__name__}")
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def logit_transform(model) -> Tuple[float, Optional[float]]:
    """(logit_scale, final_logit_softcapping) that ``model`` applies to ``lm_head`` outputs (1.0, None if none).

    Reads the same config fields as TRL's DistillationTrainer.
    """
    config = _text_config(_unwrap(model))
    scale = None
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        if getattr(config, name, None) is not None:
            scale = float(getattr(config, name))
            break
    if scale is None and getattr(config, "logits_scaling", None) is not None:
        scaling = float(config.logits_scaling)
        scale = scaling if getattr(config, "model_type", None) == "hyperclovax" else 1.0 / scaling
    softcap = getattr(config, "final_logit_softcapping", None)
    return (1.0 if scale is None else scale), (None if softcap is None else float(softcap))


def lm_head_params(model) -> Tuple[torch.Tensor, Optional[torch.Tensor], float]:
    """(weight [V, D], bias [V] or None, logit_scale) of a causal LM's output head.

    Raises ``UnsupportedLogitTransform`` for final logit softcapping, and ``TypeError`` when the output
    head is not a plain linear layer.
    """
    model = _unwrap(model)
    scale, softcap = logit_transform(model)
    if softcap is not None:
        raise UnsupportedLogitTransform(
            f"{type(model).__name__} caps its logits (final_logit_softcapping={softcap}: "
            f"logits = {softcap} * tanh(z / {softcap})) before the softmax; the taopd_kernels loss head computes "
            "softmax(h W^T + b) and cannot reproduce it. Use a model without softcapping, or set "
            "config.final_logit_softcapping = None if you accept a different distribution.")
    if not hasattr(model, "get_output_embeddings"):
        raise TypeError(f"{type(model).__name__} has no get_output_embeddings(); expected a causal LM")
    head = model.get_output_embeddings()
    weight = getattr(head, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 1:
        raise TypeError(f"{type(model).__name__}'s lm_head weight is 1-D ({tuple(weight.shape)}): a partitioned "
                        "parameter (DeepSpeed ZeRO-3 / FSDP flat shard). Gather it around the call, e.g. "
                        "`with deepspeed.zero.GatheredParameters(model.get_output_embeddings().weight):` (FSDP: "
                        "summon_full_params), or use a framework integration that does")
    if head is None or not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise TypeError(f"{type(model).__name__}'s output head ({type(head).__name__}) has no [V, D] weight; "
                        "the loss head needs a plain linear lm_head")
    bias = getattr(head, "bias", None)
    return weight, (bias if isinstance(bias, torch.Tensor) else None), scale


def final_hidden_states(model, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                        **model_kwargs) -> torch.Tensor:
    """The last hidden states [B, T, D] that the ``lm_head`` would see (after the final norm).

    Runs ``model.base_model`` (the backbone without the ``lm_head``); extra keyword arguments (e.g.
    ``position_ids``) go to it. Gradients follow the caller's grad mode.
    """
    model = _unwrap(model)
    backbone = getattr(model, "base_model", None)
    if backbone is None or backbone is model:
        raise TypeError(f"{type(model).__name__} exposes no backbone (base_model) separate from its lm_head")
    model_kwargs.setdefault("use_cache", False)
    out = backbone(input_ids=input_ids, attention_mask=attention_mask, **model_kwargs)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return hidden


def head_from_hidden(model, hidden: torch.Tensor, *, grad: bool = True) -> HeadInputs:
    """``HeadInputs`` from final hidden states already computed: the lm_head's weight and bias, a logit
    scale folded in (``(s h) W^T + s b``); ``grad=False`` detaches everything."""
    weight, bias, scale = lm_head_params(model)
    with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
        if scale != 1.0:
            hidden = hidden * scale
            bias = None if bias is None else bias * scale
    hidden = hidden.to(weight.device)
    if not grad:
        hidden, weight = hidden.detach(), weight.detach()
        bias = None if bias is None else bias.detach()
    return HeadInputs(hidden, weight, bias, scale)


def head_inputs(model, input_ids, attention_mask=None, *, grad: bool = True, **model_kwargs) -> HeadInputs:
    """``HeadInputs`` of one model; ``grad=False`` runs under ``torch.no_grad`` and detaches everything."""
    with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
        hidden = final_hidden_states(model, input_ids, attention_mask, **model_kwargs)
    return head_from_hidden(model, hidden, grad=grad)


def student_head_inputs(model, input_ids, attention_mask=None, **model_kwargs) -> HeadInputs:
    """The student's hidden states, lm_head weight and bias, with gradients."""
    return head_inputs(model, input_ids, attention_mask, grad=True, **model_kwargs)


def teacher_head_inputs(model, input_ids, attention_mask=None, **model_kwargs) -> HeadInputs:
    """The teacher's hidden states, lm_head weight and bias: no autograd graph, detached."""
    return head_inputs(model, input_ids, attention_mask, grad=False, **model_kwargs)
