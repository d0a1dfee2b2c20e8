"""TA-OPD on TRL's ``DistillationTrainer``: teachability selection with one global selection per
generation batch, through the taopd_kernels loss head (``TeachabilityKLLoss``).

    from taopd_kernels.integrations.trl import TAOPDConfig, TAOPDTrainer
    args = TAOPDConfig(output_dir="out", taopd_strategy="teachability", taopd_keep_ratio=0.05)
    trainer = TAOPDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=prompts,
                           processing_class=tokenizer)
    trainer.train()

Why ``DistillationTrainer`` (``trl.DistillationTrainer``, stable) rather than ``GKDTrainer``
(``trl.experimental.gkd``): DistillationTrainer generates once per generation batch (per-device batch
x gradient accumulation steps) and hands out micro-batches from that buffer, which is exactly the unit
TA-OPD selects over; GKDTrainer generates per micro-batch inside ``training_step`` and computes full
``[B, T, V]`` logits in its ``compute_loss``, so a batch-wide selection would need more hooks there, and
it lives in ``trl.experimental`` (unstable API).

Hooks used (two overrides, one of them private):
- ``compute_loss`` (public, transformers Trainer API): the loss through ``TeachabilityKLLoss`` on the
  completion positions, with the micro-batch's slice of the global kept mask and the global normaliser.
- ``_generate_and_score_completions`` (private, TRL): the only place where the whole generation batch
  exists before it is shuffled and split into micro-batches. After TRL's own generation, one no-grad
  forward of both models over the generation batch gives the statistics; ``select_across`` selects once;
  the kept mask ([B, C]), the normaliser (0-dim) and the teacher's hidden states ride along in the batch
  dict, which TRL shuffles and splits in unison (``shuffle_sequence_dict``, ``split_tensor_dict``).
Attributes read, not overridden: ``self._metrics`` (what TRL's ``log`` averages) and
``self._forward_redirection`` (how TRL routes a backbone call through a DDP/FSDP wrapper).

Selection in a multi-process run is per process's generation batch (not across ranks); the normaliser
is the global kept count over all processes divided by the process count, as TRL does with
``num_items_in_batch`` to compensate DDP's gradient averaging.

Gradient accumulation: each micro-batch's loss is its kept sum divided by the kept count of the whole
generation batch, and HF Trainer does not divide it again by the accumulation steps
(``loss_is_scaled_for_ga``), so the micro-batch gradients add up to those of one batch's mean over kept
positions, and the logged loss is that mean. HF Trainer's ``num_items_in_batch`` is not used: it passes
None here (it counts ``labels`` of the dataloader batch; TRL's are prompts), and a label-token count is the
wrong divisor for a batch-wide selection (tests/test_trl_grad_accum.py, docs/integrations.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

try:
    from trl import DistillationConfig, DistillationTrainer
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError("taopd_kernels.integrations.trl needs TRL >= 1.16 (pip install 'trl>=1.16')") from err

from .. import hf
from ..loss import TeachabilityKLLoss
from ..options import DEFAULTS, ESTIMATORS, STRATEGIES, LossHeadOptions
from ..stats import TeachabilityStats

_KEEP, _NORM, _TEACHER = "taopd_keep_mask", "taopd_normalizer", "taopd_teacher_hidden"


@dataclass
class TAOPDConfig(DistillationConfig):
    """``DistillationConfig`` plus the TA-OPD selection (docs/math.md, Scores and selection).

    The divergence is the reverse KL (``beta`` must stay 1.0). ``top_k`` of DistillationConfig is the
    sampling top-k of generation; the teachability top-K is ``taopd_top_k``.
    """

    taopd_strategy: str = field(default=DEFAULTS.strategy, metadata={"help": LossHeadOptions.doc("strategy")})
    taopd_keep_ratio: float = field(default=DEFAULTS.keep_ratio, metadata={"help": LossHeadOptions.doc("keep_ratio")})
    taopd_top_k: int = field(default=DEFAULTS.top_k, metadata={"help": LossHeadOptions.doc("top_k")})
    taopd_estimator: str = field(default=DEFAULTS.estimator, metadata={"help": LossHeadOptions.doc("estimator")})
    taopd_min_per_sequence: int = field(default=DEFAULTS.min_per_sequence,
                                        metadata={"help": LossHeadOptions.doc("min_per_sequence")})
    taopd_backend: str = field(default=DEFAULTS.backend, metadata={"help": LossHeadOptions.doc("backend")})
    taopd_reuse_teacher_hidden: bool = field(
        default=True, metadata={"help": "keep the teacher's hidden states from the selection pass for the loss "
                                        "(one teacher forward per generation batch; memory B x C x D_t)"})

    def __post_init__(self):
        super().__post_init__()
        if self.beta != 1.0:
            raise ValueError(f"TAOPDConfig: the TA-OPD loss is the reverse KL; beta must be 1.0, got {self.beta}")
        if self.taopd_strategy not in STRATEGIES:
            raise ValueError(f"taopd_strategy must be one of {STRATEGIES}, got {self.taopd_strategy!r}")
        if self.taopd_estimator not in ESTIMATORS:
            raise ValueError(f"taopd_estimator must be one of {ESTIMATORS}, got {self.taopd_estimator!r}")


def _aligned(hidden: torch.Tensor, prompt_len: int, completion_len: int) -> torch.Tensor:
    """Hidden states at the positions that predict the completion tokens: [B, C, D]."""
    return hf.next_token_shift(hidden, first_target=prompt_len, num_targets=completion_len)[0]


def _completion_labels(inputs) -> torch.Tensor:
    mask = inputs["completion_mask"]
    if "tool_mask" in inputs:
        mask = mask * inputs["tool_mask"]
    return inputs["completion_ids"].masked_fill(mask == 0, -100)


class TAOPDTrainer(DistillationTrainer):
    """``DistillationTrainer`` whose loss is the TA-OPD loss head with one selection per generation batch.

    Logs (besides TRL's metrics): ``taopd/kept_fraction``, and ``taopd/<stat>/all`` and ``/kept`` for
    ``teacher_mass`` (C), ``disagreement`` (D), ``kl_reverse``, ``kl_forward``, ``entropy_student``.
    """

    # The loss already divides by the generation batch's kept count: HF Trainer must not divide by the
    # accumulation steps (DistillationTrainer says the same; restated because the loss relies on it).
    loss_is_scaled_for_ga = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        a = self.args
        if not isinstance(a, TAOPDConfig):
            raise TypeError(f"TAOPDTrainer needs args=TAOPDConfig(...), got {type(a).__name__}")
        self.taopd_loss = TeachabilityKLLoss(strategy=a.taopd_strategy, keep_ratio=a.taopd_keep_ratio,
                                             top_k=a.taopd_top_k, estimator=a.taopd_estimator,
                                             temperature=self.temperature, min_per_sequence=a.taopd_min_per_sequence,
                                             backend=a.taopd_backend)
        for who, m in (("student", self.model), ("teacher", self.teacher_model)):
            hf.lm_head_params(m)  # refuses softcapped models now, not at the first step

    # ----------------------------------------------------------------------------------- helpers

    def _hidden(self, model, input_ids, attention_mask, grad: bool):
        unwrapped = self.accelerator.unwrap_model(model)
        if model is not unwrapped and getattr(self, "_forward_redirection", None) is not None:
            with torch.set_grad_enabled(grad):
                return self._forward_redirection(model, unwrapped, hf.final_hidden_states, unwrapped, input_ids,
                                                 attention_mask)
        with torch.set_grad_enabled(grad):
            return hf.final_hidden_states(unwrapped, input_ids, attention_mask)

    def _head(self, model, hidden, grad: bool) -> hf.HeadInputs:
        return hf.head_from_hidden(self.accelerator.unwrap_model(model), hidden, grad=grad)

    def _log_selection(self, stats: TeachabilityStats, mode: str):
        summary = stats.summary()
        metrics = self._metrics[mode]
        metrics["taopd/kept_fraction"].append(summary["kept_fraction"])
        for name in ("teacher_mass", "disagreement", "kl_reverse", "kl_forward", "entropy_student"):
            for group in ("all", "kept"):
                metrics[f"taopd/{name}/{group}"].append(summary[f"{name}/{group}"])

    # ------------------------------------------------------------------------ the global selection

    @torch.no_grad()
    def _taopd_select(self, batch: dict) -> dict:
        p_len, c_len = batch["prompt_ids"].size(1), batch["completion_ids"].size(1)
        input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
        attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
        labels = _completion_labels(batch)
        chunk = max(1, self.args.per_device_train_batch_size)
        stats, teacher_hidden = [], []
        for start in range(0, input_ids.size(0), chunk):
            sl = slice(start, start + chunk)
            h_s = _aligned(self._hidden(self.model, input_ids[sl], attention_mask[sl], grad=False), p_len, c_len)
            h_t = _aligned(self._hidden(self.teacher_model, input_ids[sl], attention_mask[sl], grad=False),
                           p_len, c_len)
            s, t = self._head(self.model, h_s, grad=False), self._head(self.teacher_model, h_t, grad=False)
            stats.append(self.taopd_loss.statistics(s.hidden, s.weight, t.hidden, t.weight, labels[sl],
                                                    student_bias=s.bias, teacher_bias=t.bias))
            teacher_hidden.append(h_t)
        masks, _ = self.taopd_loss.select_across(stats)
        keep = torch.cat(masks)
        kept = self.accelerator.gather(keep.sum().reshape(1).float()).sum()
        normalizer = kept.clamp(min=1.0) / self.accelerator.num_processes
        merged = TeachabilityStats.concat(stats)
        merged.kept = keep.reshape(-1)
        self._log_selection(merged, "train")
        out = {_KEEP: keep, _NORM: normalizer.reshape(())}
        if self.args.taopd_reuse_teacher_hidden:
            out[_TEACHER] = torch.cat(teacher_hidden)
        return out

    def _generate_and_score_completions(self, inputs):
        batch = super()._generate_and_score_completions(inputs)
        if self.model.training:
            batch.update(self._taopd_select(batch))
        return batch

    # ------------------------------------------------------------------------------------- the loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The TA-OPD loss of one micro-batch: its kept sum over the generation batch's kept count (training),
        or its own selection's mean over kept positions (eval). ``num_items_in_batch`` (HF Trainer's label
        count, None under TRL) is ignored: the kept count is the divisor that sums to the batch mean."""
        p_len, c_len = inputs["prompt_ids"].size(1), inputs["completion_ids"].size(1)
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        labels = _completion_labels(inputs)
        s = self._head(model, _aligned(self._hidden(model, input_ids, attention_mask, grad=True), p_len, c_len),
                       grad=True)
        h_t = inputs.get(_TEACHER)
        if h_t is None:
            self.teacher_model.eval()
            h_t = _aligned(self._hidden(self.teacher_model, input_ids, attention_mask, grad=False), p_len, c_len)
        t = self._head(self.teacher_model, h_t, grad=False)
        keep, norm = inputs.get(_KEEP), inputs.get(_NORM)
        loss, stats = self.taopd_loss(s.hidden, s.weight, t.hidden, t.weight, labels.to(s.hidden.device),
                                      student_bias=s.bias, teacher_bias=t.bias, keep_mask=keep,
                                      normalizer=norm, return_stats=True)
        if keep is None:  # eval (or a caller without the global selection): this micro-batch's own selection
            self._log_selection(stats, "train" if self.model.training else "eval")
        return (loss, None) if return_outputs else loss
