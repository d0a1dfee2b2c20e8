"""TAOPDTrainer (taopd_kernels.integrations.trl) runs 2 steps on tiny locally-built models: one
selection per generation batch, the logged C / D / KL of kept vs all, and the gradient reaching the
student. No downloads: a WordLevel tokenizer and Qwen3 / Llama configs built in code (examples/trl_ta_opd.py)."""

import pytest
import torch

pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
transformers = pytest.importorskip("transformers")

from taopd_kernels.integrations.trl import TAOPDConfig, TAOPDTrainer  # noqa: E402

from helpers import load_example  # noqa: E402

_example = load_example("trl_ta_opd")  # the example carries the tiny builders (its --tiny run uses them)
WORDS, tiny_tokenizer, tiny_models = _example.WORDS, _example.tiny_tokenizer, _example.tiny_models


@pytest.fixture
def trainer(tmp_path):
    tok = tiny_tokenizer()
    student, teacher = tiny_models(len(tok))
    prompts = datasets.Dataset.from_dict({"prompt": [" ".join(WORDS[i:i + 3]) for i in range(16)]})
    args = TAOPDConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2,
                       gradient_accumulation_steps=2, max_completion_length=6, learning_rate=1e-2,
                       logging_steps=1, report_to="none", use_cpu=True, save_strategy="no", seed=0,
                       taopd_keep_ratio=0.25, taopd_top_k=4, taopd_backend="torch", temperature=1.0,
                       dataloader_num_workers=0, bf16=False)
    return TAOPDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=prompts,
                        processing_class=tok)


def test_trainer_two_steps_selects_globally_and_trains_the_student(trainer):
    calls = []
    real_select = trainer.taopd_loss.select_across
    trainer.taopd_loss.select_across = lambda stats: calls.append(len(stats)) or real_select(stats)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    teacher_before = {n: p.detach().clone() for n, p in trainer.teacher_model.named_parameters()}
    trainer.train()
    # One selection per generation batch (2 steps x 1 generation each), each over both micro-batches.
    assert calls == [2, 2]
    changed = [n for n, p in trainer.model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert "model.embed_tokens.weight" in changed and any("layers.0" in n for n in changed)
    assert all(torch.equal(p.detach(), teacher_before[n]) for n, p in trainer.teacher_model.named_parameters())
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2
    for h in logs:
        assert 0 < h["taopd/kept_fraction"] <= 0.5
        for name in ("teacher_mass", "disagreement", "kl_reverse"):
            assert h[f"taopd/{name}/all"] == h[f"taopd/{name}/all"]  # not NaN
            assert h[f"taopd/{name}/kept"] == h[f"taopd/{name}/kept"]


def test_config_refuses_other_divergences(tmp_path):
    with pytest.raises(ValueError, match="beta must be 1.0"):
        TAOPDConfig(output_dir=str(tmp_path), beta=0.5, report_to="none", use_cpu=True, bf16=False)
    with pytest.raises(ValueError, match="taopd_strategy"):
        TAOPDConfig(output_dir=str(tmp_path), taopd_strategy="greedy", report_to="none", use_cpu=True, bf16=False)
