"""Structured pruning through attention heads and hand-written layer norms: zero-rows and prune-neurons.

Small attention blocks built in code (MatMul + Add with a symbolic batch, and Gemm on 2-D rows with
the head count left to -1, as exporters write them) and run in onnxruntime, with negative twins
where the grouping must refuse.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_zero_rows import make_model, node, zero_rows_exact

from onnxopt.data import load_feeds
from onnxopt.passes.prune_neurons import PruneNeurons
from onnxopt.passes.zero_rows import ZeroRows
from onnxopt.validate import run_model

D, HEADS, SIZE, SEQ, FFN = 16, 4, 4, 5, 12


def attention_block(rng, *, gemm=False, dead_v=(), dead_qk=(), v_bias=True, probabilities="Softmax",
                    join_perm=(0, 2, 1, 3), o_scale=1.0) -> onnx.ModelProto:
    """x -> Q, K, V -> heads -> softmax(Q·Kᵀ·s + mask) · V -> join -> output projection (+ residual) -> MLP.

    ``dead_v`` / ``dead_qk``: heads whose V (keeping its bias when ``v_bias``) / Q and K columns are zero;
    ``o_scale`` scales the output projection (how much every head matters).
    """
    w = {f"{p}_w": rng.standard_normal((D, D)).astype(np.float32) / 4 for p in "qkvo"}
    w["o_w"] *= np.float32(o_scale)
    w |= {f"{p}_b": rng.standard_normal(D).astype(np.float32) for p in "qkvo"}
    for h in dead_v:
        w["v_w"][:, h * SIZE:(h + 1) * SIZE] = 0
        if not v_bias:
            w["v_b"][h * SIZE:(h + 1) * SIZE] = 0
    for h in dead_qk:
        for p in "qk":
            w[f"{p}_w"][:, h * SIZE:(h + 1) * SIZE] = 0
            w[f"{p}_b"][h * SIZE:(h + 1) * SIZE] = 0
    w |= {"f1_w": rng.standard_normal((D, FFN)).astype(np.float32) / 4, "f1_b": np.zeros(FFN, np.float32),
          "f2_w": rng.standard_normal((FFN, D)).astype(np.float32) / 4, "scale": np.array(0.5, np.float32),
          "mask": np.where(rng.random((1, 1, 1, SEQ)) < 0.2, -30.0, 0.0).astype(np.float32)}
    nodes = []
    if gemm:  # rows (S, D), heads from [1, S, -1, size], joined by [-1, D]
        w |= {"rows": np.array([-1, D], np.int64), "split": np.array([1, SEQ, -1, SIZE], np.int64),
              "back": np.array([1, SEQ, D], np.int64)}
        nodes.append(node("Reshape", ["x", "rows"], "x2"))
        for p in "qkv":
            nodes.append(node("Gemm", ["x2", f"{p}_w", f"{p}_b"], p))
        join = "rows"
        inputs = {"x": [1, SEQ, D]}
    else:  # (batch, S, D), heads from [0, 0, H, size], joined by [0, 0, D]
        w |= {"split": np.array([0, 0, HEADS, SIZE], np.int64), "join": np.array([0, 0, D], np.int64)}
        for p in "qkv":
            nodes += [node("MatMul", ["x", f"{p}_w"], f"{p}_m"), node("Add", [f"{p}_m", f"{p}_b"], p)]
        join = "join"
        inputs = {"x": ["batch", SEQ, D]}
    for p, perm in (("q", [0, 2, 1, 3]), ("k", [0, 2, 3, 1]), ("v", [0, 2, 1, 3])):
        nodes += [node("Reshape", [p, "split"], f"{p}_4"), node("Transpose", [f"{p}_4"], f"{p}_h", perm=perm)]
    nodes += [node("MatMul", ["q_h", "k_h"], "qk"), node("Mul", ["qk", "scale"], "scaled"),
              node("Add", ["scaled", "mask"], "masked"),
              node(probabilities, ["masked"], "probs", **({"axis": -1} if probabilities == "Softmax" else {})),
              node("MatMul", ["probs", "v_h"], "ctx_h"), node("Transpose", ["ctx_h"], "ctx_t", perm=list(join_perm)),
              node("Reshape", ["ctx_t", join], "ctx")]
    if gemm:
        nodes += [node("Gemm", ["ctx", "o_w", "o_b"], "o2"), node("Reshape", ["o2", "back"], "o")]
    else:
        nodes += [node("MatMul", ["ctx", "o_w"], "o_m"), node("Add", ["o_m", "o_b"], "o")]
    nodes += [node("Add", ["x", "o"], "h"), node("MatMul", ["h", "f1_w"], "f_m"), node("Add", ["f_m", "f1_b"], "f"),
              node("Relu", ["f"], "r"), node("MatMul", ["r", "f2_w"], "g"), node("Add", ["h", "g"], "y")]
    return make_model(nodes, inputs, ["y"], w)


def initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    return onnx.numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))


def reshape_target(model: onnx.ModelProto, output: str) -> np.ndarray:
    target = next(n for n in model.graph.node if n.output[0] == output).input[1]
    return initializer(model, target)


@pytest.mark.parametrize("gemm", [False, True])
def test_dead_value_head_removes_the_whole_head_and_folds_its_bias(gemm):
    """V of head 1 dead with a bias: its context is that bias (softmax rows sum to 1), folded into the
    output projection; Q and K of the head go with it though alive. Reshape targets follow."""
    model = attention_block(np.random.default_rng(0), gemm=gemm, dead_v=(1,))
    out, stats = zero_rows_exact(model)
    assert stats["channels_removed"] == stats["heads_removed"] == 1  # a head: its Q, K, V columns are one group
    # Q/K/V columns and biases, output rows; less the rewritten targets. The context's constant goes into
    # the output projection's bias (Gemm C, or the constant of the Add after a MatMul): no node added.
    assert stats["parameters_removed"] == 4 * SIZE * D + 3 * SIZE - (2 if gemm else 4)
    assert len(out.graph.node) == len(model.graph.node)
    for p in "qkv":
        assert initializer(out, f"{p}_w").shape == (D, D - SIZE)
    assert initializer(out, "o_w").shape == (D - SIZE, D)
    if gemm:  # head count inferred (-1): the split stays; the shared [-1, D] gets a copy for the join
        assert list(reshape_target(out, "q_4")) == [1, SEQ, -1, SIZE]
        assert list(reshape_target(out, "ctx")) == [-1, D - SIZE] and list(reshape_target(out, "x2")) == [-1, D]
    else:
        assert list(reshape_target(out, "v_4")) == [0, 0, HEADS - 1, SIZE]
        assert list(reshape_target(out, "ctx")) == [0, 0, D - SIZE]


def test_dead_query_key_alone_keeps_the_head():
    """Q and K zero only flatten the head's attention: its context still depends on the input."""
    _, stats = zero_rows_exact(attention_block(np.random.default_rng(1), dead_qk=(2,)))
    assert stats["channels_removed"] == 0
    assert stats["kept_dead_MatMul_scores"] == 1  # the dead Q/K group, mixed into the live V head


