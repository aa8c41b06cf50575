"""quantize-weights: block grids, onnxruntime's MatMulNBits / GatherBlockQuantized layouts, Gemm forms,
tied and shared weights, streaming from external data, and every skip reason (with negative twins)."""

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from onnx import helper

import onnxopt
from onnxopt.blockquant import (
    block_grid, from_codes, pack_codes, padded_blocks, quantize_blocks, quantize_for_nbits, to_codes, unpack_codes,
)
from onnxopt.cli import main
from onnxopt.errors import InputError
from onnxopt.passes.base import PassContext
from onnxopt.passes.quantize_weights import QuantizeWeights

from conftest import SHARED_MODELS, make_model, run, tensor, value

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from decoder import DecoderConfig, build_decoder, token_feeds  # noqa: E402

TINY = DecoderConfig(vocab=96, dim=64, layers=2, heads=4, ffn=80, max_seq=16)


def quantized(model, **options):
    return QuantizeWeights(QuantizeWeights.Options(**options))(model)


def ops(model) -> dict[str, int]:
    found: dict[str, int] = {}
    for node in model.graph.node:
        found[node.op_type] = found.get(node.op_type, 0) + 1
    return found


def cosine(a, b) -> float:
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


# --------------------------------------------------------------------------- the grid


finite = st.floats(-100, 100, width=32, allow_nan=False, allow_infinity=False)


@settings(max_examples=60, deadline=None)
@given(w=hnp.arrays(np.float32, hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=40), elements=finite),
       bits=st.sampled_from([4, 8]), symmetric=st.booleans(), block=st.sampled_from([16, 32]))
def test_minmax_grid_rounds_every_weight_to_within_half_a_step(w, bits, symmetric, block):
    q = quantize_blocks(w, bits, block, symmetric, "minmax")
    assert q.codes.shape == (-(-w.shape[0] // block) * block, w.shape[1])
    assert q.codes.max() <= 2**bits - 1
    step = np.repeat(np.abs(q.scales), block, axis=0)[: w.shape[0]]
    # within half a step, plus half a step at the range ends: the rounded zero point (asymmetric) or the
    # side opposite the largest magnitude, whose last code is 2**(bits-1) - 1, not 2**(bits-1) (symmetric)
    error = np.abs(q.dequantize() - w)
    assert np.all(error <= step + 1e-5 * (1 + np.abs(w)))
    inner = np.abs(w) < 0.5 * np.repeat(np.abs(q.scales) * (2 ** (bits - 1) - 1), block, axis=0)[: w.shape[0]]
    assert np.all(error[inner] <= 0.5 * step[inner] + 1e-5 * (1 + np.abs(w[inner])))


@settings(max_examples=40, deadline=None)
@given(w=hnp.arrays(np.float32, (64, 5), elements=finite), symmetric=st.booleans())
def test_mse_grid_is_never_worse_than_minmax(w, symmetric):
    error = {grid: float(np.sum((quantize_blocks(w, 4, 32, symmetric, grid).dequantize() - w) ** 2))
             for grid in ("minmax", "mse")}
    assert error["mse"] <= error["minmax"] * (1 + 1e-6) + 1e-9


@given(codes=hnp.arrays(np.uint8, hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=9),
                        elements=st.integers(0, 15)), bits=st.sampled_from([4, 8]))
def test_packing_round_trips(codes, bits):
    assert np.array_equal(unpack_codes(pack_codes(codes, bits), bits, codes.shape[-1]), codes)


def test_padding_dequantizes_to_zero_and_blocks_are_independent():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((40, 3)).astype(np.float32)
    q = quantize_blocks(w, 4, 32, False)
    padding = from_codes(q.codes[32:].reshape(1, 32, 3), q.scales[1:], q.zero_points[1:])[0, 8:]
    assert np.all(padding == 0)
    scale, zero = block_grid(padded_blocks(w, 32), 4, False)
    assert np.array_equal(to_codes(padded_blocks(w, 32), scale, zero, 4).reshape(-1, 3), q.codes)


def test_zero_block_gets_a_valid_grid():
    q = quantize_blocks(np.zeros((32, 2), np.float32), 4, 32, False)
    assert np.all(q.scales == 1) and np.all(q.dequantize() == 0)


# --------------------------------------------------------------------------- layouts onnxruntime runs


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("k", [64, 72])  # 72: padded to whole blocks
def test_matmul_becomes_matmulnbits_computing_the_dequantized_product(bits, symmetric, k):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((k, 24)).astype(np.float32)
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")],
                       [value("x", ["batch", k])], [value("y", ["batch", 24])], [tensor("w", w)])
    result = quantized(model, bits=bits, symmetric=symmetric, grid="minmax")
    assert ops(result.model) == {"MatMulNBits": 1}
    assert result.stats["layers_quantized"] == 1
    assert result.stats.get("padded_k", 0) == (k % 32 != 0)
    assert "w" not in {t.name for t in result.model.graph.initializer}
    x = rng.standard_normal((3, k)).astype(np.float32)
    expected = x @ quantize_blocks(w, bits, 32, symmetric, "minmax").dequantize()
    np.testing.assert_allclose(run(result.model, {"x": x})[0], expected, rtol=1e-4, atol=1e-4)


