"""The pass contract: a small stateless class, options from a frozen dataclass, a result with stats.

A pass receives a model the pass manager owns and may change it in place; it returns the model
(the same object or a new one), whether it changed anything, and named counters (skip reasons
included, as ``skipped_<reason>``).
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import onnx

from ..data import Feed
from ..errors import InputError

@dataclass(frozen=True)
class NoOptions:
    """For passes without options."""


@dataclass
class PassResult:
    """``stats`` are flat named counters; ``details`` holds per-layer tables and series for the report
    (e.g. ``{"layers": [{"name": ..., "sparsity": ...}], "sensitivity": [...], "loss_curves": {...}}``),
    JSON-able values only."""

    model: onnx.ModelProto
    modified: bool
    stats: dict[str, int | float] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class PassContext:
    """What a pass may need beyond its options: calibration feeds, a statistics cache, the original.

    ``calib`` is re-iterable (each ``iter()`` starts again at the first sample), so a pass may
    stream the data more than once without keeping it. ``teacher`` returns the original model
    (read only) for passes that repair the optimized model against it; it is loaded only when asked.
    ``executor`` (an :class:`onnxopt.executor.Executor`, None: in this process) is handed to the
    calibration functions, which shard their work through it.
    """

    calib: Iterable[Feed] | None = None
    calib_cache: Path | None = None
    progress: bool = False
    teacher: Callable[[], onnx.ModelProto] | None = None
    executor: Any = None

    def teacher_model(self, pass_name: str) -> onnx.ModelProto:
        if self.teacher is None:
            raise InputError(f"{pass_name} needs the original model as its teacher (run it through optimize)")
        return self.teacher()

    def calibration_feeds(self, pass_name: str) -> Iterable[Feed]:
        if self.calib is None:
            raise InputError(f"{pass_name} needs calibration data: pass --calib DATA (or calib= in the API)")
        return self.calib


class Pass:
    name: ClassVar[str]
    summary: ClassVar[str]
    Options: ClassVar[type] = NoOptions
    exact: ClassVar[bool] = True

    def __init__(self, options: Any = None, context: PassContext | None = None) -> None:
        self.options = self.Options() if options is None else options
        self.context = context or PassContext()

    def requires(self, model: onnx.ModelProto) -> None:
        """Raise a clear error before any work when the model or options cannot be handled."""

    def run(self, model: onnx.ModelProto) -> PassResult:
        raise NotImplementedError

    def __call__(self, model: onnx.ModelProto) -> PassResult:
        self.requires(model)
        # Indices over big graphs allocate many small objects with no cycles: full collections
        # triggered mid-pass would cost more than the pass (measured: ~15% at 100k nodes).
        collecting = gc.isenabled()
        gc.disable()
        try:
            return self.run(model)
        finally:
            if collecting:
                gc.enable()


def count(stats: dict[str, int | float], key: str, n: int | float = 1) -> None:
    """Add to a named counter."""
    stats[key] = stats.get(key, 0) + n


def check_choice(pass_name: str, option: str, value: str, choices: tuple[str, ...]) -> None:
    """An option that names one of ``choices``, or the error that lists them."""
    if value not in choices:
        raise InputError(f"{pass_name}: {option} must be one of {'|'.join(choices)}, not '{value}'")