@pytest.mark.parametrize(("v_bias", "removed"), [(True, 0), (False, 1)])
def test_unnormalized_attention_keeps_a_constant_head_but_drops_a_zero_one(v_bias, removed):
    """Sigmoid rows do not sum to one: a dead V head's bias times them is not constant; zero still is zero."""
    model = attention_block(np.random.default_rng(2), dead_v=(0,), v_bias=v_bias, probabilities="Sigmoid")
    _, stats = zero_rows_exact(model)
    assert stats["channels_removed"] == removed
    if v_bias:
        assert stats["kept_dead_MatMul_of_unnormalized_rows"] == 1


def test_heads_mixed_by_a_reshape_are_refused():
    """Joined as (size, heads) instead of (heads, size): every output feature mixes heads; nothing goes."""
    model = attention_block(np.random.default_rng(3), dead_v=(1,), v_bias=False, join_perm=(0, 2, 3, 1))
    _, stats = zero_rows_exact(model)
    assert stats["channels_removed"] == 0
    assert stats["skipped_reshape_mixes_heads"] == 1 and stats["kept_dead_reshape_mixes_heads"] == 1


@pytest.mark.parametrize("gemm", [False, True])
@pytest.mark.parametrize("method", ["l2", "wanda", "fluctuation"])
def test_prune_neurons_takes_heads_and_mlp_units_then_zero_rows_removes_them_exactly(gemm, method):
    from onnxopt.data import random_feeds
    from onnxopt.passes.base import PassContext

    model = attention_block(np.random.default_rng(4), gemm=gemm)
    calib, _ = random_feeds(model, count=4, seed=3)
    result = PruneNeurons(PruneNeurons.Options(ratio=0.25, method=method, round_to=1),
                          PassContext(calib=calib))(model)
    assert result.stats["neurons_zeroed"] == 1 + FFN // 4  # one of 4 heads, 3 of 12 MLP units
    assert result.stats["heads_zeroed"] == 1
    assert result.stats["unprunable_runtime_operand_Add"] == 2 * D  # the residual stream: output projection, MLP
    out, stats = zero_rows_exact(result.model)
    assert stats["channels_removed"] == 1 + FFN // 4 and stats["heads_removed"] == 1
    assert initializer(out, "v_w").shape == (D, D - SIZE) and initializer(out, "f1_w").shape == (D, FFN - 3)


