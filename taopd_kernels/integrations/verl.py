"""TA-OPD as a verl distillation loss (``loss_mode=ta_opd``), for verl == 0.9.1 (the ``[verl]`` extra).

Loaded by verl itself: ``pyproject.toml`` names this module in the ``verl.plugins`` entry-point group, which
``import verl`` loads in every process (driver and Ray workers). A verl user sets, in the distillation
config, ``distillation_loss.loss_mode=ta_opd`` and ``distillation_loss.topk=K_t`` (see
docs/integrations.md for the whole snippet).

How it works in verl's two-stage loss (``verl.trainer.distillation.losses.distillation_ppo_loss``):
1. The logits step, inside the engine's forward, sees the student's logits of one micro-batch, packed
   as (1, total_nnz, V), and the teacher's top-K_t ids / log-probs (nested, one row per token). In 0.9.1
   it dispatches top-K losses from a fixed table (``compute_topk_loss``), so this module wraps that one
   function (below, pinned to 0.9.1): for ``ta_opd`` it returns verl's own top-K forward-KL loss
   (``fsdp.losses.compute_forward_kl_topk``, unchanged) plus the TA-OPD statistics and kept mask from
   ``taopd_kernels.teachability_from_topk`` (docs/math.md, Sparse teacher signal) over the micro-batch's
   response positions; every other loss mode goes to verl's function as before.
2. The registered loss (``ta_opd``) reads them back from ``model_output``, zeroes the per-token loss off
   the kept positions and scales the kept ones by N_valid / N_kept of the micro-batch, so that verl's
   ``token-mean`` aggregation (sum over valid tokens / valid count) gives the mean over kept positions;
   in policy-gradient mode the same tensor becomes the advantage (-loss), zero off the kept positions.

Selection is per micro-batch (the logits step sees one micro-batch, and verl runs its backward before the
next micro-batch's forward: no hook sees the whole batch first). Options come from environment variables
(verl's config schema has no free-form field; pass them to Ray workers through
``ray_kwargs.ray_init.runtime_env.env_vars``): TAOPD_STRATEGY, TAOPD_KEEP_RATIO, TAOPD_TOP_K,
TAOPD_MIN_PER_SEQUENCE, TAOPD_SEED; defaults from ``taopd_kernels.options.DEFAULTS``.
"""

from __future__ import annotations

import os

import torch

try:
    from verl.trainer.distillation import losses as _verl_losses
    from verl.trainer.distillation.fsdp import losses as _verl_fsdp_losses
    from verl.trainer.distillation.losses import DistillationLossSettings, register_distillation_loss
    from verl.utils.ulysses import get_ulysses_sequence_parallel_world_size
    from verl.workers.utils.padding import no_padding_2_padding
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError("taopd_kernels.integrations.verl needs verl == 0.9.1 (pip install 'taopd-kernels[verl]')") \
        from err

from ..options import DEFAULTS, STRATEGIES, as_float, as_int
from ..sparse import teachability_from_topk

LOSS_NAMES = ("ta_opd",)
VERL_VERSION = "0.9.1"  # the version whose functions this module wraps and reads (tests/test_verl.py)
SUPPORTED_STRATEGIES = ("fsdp", "fsdp2")
# What the logits step adds to model_output (one float per packed token), besides verl's own keys.
KEPT, TEACHER_MASS, DISAGREEMENT = "taopd_kept", "taopd_teacher_mass", "taopd_disagreement"
_TEACHER_KEYS = ("teacher_ids", "teacher_logprobs")
_ENV = {"strategy": "TAOPD_STRATEGY", "keep_ratio": "TAOPD_KEEP_RATIO", "top_k": "TAOPD_TOP_K",
        "min_per_sequence": "TAOPD_MIN_PER_SEQUENCE", "seed": "TAOPD_SEED"}
# A teacher id beyond the student's vocabulary is a padding row of the larger vocabulary (docs/math.md,
# Setting): probability 0 in verl's top-K loss (a finite log-prob, so 0 * log stays 0) and dropped from
# the statistics.
_PADDING_LOGPROB = -1.0e4


def selection_options() -> dict:
    """The selection options from the environment (names in ``_ENV``), checked, defaults from DEFAULTS."""
    raw = {name: os.environ.get(var) for name, var in _ENV.items()}
    opts = {name: getattr(DEFAULTS, name) for name in _ENV}
    try:
        if raw["strategy"] is not None:
            opts["strategy"] = raw["strategy"].strip()
        for name in ("top_k", "min_per_sequence", "seed"):
            if raw[name] is not None:
                opts[name] = as_int(name, int(raw[name]))
        if raw["keep_ratio"] is not None:
            opts["keep_ratio"] = as_float("keep_ratio", float(raw["keep_ratio"]))
    except (TypeError, ValueError) as err:
        raise ValueError(f"bad TA-OPD option in the environment ({_ENV}): {err}") from err
    if opts["strategy"] not in STRATEGIES:
        raise ValueError(f"{_ENV['strategy']} must be one of {STRATEGIES}, got {opts['strategy']!r}")
    return opts