GEMM_CASES = {
    # name: (attributes, bias array or None or "runtime", expected extra Add)
    "transB_vector_bias": ({"transB": 1}, np.arange(8, dtype=np.float32), False),
    "alpha_beta_row_bias": ({"alpha": 0.5, "beta": 2.0}, np.arange(8, dtype=np.float32).reshape(1, 8), False),
    "scalar_bias": ({"beta": 3.0}, np.array([1.5], np.float32), False),
    "full_bias": ({"beta": 0.5}, np.arange(24, dtype=np.float32).reshape(3, 8), True),
    "runtime_bias": ({}, "runtime", True),
    "no_bias": ({"transB": 1, "alpha": -2.0}, None, False),
}


@pytest.mark.parametrize("case", sorted(GEMM_CASES))
def test_gemm_forms_keep_alpha_beta_and_bias(case):
    attrs, bias, extra_add = GEMM_CASES[case]
    rng = np.random.default_rng(2)
    w = rng.standard_normal((8, 64) if attrs.get("transB") else (64, 8)).astype(np.float32)
    inits, inputs = [tensor("w", w)], [value("x", [3, 64])]
    names = ["x", "w"]
    if isinstance(bias, np.ndarray):
        inits.append(tensor("c", bias))
        names.append("c")
    elif isinstance(bias, str):
        inputs.append(value("c", [3, 8]))
        names.append("c")
    model = make_model([helper.make_node("Gemm", names, ["y"], name="fc", **attrs)], inputs, [value("y", [3, 8])],
                       inits)
    feed = {"x": rng.standard_normal((3, 64)).astype(np.float32)}
    if isinstance(bias, str):
        feed["c"] = rng.standard_normal((3, 8)).astype(np.float32)
    result = quantized(model, grid="minmax")
    assert ops(result.model) == {"MatMulNBits": 1, **({"Add": 1} if extra_add else {})}
    kn = w.T if attrs.get("transB") else w
    deq = quantize_blocks(np.ascontiguousarray(kn), 4, 32, False, "minmax").dequantize()
    c = feed.get("c", bias if isinstance(bias, np.ndarray) else 0.0)
    expected = attrs.get("alpha", 1.0) * feed["x"] @ deq + attrs.get("beta", 1.0) * c
    np.testing.assert_allclose(run(result.model, feed)[0], expected, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- what is skipped, and why


def test_skips_are_counted_and_leave_those_nodes_float():
    rng = np.random.default_rng(3)
    f32 = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    nodes = [
        helper.make_node("Relu", ["x_square"], ["activation"], name="relu"),
        helper.make_node("MatMul", ["x", "activation"], ["activation_product"], name="act_weight"),
        helper.make_node("MatMul", ["x", "w_other"], ["other"], name="shared_with_add"),
        helper.make_node("Add", ["w_other", "w_other"], ["w_twice"], name="reads_weight"),
        helper.make_node("Gemm", ["x_t", "w_trans_a"], ["ta"], transA=1, name="trans_a"),
        helper.make_node("Gemm", ["x", "w_rt", "rt_bias"], ["rt"], beta=2.0, name="runtime_beta"),
        helper.make_node("MatMul", ["v", "w_vec"], ["vec"], name="vector_input"),
        helper.make_node("MatMul", ["x", "w_ok"], ["ok"], name="fine"),
    ]
    inits = [tensor("w_other", f32(32, 32)), tensor("w_trans_a", f32(32, 4)), tensor("w_rt", f32(32, 4)),
             tensor("w_vec", f32(32, 4)), tensor("w_ok", f32(32, 4))]
    model = make_model(nodes, [value("x", [2, 32]), value("x_square", [32, 32]), value("x_t", [32, 2]),
                               value("v", [32]), value("rt_bias", [2, 4])],
                       [value(n, None) for n in ("activation_product", "other", "w_twice", "ta", "rt", "vec", "ok")],
                       inits)
    result = quantized(model)
    assert result.stats["layers_quantized"] == 1
    for reason in ("weight_not_constant", "weight_has_other_uses", "gemm_trans_a", "gemm_runtime_bias_with_beta",
                   "matmul_input_not_2d"):
        assert result.stats[f"skipped_{reason}"] == 1, reason
    assert ops(result.model) == {"Relu": 1, "MatMul": 3, "Add": 1, "Gemm": 2, "MatMulNBits": 1}
    assert {t.name for t in result.model.graph.initializer} >= {"w_other", "w_trans_a", "w_rt", "w_vec"}


def test_weight_that_is_an_activation_is_counted_not_rewritten():
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
                       [value("x", [2, 32]), value("w", [32, 4])], [value("y", [2, 4])])
    result = quantized(model)
    assert result.stats["skipped_weight_not_constant"] == 1 and not result.modified
    assert ops(result.model) == {"MatMul": 1}


