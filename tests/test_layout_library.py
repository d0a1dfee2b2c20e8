"""Each concept of the library is written once: the sampled estimator's formula (estimators.py), the
one-position next-token shift (hf.py), the selection across parts (selection.select_parts)."""

from __future__ import annotations

import ast
import pathlib

import torch

import taopd_kernels
from taopd_kernels.estimators import per_position_loss, sampled_token_loss, sampled_weight

PACKAGE = pathlib.Path(taopd_kernels.__file__).parent


def _sources():
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path.relative_to(PACKAGE.parent).as_posix(), ast.parse(path.read_text())


def test_the_sampled_estimator_formula_is_written_once():
    """logp_s(y) - logp_t(y) (w = -A) is formed in estimators.py only; everything else calls it. (The full
    KL's ``logp_s - logp_t`` over the vocabulary is another quantity: only the sampled tokens' count.)"""
    found = []
    for name, tree in _sources():
        for node in ast.walk(tree):
            if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Sub):
                left, right = ast.unparse(node.left), ast.unparse(node.right)
                sampled = any(s in left + right for s in ("sampled", "_y")) or name.endswith("estimators.py")
                if sampled and any(s in left for s in ("logp_s", "lp_s", "logp_student")) and \
                        any(t in right for t in ("logp_t", "lp_t", "logp_teacher")):
                    found.append(f"{name}:{node.lineno} {ast.unparse(node)}")
    assert [f.split(":")[0] for f in found] == ["taopd_kernels/estimators.py"], found


def test_sampled_token_loss_is_minus_advantage_times_logp():
    lp_s = torch.tensor([-0.5, -2.0, -1.0], requires_grad=True)
    lp_t = torch.tensor([-1.5, -0.5, -1.0])
    loss = sampled_token_loss(lp_s, lp_t)
    advantage = -(lp_s - lp_t).detach()
    assert torch.equal(loss, -advantage * lp_s)
    loss.sum().backward()
    assert torch.equal(lp_s.grad, sampled_weight(lp_s, lp_t).detach())  # A held constant


def test_per_position_loss_of_each_estimator():
    class Stats:
        kl_reverse = torch.tensor([0.25, float("nan")])
        logp_student_sampled = torch.tensor([-1.0, float("nan")])
        logp_teacher_sampled = torch.tensor([-3.0, float("nan")])

    assert per_position_loss(Stats, "full") is Stats.kl_reverse
    sampled = per_position_loss(Stats, "sampled")
    assert sampled[0] == -2.0 and torch.isnan(sampled[1])


def _is_one_position_slice(node: ast.Slice) -> bool:
    const = lambda n, v: isinstance(n, ast.Constant) and n.value == v  # noqa: E731
    minus_one = lambda n: isinstance(n, ast.UnaryOp) and isinstance(n.op, ast.USub) and const(n.operand, 1)  # noqa: E731
    return (const(node.lower, 1) and node.upper is None) or (node.lower is None and minus_one(node.upper)) \
        or (isinstance(node.lower, ast.BinOp) and isinstance(node.lower.op, ast.Sub) and const(node.lower.right, 1))


def test_the_next_token_shift_is_written_once():
    """``x[:, :-1]`` / ``x[..., 1:]`` / ``x[:, start - 1:]`` on hidden states, labels, tokens or masks: only
    in hf.next_token_shift."""
    found = []
    for name, tree in _sources():
        for node in ast.walk(tree):
            value = ast.unparse(node) if isinstance(node, ast.Subscript) else ""
            if value and "shape" not in ast.unparse(node.value) and any(w in ast.unparse(node.value) for w in
                                                                            ("hidden", "label", "ids", "mask")):
                slices = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
                if any(isinstance(s, ast.Slice) and _is_one_position_slice(s) for s in slices):
                    found.append(f"{name}:{node.lineno} {ast.unparse(node)}")
    assert [f.split(":")[0] for f in found] == ["taopd_kernels/hf.py"], found


def test_next_token_shift_pairs_position_t_with_token_t_plus_1():
    from taopd_kernels.hf import next_token_shift

    hidden = torch.arange(2 * 6 * 3).view(2, 6, 3)
    tokens = torch.arange(12).view(2, 6) + 100
    h, y = next_token_shift(hidden, tokens)
    assert torch.equal(h, hidden[:, :5]) and torch.equal(y, tokens[:, 1:])
    h, y = next_token_shift(hidden, tokens, first_target=4, num_targets=2)  # a completion at tokens 4, 5
    assert torch.equal(h, hidden[:, 3:5]) and torch.equal(y, tokens[:, 4:6])
    assert next_token_shift(targets=tokens)[0] is None and next_token_shift(hidden)[1] is None
    import pytest

    with pytest.raises(ValueError, match="first_target"):
        next_token_shift(hidden, first_target=0)
