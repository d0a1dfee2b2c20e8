"""Training driver for TA-OPD (on-policy distillation with teachability-aware token selection).

Installed as ``taopd_train`` (this folder); entry points: ``taopd-train`` / ``python train/run.py``.
Modules: run (the loop and its phases), hooks (the loop's callbacks for code that watches a run, and
the loss head's clock), head (hidden states + lm_head, the one-position shift), parallel (process
group, FSDP2, global selection), checkpoint, rollout, metrics, config, models, task, prepare (the
built-in models). The experiments on the driver (the strategy comparison, the fixed-context
diagnostic) are the subpackage ``experiments``, which the driver never imports; ``python
train/compare.py`` and ``python train/diagnose.py`` run them. The throughput measurements are in bench/.
"""