@pytest.mark.parametrize("dtype, counted", [(np.float64, True), (np.float16, False)])
def test_dtypes_other_than_float32_and_float16_are_skipped(dtype, counted):
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    w = np.random.default_rng(4).standard_normal((32, 8)).astype(dtype)
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
                       [value("x", [2, 32], elem)], [value("y", [2, 8], elem)], [tensor("w", w)])
    result = quantized(model)
    assert result.stats.get("skipped_unsupported_dtype", 0) == counted
    assert result.modified != counted
    if not counted:  # float16 activations stay float16; scales follow them
        x = np.random.default_rng(5).standard_normal((2, 32)).astype(np.float16)
        out = run(result.model, {"x": x})[0]
        assert out.dtype == np.float16 and cosine(out, x.astype(np.float32) @ w.astype(np.float32)) > 0.99


def test_weight_shared_by_two_matmuls_is_quantized_once():
    w = np.random.default_rng(6).standard_normal((32, 8)).astype(np.float32)
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["a"], name="m1"),
                        helper.make_node("MatMul", ["z", "w"], ["b"], name="m2")],
                       [value("x", [2, 32]), value("z", [2, 32])], [value("a", [2, 8]), value("b", [2, 8])],
                       [tensor("w", w)])
    result = quantized(model)
    assert result.stats["layers_quantized"] == 2 and result.stats["shared_weight_uses"] == 2
    packed = [n.input[1] for n in result.model.graph.node]
    assert packed[0] == packed[1] and len(result.model.graph.initializer) == 3  # b, scales, zero points


@pytest.mark.parametrize("bad", [{"bits": 3}, {"block_size": 48}, {"block_size": 8}, {"method": "awq"},
                                 {"grid": "hqq"}, {"accuracy_level": 7}, {"embedding_bits": 2},
                                 {"rounding": "stochastic"}, {"lr_schedule": "linear"}, {"rounding_steps": 0}])
def test_bad_options_are_one_readable_error(bad):
    with pytest.raises(InputError, match="quantize-weights"):
        QuantizeWeights.Options(**bad)


@pytest.mark.parametrize("options", [{"method": "gptq"}, {"rounding": "learned"}])
def test_solving_without_calibration_data_is_refused_before_any_work(options):
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["y"])], [value("x", [2, 32])], [value("y", [2, 4])],
                       [tensor("w", np.ones((32, 4), np.float32))])
    with pytest.raises(InputError, match="calibration"):
        quantized(model, **options)


def correlated_mlp(k: int = 96):
    """Two MatMul layers on inputs with strongly correlated features (what GPTQ's compensation exploits)."""
    rng = np.random.default_rng(7)
    w1, w2 = rng.standard_normal((k, 64)).astype(np.float32), rng.standard_normal((64, 8)).astype(np.float32)
    model = make_model([helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
                        helper.make_node("Tanh", ["h"], ["t"], name="act"),
                        helper.make_node("MatMul", ["t", "w2"], ["y"], name="fc2")],
                       [value("x", ["batch", k])], [value("y", ["batch", 8])], [tensor("w1", w1), tensor("w2", w2)])
    mix = rng.standard_normal((8, k)).astype(np.float32)
    x = (rng.standard_normal((64, 4, 8)) @ mix + 0.05 * rng.standard_normal((64, 4, k))).astype(np.float32)
    return model, x


