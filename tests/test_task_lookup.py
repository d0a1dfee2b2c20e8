"""The built-in ``lookup`` task (train/lookup_task.py): vocabulary, format, splits, per-slot checking, the
SFT streams of the prepared teacher and student."""

import json
import math
import random
from collections import Counter

import pytest

from taopd_train.lookup_task import ANSWER_CLASSES, CLASSES, GROUPS, LAYOUT, LookupTask


@pytest.fixture(scope="module")
def task():
    return LookupTask(num_eval=64)


def test_words_are_single_tokens_in_disjoint_sets_with_enough_values(task):
    tok = task.tokenizer
    sets = [set(task.list_words), set(task.keys), set(task.values)]
    assert sum(map(len, sets)) == len(set().union(*sets))  # disjoint, no repeats
    assert len(task.values) >= 200
    for w in task.list_words + task.keys + task.values:
        assert len(tok.encode(" " + w)) == 1 and 4 <= len(w) <= 8 and w.isalpha() and w.islower()
    assert Counter(task.group.values()) == {g: len(task.keys) // 3 for g in GROUPS}
    t_values, w_values = set(task.table.values()), set(task.wrong_table.values())
    assert len(t_values) == len(task.keys) and not t_values & w_values  # T injective; T' uses other values
    assert set(task.wrong_table) == {k for k in task.keys if task.group[k] != "known"}
    assert LookupTask(num_eval=64, seed=5).table == task.table  # the same for every run seed


def test_format_tokens_and_classes(task):
    tok = task.tokenizer
    ex = task.eval_examples()[0]
    keys, words = task.parse_prompt(ex.prompt)
    assert len(keys) == 3 and len(words) == 6
    assert ex.prompt == task.prompt(keys, words) and ex.prompt.startswith(" ") and ex.prompt.endswith(" =")
    assert len(tok.prompt_ids(ex.prompt)) == 11 and len(tok.encode(ex.answer)) == len(LAYOUT) == 14
    assert tok.decode(tok.prompt_ids(ex.prompt) + tok.encode(ex.answer)) == ex.prompt + ex.answer
    items = ex.answer.split()
    assert items[:2] == [words[5], words[4]] and items[10:12] == [words[1], words[0]]
    assert [items[i] for i in (3, 8, 13)] == [task.table[k] for k in keys]
    assert not set(task.values) & set(ex.prompt.split())  # values never appear in prompts: no copying
    classes = task.position_classes(ex)
    assert len(classes) == task.max_response_tokens == 15 and classes[-1] == "eos"
    assert [classes[i] for i in (3, 8, 13)] == [task.group[k] for k in keys]
    assert classes.count("rule") == 6 and classes.count("separator") == 5 and set(classes) <= set(CLASSES)
    used = set(task.token_ids(tok))
    rng = random.Random(0)
    for e in task.eval_examples() + [task.train_example(rng) for _ in range(200)]:
        assert set(tok.prompt_ids(e.prompt)) | set(tok.encode(e.answer)) | {tok.eos_id} <= used
    assert len(used) == len(task.list_words) + len(task.keys) + len(task.values) + 4  # 3 symbols + EOS


def test_per_slot_checking(task):
    ex = task.eval_examples()[1]
    right = task.slot_results(ex.answer, ex)
    assert len(right) == 9 and all(ok for _, ok in right)
    assert [c for c, _ in right].count("rule") == 6 and {c for c, _ in right} <= set(ANSWER_CLASSES)
    assert task.check(ex.answer, ex.answer) and task.check(" " + ex.answer + "  ", ex.answer)
    items = ex.answer.split()
    bad = items.copy()
    bad[8] = task.values[0] if task.values[0] != items[8] else task.values[1]  # the second lookup
    got = task.slot_results(" ".join(bad), ex)
    assert [ok for _, ok in got].count(False) == 1 and not got[5][1] and got[5][0] == task.position_classes(ex)[8]
    assert not task.check(" ".join(bad), ex.answer)
    shifted = " ".join(items[:2] + items[3:])  # a separator dropped: every later slot is misplaced
    assert [ok for _, ok in task.slot_results(shifted, ex)][:2] == [True, True]
    assert sum(ok for _, ok in task.slot_results(shifted, ex)) < 9
    assert sum(ok for _, ok in task.slot_results("", ex)) == 0
    assert sum(ok for _, ok in task.slot_results(ex.answer + " extra", ex)) == 9 and not task.check(ex.answer + " x", ex.answer)


def test_held_out_validation_and_training_prompts_are_disjoint(task, monkeypatch):
    held = {ex.prompt for ex in task.eval_examples()}
    val = {ex.prompt for ex in task.validation_examples()}
    assert len(held) == 64 and len(val) == task.split[1] == 256 and not held & val
    assert [e.prompt for e in LookupTask(num_eval=64, seed=3).eval_examples()] == [e.prompt for e in task.eval_examples()]
    # training rejects a drawn prompt that is reserved (held-out or validation), whatever the draw
    reserved = task.eval_items[0]
    draws = iter([reserved, task.validation_items[0], ("a",) * 3 + ("b",)])
    monkeypatch.setattr(task, "_draw", lambda rng: next(draws))
    assert task._train_item(random.Random(0)) == ("a",) * 3 + ("b",)


def test_teacher_stream_corrupts_slots_untrained_and_continues_correctly(task):
    rng = random.Random(1)
    corrupted, slots = 0, Counter()
    for _ in range(400):
        ex = task.teacher_example(rng, noise=0.5)
        keys, words = task.parse_prompt(ex.prompt)
        right = task.response_items(keys, words)
        got = ex.answer.split()
        diff = [i for i, (a, b) in enumerate(zip(got, right)) if a != b]
        assert len(got) == len(right) and diff == list(ex.unscored_tokens)
        corrupted += bool(diff)
        slots[len(diff)] += 1
        assert all(LAYOUT[i][0] != "sep" and got[i] in set(task.list_words) | set(task.values) for i in diff)
    assert 150 < corrupted < 250 and max(slots) >= 4  # several wrong words in one context, as in a rollout
    assert not any(task.teacher_example(rng, noise=0.0).unscored_tokens for _ in range(50))


def test_student_stream_teaches_each_key_group_its_table(task):
    rng = random.Random(2)
    brief = Counter()
    for _ in range(600):
        ex = task.student_example(rng, ordered=False)
        keys, words = task.parse_prompt(ex.prompt)
        items = ex.answer.split()
        assert ex.unscored_tokens == () and len(items) == len(LAYOUT)
        assert all(items[i] in words for i, item in enumerate(LAYOUT) if item[0] == "rule")  # candidates, any order
        for k, v in zip(keys, (items[i] for i in (3, 8, 13))):
            g = task.group[k]
            if g == "known":
                assert v == task.table[k]
            elif g == "wrong":
                assert v == task.wrong_table[k]
            else:
                assert v in (task.table[k], task.wrong_table[k])
                brief[v == task.table[k]] += 1
    assert abs(brief[True] / sum(brief.values()) - task.brief_share) < 0.06
    ex = task.student_example(rng, ordered=True)
    keys, words = task.parse_prompt(ex.prompt)
    assert [w for w, item in zip(ex.answer.split(), LAYOUT) if item[0] == "rule"] == words[::-1]


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="keys_per_group"):
        LookupTask(keys_per_group=1)
    with pytest.raises(ValueError, match="brief_share"):
        LookupTask(brief_share=1.0)


