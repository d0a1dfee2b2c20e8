"""TAOPDTrainer under gradient accumulation (issue 24): TRL's trainer run twice on the same prompts, once
with gradient_accumulation_steps=1 and a per-device batch of 2B, once with 2 steps of B, one optimizer
step each (tiny local models of examples/trl_ta_opd.py, CPU).

What it shows:
(a) the accumulated gradients, and the parameters after one SGD step, agree within float32 rounding;
(b) the logged loss is the mean over kept positions: a direct library call on the same generation batch
    (HF-style labels, ``num_items_in_batch`` = its label tokens) gives the same number, not ~keep_ratio times it;
(c) what HF Trainer passes as ``num_items_in_batch`` (None: TRL's generation dataloader yields prompt lists
    without ``labels``), what TRL counts itself (the completion tokens of the generation batch), and the
    divisor the adapter uses instead (the generation batch's global kept count);
and that a wrong divisor is caught by these assertions (monkeypatched into the loss call).

Float32 tolerance of (a): both settings evaluate the same sums in a different order (rows batched 4 vs 2 in
the matmuls, two micro-batch gradients added into ``.grad`` vs one), so they differ by rounding only:
a few ulps per operation, compounded over the 2-layer forward and backward (reductions of length <= 64).
1e-5 of each tensor's largest gradient is ~84 ulps (eps32 = 1.19e-7), above that rounding (measured:
5e-7, about 4 ulps) and far below the smallest error of a wrong divisor (tens of percent here).
SGD, not AdamW: Adam's first step is ~lr * sign(grad), blind to the gradient's scale; no clipping
(max_grad_norm=0) for the same reason.
"""

import copy
import math
from dataclasses import dataclass, field

import pytest
import torch

pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
transformers = pytest.importorskip("transformers")

from taopd_kernels import TeachabilityKLLoss, hf  # noqa: E402
from taopd_kernels.integrations.trl import TAOPDConfig, TAOPDTrainer  # noqa: E402

from helpers import load_example  # noqa: E402

_example = load_example("trl_ta_opd")

B = 2  # micro-batch of the accumulated run; the one-batch run has 2B
KEEP_RATIO, TOP_K, LR, COMPLETION_LEN = 0.25, 4, 1e-2, 6
GRAD_RTOL = 1e-5  # of each tensor's largest |gradient| (module docstring)
LOSS_RTOL = 1e-5  # float32 loss summed over <= 2 micro-batches


@dataclass
class Run:
    """What one training step of one setting left behind."""
    grads: dict = field(default_factory=dict)  # name -> accumulated gradient before the optimizer step
    params_after: dict = field(default_factory=dict)
    hf_num_items: list = field(default_factory=list)  # num_items_in_batch as HF Trainer passed it, per micro-batch
    trl_num_items: list = field(default_factory=list)  # TRL's own count (inputs["num_items_in_batch"])
    normalizers: list = field(default_factory=list)  # the adapter's divisor, per micro-batch
    micro_kept: list = field(default_factory=list)  # kept positions per micro-batch
    generation: dict = field(default_factory=dict)  # the generation batch after the selection
    logged_loss: float = float("nan")
    initial_student: object = None
    teacher: object = None


