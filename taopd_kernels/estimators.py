"""The per-position loss of each estimator (docs/math.md, Loss and gradients), written once.

``"full"``: the reverse KL of the position, ``KL_rev[t]`` (a statistic the forward computes).
``"sampled"``: with the sampled token ``y_t`` and ``w_t = logp_s(y_t) - logp_t(y_t)`` (the advantage is
``A_t = -w_t``, held constant), ``l_t = -A_t logp_s(y_t) = w_t logp_s(y_t)``: ``sampled_token_loss``.
"""

from __future__ import annotations

import torch


def sampled_weight(logp_student: torch.Tensor, logp_teacher: torch.Tensor) -> torch.Tensor:
    """w = logp_s(y) - logp_t(y) = -A, the per-token log-ratio that weights the sampled estimator's gradient."""
    return logp_student - logp_teacher


def sampled_token_loss(logp_student: torch.Tensor, logp_teacher: torch.Tensor) -> torch.Tensor:
    """-A * logp_s(y) with A = -(logp_s(y) - logp_t(y)) held constant: its gradient is the per-token
    policy-gradient estimator of the reverse KL (through ``logp_student`` only)."""
    return sampled_weight(logp_student, logp_teacher).detach() * logp_student


def per_position_loss(stats, estimator: str) -> torch.Tensor:
    """l_t of every position from ``TeachabilityStats`` (their shape; NaN where not valid)."""
    if estimator == "full":
        return stats.kl_reverse
    return sampled_token_loss(stats.logp_student_sampled, stats.logp_teacher_sampled)
