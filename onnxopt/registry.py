"""Pipeline names to passes: one explicit table, no registration by import side effects."""

from __future__ import annotations

from .passes.base import Pass
from .passes.dce import DeadCodeElimination
from .passes.distill import Distill
from .passes.lift_constants import LiftConstants
from .passes.prune import Prune
from .passes.prune_neurons import PruneNeurons
from .passes.quantize import QuantizePass
from .passes.zero_rows import ZeroRows

PASSES: dict[str, type[Pass]] = {
    p.name: p
    for p in (
        DeadCodeElimination,
        LiftConstants,
        Prune,
        PruneNeurons,
        ZeroRows,
        Distill,
        QuantizePass,
    )
}