class _GradientsBeforeStep(transformers.TrainerCallback):
    def __init__(self, run: Run):
        self.run = run

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.run.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _train(out_dir, per_device: int, accumulation: int, loss_patch=None) -> Run:
    """One optimizer step; ``loss_patch(kwargs, trl_count) -> kwargs`` rewrites the loss call's divisor."""
    tok = _example.tiny_tokenizer()
    student, teacher = _example.tiny_models(len(tok))
    prompts = datasets.Dataset.from_dict({"prompt": [" ".join(_example.WORDS[i:i + 3]) for i in range(16)]})
    args = TAOPDConfig(output_dir=str(out_dir), max_steps=1, per_device_train_batch_size=per_device,
                       gradient_accumulation_steps=accumulation, max_completion_length=COMPLETION_LEN,
                       learning_rate=LR, optim="sgd", max_grad_norm=0.0, lr_scheduler_type="constant",
                       logging_steps=1, report_to="none", use_cpu=True, save_strategy="no", seed=0,
                       taopd_keep_ratio=KEEP_RATIO, taopd_top_k=TOP_K, taopd_backend="torch", temperature=1.0,
                       dataloader_num_workers=0, bf16=False, disable_tqdm=True)
    run = Run(initial_student=copy.deepcopy(student), teacher=teacher)
    trainer = TAOPDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=prompts,
                           processing_class=tok, callbacks=[_GradientsBeforeStep(run)])

    generate = trainer._generate_and_score_completions

    def generate_and_record(inputs):
        batch = generate(inputs)
        run.generation = {k: v.clone() for k, v in batch.items() if isinstance(v, torch.Tensor)}
        return batch

    compute_loss = trainer.compute_loss

    def compute_loss_and_record(model, inputs, return_outputs=False, num_items_in_batch=None):
        run.hf_num_items.append(num_items_in_batch)
        run.trl_num_items.append(int(inputs["num_items_in_batch"]))
        run.normalizers.append(float(inputs["taopd_normalizer"]))
        run.micro_kept.append(int(inputs["taopd_keep_mask"].sum()))
        return compute_loss(model, inputs, return_outputs, num_items_in_batch)

    trainer._generate_and_score_completions = generate_and_record
    trainer.compute_loss = compute_loss_and_record
    if loss_patch is not None:
        forward = trainer.taopd_loss.forward
        trainer.taopd_loss.forward = lambda *a, **kw: forward(*a, **loss_patch(kw, run.trl_num_items[-1]))
    trainer.train()
    run.params_after = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    run.logged_loss = next(h["loss"] for h in trainer.state.log_history if "loss" in h)
    return run


def _direct_loss(run: Run) -> tuple:
    """The library called as an HF Trainer user would, on the whole generation batch with the step's
    (initial) student: HF-style unshifted labels, ``num_items_in_batch`` = their label-token count.
    Returns (loss, kept count, valid count)."""
    g = run.generation
    input_ids = torch.cat([g["prompt_ids"], g["completion_ids"]], dim=1)
    attention_mask = torch.cat([g["prompt_mask"], g["completion_mask"]], dim=1)
    labels = torch.cat([torch.full_like(g["prompt_ids"], -100),
                        g["completion_ids"].masked_fill(g["completion_mask"] == 0, -100)], dim=1)
    num_items = int(labels[:, 1:].ne(-100).sum())  # what HF Trainer counts for a causal LM
    with torch.no_grad():
        s = hf.student_head_inputs(run.initial_student, input_ids, attention_mask)
        t = hf.teacher_head_inputs(run.teacher, input_ids, attention_mask)
        loss_fn = TeachabilityKLLoss(keep_ratio=KEEP_RATIO, top_k=TOP_K, backend="torch")
        loss, stats = loss_fn(s.hidden, s.weight, t.hidden, t.weight, labels, shift_labels=True,
                              num_items_in_batch=num_items, return_stats=True)
    return float(loss), int(stats.kept.sum()), num_items


def _disagreements(one: Run, accumulated: Run, reference_loss: float) -> list:
    """Every check of (a) and (b) that fails, named; empty when the two settings agree with the library."""
    problems = []
    for name, grad in one.grads.items():
        scale = grad.abs().max()
        if (grad - accumulated.grads[name]).abs().max() > GRAD_RTOL * scale:
            problems.append(f"(a) gradient of {name}")
        after = one.params_after[name]
        atol = LR * GRAD_RTOL * scale + 4 * torch.finfo(torch.float32).eps * after.abs().max()
        if (after - accumulated.params_after[name]).abs().max() > atol:
            problems.append(f"(a) parameter {name} after the step")
    for label, run in (("accumulation 1", one), ("accumulation 2", accumulated)):
        if not math.isclose(run.logged_loss, reference_loss, rel_tol=LOSS_RTOL):
            problems.append(f"(b) logged loss of {label}: {run.logged_loss:.6g} vs the library's {reference_loss:.6g}")
    return problems


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    one = _train(tmp_path_factory.mktemp("ga1"), per_device=2 * B, accumulation=1)
    accumulated = _train(tmp_path_factory.mktemp("ga2"), per_device=B, accumulation=2)
    return one, accumulated, _direct_loss(one)


