from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from onnxopt.modelio import load_model
from onnxopt.passes.cse import CommonSubexpressionElimination, CseOptions
from onnxopt.validate import check_interface

from conftest import SHARED_MODELS, assert_identical, feeds_for, make_model, tensor, value

SAMPLES = Path(__file__).resolve().parents[1] / "samples"


def copy(model):
    c = onnx.ModelProto()
    c.CopyFrom(model)
    return c


def cse(model, **options):
    """Run the pass on a copy; check the laws every run must keep; return the result."""
    original = copy(model)
    result = CommonSubexpressionElimination(CseOptions(**options) if options else None)(copy(model))
    onnx.checker.check_model(result.model, full_check=True)
    assert check_interface(original, result.model) == []
    again = CommonSubexpressionElimination(CseOptions(**options) if options else None)(copy(result.model))
    assert not again.modified, again.stats
    assert again.model.SerializeToString() == result.model.SerializeToString()
    return result


def ops(model):
    return [n.op_type for n in model.graph.node]


X = np.linspace(-2, 2, 8, dtype=np.float32).reshape(2, 4)


def test_duplicated_branches_merge_into_one():
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["m1"]), helper.make_node("Relu", ["m1"], ["r1"]),
        helper.make_node("MatMul", ["x", "w"], ["m2"]), helper.make_node("Relu", ["m2"], ["r2"]),
        helper.make_node("Add", ["r1", "r2"], ["y"]),
    ]
    model = make_model(nodes, [value("x", [2, 4])], [value("y", [2, 3])],
                       [tensor("w", rng.standard_normal((4, 3)).astype(np.float32))])
    result = cse(model)
    assert result.modified
    assert result.stats == {"nodes_merged": 2, "constants_merged": 0}
    assert ops(result.model) == ["MatMul", "Relu", "Add"]
    assert list(result.model.graph.node[2].input) == ["r1", "r1"]
    assert_identical(model, result.model, {"x": X})


def test_attribute_order_does_not_matter_but_values_and_inputs_do():
    nodes = [
        helper.make_node("Gemm", ["x", "w"], ["g1"], alpha=2.0, transB=1),
        helper.make_node("Gemm", ["x", "w"], ["g2"], transB=1, alpha=2.0),  # same: attributes reordered
        helper.make_node("Gemm", ["x", "w"], ["g3"], transB=1, alpha=3.0),  # different alpha
        helper.make_node("LeakyRelu", ["x"], ["l1"], alpha=0.1),
        helper.make_node("LeakyRelu", ["x"], ["l2"], alpha=0.2),  # different alpha
        helper.make_node("LeakyRelu", ["z"], ["l3"], alpha=0.1),  # different input
        helper.make_node("Concat", ["g1", "g2", "g3"], ["g"], axis=1),
        helper.make_node("Concat", ["l1", "l2", "l3"], ["y"], axis=1),
    ]
    w = np.arange(12, dtype=np.float32).reshape(3, 4) / 10
    model = make_model(nodes, [value("x", [2, 4]), value("z", [2, 4])], [value("g", [2, 9]), value("y", [2, 12])],
                       [tensor("w", w)])
    result = cse(model)
    assert result.stats == {"nodes_merged": 1, "constants_merged": 0}
    assert ops(result.model).count("Gemm") == 2 and ops(result.model).count("LeakyRelu") == 3
    assert list(result.model.graph.node[-2].input) == ["g1", "g1", "g3"]
    assert_identical(model, result.model, {"x": X, "z": X[::-1].copy()})


