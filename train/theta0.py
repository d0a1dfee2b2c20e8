#!/usr/bin/env python
"""``python train/theta0.py``: theta_0 of the prepared pair per position class (the code: ``taopd_train.experiments.theta0``)."""

if __name__ == "__main__":
    import sys

    from taopd_train.experiments.theta0 import main

    sys.exit(main())