def test_both_settings_train_on_the_same_generation_batch_and_selection(runs):
    one, accumulated, _ = runs
    assert one.generation.keys() == accumulated.generation.keys()
    for key in ("prompt_ids", "completion_ids", "completion_mask", "taopd_keep_mask"):
        assert torch.equal(one.generation[key], accumulated.generation[key]), key
    assert len(one.micro_kept) == 1 and len(accumulated.micro_kept) == 2
    # The global selection splits unevenly over the two micro-batches: a per-micro-batch divisor would show.
    assert accumulated.micro_kept[0] != accumulated.micro_kept[1]


def test_hf_passes_no_num_items_in_batch_and_the_adapter_divides_by_the_global_kept_count(runs):
    one, accumulated, (_, kept, valid) = runs
    # (c) HF Trainer counts `labels` of the dataloader batch; TRL's batches are prompt lists: None, both settings.
    assert one.hf_num_items == [None] and accumulated.hf_num_items == [None, None]
    # TRL's own count (used by its JSD loss): the completion tokens of the whole generation batch.
    assert one.trl_num_items == [valid] and accumulated.trl_num_items == [valid, valid]
    # The adapter's divisor: the kept positions of the whole generation batch, in every micro-batch.
    assert one.normalizers == [kept] and accumulated.normalizers == [kept, kept]
    assert sum(accumulated.micro_kept) == kept == one.micro_kept[0]
    assert kept < valid


def test_accumulated_gradients_and_step_match_one_batch_and_the_loss_is_the_kept_mean(runs):
    one, accumulated, (reference, kept, valid) = runs
    assert one.grads and one.grads.keys() == accumulated.grads.keys()
    assert _disagreements(one, accumulated, reference) == []
    # (b) the scale: far from the kept sum over label tokens (the ~keep_ratio-times-smaller trap).
    assert reference * kept / valid < 0.5 * one.logged_loss


def _micro_batch_mean(kwargs, trl_count):  # the accumulated-batch divisor ignored: each micro-batch's own mean
    return {k: v for k, v in kwargs.items() if k != "normalizer"}


def _kept_sum_over_label_tokens(kwargs, trl_count):  # label tokens as a plain divisor of the kept sum
    return {**kwargs, "normalizer": float(trl_count)}


def _hf_formula_per_micro_batch(kwargs, trl_count):  # the module's num_items_in_batch with the global mask
    return {**_micro_batch_mean(kwargs, trl_count), "num_items_in_batch": trl_count}


@pytest.mark.parametrize("patch, caught", [
    (_micro_batch_mean, ("(a) gradient", "(b) logged loss of accumulation 2")),
    (_kept_sum_over_label_tokens, ("(b) logged loss of accumulation 1", "(b) logged loss of accumulation 2")),
    (_hf_formula_per_micro_batch, ("(a) gradient", "(b) logged loss of accumulation 2")),
])
def test_a_wrong_divisor_is_caught(runs, tmp_path, patch, caught):
    *_, (reference, _, _) = runs
    one = _train(tmp_path / "ga1", per_device=2 * B, accumulation=1, loss_patch=patch)
    accumulated = _train(tmp_path / "ga2", per_device=B, accumulation=2, loss_patch=patch)
    problems = _disagreements(one, accumulated, reference)
    for what in caught:
        assert any(p.startswith(what) for p in problems), (what, problems)


def test_dividing_again_by_the_accumulation_steps_is_caught(runs, tmp_path, monkeypatch):
    # The adapter's loss is already over the generation batch's kept count; HF Trainer's own division by
    # gradient_accumulation_steps on top would halve the accumulated run.
    *_, (reference, _, _) = runs
    monkeypatch.setattr(TAOPDTrainer, "loss_is_scaled_for_ga", False)
    one = _train(tmp_path / "ga1", per_device=2 * B, accumulation=1)
    accumulated = _train(tmp_path / "ga2", per_device=B, accumulation=2)
    problems = _disagreements(one, accumulated, reference)
    for what in ("(a) gradient", "(b) logged loss of accumulation 2"):
        assert any(p.startswith(what) for p in problems), (what, problems)
