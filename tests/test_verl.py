"""The verl plugin (taopd_kernels/integrations/verl.py) through verl's own loss entry point,
``distillation_ppo_loss``, on tiny packed (nested) batches on the CPU. Skipped where verl is not importable
(.ci/run runs it in a second environment with the ``[verl]`` extra)."""

from __future__ import annotations

import hashlib
import inspect
import math
import subprocess
import sys

import pytest
import torch

verl = pytest.importorskip("verl")

from tensordict import TensorDict  # noqa: E402
from verl.trainer.distillation import losses as verl_losses  # noqa: E402
from verl.trainer.distillation.fsdp import losses as verl_fsdp_losses  # noqa: E402
from verl.utils import tensordict_utils as tu  # noqa: E402
from verl.workers.config import (  # noqa: E402
    ActorConfig,
    DistillationConfig,
    DistillationLossConfig,
    DistillationTeacherModelConfig,
    RolloutConfig,
)
from verl.workers.utils.padding import no_padding_2_padding  # noqa: E402

from taopd_kernels.integrations import verl as plugin  # noqa: E402
from taopd_kernels.reference import reference_sparse_stats, reference_topk_forward_kl  # noqa: E402
from taopd_kernels.selection import score_and_select  # noqa: E402

PROMPTS, RESPONSES, VOCAB, K_T = (3, 2, 4, 2), (9, 11, 7, 12), 40, 20

# sha256 of the verl 0.9.1 sources the plugin wraps or relies on: a new verl fails here first.
PINNED_SOURCES = {
    "losses.distillation_ppo_loss": "7339ada238b21a87",
    "losses.compute_topk_loss": "1599d382534b6def",
    "losses.distillation_loss": "2e6165dd431f2741",
    "losses.compute_forward_kl_topk": "12c8897afe2d9c79",
    "fsdp.losses.compute_forward_kl_topk": "3a27d7d689b340a7",
    "padding.no_padding_2_padding": "0868d5c4731b66ac",
}


def _sources() -> dict:
    from verl.workers.utils import padding
    functions = {
        "losses.distillation_ppo_loss": verl_losses.distillation_ppo_loss,
        "losses.compute_topk_loss": verl_losses.compute_topk_loss.original,
        "losses.distillation_loss": verl_losses.distillation_loss,
        "losses.compute_forward_kl_topk": verl_losses.compute_forward_kl_topk,
        "fsdp.losses.compute_forward_kl_topk": verl_fsdp_losses.compute_forward_kl_topk,
        "padding.no_padding_2_padding": padding.no_padding_2_padding,
    }
    return {name: hashlib.sha256(inspect.getsource(fn).encode()).hexdigest()[:16] for name, fn in functions.items()}


# ------------------------------------------------------------------------ set-up


def configs(*, policy_gradient=False, strategy="fsdp", agg="token-mean", loss_max_clamp=None, loss_mode="ta_opd"):
    actor = ActorConfig(strategy=strategy, loss_agg_mode=agg, ppo_micro_batch_size_per_gpu=1, ppo_mini_batch_size=4,
                        rollout_n=1)
    teacher = DistillationTeacherModelConfig(model_path="teacher", inference=RolloutConfig(name="vllm", tensor_model_parallel_size=1))
    loss = DistillationLossConfig(loss_mode=loss_mode, topk=K_T, use_policy_gradient=policy_gradient,
                                  use_task_rewards=False, loss_max_clamp=loss_max_clamp, log_prob_min_clamp=None)
    return actor, DistillationConfig(enabled=True, n_gpus_per_node=1, nnodes=1, teacher_models={"teacher_model": teacher},
                                     distillation_loss=loss)


def _nested(values, lengths):
    """A jagged nested tensor as verl's batches hold them (with its cached max length)."""
    return torch.nested.as_nested_tensor(list(values.split(list(lengths))), layout=torch.jagged)


