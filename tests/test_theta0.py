"""train/theta0.py: its pieces against direct computations, and the whole measurement on a few validation
prompts of the shipped lookup models (the classes the task's design fixes: known in the student's top-K,
wrong outside it)."""

import json

import pytest
import torch

from taopd_train.experiments import theta0 as th
from taopd_train.lookup_task import LookupTask
from taopd_train.rollout import Rollout


def test_each_loss_position_gets_the_class_of_the_token_it_predicts():
    task = LookupTask()
    tok = task.tokenizer
    exs = task.validation_examples()[:2]
    prompt = [tok.prompt_ids(ex.prompt) for ex in exs]
    seqs = [p + tok.encode(ex.answer) + [tok.eos_id] for p, ex in zip(prompt, exs)]
    ids = torch.tensor(seqs)
    resp = torch.zeros_like(ids)
    resp[:, len(prompt[0]):] = 1
    ro = Rollout(ids, torch.ones_like(ids), resp, prompt_len=len(prompt[0]))
    got = th.position_classes(task, exs, ro)
    assert got == task.position_classes(exs[0]) + task.position_classes(exs[1])


def test_unused_mass_is_the_softmax_mass_on_the_unused_ids():
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(5, 8, generator=g), torch.randn(30, 8, generator=g)
    unused = torch.zeros(30, dtype=torch.bool)
    unused[[3, 7, 20]] = True
    p = torch.softmax((h @ w.T).double() / 0.7, -1)
    assert torch.allclose(th.unused_mass(h, w, unused, 0.7, chunk=2), p[:, unused].sum(-1), atol=1e-12)


def test_spearman_is_none_without_a_ranking_and_one_for_a_monotone_map():
    x = torch.arange(6.0)
    assert th.spearman(x, torch.zeros(6)) is None and th.spearman(x[:1], x[:1]) is None
    assert th.spearman(x, x.exp()) == pytest.approx(1.0)


def test_theta0_on_a_few_validation_prompts_of_the_lookup_models(tmp_path):
    from taopd_train.config import load_config

    res = th.theta0(load_config("lookup", []), prompts=4, out=tmp_path, log=lambda m: None)
    data = json.loads((tmp_path / "theta0.json").read_text())
    assert data["config"]["split"] == "validation" and data["config"]["prompts"] == 4
    classes = data["classes"]
    assert sum(r["n"] for r in classes.values()) == data["n_positions"] > 0
    for row in classes.values():
        for k in ("teacher_unused_mass", "unused_top_share_student", "unused_top_share_teacher", "C"):
            assert 0.0 <= row[k] <= 1.0
    assert classes["known"]["C"] > 0.9 and classes["wrong"]["C"] < 0.1  # the student's tables, by design
    acc = data["accuracy"]
    assert acc["teacher"]["accuracy"] > 0.9 > acc["student"]["accuracy"]
    assert acc["student"]["accuracy/known"] > acc["student"]["accuracy/wrong"]
    assert res["classes"] == classes
