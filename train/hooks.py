"""What the training loop offers code that watches a run: callbacks, and the loss head's clock.

The experiments (``taopd_train.experiments``: the comparison, the diagnostic) observe the driver only
through ``Hooks``; the driver never imports them. Subclass ``Hooks`` and pass an instance to
``run.train(cfg, hooks=...)``; every method is a no-op by default. Called on every rank.

- ``on_step_end(step, metrics)``: after each optimizer step; ``step`` counts the steps done (1 after
  the first), ``metrics`` is the step's dict as logged, with ``loss_head_s``: the loss head's wall
  time in that step (statistics + loss forward + loss backward, ``HeadClock``).
- ``reuse_evaluation(step, which)``: before each evaluation (``which``: "teacher" or "student",
  ``step``: steps done); a result returned here stands in for the evaluation (the teacher's and
  theta_0's are the same for every run of a comparison), None evaluates.
- ``on_evaluate(step, which, result, model)``: after each evaluation, reused or not, with the model
  evaluated (to read, e.g. a held-out KL; not to train).
"""

from __future__ import annotations

import time
from typing import Callable, Optional

import torch


class Hooks:
    """The loop's callbacks (see the module docstring); override the ones you need."""

    def on_step_end(self, step: int, metrics: dict) -> None:
        pass

    def reuse_evaluation(self, step: int, which: str) -> Optional[dict]:
        return None

    def on_evaluate(self, step: int, which: str, result: dict, model: torch.nn.Module) -> None:
        pass


class _Stamp(torch.autograd.Function):
    """Identity whose backward records the time it runs (brackets the loss head's backward)."""

    @staticmethod
    def forward(ctx, x, stamps: list):
        ctx.stamps = stamps
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.stamps.append(time.perf_counter())
        return grad, None


class HeadClock:
    """Wall time of the fused loss head in one step, on the host clock (on a GPU without a
    synchronisation: the time to launch it). Forward calls are timed around; a backward is bracketed
    by identity marks on the loss (its gradient arrives) and the student's hidden states (it leaves)."""

    def __init__(self):
        self._seconds = 0.0
        self._brackets: list = []  # (start stamps, end stamps) of the backwards still to run

    def forward(self, fn: Callable):
        """``fn()``, timed."""
        t = time.perf_counter()
        out = fn()
        self._seconds += time.perf_counter() - t
        return out

    def loss(self, fn: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor) -> torch.Tensor:
        """``fn(hidden)`` (a loss), its forward timed and its backward through ``hidden`` bracketed."""
        start, end = [], []
        if hidden.requires_grad:
            hidden = _Stamp.apply(hidden, end)
        loss = self.forward(lambda: fn(hidden))
        if loss.requires_grad:
            loss = _Stamp.apply(loss, start)
            self._brackets.append((start, end))
        return loss

    def seconds(self) -> float:
        """The time so far, with every bracketed backward that has run."""
        pending = []
        for start, end in self._brackets:
            if start and end:
                self._seconds += end[0] - start[0]
            else:
                pending.append((start, end))
        self._brackets = pending
        return self._seconds
