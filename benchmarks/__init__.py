"""repsqueeze's benchmarks: ``python -m benchmarks.run`` (or ``python benchmarks/run.py``),
``benchmarks.deploy_time``, ``benchmarks.int8``, ``benchmarks.recipes``; results are the
committed ``results*.{md,json}`` files beside them."""
