"""Reproducible preparation of the built-in models (train/prepare.py): shipped compact weights expand to
exactly the models that SFT produced, and the shipped files in train/prepared/ match their records."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from taopd_train import prepare as P
from taopd_train.config import load_config
from taopd_train.models import load_tokenizer
from taopd_train.task import build_task

TINY = ["sft.teacher_steps=3", "sft.student_steps=3", "sft.eval_every=3", "data.eval_size=16",
        "teacher.tiny.hidden_size=32", "teacher.tiny.intermediate_size=64",
        "student.tiny.hidden_size=32", "student.tiny.intermediate_size=64"]


def test_shipped_compact_weights_expand_to_the_trained_models(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    cfg = load_config(None, [f"sft.cache_dir={tmp_path / 'cache'}", *TINY])
    task, tok = build_task(cfg.data, cfg.seed), load_tokenizer(cfg)
    monkeypatch.setattr(P, "SHIPPED_DIR", tmp_path / "shipped")
    trained = P.prepare_builtin(cfg, task, tok, torch.device("cpu"), log=lambda m: None)
    for role, d in trained.items():
        assert json.loads((Path(d) / "prepared.json").read_text())["source"] == "trained"
        P.SHIPPED_DIR.mkdir(exist_ok=True)
        shutil.copyfile(Path(d) / "compact.safetensors", P.shipped_path(cfg, role))
    shipped = P.prepare_builtin(cfg, task, tok, torch.device("cpu"), log=lambda m: None)
    for role in trained:
        assert shipped[role] != trained[role] and shipped[role].endswith("-shipped")
        info = json.loads((Path(shipped[role]) / "prepared.json").read_text())
        assert info["source"] == "shipped" and info["compact_accuracy_measured"] == info["compact_accuracy"]
        a = load_file(str(Path(trained[role]) / "model.safetensors"))
        b = load_file(str(Path(shipped[role]) / "model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # sft.shipped=false ignores the shipped files: the trained cache again
    cfg2 = load_config(None, [f"sft.cache_dir={tmp_path / 'cache'}", "sft.shipped=false", *TINY])
    assert P.prepare_builtin(cfg2, task, tok, torch.device("cpu"), log=lambda m: None) == trained


def test_the_early_stop_reads_the_validation_pairs_not_the_held_out_set(monkeypatch):
    cfg = load_config(None, TINY)
    task, tok = build_task(cfg.data, cfg.seed), load_tokenizer(cfg)
    asked = []

    def spy(model, prompts, **kw):
        asked.append([list(p) for p in prompts])
        return generate(model, prompts, **kw)

    generate = P.generate
    monkeypatch.setattr(P, "generate", spy)
    _, info = P.compact_sft(cfg.student.tiny, 3, task, tok, cfg.sft, seed=0, device=torch.device("cpu"),
                            log=lambda m: None)
    id_map = {t: i for i, t in enumerate(info["vocab"])}
    compact = lambda examples: [[id_map[t] for t in tok.prompt_ids(ex.prompt)] for ex in examples]  # noqa: E731
    assert asked == [compact(task.validation_examples())]
    assert not {tuple(p) for p in asked[0]} & {tuple(p) for p in compact(task.eval_examples())}


def test_the_preparation_key_holds_the_split_not_the_eval_size():
    key = lambda *o: P.compact_key(load_config(None, list(o)), "teacher")  # noqa: E731
    assert key("data.eval_size=256") == key("data.eval_size=1024") == key()
    assert key("data.eval_size=1025") != key()  # past the reserve: other training pairs
    assert P.cache_key(load_config(None, ["data.eval_size=512"]), "student") == P.cache_key(load_config(None, []), "student")


def test_the_expansion_is_device_independent_and_seeded():
    from taopd_train.config import TinyArch
    from taopd_train.models import tiny_qwen3_config
    from transformers import Qwen3ForCausalLM

    torch.manual_seed(0)
    arch = TinyArch(16, 1, 2, 1, 32)
    small = Qwen3ForCausalLM(tiny_qwen3_config(arch, vocab_size=20 + P.DISTRACTORS, special_id=19))
    vocab = list(range(10, 29)) + [151643]
    torch.manual_seed(123)  # the global RNG does not enter the expansion
    a = P.expand(small, vocab, arch, seed=5, device=torch.device("cpu")).get_input_embeddings().weight
    torch.manual_seed(456)
    b = P.expand(small, vocab, arch, seed=5, device=torch.device("cpu")).get_input_embeddings().weight
    assert torch.equal(a, b)
    assert torch.equal(a[vocab], small.get_input_embeddings().weight[:20])


@pytest.mark.parametrize("path", sorted(P.SHIPPED_DIR.glob("*.safetensors")), ids=lambda p: p.name)
def test_shipped_files_are_named_by_their_preparation(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        info = json.loads(f.metadata()["info"])
    assert {"compact_accuracy", "steps", "vocab"} <= set(info)
    assert path.stat().st_size < 8 * 2 ** 20


@pytest.mark.parametrize("config", [None, "arithmetic"])
def test_the_bundled_configs_have_shipped_weights_that_met_their_early_stop(config):
    """A fresh machine expands these instead of training (the same models everywhere); a change to what the
    preparation depends on without regenerated weights would silently train here instead."""
    from safetensors import safe_open

    cfg = load_config(config, [])
    for role in ("teacher", "student"):
        path = P.shipped_path(cfg, role)
        assert path.is_file(), f"{path.name}: regenerate with python -m taopd_train.prepare --export"
        with safe_open(str(path), framework="pt") as f:
            info = json.loads(f.metadata()["info"])
        assert info["compact_accuracy"] >= getattr(cfg.sft, f"{role}_target"), (role, info["compact_accuracy"])
        assert info["steps"] < getattr(cfg.sft, f"{role}_steps")  # it stopped early, on the validation pairs