@pytest.mark.parametrize("k", [96, 80])  # 80: padded to whole blocks
def test_gptq_beats_round_to_nearest_on_correlated_inputs(k):
    from onnxopt.data import FeedSet

    model, x = correlated_mlp(k)
    calib = FeedSet({"x": x[:48]}, "calib")
    held_out = x[48:].reshape(-1, k)
    reference = run(model, {"x": held_out})[0]
    error = {}
    for method in ("rtn", "gptq"):
        result = QuantizeWeights(QuantizeWeights.Options(method=method), PassContext(calib=calib))(onnx_copy(model))
        assert result.stats["layers_quantized"] == 2
        error[method] = float(np.linalg.norm(run(result.model, {"x": held_out})[0] - reference))
    assert result.stats["gptq_layers"] == 2 and result.stats["gptq_calibration_samples"] == 48
    assert error["gptq"] < 0.7 * error["rtn"], error


def sequence_layer(k: int = 128, n: int = 32, seed: int = 0):
    """One MatMul reading sequences ``(batch, seq, k)``."""
    w = np.random.default_rng(seed).standard_normal((k, n)).astype(np.float32)
    return make_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")], [value("x", ["b", "s", k])],
                      [value("y", ["b", "s", n])], [tensor("w", w)])


def held_out_errors(model, samples: np.ndarray, calibration: int, *options: dict) -> tuple[list[float], list]:
    """Output error on the samples after the first ``calibration`` (those calibrate), and the pass result,
    per option set."""
    from onnxopt.data import FeedSet

    calib = FeedSet({"x": samples[:calibration]}, "calib")
    held_out = samples[calibration:, 0]
    reference = run(model, {"x": held_out})[0]
    errors, results = [], []
    for extra in options:
        results.append(QuantizeWeights(QuantizeWeights.Options(**extra), PassContext(calib=calib))(onnx_copy(model)))
        errors.append(float(np.linalg.norm(run(results[-1].model, {"x": held_out})[0] - reference)))
    return errors, results


@pytest.mark.parametrize("seed", [0, 1])
def test_gptq_on_white_inputs_with_fewer_calibration_rows_than_inputs_does_not_lose_to_rtn(seed):
    """The bug this pins: 48 calibration rows for 128 inputs make XᵀX singular, and GPTQ moved the rounding error
    into the directions calibration never visited: 1.56-1.72x round-to-nearest's error on held-out rows of the
    same white distribution (the generated decoder's logits lost to RTN). XᵀX shrunk by its own sampling noise
    (nearly all the way to its diagonal here) keeps GPTQ at RTN's error; ``shrinkage=false`` is the old solver."""
    x = np.random.default_rng(seed).standard_normal((12 + 64, 1, 4, 128)).astype(np.float32)
    (rtn, gptq, raw), (_, shrunk, old) = held_out_errors(sequence_layer(seed=seed), x, 12, {}, {"method": "gptq"},
                                                         {"method": "gptq", "shrinkage": False})
    assert gptq <= 1.005 * rtn < raw / 1.3, (rtn, gptq, raw)
    assert shrunk.stats["hessian_shrinkage_max"] > 0.9 and shrunk.details["layers"][0]["hessian_shrinkage"] > 0.9
    assert "hessian_shrinkage_max" not in old.stats and "hessian_shrinkage" not in old.details["layers"][0]