# ---------------------------------------------------------------------------- refusals


def _refuse_unsupported(config, distillation_config, data_format: str = "thd") -> None:
    """What this loss does not support, named (docs/integrations.md)."""
    if config.strategy not in SUPPORTED_STRATEGIES:
        raise NotImplementedError(
            f"loss_mode=ta_opd supports actor strategy {SUPPORTED_STRATEGIES}, got {config.strategy!r}: Megatron "
            "shards the logits over the vocabulary (the statistics need whole rows), and VeOmni's fused path "
            "skips the logits step")
    if config.loss_agg_mode != "token-mean":
        raise NotImplementedError(
            f"loss_mode=ta_opd supports actor.loss_agg_mode='token-mean' only, got {config.loss_agg_mode!r}: its "
            "per-token loss is scaled by N_valid / N_kept so that token-mean gives the mean over kept positions")
    if data_format != "thd":
        raise NotImplementedError(f"loss_mode=ta_opd needs packed (THD) batches, got data_format={data_format!r}")
    clamp = distillation_config.distillation_loss.loss_max_clamp
    if clamp is not None:
        raise ValueError(
            f"loss_mode=ta_opd needs distillation_loss.loss_max_clamp=null (got {clamp}): verl clamps the per-token "
            "loss after ta_opd has scaled the kept tokens by N_valid / N_kept, which would cut the kept tokens' loss")
    if get_ulysses_sequence_parallel_world_size() > 1:
        raise NotImplementedError("loss_mode=ta_opd does not support Ulysses sequence parallelism "
                                  "(ulysses_sequence_parallel_size > 1): the selection needs the whole sequences")


def _require(mapping, keys, where: str, why: str) -> None:
    missing = [k for k in keys if k not in mapping.keys()]
    if missing:
        raise KeyError(f"loss_mode=ta_opd: {missing} missing from {where}; {why}")


# ---------------------------------------------------------------------------- packed positions


def _lengths(data) -> tuple:
    """(prompt lengths, response lengths) per sequence, as ``no_padding_2_padding`` reads them."""
    prompts, responses = data["prompts"], data["responses"]
    if prompts.is_nested:
        return prompts.offsets().diff(), responses.offsets().diff()
    mask = data["attention_mask"]
    return mask[:, :prompts.shape[1]].sum(1), mask[:, prompts.shape[1]:].sum(1)


def packed_positions(data, total: int) -> tuple:
    """(valid [total], sequence ids [total]) over the packed tokens of a micro-batch: position j is valid when
    it predicts a response token under the response mask (the logits at j predict token j + 1, the same
    left shift as ``no_padding_2_padding``)."""
    prompt_lens, response_lens = _lengths(data)
    device = prompt_lens.device
    seq_lens = prompt_lens + response_lens
    if int(seq_lens.sum()) != total:
        raise ValueError(f"loss_mode=ta_opd: the micro-batch's sequences hold {int(seq_lens.sum())} tokens but the "
                         f"student logits have {total} rows (padding from sequence parallelism is not supported)")
    starts = seq_lens.cumsum(0) - seq_lens
    resp_starts = response_lens.cumsum(0) - response_lens
    # Response token k of sequence i is predicted at packed row starts_i + prompt_len_i - 1 + k.
    where = torch.repeat_interleave(starts + prompt_lens - 1 - resp_starts, response_lens) + \
        torch.arange(int(response_lens.sum()), device=device)
    mask = data["response_mask"]
    if mask.is_nested:
        resp_mask = mask.values().bool()
    else:
        resp_mask = mask.bool()[torch.arange(mask.shape[1], device=device)[None, :] < response_lens[:, None]]
    valid = torch.zeros(total, dtype=torch.bool, device=device)
    valid[where] = resp_mask.to(device)
    sequence_ids = torch.repeat_interleave(torch.arange(len(seq_lens), device=device), seq_lens)
    return valid, sequence_ids


# ---------------------------------------------------------------------------- the two stages


def _teacher_rows(data, vocab_size: int) -> tuple:
    """The teacher's (ids, log-probs) [total_nnz, K_t], ids beyond the student's vocabulary made padding."""
    for key in _TEACHER_KEYS:
        if not data[key].is_nested:
            raise ValueError(f"loss_mode=ta_opd expects data[{key!r}] as a nested (jagged) tensor, as verl's "
                             "no-padding batches carry it")
    ids, logprobs = data["teacher_ids"].values().long(), data["teacher_logprobs"].values()
    beyond = ids >= vocab_size
    return torch.where(beyond, 0, ids), torch.where(beyond, _PADDING_LOGPROB, logprobs.float()), beyond