def test_slot_accuracy_is_the_headline_with_classes_beside_it(task):
    exs = task.validation_examples()[:20]
    pairs = [(ex.answer, ex) for ex in exs]
    items = exs[0].answer.split()
    items[0] = items[1]  # one rule slot wrong in one response
    pairs[0] = (" ".join(items), exs[0])
    acc = task.slot_accuracy(pairs)
    assert acc["accuracy"] == pytest.approx(1 - 1 / 180) and acc["accuracy/rule"] == pytest.approx(1 - 1 / 120)
    assert acc["exact_match"] == pytest.approx(19 / 20)
    assert all(acc[f"accuracy/{g}"] == 1.0 for g in GROUPS if f"accuracy/{g}" in acc)


def test_class_metrics_count_kept_positions_per_class():
    import torch

    from taopd_train.metrics import class_metrics

    classes = torch.tensor([0, 0, 1, 1, 2, 2])
    valid = torch.tensor([1, 1, 1, 1, 1, 0]).bool()
    kept = torch.tensor([1, 0, 1, 1, 0, 1]).bool()  # the last one is not valid: not counted
    c = torch.tensor([0.5, 0.1, 0.9, 0.7, 0.3, float("nan")])
    m = class_metrics(["a", "b", "c"], classes, valid, kept, c)
    assert m["kept_mix/a"] == pytest.approx(1 / 3) and m["kept_mix/b"] == pytest.approx(2 / 3) and m["kept_mix/c"] == 0
    assert m["kept_rate/a"] == 0.5 and m["kept_rate/b"] == 1.0 and m["kept_rate/c"] == 0.0
    assert m["C/a"] == pytest.approx(0.3) and m["C_kept/b"] == pytest.approx(0.8) and m["C/c"] == pytest.approx(0.3)
    assert math.isnan(m["C_kept/c"])


def test_the_driver_labels_each_loss_position_with_the_class_of_the_token_it_predicts(task):
    import torch

    from taopd_train import run
    from taopd_train.rollout import Rollout

    tok = task.tokenizer
    exs = task.validation_examples()[:2]
    seqs = [tok.prompt_ids(ex.prompt) + tok.encode(ex.answer) + [tok.eos_id] for ex in exs]
    ids = torch.tensor(seqs)
    resp = torch.zeros_like(ids)
    resp[:, 11:] = 1
    ro = Rollout(ids, torch.ones_like(ids), resp, prompt_len=11)
    valid = resp[:, 1:].reshape(-1).bool()
    kept = torch.zeros_like(valid)
    kept[11 - 1 + 3] = True  # row 0: the position that predicts response token 3, the first lookup
    stats = type("S", (), {"valid": valid, "kept": kept, "teacher_mass": torch.ones(valid.shape)})()
    m = run._class_metrics(task, exs, ro, stats)
    first = task.position_classes(exs[0])[3]
    assert m[f"kept_mix/{first}"] == 1.0 and m["kept_rate/rule"] == 0.0
    assert m["kept_rate/other"] != m["kept_rate/other"]  # no position past the layout: NaN


def test_the_lookup_config_has_shipped_weights_that_met_their_early_stop():
    from safetensors import safe_open

    from taopd_train import prepare as P
    from taopd_train.config import load_config

    cfg = load_config("lookup", [])
    for role in ("teacher", "student"):
        path = P.shipped_path(cfg, role)
        assert path.is_file(), f"{path.name}: regenerate with python -m taopd_train.prepare --config lookup --export"
        with safe_open(str(path), framework="pt") as f:
            info = json.loads(f.metadata()["info"])
        assert info["compact_accuracy"] >= getattr(cfg.sft, f"{role}_target"), (role, info["compact_accuracy"])
        assert info["steps"] < getattr(cfg.sft, f"{role}_steps")
