"""The layer-wise reconstruction engine: per-layer statistics streamed from calibration data and the solvers
on top (GPTQ, SparseGPT, masked ridge refit, learned rounding). Passes choose a solver; none of this is a pass."""

from .solvers import SolverError, blas_threads, damped_inverse_cholesky, gptq, masked_refit, obs_sweep, sparsegpt
from .rounding import OPTIMIZERS, SCHEDULES, Schedule, learned_rounding
from .statistics import LayerGeometry, LayerStatistics

__all__ = ["OPTIMIZERS", "SCHEDULES", "LayerGeometry", "LayerStatistics", "Schedule", "SolverError", "blas_threads",
           "damped_inverse_cholesky", "gptq", "learned_rounding", "masked_refit", "obs_sweep", "sparsegpt"]
