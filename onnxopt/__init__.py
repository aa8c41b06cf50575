"""onnxopt: post-training ONNX graph optimization, validated with onnxruntime."""

__version__ = "0.1.0"

from .api import bench, compare, info, optimize, report_html  # noqa: E402
from .errors import InputError, OnnxoptError, ValidationError  # noqa: E402
from .manager import Result  # noqa: E402
from .modelio import load_model, save_model  # noqa: E402
from .pipeline import format_pipeline, parse_pipeline  # noqa: E402
from .registry import PASSES  # noqa: E402

__all__ = [
    "PASSES", "InputError", "OnnxoptError", "Result", "ValidationError", "__version__", "bench", "compare",
    "format_pipeline", "info", "load_model", "optimize", "parse_pipeline", "report_html", "save_model",
]
