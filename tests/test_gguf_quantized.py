"""Quantization-preserving GGUF import: ggml blocks -> MLX affine layers.

The reference is gguf-py's dequantization (bit-identical to ggml's), reached through
the float import, which shares no code with the affine mapping.
"""

import json
import os
import subprocess
import sys

import gguf
import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from mlx.utils import tree_flatten

from gain_mlx.gguf.affine import EXACT, mlx_bits, pack, to_affine
from gain_mlx.gguf.convert import cached_convert, convert_gguf
from gguf_fixtures import gguf_tensors, random_raw, tiny_for_gguf, write_gguf, write_random_gguf

K_DIMS = dict(hidden_size=256, intermediate_size=256)  # K-quant rows hold 256-value blocks
CASES = [  # (model type, ggml type, overrides)
    ("llama", Q.Q4_0, {}),  # Q/K rows permuted by llama.cpp
    ("llama", Q.Q4_1, {}),
    ("llama", Q.Q5_0, {}),
    ("llama", Q.Q5_1, {}),
    ("llama", Q.Q8_0, {}),
    ("llama", Q.Q4_K, K_DIMS),
    ("llama", Q.Q5_K, K_DIMS),
    ("llama", Q.Q6_K, K_DIMS),  # not affine at group 32: 8-bit
    ("gpt_neox", Q.Q4_1, {}),  # fused qkv reordered per head
    ("phi3", Q.Q4_0, {}),  # fused qkv_proj / gate_up_proj
    ("qwen3_moe", Q.Q8_0, {}),  # stacked experts (SwitchLinear)
]


def _random_gguf(path, model, qtype):
    """Every matrix (stacked experts too) as random ``qtype`` blocks."""
    rng = np.random.default_rng(0)
    tensors = []
    for name, data, _ in gguf_tensors(model):
        if data.ndim >= 2:
            rows = int(np.prod(data.shape[:-1]))
            raw = random_raw(rows, data.shape[-1], qtype, data.shape[-1] ** -0.5, rng)
            tensors.append((name, raw.reshape(*data.shape[:-1], -1), qtype))
        else:
            tensors.append((name, data, None))
    return write_gguf(path, model, tensors=tensors)


def _dequantized(model) -> dict:
    """Every weight of ``model`` as float32 values (quantized layers dequantized with
    their scales upcast first, so the reference is not rounded by MLX)."""
    out = dict(tree_flatten(model.parameters()))
    for path, m in model.named_modules():
        if hasattr(m, "scales"):
            out[f"{path}.weight"] = mx.dequantize(
                m.weight, m.scales.astype(mx.float32), m.biases.astype(mx.float32),
                group_size=m.group_size, bits=m.bits)
            del out[f"{path}.scales"], out[f"{path}.biases"]
    return {k: np.array(v.astype(mx.float32)) for k, v in out.items()}


def _quantized_modules(model) -> dict:
    return {path: m.bits for path, m in model.named_modules() if hasattr(m, "scales")}


@pytest.mark.parametrize("model_type,qtype,overrides", CASES, ids=lambda c: getattr(c, "name", c) if c else "")
def test_quantized_import_reproduces_gguf_py(tmp_path, model_type, qtype, overrides):
    path = _random_gguf(tmp_path / "m.gguf", tiny_for_gguf(model_type, **overrides), qtype)
    reference, _ = mlx_lm.load(str(convert_gguf(path, tmp_path / "float")))
    model, _ = mlx_lm.load(str(convert_gguf(path, tmp_path / "q", form="quantized-float32")))
    quantized = _quantized_modules(model)
    matrices = {k for k, v in tree_flatten(reference.parameters()) if v.ndim >= 2}
    assert {f"{p}.weight" for p in quantized} == matrices  # every matrix stays quantized
    assert set(quantized.values()) == {mlx_bits(qtype)}
    ref, got = _dequantized(reference), _dequantized(model)
    assert ref.keys() == got.keys()
    for name in ref:
        if qtype in EXACT or name not in matrices:
            np.testing.assert_array_equal(got[name], ref[name], err_msg=name)
        else:  # 8-bit affine of a 16-element sub-block type: within half a step
            err = np.abs(got[name] - ref[name]).max() / np.abs(ref[name]).max()
            assert err < 1e-2, (name, err)
    ids = mx.array(np.arange(12) % 100)[None]
    a, b = np.array(model(ids)), np.array(reference(ids))
    tolerance = 1e-5 if qtype in EXACT else 0.05  # of the largest logit
    assert np.abs(a - b).max() <= tolerance * np.abs(b).max()


@pytest.mark.parametrize("qtype", sorted(EXACT, key=lambda q: q.value), ids=lambda q: q.name)
def test_float16_scales_round_within_fp16(qtype):
    """float16 scales cost the rounding of ``d * sc`` (and of the bias) only."""
    raw = random_raw(16, 512, qtype, 0.05, np.random.default_rng(1))
    reference = gguf.quants.dequantize(raw, qtype)
    wq, scales, biases = to_affine(raw, qtype, 512)
    half = [mx.array(a).astype(mx.float16).astype(mx.float32) for a in (scales, biases)]
    w = np.array(mx.dequantize(mx.array(wq), *half, group_size=32, bits=mlx_bits(qtype)))
    err = np.abs(w - reference).max() / np.abs(reference).max()
    assert err < 1e-3, err


