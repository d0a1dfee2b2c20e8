"""Fused kernels for Teachability-Aware On-Policy Distillation (TA-OPD).

    from taopd_kernels import fused_teachability_kl
    loss, stats = fused_teachability_kl(h_student, W_student, h_teacher, W_teacher, valid_mask=mask)
    loss.backward()

The math contract is SPEC.md (shipped alongside the project); README.md lists the choices it leaves open.
"""

from .api import (
    fused_teachability_kl,
    select_positions,
    teachability_kl_from_logits,
    teachability_stats,
)
from .backends import available as backend_available
from .selection import STRATEGIES, batch_normalize, num_to_keep, select_top, strategy_scores
from .stats import TeachabilityStats

ESTIMATORS = ("full", "sampled")
BACKENDS = ("auto", "torch", "triton", "cuda")  # layout-train placeholder: taopd_kernels.options on merge
__version__ = "0.1.0"

__all__ = [
    "fused_teachability_kl",
    "teachability_kl_from_logits",
    "teachability_stats",
    "select_positions",
    "TeachabilityStats",
    "STRATEGIES",
    "ESTIMATORS",
    "batch_normalize",
    "strategy_scores",
    "select_top",
    "num_to_keep",
    "backend_available",
]
