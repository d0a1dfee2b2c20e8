"""The built-in long-response task (train/task.py, ``data.source=long_arithmetic``): generation and answer checking."""

import random

import pytest

from taopd_train.config import load_config
from taopd_train.task import ArithmeticTask, LongArithmeticTask, build_task


def test_worked_solution_format_and_answer():
    task = LongArithmeticTask(digits=4, num_eval=16)
    ex = task.format(4821, 7)
    assert ex.prompt == "12840+7*4="  # the start, least significant digit first
    assert ex.solution == "12840+7;82840+7;53840+7;24840+7;94840"
    assert ex.answer == "94840" and ex.target == ex.solution  # 4849, little-endian, zero-padded
    top = task.format(9999, 9)  # the longest total: a fifth digit
    assert top.answer == "53001" and top.solution.endswith(";53001")
    assert len(top.solution) + 1 == task.max_response_tokens  # one token per character, plus EOS
    assert LongArithmeticTask(digits=2, chain=2).format(5, 3).solution == "500+3;800+3;110"


def test_every_partial_result_is_right_and_responses_are_long():
    task = LongArithmeticTask(digits=4, num_eval=64)
    rng = random.Random(0)
    lengths = []
    for _ in range(300):
        ex = task.train_example(rng)
        start, rest = ex.prompt[:-1].split("+")
        k, chain = map(int, rest.split("*"))
        parts = ex.solution.split(";")
        assert len(parts) == chain + 1
        for i, part in enumerate(parts):
            total = part.split("+")[0]
            assert len(total) == 5 and int(total[::-1]) == int(start[::-1]) + i * k
            if i < chain:
                assert part.split("+")[1] == str(k)
        assert parts[-1] == ex.answer and "+" not in parts[-1]
        lengths.append(len(ex.solution) + 1)
    lengths.sort()
    assert 30 <= lengths[len(lengths) // 2] <= 100  # median response tokens (one per character + EOS)


def test_answer_check_is_exact_on_the_final_total():
    task = LongArithmeticTask(digits=3, num_eval=8)
    ex = task.format(123, 9)
    assert task.check(ex.solution, ex.answer)
    assert task.check(" " + ex.solution + " ", ex.answer)
    assert not task.check(ex.solution + "0", ex.answer)  # one digit more
    assert not task.check(ex.solution[:-1], ex.answer)  # one digit less
    assert not task.check(ex.solution.rsplit(";", 1)[0], ex.answer)  # stopped one total early
    assert not task.check("", ex.answer) and not task.check(ex.answer, ex.answer)  # the total alone has no ';'
    assert task.check("garbage;" + ex.answer, ex.answer)  # only the final total is checked


def test_held_out_pairs_are_never_sampled_and_do_not_depend_on_the_seed():
    task = LongArithmeticTask(digits=1, num_eval=20, seed=0)  # 90 pairs: collisions would show
    held = {ex.prompt for ex in task.eval_examples()}
    rng = random.Random(1)
    assert all(task.train_example(rng).prompt not in held for _ in range(2000))
    assert [e.prompt for e in LongArithmeticTask(digits=1, num_eval=20, seed=5).eval_examples()] == \
        [e.prompt for e in task.eval_examples()]


@pytest.mark.parametrize("make", [lambda n: LongArithmeticTask(digits=2, num_eval=n),
                                  lambda n: ArithmeticTask(max_operand=30, num_eval=n)], ids=["long", "short"])
def test_validation_pairs_are_neither_held_out_nor_trained_on_and_the_reserve_fixes_training(make):
    task = make(20)
    held = {ex.prompt for ex in task.eval_examples()}
    val = {ex.prompt for ex in task.validation_examples()}
    assert len(held) == 20 and len(val) == len(task.validation_examples()) >= 1 and not held & val
    rng = random.Random(1)
    trained = {task.train_example(rng).prompt for _ in range(3000)}
    assert not trained & (held | val)
    # a larger held-out set within the reserve: the same validation pairs and the same training stream
    bigger = make(task.split[0])
    assert {ex.prompt for ex in bigger.eval_examples()} >= held
    assert bigger.validation_examples() == task.validation_examples() and bigger.split == task.split
    r1, r2 = random.Random(7), random.Random(7)
    assert [task.train_example(r1) for _ in range(200)] == [bigger.train_example(r2) for _ in range(200)]
    # past the reserve, held-out pairs push the validation pairs back (and change the preparation's key)
    assert make(task.split[0] + 1).split[0] == task.split[0] + 1


def test_built_from_the_config():
    cfg = load_config(None, ["data.source=long_arithmetic", "data.digits=3", "data.chain=5", "data.eval_size=32"])
    task = build_task(cfg.data, cfg.seed)
    assert isinstance(task, LongArithmeticTask) and (task.digits, task.chain) == (3, 5)
    assert len(task.eval_examples()) == 32


def test_every_character_is_one_qwen_token():
    from taopd_train.models import QwenBPETokenizer
    from taopd_train.prepare import task_token_ids

    tok = QwenBPETokenizer()
    task = LongArithmeticTask(digits=4, num_eval=8)
    ex = task.format(9081, 2)
    ids = tok.encode(ex.solution)
    assert len(ids) == len(ex.solution) and tok.decode(ids) == ex.solution
    assert len(tok.prompt_ids(ex.prompt)) == len(ex.prompt)
    assert len(task_token_ids(task, tok)) == len(task.alphabet()) + 1  # + EOS


def test_corrupted_examples_continue_from_the_wrong_total():
    task = LongArithmeticTask(digits=4, num_eval=16)
    rng = random.Random(3)
    width = task.digits + 1
    for _ in range(200):
        ex = task.corrupted_example(rng)
        start, rest = ex.prompt[:-1].split("+")
        k = int(rest.split("*")[0])
        (pos,) = ex.unscored
        i, j = divmod(pos, width + 3)
        assert j < task.digits  # a digit of a total, never its top digit or a separator
        totals = [int(part.split("+")[0][::-1]) for part in ex.solution.split(";")]
        clean = [int(start[::-1]) + n * k for n in range(task.chain + 1)]
        assert totals[:i] == clean[:i] and totals[i] != clean[i]  # one wrong digit, in total i
        assert sum(a != b for a, b in zip(task.little_endian(totals[i]), task.little_endian(clean[i]))) == 1
        assert all(totals[n + 1] == totals[n] + k for n in range(i, task.chain))  # later totals continue from it
        assert ex.answer == ex.solution.rsplit(";", 1)[1]


def test_sft_does_not_train_on_the_corrupted_digit():
    from taopd_train.models import QwenBPETokenizer
    from taopd_train.prepare import sft_batch

    tok = QwenBPETokenizer()
    task = LongArithmeticTask(digits=4, num_eval=8)
    clean = task.format(4821, 7)
    bad = task.corrupted_example(random.Random(0))
    ids, _, rows, cols, labels = sft_batch([clean, bad], tok, "cpu")
    prompt = len(tok.prompt_ids(clean.prompt))
    n = len(clean.solution) + 1  # response tokens + EOS
    assert (rows == 0).sum() == n and (rows == 1).sum() == n - 1
    skipped = prompt + bad.unscored[0]  # the token position left out; its predictor is position - 1
    assert skipped - 1 not in cols[rows == 1].tolist() and skipped - 1 in cols[rows == 0].tolist()
    assert (labels == ids[rows, cols + 1]).all()