def test_gptq_beats_rtn_on_held_out_correlated_sequences_with_few_calibration_rows():
    """Sequences whose 128 features mix 12 factors of decaying scale (non-isotropic, like real activations):
    GPTQ's held-out output error is a fraction of RTN's, with 8 x 16 calibration rows (XᵀX barely full rank)."""
    rng = np.random.default_rng(5)
    mix = rng.standard_normal((12, 128)) * np.linspace(3, 0.3, 12)[:, None]
    x = (rng.standard_normal((8 + 64, 1, 16, 12)) @ mix + 0.3 * rng.standard_normal((8 + 64, 1, 16, 128)))
    (rtn, gptq, raw), _ = held_out_errors(sequence_layer(seed=5), x.astype(np.float32), 8, {},
                                          {"method": "gptq"}, {"method": "gptq", "shrinkage": False})
    assert gptq < 0.5 * rtn and raw < 0.5 * rtn, (rtn, gptq, raw)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_learned_rounding_beats_its_base_on_held_out_data(method):
    """rounding=learned starts from nearest rounding's (or GPTQ's) codes and grid and lowers each layer's error
    on the calibration data; on held-out data of the same distribution the output error falls too. GPTQ in input
    order here: with act_order (the default) GPTQ alone is already where learned rounding takes it on this toy
    (held-out error 11.6 vs 14.7 in input order, 12.0 learned on top), so there is nothing left to show."""
    from onnxopt.data import FeedSet

    model, x = correlated_mlp(96)
    calib = FeedSet({"x": x[:48]}, "calib")
    held_out = x[48:].reshape(-1, 96)
    reference = run(model, {"x": held_out})[0]
    error, results = {}, {}
    for rounding in ("nearest", "learned"):
        options = QuantizeWeights.Options(method=method, rounding=rounding, rounding_steps=50, act_order=False)
        results[rounding] = QuantizeWeights(options, PassContext(calib=calib))(onnx_copy(model))
        error[rounding] = float(np.linalg.norm(run(results[rounding].model, {"x": held_out})[0] - reference))
    stats, layers = results["learned"].stats, results["learned"].details["layers"]
    assert stats["rounding_learned"] == 2 and stats["layers_quantized"] == 2
    assert all(len(layer["loss_curve"]) == 50 for layer in layers)
    assert error["learned"] < 0.95 * error["nearest"], error
    # same grid as the base: only codes move
    base = {t.name.split("_")[-1]: t for t in results["nearest"].model.graph.initializer if "scales" in t.name}
    learned = {t.name.split("_")[-1]: t for t in results["learned"].model.graph.initializer if "scales" in t.name}
    assert base.keys() == learned.keys()
    for name in base:
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(base[name]), onnx.numpy_helper.to_array(learned[name]))


def test_learned_rounding_keeps_codes_that_cannot_improve():
    """Weights exactly on the grid have no rounding error: learned rounding keeps nearest's codes, says so."""
    from onnxopt.data import FeedSet

    rng = np.random.default_rng(3)
    w = rng.integers(-8, 8, (32, 4)).astype(np.float32)
    w[0] = -8  # every block spans [-8, 7]: the grid's steps are whole numbers
    w[1] = 7
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["y"])], [value("x", ["b", 32])], [value("y", ["b", 4])],
                       [tensor("w", w)])
    calib = FeedSet({"x": rng.standard_normal((16, 2, 32)).astype(np.float32)}, "calib")
    result = QuantizeWeights(QuantizeWeights.Options(rounding="learned", grid="minmax", rounding_steps=20),
                             PassContext(calib=calib))(onnx_copy(model))
    assert result.stats.get("rounding_kept_nearest") == 1 and "rounding_learned" not in result.stats
    x = rng.standard_normal((5, 32)).astype(np.float32)
    np.testing.assert_allclose(run(result.model, {"x": x})[0], x @ w, rtol=1e-5, atol=1e-4)


def test_gptq_statistics_over_budget_take_more_calibration_runs_with_the_same_result(monkeypatch):
    from onnxopt.data import FeedSet
    from onnxopt.passes import quantize_weights

    model, x = correlated_mlp()
    calib = FeedSet({"x": x[:16]}, "calib")
    results = []
    for budget in (quantize_weights.HESSIAN_BUDGET, 1):
        monkeypatch.setattr(quantize_weights, "HESSIAN_BUDGET", budget)
        results.append(QuantizeWeights(QuantizeWeights.Options(method="gptq"), PassContext(calib=calib))(
            onnx_copy(model)))
    assert [r.stats["gptq_calibration_passes"] for r in results] == [1, 2]
    packed = [sorted(t.raw_data for t in r.model.graph.initializer) for r in results]
    assert packed[0] == packed[1]


def onnx_copy(model):
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


# --------------------------------------------------------------------------- decoder models, external data