def test_identical_constants_merge_and_then_their_users():
    w = np.arange(12, dtype=np.float32).reshape(4, 3)
    nodes = [
        helper.make_node("Constant", [], ["k1"], value_float=2.0),
        helper.make_node("Constant", [], ["w3"], value=tensor("", w)),
        helper.make_node("MatMul", ["x", "w1"], ["m1"]),
        helper.make_node("MatMul", ["x", "w2"], ["m2"]),  # w2 == w1: merges once w2 -> w1
        helper.make_node("MatMul", ["x", "w3"], ["m3"]),  # Constant node equal to w1
        helper.make_node("MatMul", ["x", "w_other"], ["m4"]),  # one value differs
        helper.make_node("Mul", ["m1", "k1"], ["a"]),
        helper.make_node("Mul", ["m2", "k2"], ["b"]),  # k2 initializer == Constant k1
        helper.make_node("Mul", ["m3", "k_double"], ["c"]),  # different dtype: never equal
        helper.make_node("Sum", ["a", "b", "c", "m4"], ["y"]),
    ]
    other = w.copy()
    other[3, 2] = -1
    inits = [tensor("w1", w), tensor("w2", w.copy()), tensor("w_other", other), tensor("k2", np.float32(2.0)),
             tensor("k_double", np.float64(2.0))]
    nodes[8] = helper.make_node("Mul", ["m3", "k1b"], ["c"])
    inits.append(tensor("k1b", np.array([2.0], np.float32)))  # shape [1], not a scalar: kept
    model = make_model(nodes, [value("x", [2, 4])], [value("y", [2, 3])], inits)
    result = cse(model)
    # w2 -> w1; Constant w3 -> w1; Constant k1 vs initializer k2: the initializer (swept first) stays.
    assert result.stats == {"nodes_merged": 3, "constants_merged": 3}
    assert {t.name for t in result.model.graph.initializer} == {"w1", "w_other", "k2", "k_double", "k1b"}
    assert ops(result.model) == ["MatMul", "MatMul", "Mul", "Mul", "Sum"]
    assert_identical(model, result.model, {"x": X})


def test_overridable_initializers_are_not_constants():
    nodes = [helper.make_node("Add", ["x", "a"], ["p"]), helper.make_node("Add", ["x", "b"], ["q"]),
             helper.make_node("Sub", ["p", "q"], ["y"])]
    model = make_model(nodes, [value("x", [2]), value("a", [2])], [value("y", [2])],
                       [tensor("a", np.ones(2, np.float32)), tensor("b", np.ones(2, np.float32))])
    result = cse(model)
    assert not result.modified
    feed = {"x": np.ones(2, np.float32), "a": np.full(2, 5, np.float32)}
    assert_identical(model, result.model, feed)


def test_random_ops_are_never_merged():
    nodes = [
        helper.make_node("RandomUniformLike", ["x"], ["r1"], seed=1.0),
        helper.make_node("RandomUniformLike", ["x"], ["r2"], seed=1.0),
        helper.make_node("RandomNormal", [], ["n1"], shape=[2, 4], seed=3.0),
        helper.make_node("RandomNormal", [], ["n2"], shape=[2, 4], seed=3.0),
        helper.make_node("Bernoulli", ["x01"], ["b1"]),
        helper.make_node("Bernoulli", ["x01"], ["b2"]),
        helper.make_node("Sum", ["r1", "r2", "n1", "n2"], ["s"]),
        helper.make_node("Add", ["b1", "b2"], ["b"]),
        helper.make_node("Relu", ["x"], ["e1"]),
        helper.make_node("Relu", ["x"], ["e2"]),
        helper.make_node("Sum", ["s", "b", "e1", "e2"], ["y"]),
    ]
    model = make_model(nodes, [value("x", [2, 4]), value("x01", [2, 4])], [value("y", [2, 4])])
    result = cse(model)
    assert result.stats == {"nodes_merged": 1, "constants_merged": 0, "skipped_nondeterministic": 6}
    assert ops(result.model).count("RandomUniformLike") == 2 and ops(result.model).count("Bernoulli") == 2


