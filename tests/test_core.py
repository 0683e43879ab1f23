"""Gain layers, the architecture table, adapters: tiny random models, seconds each."""

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import TINY_CONFIGS, tiny_input, tiny_model
from mlx.utils import tree_flatten

from gain_mlx import adapter as A
from gain_mlx.arch import ARCHITECTURES, find_targets, get_module, producer_row_index, head_layout
from gain_mlx.layers import GainLinear, GainSwitchLinear


def n_trainable(model):
    return sum(v.size for _, v in tree_flatten(model.trainable_parameters()))


def randomize_gains(model, seed=0, low=0.5, high=1.5):
    key = mx.random.key(seed)
    for _, layer in model.named_modules():
        if isinstance(layer, (GainLinear, GainSwitchLinear)):
            key, sub = mx.random.split(key)
            layer.gain = mx.random.uniform(low, high, layer.gain.shape, key=sub)


def test_table_covers_required_architectures():
    required = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "phi", "gpt2", "starcoder2", "qwen3_moe"}
    assert required <= set(ARCHITECTURES)
    assert set(TINY_CONFIGS) == set(ARCHITECTURES), "every table entry needs a tiny model in the tests"


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
@pytest.mark.parametrize("tie_kv", [False, True])
def test_identity_at_unit_gains(model_type, tie_kv):
    model = tiny_model(model_type)
    x = tiny_input()
    ref = model(x)
    targets = apply = A.apply_gains(model, "gain-ffn", tie_kv=tie_kv)
    assert len(apply) == 2 * len(model.layers)
    assert all(isinstance(get_module(model, t.path), (GainLinear, GainSwitchLinear)) for t in targets)
    assert mx.array_equal(model(x), ref), "gains of 1 must reproduce the base logits exactly"
    assert all(not isinstance(getattr(get_module(model, t.path), "base"), (GainLinear,)) for t in targets)


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_gains_change_logits_and_only_gains_train(model_type):
    model = tiny_model(model_type)
    x = tiny_input()
    ref = model(x)
    A.apply_gains(model, "gain-ffn")
    trainable = [k for k, _ in tree_flatten(model.trainable_parameters())]
    assert trainable and all(k.endswith(".gain") for k in trainable)
    randomize_gains(model)
    assert not mx.allclose(model(x), ref)


def test_quantized_identity():
    model = tiny_model("llama")
    nn.quantize(model, group_size=32, bits=4)
    x = tiny_input()
    ref = model(x)
    A.apply_gains(model, "gain-ffn", tie_kv=True)
    assert mx.array_equal(model(x), ref)


def test_gain_linear_is_input_side_and_leaves_bias():
    base = nn.Linear(8, 5, bias=True)
    layer = GainLinear(base, (8,))
    layer.gain = mx.arange(1, 9, dtype=mx.float32) / 4
    x = mx.random.normal((3, 8))
    expected = x @ (base.weight * layer.gain[None, :]).T + base.bias
    assert mx.allclose(layer(x), expected, atol=1e-5)


def test_tied_gain_expands_per_kv_group():
    base = nn.Linear(4 * 3, 6, bias=False)  # 4 query heads of dim 3, 2 KV heads
    layer = GainLinear(base, (2, 3), repeats=2)
    layer.gain = mx.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    assert layer.full_gain().tolist() == [1, 2, 3, 1, 2, 3, 4, 5, 6, 4, 5, 6]


def test_switch_gain_is_per_expert():
    from mlx_lm.models.switch_layers import SwitchLinear

    base = SwitchLinear(6, 4, num_experts=3, bias=False)
    layer = GainSwitchLinear(base)
    layer.gain = mx.random.uniform(0.5, 1.5, (3, 6))
    x = mx.random.normal((5, 2, 1, 6))
    idx = mx.random.randint(0, 3, (5, 2))
    out = layer(x, idx)
    w = np.array(base.weight)
    g = np.array(layer.gain)
    xn, ix = np.array(x), np.array(idx)
    expected = np.einsum("tki,tkoi->tko", xn[:, :, 0] * g[ix], w[ix])[:, :, None]
    np.testing.assert_allclose(np.array(out), expected, rtol=1e-4, atol=1e-5)


def test_parameter_counts_smollm2_shapes():
    """SmolLM2-135M: 30 layers, d=576, d_ff=1536, 9 query / 3 KV heads (built lazily, never evaluated)."""
    from mlx_lm.models import llama

    args = llama.ModelArgs.from_dict(
        dict(model_type="llama", hidden_size=576, num_hidden_layers=30, intermediate_size=1536,
             num_attention_heads=9, num_key_value_heads=3, rms_norm_eps=1e-5, vocab_size=49152)
    )
    counts = {}
    for variant, tie in [("gain", False), ("gain-ffn", False), ("gain", True)]:
        model = llama.Model(args)
        A.apply_gains(model, variant, tie_kv=tie)
        counts[(variant, tie)] = n_trainable(model)
    assert counts[("gain", False)] == 17_280
    assert counts[("gain-ffn", False)] == 63_360
    assert counts[("gain", True)] == 30 * 3 * 64


