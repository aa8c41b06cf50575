"""onnxopt: post-training ONNX graph optimization, validated with onnxruntime."""

__version__ = "0.1.0"