@pytest.mark.parametrize("tied", [False, True])
def test_generated_decoder_quantizes_end_to_end_from_external_data(tmp_path, tied):
    config = DecoderConfig(**{**TINY.__dict__, "tied": tied})
    path = build_decoder(tmp_path / "decoder.onnx", config)
    data = token_feeds(tmp_path / "ids.npz", config, samples=3, seq=8)
    out = tmp_path / "decoder.q4.onnx"
    result = onnxopt.optimize(path, "quantize-weights", data=data, output=out)
    assert result.report.passed, result.report.table()
    stats = result.report.steps[0].stats
    assert stats["layers_quantized"] == 7 * config.layers + 1  # q k v o gate up down per layer, the LM head
    assert stats["embeddings_quantized"] == 1 and stats["padded_k"] == config.layers  # ffn 80 = 2.5 blocks
    assert stats.get("shared_weight_uses", 0) == 2 * tied
    model = onnx.load(out, load_external_data=False)
    assert {n.op_type for n in model.graph.node} >= {"MatMulNBits", "GatherBlockQuantized"}
    assert not [n for n in model.graph.node if n.op_type == "Gemm"]
    floats = {t.name for t in onnx.load(path, load_external_data=False).graph.initializer if len(t.dims) == 2} - {
        "cos_table", "sin_table", "causal_table"}
    assert floats and not floats & {t.name for t in model.graph.initializer}  # no float weight matrix is left
    assert weight_bytes(out) < 0.2 * weight_bytes(path)
    ids = np.load(data)["input_ids"][0]
    reference, candidate = (run(onnxopt.load_model(p), {"input_ids": ids})[0] for p in (path, out))
    assert cosine(reference, candidate) > 0.98


@pytest.mark.parametrize("tied", [False, True])
def test_embedding_bits_set_an_untied_table_apart_and_a_tied_table_follows_its_layer(tmp_path, tied):
    config = DecoderConfig(**{**TINY.__dict__, "tied": tied})
    path = build_decoder(tmp_path / "decoder.onnx", config)
    data = token_feeds(tmp_path / "ids.npz", config, samples=2, seq=8)
    cosines = {}
    for bits in (4, 8):
        result = onnxopt.optimize(path, f"quantize-weights(embedding_bits={bits})", data=data)
        assert result.report.passed, result.report.table()
        table = next(n for n in result.model.graph.node if n.op_type == "GatherBlockQuantized")
        table_bits = next((a.i for a in table.attribute if a.name == "bits"), 4)
        assert table_bits == (4 if tied else bits)
        assert {a.i for n in result.model.graph.node if n.op_type == "MatMulNBits" for a in n.attribute
                if a.name == "bits"} == {4}
        cosines[bits] = result.report.steps[0].vs_original["outputs"]["logits"]["cosine"]
    if tied:
        assert cosines[4] == cosines[8]
    else:  # the finer table keeps more of the logits
        assert cosines[8] > cosines[4]


def test_gptq_on_a_tied_decoder_solves_every_layer_and_the_table_shares_the_lm_head_codes(tmp_path):
    config = DecoderConfig(**{**TINY.__dict__, "tied": True})
    path = build_decoder(tmp_path / "decoder.onnx", config)
    calib = token_feeds(tmp_path / "calib.npz", config, samples=4, seq=8, seed=5)
    data = token_feeds(tmp_path / "eval.npz", config, samples=2, seq=8, seed=6)
    result = onnxopt.optimize(path, "quantize-weights(method=gptq)", calib=calib, data=data)
    assert result.report.passed, result.report.table()
    stats = result.report.steps[0].stats
    assert stats["gptq_layers"] == 7 * config.layers + 1  # one solve per weight (q/k/v share their XᵀX)
    assert "gptq_rounded_without_statistics" not in stats and stats["embeddings_quantized"] == 1
    table = next(n for n in result.model.graph.node if n.op_type == "GatherBlockQuantized")
    head = next(n for n in result.model.graph.node if n.op_type == "MatMulNBits" and n.input[0] == "final_rows")
    assert table.input[2] == head.input[2]  # one scales tensor: the table reads the LM head's GPTQ grid


def weight_bytes(path) -> int:
    """Bytes of every initializer (external data without the alignment padding between tensors)."""
    model = onnx.load(path, load_external_data=False)
    return sum(int({e.key: e.value for e in t.external_data}.get("length", 0)) + len(t.raw_data)
               for t in model.graph.initializer)


def test_input_files_are_never_modified(tmp_path):
    path = build_decoder(tmp_path / "decoder.onnx", TINY)
    before = [(p.name, p.read_bytes()) for p in sorted(tmp_path.iterdir())]
    onnxopt.optimize(path, "quantize-weights", output=tmp_path / "out.onnx", validate=False)
    assert [(p.name, p.read_bytes()) for p in sorted(tmp_path.iterdir()) if not p.name.startswith("out")] == before