HEAD_WEIGHTS, UNIT_WEIGHTS = 3 * SIZE * (D + 1) + SIZE * D, 2 * D + 1  # Q/K/V columns + biases + output rows


def test_global_scope_spends_one_weight_budget_where_it_costs_least():
    """Strong heads (a large output projection): the fluctuation budget goes to MLP units, where the
    output error per weight is least; group scope takes a head anyway, and loses more."""
    from onnxopt.data import random_feeds
    from onnxopt.passes.base import PassContext

    def pruned(scope):
        model = attention_block(np.random.default_rng(4), o_scale=20)
        calib, _ = random_feeds(model, count=8, seed=3)
        dense = np.stack(run_model(model, calib)["y"])
        result = PruneNeurons(PruneNeurons.Options(ratio=0.25, method="fluctuation", scope=scope, round_to=1),
                              PassContext(calib=calib))(model)
        error = np.linalg.norm(np.stack(run_model(result.model, calib)["y"]) - dense)
        return result, zero_rows_exact(result.model)[1], error

    (result, removed, error), (group, _, group_error) = pruned("global"), pruned("group")
    budget = 0.25 * (HEADS * HEAD_WEIGHTS + FFN * UNIT_WEIGHTS)
    assert "heads_zeroed" not in result.stats and result.stats["neurons_zeroed"] == FFN - 1  # one unit stays
    assert abs(removed["parameters_removed"] - budget) <= HEAD_WEIGHTS / 2
    assert group.stats["heads_zeroed"] == 1 and group.stats["neurons_zeroed"] == 1 + FFN // 4
    assert error < group_error


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(dead=st.sets(st.integers(0, HEADS - 1), max_size=HEADS - 1), gemm=st.booleans(), v_bias=st.booleans(),
       seed=st.integers(0, 2**16))
def test_property_every_dead_value_head_goes_exactly(dead, gemm, v_bias, seed):
    model = attention_block(np.random.default_rng(seed), gemm=gemm, dead_v=tuple(dead), v_bias=v_bias)
    _, stats = zero_rows_exact(model)
    assert stats["channels_removed"] == len(dead)


# --------------------------------------------------------------------------- hand-written layer norms

C, L, HIDDEN, CLASSES = 8, 6, 12, 5


def layer_norm(prefix: str, x: str, width: int, one_pass: bool, gamma_dead, w: dict, rng) -> list:
    """LayerNorm over the last axis from ReduceSum / Mul / Add (Sub, Sqrt, Div), as converters write it."""
    w[f"{prefix}.inv"] = np.array(1.0 / width, np.float32)
    w[f"{prefix}.eps"] = np.array(1e-5, np.float32)
    w[f"{prefix}.axes"] = np.array([-1], np.int64)
    gamma = (1 + rng.random(width)).astype(np.float32)
    gamma[list(gamma_dead)] = 0
    w[f"{prefix}.g"], w[f"{prefix}.b"] = gamma, rng.standard_normal(width).astype(np.float32)
    p = prefix
    nodes = [node("ReduceSum", [x, f"{p}.axes"], f"{p}.sum"), node("Mul", [f"{p}.sum", f"{p}.inv"], f"{p}.mean"),
             node("Sub", [x, f"{p}.mean"], f"{p}.d")]
    if one_pass:  # E[x²] - mean²
        nodes += [node("Mul", [x, x], f"{p}.sq"), node("ReduceSum", [f"{p}.sq", f"{p}.axes"], f"{p}.sqs"),
                  node("Mul", [f"{p}.sqs", f"{p}.inv"], f"{p}.ex2"), node("Mul", [f"{p}.mean", f"{p}.mean"], f"{p}.m2"),
                  node("Sub", [f"{p}.ex2", f"{p}.m2"], f"{p}.var")]
    else:  # E[(x - mean)²]
        nodes += [node("Mul", [f"{p}.d", f"{p}.d"], f"{p}.sq"), node("ReduceSum", [f"{p}.sq", f"{p}.axes"], f"{p}.sqs"),
                  node("Mul", [f"{p}.sqs", f"{p}.inv"], f"{p}.var")]
    nodes += [node("Add", [f"{p}.var", f"{p}.eps"], f"{p}.ve"), node("Sqrt", [f"{p}.ve"], f"{p}.std"),
              node("Div", [f"{p}.d", f"{p}.std"], f"{p}.n"), node("Mul", [f"{p}.n", f"{p}.g"], f"{p}.s"),
              node("Add", [f"{p}.s", f"{p}.b"], f"{p}.y")]
    return nodes