def test_training_dropout_and_custom_domains_are_never_merged():
    nodes = [
        helper.make_node("Dropout", ["x", "ratio", "train"], ["d1"]),
        helper.make_node("Dropout", ["x", "ratio", "train"], ["d2"]),
        helper.make_node("Dropout", ["x"], ["i1"]),  # inference form: deterministic
        helper.make_node("Dropout", ["x"], ["i2"]),
        helper.make_node("Foo", ["x"], ["f1"], domain="custom"),
        helper.make_node("Foo", ["x"], ["f2"], domain="custom"),
        helper.make_node("Sum", ["d1", "d2", "i1", "i2", "f1", "f2"], ["y"]),
    ]
    model = make_model(nodes, [value("x", [2, 4]), value("train", [], TensorProto.BOOL)], [value("y", [2, 4])],
                       [tensor("ratio", np.float32(0.5))])
    model.opset_import.append(helper.make_opsetid("custom", 1))
    result = CommonSubexpressionElimination()(copy(model))
    assert result.stats == {"nodes_merged": 1, "constants_merged": 0, "skipped_nondeterministic": 2,
                            "skipped_custom_domain": 2}


def test_two_graph_outputs_computed_alike_stay_two_outputs():
    nodes = [helper.make_node("Relu", ["x"], ["y1"]), helper.make_node("Relu", ["x"], ["y2"])]
    model = make_model(nodes, [value("x", [2, 4])], [value("y1", [2, 4]), value("y2", [2, 4])])
    result = cse(model)
    assert not result.modified
    assert result.stats == {"nodes_merged": 0, "constants_merged": 0, "skipped_graph_output": 1}
    assert [o.name for o in result.model.graph.output] == ["y1", "y2"]


def test_a_graph_output_duplicate_gives_its_name_to_the_earlier_node():
    nodes = [
        helper.make_node("Sigmoid", ["x"], ["t"]),
        helper.make_node("Neg", ["t"], ["n"]),
        helper.make_node("Sigmoid", ["x"], ["y"]),  # graph output: the first Sigmoid takes the name "y"
        helper.make_node("Sigmoid", ["x"], ["z"]),  # another graph output: stays
        helper.make_node("Abs", ["y"], ["a"]),
    ]
    model = make_model(nodes, [value("x", [2, 4])],
                       [value("n", [2, 4]), value("y", [2, 4]), value("z", [2, 4]), value("a", [2, 4])],
                       value_info=[value("t", [2, 4])])
    result = cse(model)
    assert result.stats == {"nodes_merged": 1, "constants_merged": 0, "skipped_graph_output": 1}
    g = result.model.graph
    assert [(n.op_type, list(n.input), list(n.output)) for n in g.node] == [
        ("Sigmoid", ["x"], ["y"]), ("Neg", ["y"], ["n"]), ("Sigmoid", ["x"], ["z"]), ("Abs", ["y"], ["a"])]
    assert [o.name for o in g.output] == ["n", "y", "z", "a"]
    assert [v.name for v in g.value_info] == []  # "t" no longer exists
    assert_identical(model, result.model, {"x": X})


def _if_model():
    """Outer a == b (b merged into a); the then branch reads b and recomputes Sigmoid(x) (an outer value)."""
    then_branch = helper.make_graph(
        [helper.make_node("Sigmoid", ["x"], ["s_in"]), helper.make_node("Add", ["b", "s_in"], ["t"])],
        "then", [], [value("t", [2, 4])])
    else_branch = helper.make_graph(
        [helper.make_node("Neg", ["b"], ["e1"]), helper.make_node("Neg", ["b"], ["e2"]),
         helper.make_node("Mul", ["e1", "e2"], ["e"])],
        "else", [], [value("e", [2, 4])])
    nodes = [
        helper.make_node("Sigmoid", ["x"], ["a"]),
        helper.make_node("Sigmoid", ["x"], ["b"]),
        helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
        helper.make_node("Greater", ["s", "zero"], ["cond"]),
        helper.make_node("If", ["cond"], ["r"], then_branch=then_branch, else_branch=else_branch),
        helper.make_node("Add", ["r", "a"], ["y"]),
    ]
    return make_model(nodes, [value("x", [2, 4])], [value("y", [2, 4])], [tensor("zero", np.float32(0))])