def test_cli_runs_the_pass_with_options(tmp_path):
    path = build_decoder(tmp_path / "decoder.onnx", TINY)
    out = tmp_path / "q8.onnx"
    result = CliRunner().invoke(main, ["optimize", str(path), "-o", str(out), "-p",
                                       "quantize-weights(bits=8,block_size=64,symmetric=true,embeddings=false)"])
    assert result.exit_code == 0, result.output
    model = onnx.load(out, load_external_data=False)
    assert "Gather" in {n.op_type for n in model.graph.node}  # embeddings=false keeps the table float
    assert {a.i for n in model.graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "bits"} == {8}


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_MODELS / "minilm_l3").is_dir(), reason="shared models absent")
def test_minilm_int4_keeps_the_sentence_embedding_at_a_fifth_of_the_file(tmp_path):
    folder = SHARED_MODELS / "minilm_l3"
    out = tmp_path / "minilm.q4.onnx"
    result = onnxopt.optimize(folder / "model.onnx", "quantize-weights", data=folder / "eval.npz", output=out)
    assert result.report.passed
    assert out.stat().st_size <= 0.2 * (folder / "model.onnx").stat().st_size
    reference, candidate = (sentence_embeddings(p, folder, 32) for p in (folder / "model.onnx", out))
    assert np.mean(np.sum(reference * candidate, axis=1)) >= 0.98


def sentence_embeddings(path, folder, count):
    """Masked mean of ``hidden`` over each sentence's real tokens, L2-normalised (minilm_l3/info.json)."""
    feeds = np.load(folder / "eval.npz")
    lengths = np.load(folder / "eval.lengths.npz")["lengths"]
    model = onnxopt.load_model(path)
    rows = []
    for i in range(count):
        hidden = run(model, {k: feeds[k][i] for k in feeds.files})[0]
        mean = hidden[0, : lengths[i]].mean(0)
        rows.append(mean / np.linalg.norm(mean))
    return np.array(rows)


def test_constant_node_weights_and_subgraph_layers_are_quantized_and_the_float_removed():
    rng = np.random.default_rng(8)
    w = rng.standard_normal((32, 4)).astype(np.float32)
    inner = helper.make_graph([helper.make_node("MatMul", ["x", "w_inner"], ["branch_y"], name="inner_mm")], "then",
                              [], [value("branch_y", [2, 4])], [tensor("w_inner", w)])
    other = helper.make_graph([helper.make_node("MatMul", ["x", "w_const"], ["else_y"], name="else_mm")], "else",
                              [], [value("else_y", [2, 4])])
    model = make_model([helper.make_node("Constant", [], ["w_const"], value=tensor("v", w), name="const"),
                        helper.make_node("If", ["cond"], ["y"], then_branch=inner, else_branch=other, name="if"),
                        helper.make_node("MatMul", ["x", "w_outer"], ["z"], name="outer_mm")],
                       [value("x", [2, 32]), value("cond", [], onnx.TensorProto.BOOL)],
                       [value("y", [2, 4]), value("z", [2, 4])], [tensor("w_outer", w)])
    result = quantized(model)
    # the outer Constant is read from inside a branch: an outer-scope use, so not a weight of that branch
    assert result.stats["layers_quantized"] == 2 and result.stats["skipped_weight_not_constant"] == 1
    assert ops(result.model) == {"Constant": 1, "If": 1, "MatMulNBits": 1}
    then_branch = next(a.g for a in result.model.graph.node[1].attribute if a.name == "then_branch")
    assert [n.op_type for n in then_branch.node] == ["MatMulNBits"] and "w_inner" not in {
        t.name for t in then_branch.initializer}
    x = rng.standard_normal((2, 32)).astype(np.float32)
    for cond in (True, False):
        out = run(result.model, {"x": x, "cond": np.array(cond)})[0]
        assert cosine(out, x @ w) > 0.99


def test_constant_node_weight_is_replaced_and_its_node_dropped():
    w = np.random.default_rng(9).standard_normal((32, 4)).astype(np.float32)
    model = make_model([helper.make_node("Constant", [], ["w"], value=tensor("v", w), name="const"),
                        helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
                       [value("x", [2, 32])], [value("y", [2, 4])])
    result = quantized(model)
    assert ops(result.model) == {"MatMulNBits": 1}
