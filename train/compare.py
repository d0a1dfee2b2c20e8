#!/usr/bin/env python
"""``python train/compare.py``: the strategy comparison (the code: ``taopd_train.experiments.compare``)."""

if __name__ == "__main__":
    import sys

    from taopd_train.experiments.compare import main

    sys.exit(main())
