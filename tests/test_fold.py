"""The fold plan and its execution on in-memory models (tiny random models, seconds).

Every claim is checked against an independent reference: the un-fused model with its
gain layers (logits), or ``s * dequantize(W)`` computed here in float32 (weights).
"""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import TINY_CONFIGS, tiny_input, tiny_model
from mlx.utils import tree_flatten, tree_unflatten

from gain_mlx.adapter import apply_gains, gain_parameters
from gain_mlx.arch import HeadLayout, Target, get_module, head_layout
from gain_mlx.fold import FoldStep, invert, is_power_of_two, plan_folds
from gain_mlx.fuse import execute_step, fuse_model
from gain_mlx.layers import GAIN_LAYERS

# Quantized tests need input widths divisible by group sizes up to 128.
WIDE = dict(hidden_size=128, intermediate_size=256)


def randomize_gains(model, seed=0, low=0.5, high=1.5):
    key = mx.random.key(seed)
    for _, layer in model.named_modules():
        if isinstance(layer, GAIN_LAYERS):
            key, sub = mx.random.split(key)
            layer.gain = mx.random.uniform(low, high, layer.gain.shape, key=sub)


def rel_diff(a, b):
    return (mx.abs(a - b).max() / mx.abs(b).max()).item()


def quantize_linears(model, bits=4, group_size=64, mode="affine"):
    """Quantize every linear layer (not embeddings / lm_head, as a small real model might)."""
    nn.quantize(
        model,
        group_size,
        bits,
        mode=mode,
        class_predicate=lambda p, m: hasattr(m, "to_quantized")
        and not isinstance(m, nn.Embedding)
        and "lm_head" not in p,
    )
    return model


def dequantized(layer):
    """float32 weight, computed in float32 (mx.dequantize computes in the scales' dtype)."""
    if "scales" not in layer:
        return layer.weight.astype(mx.float32)
    f32 = lambda a: a.astype(mx.float32) if a is not None and a.dtype != mx.uint8 else a
    return mx.dequantize(
        layer.weight, f32(layer.scales), f32(layer.get("biases")), group_size=layer.group_size,
        bits=layer.bits, mode=layer.mode, dtype=mx.float32,
    )


def gained(model_type="llama", variant="gain-ffn", tie_kv=False, quantize=None, seed=0, **overrides):
    """(model with random gains, targets, input, logits of the un-fused model)."""
    model = tiny_model(model_type, **overrides)
    if quantize:
        quantize_linears(model, **quantize)
    targets = apply_gains(model, variant, tie_kv=tie_kv)
    randomize_gains(model, seed)
    x = tiny_input()
    return model, targets, x, model(x)


# ---------------------------------------------------------------- the plan itself

LAYOUT_GQA = HeadLayout(n_heads=4, n_kv_heads=2, head_dim=8)


def _attn(producer_rows="all"):
    producer = "a.v_proj" if producer_rows == "all" else "a.qkv_proj"
    return Target("a.o_proj", "attn", 0, producer, producer_rows)


def test_plan_float_targets_take_columns():
    t = [_attn(), Target("m.down", "ffn", 0, "m.up")]
    gains = {"a.o_proj": np.full(32, 2.0), "m.down": np.arange(1, 17.0)}
    steps = plan_folds(t, gains, lambda p: False, LAYOUT_GQA)
    assert [(s.dest, s.axis) for s in steps] == [("a.o_proj", "columns"), ("m.down", "columns")]
    np.testing.assert_array_equal(steps[1].factor, gains["m.down"])


def test_plan_quantized_gated_ffn_goes_to_up_rows():
    ffn = Target("m.down", "ffn", 0, "m.up")
    fused = Target("m.down", "ffn", 0, "m.gate_up", "up")
    g = np.arange(1, 17.0)
    (step,) = plan_folds([ffn], {"m.down": g}, lambda p: True)
    assert (step.dest, step.axis, step.rows) == ("m.up", "rows", None)
    (step,) = plan_folds([fused], {"m.down": g}, lambda p: True)
    # gate|up stacked: the up half is rows 16..31 of the 32-row producer
    assert step.dest == "m.gate_up" and list(step.rows) == list(range(16, 32))
    np.testing.assert_array_equal(step.factor, g)