def micro_batch(seed=0, teacher_id_shift=0):
    """A packed micro-batch as verl's no-padding path builds it: sequences prompt + response, the teacher's
    top-K_t per packed token (row j predicts token j + 1), a response mask with a few masked tokens."""
    g = torch.Generator().manual_seed(seed)
    seq_lens = [p + r for p, r in zip(PROMPTS, RESPONSES)]
    total = sum(seq_lens)
    tokens = torch.randint(0, VOCAB, (total,), generator=g)
    starts = [sum(seq_lens[:i]) for i in range(len(seq_lens))]
    prompts = torch.cat([tokens[s:s + p] for s, p in zip(starts, PROMPTS)])
    responses = torch.cat([tokens[s + p:s + p + r] for s, p, r in zip(starts, PROMPTS, RESPONSES)])
    response_mask = (torch.rand(sum(RESPONSES), generator=g) > 0.15).long()
    teacher_logits = torch.randn(total, VOCAB, generator=g) * 2
    lp = torch.log_softmax(teacher_logits, -1)
    top = lp.topk(K_T, -1)
    ids, values = (top.indices + teacher_id_shift).int(), top.values.clone()
    last_rows = torch.tensor(seq_lens).cumsum(0) - 1
    ids[last_rows], values[last_rows] = 0, 0.0  # verl's dummy row after each sequence (extract_prompt_logprobs)
    n_valid = int(response_mask.sum())
    data = TensorDict({
        "input_ids": _nested(tokens, seq_lens), "prompts": _nested(prompts, list(PROMPTS)),
        "responses": _nested(responses, list(RESPONSES)), "response_mask": _nested(response_mask, list(RESPONSES)),
        "teacher_ids": _nested(ids, seq_lens), "teacher_logprobs": _nested(values, seq_lens),
        "advantages": _nested(torch.zeros(sum(RESPONSES)), list(RESPONSES)),
    }, batch_size=[len(seq_lens)])
    for key, value in (("dp_size", 1), ("batch_num_tokens", n_valid), ("global_batch_size", len(seq_lens))):
        tu.assign_non_tensor_data(data, key, value)
    student_logits = (torch.randn(1, total, VOCAB, generator=g) * 2).requires_grad_()
    return data, student_logits, seq_lens


def run_both_stages(actor, distill, data, student_logits, seq_lens):
    """Stage 1 as the engine calls it (logits step), stage 2 as the actor's loss (docs/integrations.md)."""
    outputs = verl_losses.distillation_ppo_loss(config=actor, distillation_config=distill, data=data,
                                                student_logits=student_logits)
    model_output = {k: _nested(v.squeeze(0), seq_lens) for k, v in outputs.items()}
    rolled = torch.roll(data["input_ids"].values(), -1)
    log_probs = torch.log_softmax(student_logits[0], -1).gather(1, rolled[:, None]).squeeze(1)
    model_output["log_probs"] = _nested(log_probs, seq_lens)
    old = no_padding_2_padding(log_probs.detach(), data)
    data["old_log_probs"] = _nested(old[torch.arange(old.shape[1])[None, :] < torch.tensor(RESPONSES)[:, None]],
                                    RESPONSES)
    loss, metrics = verl_losses.distillation_ppo_loss(config=actor, distillation_config=distill,
                                                      model_output=model_output, data=data)
    return loss, metrics, outputs


def reference_loss(data, student_logits):
    """The documented ta_opd loss from taopd_kernels.reference: the kept set from the float64 sparse statistics
    and the library's selection, then the mean over kept positions of verl's top-K forward KL."""
    valid, sequence_ids = plugin.packed_positions(data, student_logits.shape[1])
    ids, logprobs = data["teacher_ids"].values().long(), data["teacher_logprobs"].values()
    ref = reference_sparse_stats(teacher_topk_ids=ids, teacher_topk_logprobs=logprobs,
                                 student_logits=student_logits[0].detach(), top_k=16)
    _, kept = score_and_select("teachability", entropy=ref["entropy_student"], disagreement=ref["disagreement"],
                               teacher_mass=ref["teacher_mass"], valid=valid, keep_ratio=0.05,
                               sequence_ids=sequence_ids, min_per_sequence=1)
    per_token = reference_topk_forward_kl(student_logits[0], ids, logprobs)
    return per_token[kept].sum() / kept.sum(), kept, valid


# ------------------------------------------------------------------------ tests


