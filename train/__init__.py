"""Training driver for TA-OPD (on-policy distillation with teachability-aware token selection).

Entry points: ``python train/run.py`` (the OPD driver) and ``python train/throughput.py``.
"""