def test_plan_attention_v_rows_only_when_kv_groups_agree():
    tied = np.repeat(np.arange(1, 17.0).reshape(2, 1, 8), 2, axis=1).reshape(-1)  # (n_kv, rep, hd)
    untied = np.arange(1, 33.0)
    q = lambda p: True
    (step,) = plan_folds([_attn()], {"a.o_proj": tied}, q, LAYOUT_GQA)
    assert (step.dest, step.axis, step.rows) == ("a.v_proj", "rows", None)
    np.testing.assert_array_equal(step.factor, np.arange(1, 17.0))  # row k*hd+d of V
    (step,) = plan_folds([_attn()], {"a.o_proj": untied}, q, LAYOUT_GQA)
    assert (step.dest, step.axis) == ("a.o_proj", "columns")
    (step,) = plan_folds([_attn()], {"a.o_proj": untied}, q, HeadLayout(4, 4, 8))  # MHA
    assert step.dest == "a.v_proj" and np.array_equal(step.factor, untied)
    (step,) = plan_folds([_attn()], {"a.o_proj": tied}, q, None)  # no layout: play safe
    assert step.axis == "columns"


def test_plan_fused_qkv_v_rows():
    tied = np.repeat(np.arange(1, 17.0).reshape(2, 1, 8), 2, axis=1).reshape(-1)
    (step,) = plan_folds([_attn("v")], {"a.o_proj": tied}, lambda p: True, LAYOUT_GQA)
    # q|k|v rows: 32 q rows, 16 k rows, then the 16 V rows
    assert step.dest == "a.qkv_proj" and list(step.rows) == list(range(48, 64))


def test_plan_without_producer_and_helpers():
    t = Target("m.c_proj", "ffn", 0, None)
    (step,) = plan_folds([t], {"m.c_proj": np.ones(8)}, lambda p: True, LAYOUT_GQA)
    assert (step.dest, step.axis) == ("m.c_proj", "columns")
    np.testing.assert_allclose(invert(FoldStep("a", "b", "rows", None, np.array([2.0, 4.0]))).factor, [0.5, 0.25])
    assert is_power_of_two(np.array([0.25, 1.0, 8.0]))
    assert not is_power_of_two(np.array([0.25, 3.0]))
    assert not is_power_of_two(np.array([-2.0, 0.0]))


# ---------------------------------------------------------------- float models, every architecture


@pytest.mark.parametrize("tie_kv", [False, True])
@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_float32_fuse_matches_gains_applied(model_type, tie_kv):
    model, targets, x, want = gained(model_type, tie_kv=tie_kv)
    report = fuse_model(model, targets)
    assert not any(isinstance(m, GAIN_LAYERS) for _, m in model.named_modules())
    assert {r["method"] for r in report} == {"float"}
    assert rel_diff(model(x), want) <= 1e-5


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_float32_producer_rows_are_exact(model_type):
    """Force every exact producer fold on a float model: checks the V-row / up-row maps."""
    model, targets, x, want = gained(model_type, tie_kv=True)
    gains = {p: np.array(g) for p, g in gain_parameters(model).items()}
    model.update_modules(tree_unflatten([(t.path, get_module(model, t.path).base) for t in targets]))
    steps = plan_folds(targets, gains, lambda p: True, head_layout(model))
    expected_rows = {t.path for t in targets if t.producer is not None}
    assert {s.target for s in steps if s.axis == "rows"} == expected_rows
    for s in steps:
        execute_step(get_module(model, s.dest), s)
    assert rel_diff(model(x), want) <= 1e-5


# ---------------------------------------------------------------- quantized bases


