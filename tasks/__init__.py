"""Task code (LightningModules and DataModules) built on :mod:`gdrq_lightning`.

One sub-package per task: ``classification``, ``detection``, ``segmentation``.
The library never imports this package; configs name task classes by ``class_path``.
"""
