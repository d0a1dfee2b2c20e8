"""Experiments on the driver: the strategy comparison (``compare``) and the fixed-context diagnostic
(``diagnose``), with the frozen context bank they share (``bank``).

They run the driver's ``run.train`` and watch it only through the loop's callbacks (``hooks.Hooks``); the
driver imports nothing from here. Commands: ``python train/compare.py`` and ``python train/diagnose.py``
(thin entry points into this package).
"""