@pytest.mark.parametrize("bits,group_size", [(4, 32), (4, 64), (4, 128), (8, 32), (8, 64), (8, 128)])
@pytest.mark.parametrize("model_type,tie_kv", [("llama", True), ("phi3", True), ("llama_mha", False)])
def test_affine_fold_is_exact_with_fp32_scales(model_type, tie_kv, bits, group_size):
    overrides = dict(WIDE)
    if model_type == "llama_mha":
        model_type, overrides["num_key_value_heads"] = "llama", 4
    model, targets, x, want = gained(
        model_type, tie_kv=tie_kv, quantize=dict(bits=bits, group_size=group_size), **overrides
    )
    layout = head_layout(model)
    gains = {p: np.array(g) for p, g in gain_parameters(model).items()}
    before = {t.producer: (dict(tree_flatten(get_module(model, t.producer).parameters())),
                           dequantized(get_module(model, t.producer))) for t in targets}
    report = fuse_model(model, targets, fp32_scales=True)
    assert {r["method"] for r in report} == {"scales"} and {r["dtype"] for r in report} == {"float32"}
    for t in targets:
        params, w = before[t.producer]
        layer = get_module(model, t.producer)
        assert mx.array_equal(layer.weight, params["weight"])  # packed integers untouched
        # independent reference: s * dequantize(W) on the producer rows, built here
        g = gains[t.path]
        if t.kind == "attn":
            g = g.reshape(layout.n_kv_heads, -1, layout.head_dim)[:, 0].reshape(-1)
        mult = np.ones(w.shape[0], np.float32)
        mult[w.shape[0] - g.size:] = g  # V rows / up half are the last rows; "all" = every row
        ref = w * mx.array(mult)[:, None]
        np.testing.assert_allclose(np.array(dequantized(layer)), np.array(ref), rtol=1e-6, atol=1e-7)
    assert rel_diff(model(x), want) <= 1e-5


def test_bf16_scales_round_and_say_so():
    model = tiny_model("llama", **WIDE)
    model.set_dtype(mx.bfloat16)
    float_up = model.layers[0].mlp.up_proj.weight.astype(mx.float32)
    quantize_linears(model, bits=4, group_size=64)
    targets = apply_gains(model, "gain-ffn", tie_kv=True)
    randomize_gains(model)
    g = mx.array(np.array(gain_parameters(model)["model.layers.0.mlp.down_proj"]))[:, None]
    up = get_module(model, "model.layers.0.mlp.up_proj")
    ref = dequantized(up) * g
    quantization_error = rel_norm(dequantized(up), float_up)
    # what bf16 storage of the scaled scales/biases must give, built independently
    bf16_round = lambda a: (a.astype(mx.float32) * g).astype(mx.bfloat16).astype(mx.float32)
    rounded = mx.dequantize(up.weight, bf16_round(up.scales), bf16_round(up.biases), 64, 4)
    report = fuse_model(model, targets)
    assert {r["method"] for r in report} == {"scales"} and {r["dtype"] for r in report} == {"bfloat16"}
    up_error = next(r["rel_error"] for r in report if r["dest"] == "model.layers.0.mlp.up_proj")
    assert up_error == pytest.approx(rel_norm(rounded, ref), rel=1e-4)
    assert 0 < up_error < quantization_error / 5


def rel_norm(a, ref):
    return (mx.linalg.norm((a - ref).reshape(-1)) / mx.linalg.norm(ref.reshape(-1))).item()


def _requantize_whole_model_error(model, targets, gains):
    """Squared error of the mlx-lm way: every quantized matrix dequantized, the gain put on
    its target's columns, then requantized with the same settings."""
    total = 0.0
    for path, layer in model.named_modules():
        if "scales" not in layer:
            continue
        path = path.removesuffix(".base")
        w = dequantized(layer)
        ref = w * mx.array(gains[path]) if path in gains else w
        q, s, b = mx.quantize(ref, layer.group_size, layer.bits)
        total += mx.sum((mx.dequantize(q, s, b, layer.group_size, layer.bits) - ref) ** 2).item()
    return total


@pytest.mark.parametrize("model_type,tie_kv", [("starcoder2", False), ("gpt2", True), ("llama", False)])
def test_requantize_path_reports_its_error_and_beats_whole_model_requantize(model_type, tie_kv):
    overrides = {"gpt2": dict(n_embd=128)}.get(model_type, WIDE)
    model, targets, x, want = gained(model_type, tie_kv=tie_kv, quantize=dict(bits=4, group_size=64), **overrides)
    gains = {p: np.array(g) for p, g in gain_parameters(model).items()}
    whole = _requantize_whole_model_error(model, targets, gains)
    refs = {t.path: dequantized(get_module(model, t.path).base) * mx.array(gains[t.path]) for t in targets}
    report = fuse_model(model, targets, fp32_scales=True)
    requantized = [r for r in report if r["method"] == "requantize"]
    assert requantized and all(r["axis"] == "columns" for r in requantized)
    ours = 0.0
    for r in requantized:  # the reported error is the real one
        got, ref = dequantized(get_module(model, r["dest"])), refs[r["target"]]
        err = mx.sum((got - ref) ** 2).item()
        assert r["rel_error"] == pytest.approx((err / mx.sum(ref**2).item()) ** 0.5, rel=1e-3)
        ours += err
    assert 0 < ours < whole
    assert rel_diff(model(x), want) < 0.5  # noisy but the same model


