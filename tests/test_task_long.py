"""The built-in long-response task (train/task.py, ``data.source=long_arithmetic``): generation and answer checking."""

import random

from taopd_train.config import load_config
from taopd_train.task import LongArithmeticTask, build_task


def test_worked_solution_format_and_answer():
    task = LongArithmeticTask(digits=5, num_eval=16)
    ex = task.format(1234, 56789)
    assert ex.prompt == "01234+56789="
    assert ex.solution == "4+9+0=13;3+8+1=12;2+7+1=10;1+6+1=08;0+5+0=05=58023"
    assert ex.answer == "58023" and ex.target == ex.solution
    top = task.format(99999, 99999)  # the longest response: a carry out of the last column
    assert top.answer == "199998" and top.solution.endswith("=19=199998")
    assert len(top.solution) + 1 == task.max_response_tokens  # one token per character, plus EOS


def test_every_column_is_right_and_lengths_are_long():
    task = LongArithmeticTask(digits=5, num_eval=64, seed=3)
    rng = random.Random(0)
    lengths = []
    for _ in range(200):
        ex = task.train_example(rng)
        a, b = map(int, ex.prompt[:-1].split("+"))
        cols, final = ex.solution.split(";"), ex.solution.rsplit("=", 1)[1]
        carry = 0
        for i, col in enumerate(cols):
            lhs, s = col.split("=")[:2]
            x, y, c = map(int, lhs.split("+"))
            assert (x, y, c) == ((a // 10 ** i) % 10, (b // 10 ** i) % 10, carry)
            assert int(s) == x + y + c and len(s) == 2
            carry = int(s) // 10
        assert final == str(a + b) == ex.answer
        lengths.append(len(ex.solution) + 1)
    lengths.sort()
    assert 30 <= lengths[len(lengths) // 2] <= 100  # median response tokens (one per character + EOS)


def test_answer_check_is_exact_on_the_final_answer():
    task = LongArithmeticTask(digits=3, num_eval=8)
    ex = task.format(123, 989)
    assert task.check(ex.solution, ex.answer)
    assert task.check(" " + ex.solution + " ", ex.answer)
    assert not task.check(ex.solution + "0", ex.answer)  # one digit more
    assert not task.check(ex.solution[:-1], ex.answer)  # one digit less
    assert not task.check(ex.solution.rsplit("=", 1)[0], ex.answer)  # no final answer: the last column's sum
    assert not task.check("", ex.answer) and not task.check("1112", ex.answer)
    assert task.check("garbage=" + ex.answer, ex.answer)  # only the final answer is checked


def test_held_out_pairs_are_never_sampled_and_seeded():
    task = LongArithmeticTask(digits=1, num_eval=20, seed=0)  # 100 pairs: collisions would show
    held = {(ex.prompt) for ex in task.eval_examples()}
    rng = random.Random(1)
    assert all(task.train_example(rng).prompt not in held for _ in range(2000))
    assert [e.prompt for e in LongArithmeticTask(digits=1, num_eval=20, seed=0).eval_examples()] == \
        [e.prompt for e in task.eval_examples()]


def test_built_from_the_config():
    cfg = load_config(None, ["data.source=long_arithmetic", "data.digits=4", "data.eval_size=32"])
    task = build_task(cfg.data, cfg.seed)
    assert isinstance(task, LongArithmeticTask) and task.digits == 4 and len(task.eval_examples()) == 32


def test_every_character_is_one_qwen_token():
    from taopd_train.models import QwenBPETokenizer

    tok = QwenBPETokenizer()
    task = LongArithmeticTask(digits=5, num_eval=8)
    ex = task.format(90817, 2)
    ids = tok.encode(ex.solution)
    assert len(ids) == len(ex.solution) and tok.decode(ids) == ex.solution
    assert len(tok.prompt_ids(ex.prompt)) == len(ex.prompt)