def test_subgraphs_see_renamed_outer_values_and_reuse_them():
    model = _if_model()
    result = cse(model)
    # outer b -> a; then: Sigmoid(x) -> outer a; else: e2 -> e1.
    assert result.stats == {"nodes_merged": 3, "constants_merged": 0}
    g = result.model.graph
    if_node = next(n for n in g.node if n.op_type == "If")
    branches = {a.name: a.g for a in if_node.attribute}
    then_g, else_g = branches["then_branch"], branches["else_branch"]
    assert [(n.op_type, list(n.input)) for n in then_g.node] == [("Add", ["a", "a"])]
    assert [(n.op_type, list(n.input)) for n in else_g.node] == [("Neg", ["a"]), ("Mul", ["e1", "e1"])]
    for x in (X, -X):
        assert_identical(model, result.model, {"x": x})


def test_loop_body_reuses_outer_values_and_keeps_its_carried_ones():
    body = helper.make_graph(
        [helper.make_node("Sigmoid", ["x"], ["inv"]),  # loop invariant, equal to outer a
         helper.make_node("Add", ["acc", "b"], ["t1"]),  # b is merged into a
         helper.make_node("Add", ["t1", "inv"], ["acc_out"]),
         helper.make_node("Identity", ["cond_in"], ["cond_out"])],
        "body", [value("i", [], TensorProto.INT64), value("cond_in", [], TensorProto.BOOL), value("acc", [2, 4])],
        [value("cond_out", [], TensorProto.BOOL), value("acc_out", [2, 4])])
    nodes = [helper.make_node("Sigmoid", ["x"], ["a"]), helper.make_node("Sigmoid", ["x"], ["b"]),
             helper.make_node("Loop", ["n", "", "x"], ["y"], body=body)]
    model = make_model(nodes, [value("x", [2, 4]), value("n", [], TensorProto.INT64)], [value("y", [2, 4])])
    result = cse(model)
    assert result.stats == {"nodes_merged": 2, "constants_merged": 0}
    body_nodes = result.model.graph.node[-1].attribute[0].g.node
    assert [(n.op_type, list(n.input)) for n in body_nodes] == [
        ("Add", ["acc", "a"]), ("Add", ["t1", "a"]), ("Identity", ["cond_in"])]
    for n in (0, 1, 3):
        assert_identical(model, result.model, {"x": X, "n": np.array(n)})


def test_models_with_shadowed_names_are_left_alone():
    branch = helper.make_graph([helper.make_node("Neg", ["x"], ["a"])], "b", [], [value("a", [2, 4])])
    nodes = [helper.make_node("Sigmoid", ["x"], ["a"]), helper.make_node("Sigmoid", ["x"], ["a2"]),
             helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=branch)]
    model = make_model(nodes, [value("x", [2, 4]), value("c", [], TensorProto.BOOL)],
                       [value("y", [2, 4]), value("a", [2, 4]), value("a2", [2, 4])])
    result = CommonSubexpressionElimination()(copy(model))
    assert not result.modified
    assert result.stats == {"nodes_merged": 0, "constants_merged": 0, "skipped_shadowed_names": 1}


def test_a_body_with_a_random_op_is_not_merged():
    def if_node(out):
        body = helper.make_graph([helper.make_node("RandomUniformLike", ["x"], ["u" + out])], "b" + out, [],
                                 [value("u" + out, [2, 4])])
        return helper.make_node("If", ["c"], [out], then_branch=body, else_branch=body)

    nodes = [if_node("p"), if_node("q"), helper.make_node("Add", ["p", "q"], ["y"])]
    model = make_model(nodes, [value("x", [2, 4]), value("c", [], TensorProto.BOOL)], [value("y", [2, 4])])
    result = CommonSubexpressionElimination()(copy(model))
    assert not result.modified
    assert result.stats["skipped_impure_subgraph"] == 2