def test_plugin_registers_on_import_verl():
    """verl loads the entry point itself (a failed plugin is only logged at debug level, so check it)."""
    code = ("import verl\nfrom verl.trainer.distillation import losses as l\n"
            "assert 'ta_opd' in l.DISTILLATION_LOSS_REGISTRY, sorted(l.DISTILLATION_LOSS_REGISTRY)\n"
            "assert l.get_distillation_loss_settings('ta_opd').use_topk\n"
            "assert l.compute_topk_loss.taopd_wrapped\nprint('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_verl_is_the_pinned_version_and_the_wrapped_sources_are_unchanged():
    assert verl.__version__ == plugin.VERL_VERSION
    assert _sources() == PINNED_SOURCES, "verl changed: re-check taopd_kernels/integrations/verl.py against it"


def test_both_stages_give_the_reference_loss_and_zero_gradient_off_kept_rows():
    actor, distill = configs()
    data, logits, seq_lens = micro_batch()
    loss, metrics, outputs = run_both_stages(actor, distill, data, logits, seq_lens)
    ref, kept, valid = reference_loss(data, logits.detach().clone().requires_grad_())
    assert torch.equal(outputs[plugin.KEPT][0].bool(), kept)
    assert abs(float(loss) - float(ref)) <= 1e-5 * (1 + abs(float(ref)))
    loss.backward()
    row_grad = logits.grad[0].abs().sum(-1)
    assert bool((row_grad[~kept] == 0).all()) and bool((row_grad[kept] > 0).all())
    n_valid, n_kept = int(valid.sum()), int(kept.sum())
    assert n_kept == max(1, math.ceil(0.05 * n_valid)) or n_kept <= len(seq_lens) + math.ceil(0.05 * n_valid)
    assert math.isclose(metrics["taopd/kept_fraction"], n_kept / n_valid)
    for key in ("taopd/teacher_mass", "taopd/teacher_mass_kept", "taopd/disagreement_kept"):
        assert math.isfinite(metrics[key]), key


def test_policy_gradient_mode():
    """use_policy_gradient: verl turns the per-token loss into the advantage (-loss); zero off kept rows, so
    those rows get no gradient; at ratio 1 the loss value is the same mean over kept positions."""
    actor, distill = configs(policy_gradient=True)
    data, logits, seq_lens = micro_batch(seed=1)
    loss, metrics, _ = run_both_stages(actor, distill, data, logits, seq_lens)
    ref, kept, _ = reference_loss(data, logits.detach().clone())
    assert abs(float(loss) - float(ref)) <= 1e-5 * (1 + abs(float(ref)))
    loss.backward()
    row_grad = logits.grad[0].abs().sum(-1)
    assert bool((row_grad[~kept] == 0).all()) and bool((row_grad[kept] > 0).any())
    assert "taopd/kept_fraction" in metrics


def test_other_loss_modes_go_to_verl_unchanged():
    actor, distill = configs(loss_mode="forward_kl_topk")
    data, logits, _ = micro_batch(seed=2)
    ours = verl_losses.compute_topk_loss(actor, distill, data, logits, "thd")
    theirs = verl_losses.compute_topk_loss.original(actor, distill, data, logits, "thd")
    assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_teacher_ids_beyond_the_student_vocabulary_are_padding():
    actor, distill = configs()
    data, logits, seq_lens = micro_batch(seed=3)
    ids = data["teacher_ids"].values().clone()
    ids[::5, -1] = VOCAB + 3  # a padding row of a larger teacher vocabulary, at its lowest rank
    data["teacher_ids"] = _nested(ids, seq_lens)
    loss, _, _ = run_both_stages(actor, distill, data, logits, seq_lens)
    assert math.isfinite(float(loss))


@pytest.mark.parametrize("change, match", [
    (dict(strategy="megatron"), "megatron"),
    (dict(agg="seq-mean-token-mean"), "token-mean"),
    (dict(loss_max_clamp=10.0), "loss_max_clamp"),
])
def test_unsupported_modes_are_refused_by_name(change, match):
    actor, distill = configs(**change)
    data, logits, seq_lens = micro_batch()
    with pytest.raises((NotImplementedError, ValueError), match=match):
        run_both_stages(actor, distill, data, logits, seq_lens)


def test_missing_inputs_are_refused_by_name():
    actor, distill = configs()
    data, logits, seq_lens = micro_batch()
    fused_output = {"log_probs": _nested(torch.zeros(sum(seq_lens)), seq_lens)}  # no logits step ran
    with pytest.raises(KeyError, match="use_fused_kernels"):
        verl_losses.distillation_ppo_loss(config=actor, distillation_config=distill, model_output=fused_output,
                                          data=data)
    del data["teacher_ids"]
    with pytest.raises(KeyError, match="teacher_ids"):
        verl_losses.distillation_ppo_loss(config=actor, distillation_config=distill, data=data, student_logits=logits)


def test_options_from_the_environment(monkeypatch):
    monkeypatch.setenv("TAOPD_KEEP_RATIO", "0.5")
    monkeypatch.setenv("TAOPD_STRATEGY", "divergence")
    assert plugin.selection_options()["keep_ratio"] == 0.5
    actor, distill = configs()
    data, logits, seq_lens = micro_batch()
    _, metrics, _ = run_both_stages(actor, distill, data, logits, seq_lens)
    assert metrics["taopd/kept_fraction"] >= 0.5
    monkeypatch.setenv("TAOPD_TOP_K", "24")
    with pytest.raises(ValueError, match="distillation_loss.topk"):
        run_both_stages(actor, distill, data, logits, seq_lens)
    monkeypatch.setenv("TAOPD_STRATEGY", "nope")
    with pytest.raises(ValueError, match="TAOPD_STRATEGY"):
        plugin.selection_options()