def logits_step(config, distillation_config, data, student_logits: torch.Tensor, data_format: str) -> dict:
    """verl's logits step for ``ta_opd``: verl's own top-K loss outputs plus the TA-OPD statistics and kept
    mask, each (1, total_nnz)."""
    _refuse_unsupported(config, distillation_config, data_format)
    _require(data, (*_TEACHER_KEYS, "prompts", "responses", "response_mask"), "the micro-batch",
             "the teacher's top-K comes from distillation.teacher_models (use_topk) and the rollout")
    if student_logits.dim() != 3 or student_logits.shape[0] != 1:
        raise ValueError(f"loss_mode=ta_opd expects packed student logits (1, total_nnz, V), "
                         f"got {tuple(student_logits.shape)}")
    total, vocab = student_logits.shape[1], student_logits.shape[2]
    ids, logprobs, beyond = _teacher_rows(data, vocab)
    offsets = data["teacher_ids"].offsets()
    nested = lambda x: torch.nested.nested_tensor_from_jagged(x, offsets)  # noqa: E731
    outputs = _verl_fsdp_losses.compute_forward_kl_topk(
        student_logits=student_logits, teacher_topk_log_probs=nested(logprobs), teacher_topk_ids=nested(ids),
        config=distillation_config, data_format=data_format)
    valid, sequence_ids = packed_positions(data, total)
    opts = selection_options()
    if ids.shape[1] < opts["top_k"]:
        raise ValueError(f"loss_mode=ta_opd: the teacher returned K_t={ids.shape[1]} entries per token "
                         f"(distillation_loss.topk) but the statistics' top-K is {opts['top_k']} ({_ENV['top_k']}); "
                         "set distillation_loss.topk >= it")
    _, stats = teachability_from_topk(
        teacher_topk_ids=torch.where(beyond, -1, ids), teacher_topk_logprobs=logprobs,
        student_logits=student_logits[0].detach(), valid_mask=valid, sequence_ids=sequence_ids, **opts)
    outputs[KEPT] = stats.kept.float()[None]
    outputs[TEACHER_MASS] = torch.nan_to_num(stats.teacher_mass, nan=0.0)[None]
    outputs[DISAGREEMENT] = torch.nan_to_num(stats.disagreement, nan=0.0, posinf=0.0)[None]
    return outputs


@register_distillation_loss(DistillationLossSettings(names=list(LOSS_NAMES), use_topk=True))  # type: ignore[arg-type]
def compute_ta_opd(config, distillation_config, model_output: dict, data) -> tuple:
    """The registered ``ta_opd`` loss: verl's top-K loss (and metrics) zero off the kept positions, scaled by
    N_valid / N_kept of the micro-batch, plus the TA-OPD metrics."""
    _refuse_unsupported(config, distillation_config)
    _require(model_output, ("distillation_losses", KEPT, TEACHER_MASS, DISAGREEMENT), "model_output",
             "the logits step did not run for ta_opd (verl's fused kernels, actor.use_fused_kernels=True, "
             "skip it; so does a strategy other than fsdp/fsdp2)")
    losses, metrics = _verl_losses.compute_forward_kl_topk(config, distillation_config, model_output, data)
    mask = data["response_mask"]
    valid = (mask.to_padded_tensor(0) if mask.is_nested else mask).bool()
    kept = no_padding_2_padding(model_output[KEPT], data).bool() & valid
    mass = no_padding_2_padding(model_output[TEACHER_MASS], data).double()
    disagreement = no_padding_2_padding(model_output[DISAGREEMENT], data).double()
    sums = torch.stack([valid.sum().double(), kept.sum().double(), mass[valid].sum(), mass[kept].sum(),
                        disagreement[kept].sum()]).tolist()  # one host read
    n_valid, n_kept = sums[0], sums[1]
    losses = torch.where(kept, losses * (n_valid / max(n_kept, 1.0)), torch.zeros_like(losses))
    per = lambda total, count: total / count if count else float("nan")  # noqa: E731
    metrics.update({"taopd/kept_fraction": per(n_kept, n_valid), "taopd/teacher_mass": per(sums[2], n_valid),
                    "taopd/teacher_mass_kept": per(sums[3], n_kept), "taopd/disagreement_kept": per(sums[4], n_kept)})
    return losses, metrics


# ---------------------------------------------------------------------------- the one wrapped verl function


def _install_logits_step() -> None:
    """Route verl's logits step to ``logits_step`` for ``ta_opd``.

    Pinned to verl 0.9.1: ``distillation_ppo_loss`` calls the module-level ``compute_topk_loss(config,
    distillation_config, data, student_logits, data_format)``, which dispatches on ``config.strategy`` to a
    fixed top-K loss and is the only place the student's logits are seen. verl offers no hook there, so
    the module attribute is replaced by a wrapper that handles ``ta_opd`` and calls the original for every
    other mode. tests/test_verl.py fails when either function's source changes.
    """
    current = _verl_losses.compute_topk_loss
    if getattr(current, "taopd_wrapped", False):
        return
    original = current

    def compute_topk_loss(config, distillation_config, data, student_logits, data_format):
        if distillation_config.distillation_loss.loss_mode in LOSS_NAMES:
            return logits_step(config, distillation_config, data, student_logits, data_format)
        return original(config, distillation_config, data, student_logits, data_format)

    compute_topk_loss.taopd_wrapped = True
    compute_topk_loss.original = original
    _verl_losses.compute_topk_loss = compute_topk_loss


_install_logits_step()