def test_equal_if_nodes_merge():
    body = helper.make_graph([helper.make_node("Neg", ["x"], ["u"])], "b", [], [value("u", [2, 4])])
    other = helper.make_graph([helper.make_node("Abs", ["x"], ["v"])], "o", [], [value("v", [2, 4])])
    nodes = [helper.make_node("If", ["c"], ["p"], then_branch=body, else_branch=other),
             helper.make_node("If", ["c"], ["q"], then_branch=body, else_branch=other),
             helper.make_node("Add", ["p", "q"], ["y"])]
    model = make_model(nodes, [value("x", [2, 4]), value("c", [], TensorProto.BOOL)], [value("y", [2, 4])])
    result = CommonSubexpressionElimination()(copy(model))
    assert result.stats["nodes_merged"] == 1
    assert ops(result.model) == ["If", "Add"]
    for c in (True, False):
        assert_identical(model, result.model, {"x": X, "c": np.array(c)})


def test_external_constants_are_hashed_streaming_up_to_a_limit(tmp_path):
    from onnxopt.modelio import save_model

    w = np.random.default_rng(3).standard_normal((64, 64)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["a"]), helper.make_node("MatMul", ["x", "w2"], ["b"]),
             helper.make_node("Add", ["a", "b"], ["y"])]
    model = make_model(nodes, [value("x", [2, 64])], [value("y", [2, 64])], [tensor("w1", w), tensor("w2", w.copy())])
    save_model(model, tmp_path / "m.onnx", external=True)
    loaded = load_model(tmp_path / "m.onnx")
    assert all(t.data_location == TensorProto.EXTERNAL for t in loaded.graph.initializer)
    small = CommonSubexpressionElimination(CseOptions(max_external_bytes=1000))(copy(loaded))
    assert not small.modified
    assert small.stats["skipped_large_external_constant"] == 2
    merged = CommonSubexpressionElimination()(copy(loaded))
    assert merged.stats == {"nodes_merged": 1, "constants_merged": 1}
    feed = {"x": np.ones((2, 64), np.float32)}
    assert_identical(loaded, merged.model, feed)


def test_lone_shapes_are_never_read(monkeypatch):
    """Constants whose dtype and shape are unique are not hashed at all."""
    import onnxopt.passes.cse as cse_module

    read = []
    real = cse_module._tensor_chunks
    monkeypatch.setattr(cse_module, "_tensor_chunks", lambda t: (read.append(t.name), real(t))[1])
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["a"]), helper.make_node("MatMul", ["a", "w2"], ["y"])]
    model = make_model(nodes, [value("x", [2, 4])], [value("y", [2, 2])],
                       [tensor("w1", np.ones((4, 3), np.float32)), tensor("w2", np.ones((3, 2), np.float32))])
    CommonSubexpressionElimination()(model)
    assert read == []


def test_same_shaped_weights_are_read_by_their_first_mib_unless_it_matches(tmp_path, monkeypatch):
    """Weights that share dtype and shape (every layer of a transformer) are told apart by their first
    MiB; only when that matches are all their bytes read, and a later difference still keeps them apart."""
    import onnxopt.passes.cse as cse_module
    from onnxopt.modelio import save_model

    read: dict[str, int] = {}
    real = cse_module._tensor_chunks

    def counted(t):
        for chunk in real(t):
            read[t.name] = read.get(t.name, 0) + len(chunk)
            yield chunk

    monkeypatch.setattr(cse_module, "_tensor_chunks", counted)
    rng = np.random.default_rng(5)
    size = 1024  # 4 MiB of float32 per weight
    first = rng.standard_normal((size, size)).astype(np.float32)
    other = rng.standard_normal((size, size)).astype(np.float32)  # differs at once
    late = first.copy()
    late[-1, -1] += 1  # equal first MiB, differs at the end
    names = ["w_first", "w_other", "w_late", "w_same"]
    nodes = [helper.make_node("MatMul", ["x", n], [f"m{i}"]) for i, n in enumerate(names)]
    nodes += [helper.make_node("Sum", [f"m{i}" for i in range(4)], ["y"])]
    model = make_model(nodes, [value("x", [1, size])], [value("y", [1, size])],
                       [tensor("w_first", first), tensor("w_other", other), tensor("w_late", late),
                        tensor("w_same", first.copy())])
    save_model(model, tmp_path / "m.onnx", external=True)
    result = CommonSubexpressionElimination()(load_model(tmp_path / "m.onnx"))
    assert result.stats["constants_merged"] == 1  # w_same into w_first; w_late stays
    assert read["w_other"] <= (1 << 20) + 16  # its head differs: nothing past the first MiB
    assert read["w_late"] > 4 << 20  # its head matched: hashed whole
    assert {i.name for i in result.model.graph.initializer} == {"w_first", "w_other", "w_late"}


