"""Paired dense-vs-ssProp experiments: plan, execute, summarize (see :mod:`ssprop_energy.experiment.runner`).

The package import is light on purpose (no torch): ``from ssprop_energy.experiment.runner import Experiment``
loads the engine.
"""