@pytest.mark.parametrize("bits", [4, 5, 8])
def test_pack_is_mlx_layout(bits):
    q = np.random.default_rng(bits).integers(0, 1 << bits, (3, 64))
    ones, zeros = mx.ones((3, 2)), mx.zeros((3, 2))
    w = mx.dequantize(mx.array(pack(q, bits)), ones, zeros, group_size=32, bits=bits)
    np.testing.assert_array_equal(np.array(w), q)


def _mixed_gguf(path, model):
    """Q4_K_M's pattern: Q4_K matrices, Q6_K for ffn_down and the output layer."""
    rng = np.random.default_rng(0)
    tensors = []
    for name, data, _ in gguf_tensors(model):
        if data.ndim != 2:
            tensors.append((name, data, None))
            continue
        qtype = Q.Q6_K if ("ffn_down" in name or name == "output.weight") else Q.Q4_K
        tensors.append((name, random_raw(*data.shape, qtype, data.shape[1] ** -0.5, rng), qtype))
    return write_gguf(path, model, tensors=tensors)


def test_mixed_file_loads_with_plain_mlx_lm(tmp_path):
    model = tiny_for_gguf("llama", tie_word_embeddings=False, **K_DIMS)
    path = _mixed_gguf(tmp_path / "m.gguf", model)
    out = convert_gguf(path, tmp_path / "q", form="quantized-float16")
    config = json.loads((out / "config.json").read_text())["quantization"]
    assert config["model.layers.0.mlp.down_proj"]["bits"] == 8
    assert config["model.layers.0.mlp.up_proj"]["bits"] == 4
    loaded, _ = mlx_lm.load(str(out))
    bits = _quantized_modules(loaded)
    assert bits["lm_head"] == bits["model.layers.1.mlp.down_proj"] == 8
    assert bits["model.embed_tokens"] == bits["model.layers.1.self_attn.o_proj"] == 4
    assert loaded.layers[0].mlp.up_proj.scales.dtype == mx.float16
    reference, _ = mlx_lm.load(str(convert_gguf(path, tmp_path / "float")))
    ids = mx.array(np.arange(12) % 100)[None]
    a, b = np.array(loaded(ids).astype(mx.float32)), np.array(reference(ids))
    assert np.abs(a - b).max() < 0.02 * np.abs(b).max()


def test_size_near_the_file(tmp_path):
    model = tiny_for_gguf("llama", tie_word_embeddings=False, **K_DIMS)
    path = _mixed_gguf(tmp_path / "m.gguf", model)
    quantized = convert_gguf(path, tmp_path / "q", form="quantized-float16") / "model.safetensors"
    floats = convert_gguf(path, tmp_path / "f") / "model.safetensors"
    ratio = quantized.stat().st_size / path.stat().st_size
    assert ratio < 1.45, ratio  # 4-bit + fp16 scale/bias per 32 = 5 bits for 4.5; Q6_K 9 for 6.6
    assert floats.stat().st_size > 4 * quantized.stat().st_size


def test_cache_keeps_one_conversion_per_file_and_form(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GAIN_MLX_CACHE", str(tmp_path / "cache"))
    path = write_random_gguf(tmp_path / "m.gguf", tiny_for_gguf("llama"), Q.Q4_0)
    first = cached_convert(path, form="quantized-float16")
    other = cached_convert(path, form="float32")
    assert first != other and first.is_dir() and other.is_dir()
    assert isinstance(mlx_lm.load(str(first))[0].layers[0].mlp.up_proj, nn.QuantizedLinear)
    stamp = path.stat().st_mtime_ns + 10**9
    os.utime(path, ns=(stamp, stamp))  # the file changed: its quantized conversion is stale
    again = cached_convert(path, form="quantized-float16")
    assert again != first and not first.exists() and other.exists()
    assert "removing stale cached conversion" in capsys.readouterr().err
    gone = write_random_gguf(tmp_path / "gone.gguf", tiny_for_gguf("llama"), Q.Q4_0)
    orphan = cached_convert(gone, form="float32")
    gone.unlink()
    cached_convert(path, form="bfloat16")  # any new conversion sweeps those of deleted files
    assert not orphan.exists() and again.exists() and other.exists()


@pytest.mark.parametrize("flags", [["--keep-quantization", "--quantize"], ["--keep-quantization", "--dtype", "bfloat16"]],
                         ids=["with-quantize", "bfloat16-scales"])
def test_cli_keep_quantization_refuses_bad_flags(tmp_path, flags):
    path = write_random_gguf(tmp_path / "m.gguf", tiny_for_gguf("llama"), Q.Q4_0)
    r = subprocess.run([sys.executable, "-m", "gain_mlx.convert", "--gguf", str(path), "--out", str(tmp_path / "o"),
                        *flags], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    assert not (tmp_path / "o").exists()


def test_cli_keep_quantization_writes_the_quantized_form(tmp_path):
    path = write_random_gguf(tmp_path / "m.gguf", tiny_for_gguf("llama"), Q.Q4_0)
    r = subprocess.run([sys.executable, "-m", "gain_mlx.convert", "--gguf", str(path), "--out", str(tmp_path / "o"),
                        "--keep-quantization", "--dtype", "float16"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    model, _ = mlx_lm.load(str(tmp_path / "o"))
    assert set(_quantized_modules(model).values()) == {4}
    assert model.layers[0].mlp.up_proj.scales.dtype == mx.float16
