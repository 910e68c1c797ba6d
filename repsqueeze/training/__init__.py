"""Training: the Lightning module (:mod:`~repsqueeze.training.lit`), the data sets
and their splits and loaders (:mod:`~repsqueeze.training.datasets`,
:mod:`~repsqueeze.training.data`: no Lightning import), the data modules built on those
(:mod:`~repsqueeze.training.datamodules`), the optimisation rules
(:mod:`~repsqueeze.training.optim`), the loggers (:mod:`~repsqueeze.training.loggers`) and
the training-vs-deployed check (:mod:`~repsqueeze.training.callbacks`).

Nothing is imported here, so ``import repsqueeze.training.data`` stays light.
"""