def file_type_classifier(one_pass: bool, gamma_dead: bool, seed: int = 0) -> onnx.ModelProto:
    """Conv over byte features -> LN -> MatMul -> Relu -> LN -> mean over positions -> MatMul, with a
    quarter of every layer's output neurons zeroed by hand (weights and bias)."""
    rng = np.random.default_rng(seed)
    dead_conv, dead_hidden, dead_out = (1, 5), (0, 4, 9), (2,)
    w = {"conv_w": rng.standard_normal((C, 4, 3)).astype(np.float32), "conv_b": rng.standard_normal(C).astype(np.float32),
         "w1": rng.standard_normal((C, HIDDEN)).astype(np.float32), "b1": rng.standard_normal(HIDDEN).astype(np.float32),
         "w2": rng.standard_normal((HIDDEN, CLASSES)).astype(np.float32),
         "b2": rng.standard_normal(CLASSES).astype(np.float32), "pool_axes": np.array([1], np.int64)}
    w["conv_w"][list(dead_conv)] = 0
    w["conv_b"][list(dead_conv)] = 0
    w["w1"][:, list(dead_hidden)] = 0
    w["b1"][list(dead_hidden)] = 0
    w["w2"][:, list(dead_out)] = 0
    w["b2"][list(dead_out)] = 0
    nodes = [node("Conv", ["x", "conv_w", "conv_b"], "c", pads=[1, 1]), node("Relu", ["c"], "cr"),
             node("Transpose", ["cr"], "ct", perm=[0, 2, 1])]
    nodes += layer_norm("ln1", "ct", C, one_pass, dead_conv if gamma_dead else (), w, rng)
    nodes += [node("MatMul", ["ln1.y", "w1"], "m1"), node("Add", ["m1", "b1"], "a1"), node("Relu", ["a1"], "r1")]
    nodes += layer_norm("ln2", "r1", HIDDEN, one_pass, dead_hidden if gamma_dead else (), w, rng)
    nodes += [node("ReduceMean", ["ln2.y", "pool_axes"], "pooled", keepdims=0),
              node("MatMul", ["pooled", "w2"], "m2"), node("Add", ["m2", "b2"], "logits")]
    return make_model(nodes, {"x": [2, 4, L]}, ["logits"], w, opset=18)


def test_hand_written_layer_norms_keep_dead_channels_and_say_why():
    """Real layer norms (live gamma): a zeroed channel normalizes to -mean/std, which depends on the input."""
    _, stats = zero_rows_exact(file_type_classifier(one_pass=False, gamma_dead=False))
    assert stats["channels_removed"] == 0
    assert stats["kept_dead_runtime_operand_Sub"] == 2 + 3  # conv channels and hidden units: x - mean
    assert stats["kept_dead_graph_output"] == 1  # the dead class logit is an output


def test_one_pass_layer_norm_with_zero_gamma_drops_the_channels_exactly():
    """E[x²] - mean² with 1/C kept: a zero channel adds nothing to either sum; zero gamma makes its
    output the constant beta, folded into the next MatMul. Both LNs' channels go."""
    out, stats = zero_rows_exact(file_type_classifier(one_pass=True, gamma_dead=True))
    assert stats["channels_removed"] == 2 + 3
    assert initializer(out, "conv_w").shape == (C - 2, 4, 3) and initializer(out, "w1").shape == (C - 2, HIDDEN - 3)
    assert initializer(out, "ln1.g").shape == (C - 2,) and initializer(out, "inv" and "ln1.inv") == np.float32(1 / C)


