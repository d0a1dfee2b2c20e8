"""Training driver for TA-OPD (on-policy distillation with teachability-aware token selection).

Installed as ``taopd_train`` (this folder); entry points: ``taopd-train`` / ``python train/run.py``.
Modules: run (the loop and its phases), head (hidden states + lm_head, the one-position shift),
parallel (process group, FSDP2, global selection), checkpoint, rollout, metrics, config, models,
task, prepare. The throughput measurements are in bench/.
"""
