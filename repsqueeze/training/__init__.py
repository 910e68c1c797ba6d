"""Training: the Lightning module (:mod:`~repsqueeze.training.lit`), the data sets
(:mod:`~repsqueeze.training.datasets`, no Lightning import) and their data modules
(:mod:`~repsqueeze.training.datamodules`), the optimisation rules
(:mod:`~repsqueeze.training.optim`), the loggers (:mod:`~repsqueeze.training.loggers`) and
the training-vs-deployed check (:mod:`~repsqueeze.training.callbacks`).

Nothing is imported here, so ``import repsqueeze.training.datasets`` stays light.
"""