def test_unknown_architecture_and_custom_targets():
    model = tiny_model("llama")
    model.model_type = "mystery"
    with pytest.raises(ValueError, match="mystery.*supported:.*llama.*--targets"):
        A.apply_gains(model)
    paths = ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    targets = A.apply_gains(model, "gain", targets=paths)
    assert [t.path for t in targets] == paths and n_trainable(model) == 2 * 96
    with pytest.raises(ValueError, match="no module at model.layers.9"):
        find_targets(tiny_model("llama"), "gain", paths=["model.layers.9.mlp.down_proj"])


def test_producer_rows_recover_v_and_up():
    """Scaling the producer rows given by the table equals scaling the target's inputs."""
    for model_type in ("phi3", "gpt2", "gpt_neox", "llama"):
        model = tiny_model(model_type)
        layout = head_layout(model)
        x = tiny_input()
        targets = A.apply_gains(model, "gain-ffn", tie_kv=True)
        randomize_gains(model, seed=3)
        want = model(x)
        gains = A.gain_parameters(model)
        # the row factor is the gain as stored: (n_kv_heads, head_dim) when tied
        stored = {t.path: get_module(model, t.path).gain for t in targets}
        for t in targets:
            layer = get_module(model, t.path)
            layer.gain = mx.ones_like(layer.gain)
            prod = get_module(model, t.producer) if t.producer else None
            if prod is None:
                layer.gain = gains[t.path]  # non-gated FFN: nothing to fold into
                continue
            rows = producer_row_index(t, prod.weight.shape[0], layout)
            scale = np.ones(prod.weight.shape[0], np.float32)
            scale[rows] = np.array(stored[t.path]).reshape(-1)
            prod.weight = prod.weight * mx.array(scale)[:, None]
            if "bias" in prod:
                prod.bias = prod.bias * mx.array(scale)
        np.testing.assert_allclose(np.array(model(x)), np.array(want), rtol=1e-4, atol=1e-4)


def test_save_load_round_trip(tmp_path):
    model = tiny_model("qwen2")
    targets = A.apply_gains(model, "gain-ffn", tie_kv=True)
    randomize_gains(model)
    x = tiny_input()
    want = model(x)
    A.save_adapter(model, tmp_path / "a", A.adapter_config(model, targets, "gain-ffn", True))
    cfg = json.loads((tmp_path / "a" / "gain_config.json").read_text())
    for key in ("format_version", "variant", "orientation", "targets", "tie_kv", "model_type",
                "num_layers", "hidden_size", "intermediate_size", "fingerprint"):
        assert key in cfg
    fresh = tiny_model("qwen2")
    A.load_adapter(fresh, tmp_path / "a")
    assert mx.array_equal(fresh(x), want)
    config, gains = A.read_adapter(tmp_path / "a")
    assert gains["model.layers.0.self_attn.o_proj"].shape == (2, 16)
    assert not list((tmp_path / "a").glob(".tmp-*"))


def test_mismatched_base_fails_clearly(tmp_path):
    model = tiny_model("llama", seed=0)
    targets = A.apply_gains(model, "gain-ffn")
    A.save_adapter(model, tmp_path / "a", A.adapter_config(model, targets, "gain-ffn", False))
    with pytest.raises(A.AdapterError, match="different base weights"):
        A.load_adapter(tiny_model("llama", seed=1), tmp_path / "a")
    with pytest.raises(A.AdapterError, match="'llama' model.*'qwen2'"):
        A.load_adapter(tiny_model("qwen2"), tmp_path / "a")
    with pytest.raises(A.AdapterError, match="intermediate_size=96.*has 128"):
        A.load_adapter(tiny_model("llama", intermediate_size=128), tmp_path / "a")
    with pytest.raises(A.AdapterError, match="not found"):
        A.load_adapter(tiny_model("llama"), tmp_path / "nothing")


def test_fingerprint_survives_quantization(tmp_path):
    model = tiny_model("llama", seed=0)
    targets = A.apply_gains(model, "gain-ffn")
    A.save_adapter(model, tmp_path / "a", A.adapter_config(model, targets, "gain-ffn", False))
    quantized = tiny_model("llama", seed=0)
    nn.quantize(quantized, group_size=32, bits=4)
    A.load_adapter(quantized, tmp_path / "a")  # same weights, 4-bit: accepted