def test_mx_modes_power_of_two_exact_else_requantize_changed_rows():
    model, targets, x, _ = gained("llama", tie_kv=True, quantize=dict(bits=4, group_size=32, mode="mxfp4"), **WIDE)
    first = [t for t in targets if t.layer == 0]
    for t in first:  # powers of two in layer 0; layer 1 keeps its U(0.5, 1.5) gains
        layer = get_module(model, t.path)
        layer.gain = 2.0 ** mx.round(mx.log2(layer.gain) * 2)
    want = model(x)
    packed = {t.producer: get_module(model, t.producer).weight for t in targets}
    report = {r["target"]: r for r in fuse_model(model, targets)}
    for t in targets:
        r = report[t.path]
        if t.layer == 0:
            assert r["method"] == "exponent" and r["rel_error"] == 0.0
            assert mx.array_equal(get_module(model, t.producer).weight, packed[t.producer])
        else:
            assert r["method"] == "requantize" and 0 < r["rel_error"] < 0.2
    assert rel_diff(model(x), want) < 0.5


def test_nvfp4_requantizes_only_changed_rows():
    model, targets, x, want = gained("llama", tie_kv=True, quantize=dict(bits=4, group_size=16, mode="nvfp4"), **WIDE)
    # a gain of exactly 1 on the first head's channels leaves those V rows alone
    attn = get_module(model, targets[0].path)
    g = np.array(attn.gain)
    g[0] = 1.0
    attn.gain = mx.array(g)
    v = get_module(model, targets[0].producer)
    old_w, old_s = v.weight, v.scales
    report = fuse_model(model, targets)
    assert {r["method"] for r in report} == {"requantize"}
    hd = head_layout(model).head_dim
    assert mx.array_equal(v.weight[:hd], old_w[:hd]) and mx.array_equal(v.scales[:hd], old_s[:hd])
    assert not mx.array_equal(v.scales[hd:], old_s[hd:])  # the others took their gains
    assert all(r["rel_error"] > 0 for r in report)
    assert rel_diff(model(x), want) < 0.5


@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral"])
def test_quantized_moe_experts_fold_exactly(model_type):
    overrides = dict(WIDE, moe_intermediate_size=64) if model_type == "qwen3_moe" else dict(WIDE)
    model, targets, x, want = gained(model_type, tie_kv=True, quantize=dict(bits=4, group_size=64), **overrides)
    report = fuse_model(model, targets, fp32_scales=True)
    assert {r["method"] for r in report} == {"scales"}
    assert any("switch_mlp" in r["dest"] for r in report)
    assert max(r["rel_error"] for r in report) < 1e-6
    assert rel_diff(model(x), want) <= 1e-5


@pytest.mark.parametrize("quantize", [None, dict(bits=4, group_size=64)])
def test_de_fold_restores_the_base(quantize):
    model = tiny_model("qwen2", **WIDE)
    if quantize:
        quantize_linears(model, **quantize)
    base_params = dict(tree_flatten(model.parameters()))
    x = tiny_input()
    base_logits = model(x)
    targets = apply_gains(model, "gain-ffn", tie_kv=True)
    randomize_gains(model)
    gains = {p: l.gain for p, l in model.named_modules() if isinstance(l, GAIN_LAYERS)}
    fuse_model(model, targets, fp32_scales=True)
    assert rel_diff(model(x), base_logits) > 1e-2
    apply_gains(model, "gain-ffn", tie_kv=True)  # the same gains again, divided out
    for p, g in gains.items():
        get_module(model, p).gain = g
    report = fuse_model(model, targets, fp32_scales=True, de_fold=True)
    assert max(r["rel_error"] for r in report) < 1e-6
    params = dict(tree_flatten(model.parameters()))
    assert params.keys() == base_params.keys()
    for name, value in params.items():
        if value.dtype == mx.uint32:
            assert mx.array_equal(value, base_params[name]), name
        else:
            np.testing.assert_allclose(np.array(value), np.array(base_params[name]), rtol=1e-5, atol=1e-7, err_msg=name)
    assert rel_diff(model(x), base_logits) <= 1e-5
