"""The built-in long-response task (train/task.py, ``data.source=long_arithmetic``): generation and answer checking."""

import random

from taopd_train.config import load_config
from taopd_train.task import LongArithmeticTask, build_task


def test_worked_solution_format_and_answer():
    task = LongArithmeticTask(digits=4, num_eval=16)
    ex = task.format(4821, 7)
    assert ex.prompt == "4821+7*6="
    assert ex.solution == "12840+7;82840+7;53840+7;24840+7;94840+7;65840+7;36840=4863"
    assert ex.answer == "4863" and ex.target == ex.solution
    top = task.format(9999, 9)  # the longest response: a fifth digit
    assert top.answer == "10053" and top.solution.endswith(";35001=10053")
    assert len(top.solution) + 1 == task.max_response_tokens  # one token per character, plus EOS


def test_every_partial_result_is_right_and_responses_are_long():
    task = LongArithmeticTask(digits=4, num_eval=64)
    rng = random.Random(0)
    lengths = []
    for _ in range(300):
        ex = task.train_example(rng)
        start, rest = ex.prompt[:-1].split("+")
        k, chain = map(int, rest.split("*"))
        steps, final = ex.solution.rsplit("=", 1)
        parts = steps.split(";")
        assert len(parts) == chain + 1
        for i, part in enumerate(parts):
            total = part.split("+")[0]
            assert len(total) == 5 and int(total[::-1]) == int(start) + i * k
            if i < chain:
                assert part.split("+")[1] == str(k)
        assert final == str(int(start) + chain * k) == ex.answer
        lengths.append(len(ex.solution) + 1)
    lengths.sort()
    assert 30 <= lengths[len(lengths) // 2] <= 100  # median response tokens (one per character + EOS)


def test_answer_check_is_exact_on_the_final_answer():
    task = LongArithmeticTask(digits=3, num_eval=8)
    ex = task.format(123, 9)
    assert task.check(ex.solution, ex.answer)
    assert task.check(" " + ex.solution + " ", ex.answer)
    assert not task.check(ex.solution + "0", ex.answer)  # one digit more
    assert not task.check(ex.solution[:-1], ex.answer)  # one digit less
    assert not task.check(ex.solution.rsplit("=", 1)[0], ex.answer)  # no final answer
    assert not task.check("", ex.answer) and not task.check(ex.answer, ex.answer)  # the answer alone has no '='
    assert task.check("garbage=" + ex.answer, ex.answer)  # only the final answer is checked


def test_held_out_pairs_are_never_sampled_and_do_not_depend_on_the_seed():
    task = LongArithmeticTask(digits=1, num_eval=20, seed=0)  # 90 pairs: collisions would show
    held = {ex.prompt for ex in task.eval_examples()}
    rng = random.Random(1)
    assert all(task.train_example(rng).prompt not in held for _ in range(2000))
    assert [e.prompt for e in LongArithmeticTask(digits=1, num_eval=20, seed=5).eval_examples()] == \
        [e.prompt for e in task.eval_examples()]


def test_built_from_the_config():
    cfg = load_config(None, ["data.source=long_arithmetic", "data.digits=3", "data.eval_size=32"])
    task = build_task(cfg.data, cfg.seed)
    assert isinstance(task, LongArithmeticTask) and task.digits == 3 and len(task.eval_examples()) == 32


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
