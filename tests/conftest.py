"""Small real models built in code, and helpers to run them in onnxruntime."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxopt.validate import Session

SHARED_MODELS = Path(__file__).resolve().parents[2] / "shared" / "models"


@pytest.fixture(autouse=True)
def restart_shared_generators():
    """Module-level generators (``test_zero_rows.rng`` behind its ``weight`` helper, which other files
    import; ``RNG`` of a few files) start over for every test: a test's weights must not depend on which
    tests ran before it, nor on how many examples hypothesis drew there."""
    for module in list(sys.modules.values()):
        if getattr(module, "__name__", "").startswith("test_"):
            for attr in ("rng", "RNG"):
                generator = getattr(module, attr, None)
                if isinstance(generator, np.random.Generator):
                    setattr(module, attr, np.random.default_rng(generator.bit_generator.seed_seq.entropy))


def make_model(nodes, inputs, outputs, initializers=(), opset=17, functions=(), **graph_kwargs) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers), **graph_kwargs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], functions=list(functions))
    model.ir_version = 8
    return model


def tensor(name, array) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


def value(name, shape, dtype=TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, shape)


def mlp(seed: int = 0, hidden: int = 16, with_dead_branch: bool = False) -> onnx.ModelProto:
    """x[batch,8] -> Gemm(transB) -> Relu -> MatMul -> Add -> y[batch,4]."""
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], transB=1, name="fc1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w2"], ["m"], name="fc2"),
        helper.make_node("Add", ["m", "b2"], ["y"], name="bias2"),
    ]
    inits = [
        tensor("w1", rng.standard_normal((hidden, 8)).astype(np.float32)),
        tensor("b1", rng.standard_normal(hidden).astype(np.float32)),
        tensor("w2", rng.standard_normal((hidden, 4)).astype(np.float32)),
        tensor("b2", rng.standard_normal(4).astype(np.float32)),
    ]
    if with_dead_branch:
        nodes += [
            helper.make_node("MatMul", ["r", "w_dead"], ["dead1"], name="dead_fc"),
            helper.make_node("Sigmoid", ["dead1"], ["dead2"], name="dead_act"),
        ]
        inits.append(tensor("w_dead", rng.standard_normal((hidden, 3)).astype(np.float32)))
    return make_model(nodes, [value("x", ["batch", 8])], [value("y", ["batch", 4])], inits)


def feeds_for(model: onnx.ModelProto, count: int = 4, seed: int = 1) -> dict[str, np.ndarray]:
    """Sample-major random arrays for every input (first axis: samples)."""
    from onnxopt.data import random_feeds

    return random_feeds(model, count=count, seed=seed)[0].arrays


def run(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    with Session(model) as session:
        return list(session.run(feed).values())


def assert_identical(a: onnx.ModelProto, b: onnx.ModelProto, feed: dict[str, np.ndarray]) -> None:
    """Bit-identical outputs: a pass that only removes work must not even flip the sign of a zero."""
    for x, y in zip(run(a, feed), run(b, feed), strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()


def assert_same_outputs(a: onnx.ModelProto, b: onnx.ModelProto, feeds: dict[str, np.ndarray], rtol=1e-5, atol=1e-6):
    count = next(iter(feeds.values())).shape[0]
    for i in range(count):
        feed = {k: v[i] for k, v in feeds.items()}
        for x, y in zip(run(a, feed), run(b, feed)):
            np.testing.assert_allclose(y, x, rtol=rtol, atol=atol)


@pytest.fixture
def shared_models() -> Path:
    if not SHARED_MODELS.is_dir():
        pytest.skip("../shared/models is absent")
    return SHARED_MODELS