# --------------------------------------------------------------------------- property

UNARY = ["Relu", "Neg", "Sigmoid", "Abs"]
BINARY = ["Add", "Mul", "Sub"]


@st.composite
def dags_with_duplicates(draw):
    """Random DAGs over one input, with constants of repeated values and nodes copied from earlier ones."""
    n_consts = draw(st.integers(0, 4))
    inits = [tensor(f"c{k}", np.full(3, draw(st.sampled_from([0.5, 2.0])), np.float32)) for k in range(n_consts)]
    values = ["x"] + [t.name for t in inits]
    specs = []  # (op, inputs, attrs)
    for i in range(draw(st.integers(1, 20))):
        if specs and draw(st.integers(0, 2)) == 0:
            spec = draw(st.sampled_from(specs))  # an exact duplicate of an earlier computation
        else:
            kind = draw(st.sampled_from(["unary", "binary", "leaky"]))
            if kind == "unary":
                spec = (draw(st.sampled_from(UNARY)), (draw(st.sampled_from(values)),), ())
            elif kind == "binary":
                spec = (draw(st.sampled_from(BINARY)), tuple(draw(st.sampled_from(values)) for _ in range(2)), ())
            else:
                spec = ("LeakyRelu", (draw(st.sampled_from(values)),), (("alpha", draw(st.sampled_from([0.1, 0.2]))),))
        specs.append(spec)
        values.append(f"v{i}")
    nodes = [helper.make_node(op, list(ins), [f"v{i}"], **dict(attrs)) for i, (op, ins, attrs) in enumerate(specs)]
    outputs = draw(st.lists(st.sampled_from(values[1 + n_consts:]), min_size=1, max_size=4, unique=True))
    return make_model(nodes, [value("x", [3])], [value(o, [3]) for o in outputs], inits)


def _node_key(node):
    return (node.op_type, tuple(node.input), tuple(a.SerializeToString() for a in node.attribute))


@settings(max_examples=60, deadline=None)
@given(dags_with_duplicates())
def test_cse_never_changes_outputs_and_leaves_no_equal_nodes(model):
    result = cse(model)
    assert_identical(model, result.model, {"x": np.array([-1.5, 0.0, 2.0], np.float32)})
    outputs = {o.name for o in result.model.graph.output}
    seen = {}
    for node in result.model.graph.node:
        key = _node_key(node)
        if key in seen:  # only two graph outputs may stay computed alike
            assert node.output[0] in outputs and seen[key] in outputs
        else:
            seen[key] = node.output[0]
    values = {}
    for t in result.model.graph.initializer:
        assert t.raw_data not in values, "two equal constants remain"
        values[t.raw_data] = t.name


# --------------------------------------------------------------------------- real models


def test_cse_on_ppocr_cls():
    path = SHARED_MODELS / "ppocr_cls" / "model.onnx"
    if not path.exists():
        pytest.skip("shared ppocr_cls model is absent")
    model = load_model(path)
    result = cse(model)
    # paddle2onnx writes one Constant node per use: 76 of the 308 repeat an earlier one.
    assert result.stats == {"nodes_merged": 0, "constants_merged": 76}
    assert len(model.graph.node) - len(result.model.graph.node) == 76
    feed = {k: v[0] for k, v in feeds_for(model, count=1).items()}
    assert_identical(model, result.model, feed)


def test_cse_on_transformer_sample():
    path = SAMPLES / "transformer.onnx"
    if not path.exists():
        pytest.skip("samples/transformer.onnx is absent")
    model = load_model(path)
    result = cse(model)
    assert not result.modified
    assert result.stats == {"nodes_merged": 0, "constants_merged": 0}
    assert result.model.SerializeToString() == model.SerializeToString()
