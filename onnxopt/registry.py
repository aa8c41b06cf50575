"""Pipeline names to passes: one explicit table, no registration by import side effects."""

from __future__ import annotations

from .passes.base import Pass
from .passes.cse import CommonSubexpressionElimination
from .passes.dce import DeadCodeElimination
from .passes.distill import Distill
from .passes.flush_subnormals import FlushSubnormals
from .passes.fold_batchnorm import FoldBatchNorm
from .passes.fold_constants import FoldConstants
from .passes.fuse_bias import FuseBias
from .passes.lift_constants import LiftConstants
from .passes.prune import Prune
from .passes.prune_neurons import PruneNeurons
from .passes.quantize import QuantizePass
from .passes.quantize_weights import QuantizeWeights
from .passes.remove_noops import RemoveNoops
from .passes.residual_sum import ResidualSum
from .passes.zero_rows import ZeroRows

PASSES: dict[str, type[Pass]] = {
    p.name: p
    for p in (
        DeadCodeElimination,
        LiftConstants,
        FlushSubnormals,
        FoldConstants,
        RemoveNoops,
        CommonSubexpressionElimination,
        FoldBatchNorm,
        FuseBias,
        ResidualSum,
        Prune,
        PruneNeurons,
        ZeroRows,
        Distill,
        QuantizePass,
        QuantizeWeights,
    )
}

# Named pipelines a step may name instead of a pass (expanded in place; they take no options).
# cleanup: no-ops go before folding (a CastLike to the same type would block it) and again after it
# (an inlined If branch brings its own), cse after the fusions (they can make equal biases), dce last;
# flush-subnormals right after lift-constants, so it sees every weight before folding multiplies them in.
PRESETS: dict[str, str] = {
    "cleanup": "lift-constants,flush-subnormals,remove-noops,fold-constants,remove-noops,fold-batchnorm,fuse-bias,cse,dce",
}
