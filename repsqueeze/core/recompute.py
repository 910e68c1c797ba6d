"""Activation recomputation for chain mode, with BatchNorm statistics updated once.

A block in chain mode keeps every inner layer's output for backward (DBB's four branches:
several times a plain conv-BN's activations). With recomputation a block keeps only its
input: ``torch.utils.checkpoint`` (non-reentrant) drops the inner activations after the
forward pass and runs the block's layers again when backward needs them. The recomputed
pass normalises with the same batch statistics (they are the statistics of the same
input), and the BatchNorm running statistics and ``num_batches_tracked`` it would update a
second time are put back to their values after the first pass, so training sees one update
per step, exactly as without recomputation.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint


def checkpointed(fn: Callable[[Tensor], Tensor], x: Tensor, module: nn.Module) -> Tensor:
    """``fn(x)`` under ``torch.utils.checkpoint``; the running statistics of the BatchNorms
    in ``module`` are updated by the forward pass only, not by the recomputation.

    Args:
        fn: the computation, a pure function of ``x`` and ``module``'s parameters and
            buffers (no randomness: the RNG state is not replayed).
        x: its input, the one tensor kept for backward.
        module: the module whose BatchNorms ``fn`` runs.
    """
    norms = [m for m in module.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    passes = []

    def run(x: Tensor) -> Tensor:
        if not passes:  # the forward pass
            passes.append(True)
            return fn(x)
        kept = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in norms]  # fmt: skip
        try:
            return fn(x)
        finally:
            with torch.no_grad():
                for m, (mean, var, count) in zip(norms, kept, strict=True):
                    m.running_mean.copy_(mean)
                    m.running_var.copy_(var)
                    m.num_batches_tracked.copy_(count)

    return checkpoint(run, x, use_reentrant=False, preserve_rng_state=False)
