#!/usr/bin/env python
"""``python train/diagnose.py``: the fixed-context diagnostic (the code: ``taopd_train.experiments.diagnose``)."""

if __name__ == "__main__":
    import sys

    from taopd_train.experiments.diagnose import main

    sys.exit(main())
