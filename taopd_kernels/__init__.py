"""Fused kernels for Teachability-Aware On-Policy Distillation (TA-OPD).

    from taopd_kernels import fused_teachability_kl
    loss, stats = fused_teachability_kl(h_student, W_student, h_teacher, W_teacher, valid_mask=mask)
    loss.backward()

docs/math.md in the repository is the math contract: what every number means.
"""

from .api import (
    fused_teachability_kl,
    select_positions,
    teachability_kl_from_logits,
    teachability_stats,
)
from .backends import available as backend_available
from .loss import TeachabilityKLLoss, labels_to_positions, select_across, teachability_kl_loss
from .options import BACKENDS, DEFAULTS, ESTIMATORS, STRATEGIES, LossHeadOptions, default_vocab_size
from .selection import PartsSelection, batch_normalize, num_to_keep, select_parts, select_top, strategy_scores
from .sparse import SparseTeachabilityStats, teachability_from_topk
from .stats import TeachabilityStats

__version__ = "0.2.0"

__all__ = [
    "fused_teachability_kl",
    "teachability_kl_from_logits",
    "teachability_stats",
    "select_positions",
    "TeachabilityKLLoss",
    "teachability_kl_loss",
    "select_across",
    "select_parts",
    "PartsSelection",
    "labels_to_positions",
    "TeachabilityStats",
    "LossHeadOptions",
    "DEFAULTS",
    "default_vocab_size",
    "STRATEGIES",
    "ESTIMATORS",
    "BACKENDS",
    "batch_normalize",
    "strategy_scores",
    "select_top",
    "num_to_keep",
    "backend_available",
    "teachability_from_topk",
    "SparseTeachabilityStats",
]