def test_two_pass_layer_norm_refuses_even_with_zero_gamma():
    """E[(x - mean)²]: a zero channel adds mean² to the variance, so removing it would change every output."""
    _, stats = zero_rows_exact(file_type_classifier(one_pass=False, gamma_dead=True))
    assert stats["channels_removed"] == 0
    assert stats["kept_dead_summed_over_channels_while_not_zero"] == 2 + 3


def test_prune_neurons_on_the_classifier_says_why_nothing_goes():
    """Every Conv channel and hidden unit feeds a layer norm; the classes are the output."""
    result = PruneNeurons(PruneNeurons.Options(ratio=0.25))(file_type_classifier(one_pass=False, gamma_dead=False))
    assert result.stats["neurons_zeroed"] == 0 and not result.modified
    assert result.stats["unprunable_runtime_operand_Sub"] == C + HIDDEN
    assert result.stats["unprunable_summed_over_channels_while_not_zero"] == C + HIDDEN
    assert result.stats["unprunable_graph_output"] == CLASSES


def test_prune_neurons_through_a_one_pass_layer_norm_with_zero_gamma():
    """Only channels with zero gamma can go; among the hidden units, only those whose bias Add keeps
    them zero after Relu (the rest are summed while not zero, and counted)."""
    result = PruneNeurons(PruneNeurons.Options(ratio=0.25, round_to=1))(file_type_classifier(one_pass=True,
                                                                                              gamma_dead=True))
    assert result.stats["neurons_zeroed"] == 2 + 3
    assert result.stats["unprunable_summed_over_channels_while_not_zero"] == 4
    _, stats = zero_rows_exact(result.model)
    assert stats["channels_removed"] == 2 + 3


# --------------------------------------------------------------------------- real model

MODELS = Path(__file__).resolve().parents[2] / "shared" / "models"


@pytest.mark.slow
@pytest.mark.skipif(not (MODELS / "minilm_l3").is_dir(), reason="../shared/models/minilm_l3 is absent")
def test_minilm_heads_and_mlp_units_removed_exactly():
    """3 of 12 heads and 384 of 1536 MLP units in each of 3 layers; zero-rows keeps the pruned outputs."""
    model = onnx.load(MODELS / "minilm_l3" / "model.onnx")
    feeds = load_feeds(MODELS / "minilm_l3" / "eval.npz").head(4)
    pruned = PruneNeurons(PruneNeurons.Options(ratio=0.25))(model)
    assert pruned.stats["neurons_zeroed"] == 3 * (3 + 384) and pruned.stats["heads_zeroed"] == 3 * 3
    before = run_model(pruned.model, feeds)
    work = onnx.ModelProto()
    work.CopyFrom(pruned.model)
    result = ZeroRows()(work)
    assert result.stats["channels_removed"] == 3 * (3 + 384)
    onnx.checker.check_model(result.model, full_check=True)
    assert initializer(result.model, "onnx::MatMul_364").shape == (384, 288)  # layer 0 query: 9 heads of 32
    after = run_model(result.model, feeds)
    for name, values in before.items():
        ref, got = np.stack(values), np.stack(after[name])
        assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()


def test_sample_transformer_global_fluctuation_keeps_the_output():
    """The issue's recipe on samples/transformer: a quarter of the layer weights go, cosine stays >= 0.98
    (group scope must take one of the 4 heads, and distill brings that only to ~0.97)."""
    import onnxopt
    from onnxopt.graph import parameter_count

    samples = Path(__file__).resolve().parents[1] / "samples"
    model = onnx.load(samples / "transformer.onnx")
    result = onnxopt.optimize(model, "prune-neurons(ratio=0.25,method=fluctuation,scope=global),distill,zero-rows",
                              calib=samples / "transformer.calib.npz", data=samples / "transformer.eval.npz")
    assert result.report.steps[-1].vs_original["outputs"]["hidden"]["cosine"] >= 0.98
    assert parameter_count(result.model.graph) <= 0.76 * parameter_count(model.graph)
