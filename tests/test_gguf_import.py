"""GGUF -> MLX import without llama.cpp: round trips of tiny models, config, errors, cache, CLI."""

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
from mlx_lm.utils import load_model

from gain_mlx.gguf import GGUFImportError
from gain_mlx.gguf import convert as conv
from gain_mlx.gguf.convert import cached_convert, convert_gguf, open_gguf, write_model
from gguf_fixtures import gguf_tensors, llama3_rope_factors, tiny_for_gguf, write_gguf

ARCHS = ["llama", "qwen2", "qwen3", "gemma3_text"]
IDS = np.random.default_rng(0).integers(0, 512, 40)  # longer than gemma3's window (16)


def logits(model, ids=IDS):
    return np.array(model(mx.array(ids)[None])[0].astype(mx.float32))


def rounded(model, qtype):
    """The model with every matrix rounded through ``qtype`` by gguf-py (the reference
    for what a GGUF of that type can hold); vectors stay float32 as in llama.cpp files."""
    def through(w):
        if w.ndim != 2 or qtype == Q.F32:
            return w
        a = np.array(w)
        if qtype == Q.F16:
            return mx.array(a.astype(np.float16).astype(np.float32))
        return mx.array(gguf.quants.dequantize(gguf.quants.quantize(a, qtype), qtype))

    model.update(nn.utils.tree_map(through, model.parameters()))
    return model


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.Q8_0, Q.Q4_0], ids=lambda q: q.name)
@pytest.mark.parametrize("model_type", ARCHS)
def test_round_trip_logits(tmp_path, model_type, qtype):
    model = tiny_for_gguf(model_type)
    path = write_gguf(tmp_path / "m.gguf", model, qtype)
    loaded, tokenizer = mlx_lm.load(str(convert_gguf(path, tmp_path / "mlx")))
    got = logits(loaded)
    expected = logits(rounded(model, qtype))
    np.testing.assert_allclose(got, expected, atol=2e-5 if qtype == Q.F32 else 1e-4, rtol=1e-4)
    if qtype != Q.F32:  # the rounding is really there, and matched
        assert np.abs(got - logits(tiny_for_gguf(model_type))).max() > 1e-3
    assert tokenizer.encode("hello world")  # mlx_lm.load accepted the tokenizer files


def _config(tmp_path, model, **kw):
    path = write_gguf(tmp_path / "m.gguf", model, **kw)
    out = tmp_path / "mlx"
    out.mkdir()
    write_model(open_gguf(path), out)
    return json.loads((out / "config.json").read_text()), out


def test_config_from_metadata_llama(tmp_path):
    model = tiny_for_gguf("llama", rope_theta=100000.0, max_position_embeddings=4096,
                          tie_word_embeddings=True)
    config, out = _config(tmp_path, model)
    assert {k: config[k] for k in (
        "model_type", "num_hidden_layers", "hidden_size", "intermediate_size",
        "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
        "rope_theta", "max_position_embeddings", "vocab_size", "tie_word_embeddings",
    )} == {
        "model_type": "llama", "num_hidden_layers": 2, "hidden_size": 64,
        "intermediate_size": 96, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 16, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
        "max_position_embeddings": 4096, "vocab_size": 512, "tie_word_embeddings": True,
    }
    loaded, _ = load_model(out)
    assert loaded.layers[0].self_attn.rope.base == 100000.0
    assert "lm_head" not in loaded  # tied


def test_rope_theta_is_not_hidden_where_mlx_lm_ignores_it(tmp_path):
    """mlx-lm's llama reads only a flat ``rope_theta``: a nested ``rope_parameters``
    silently falls back to 10000. The import must write it flat."""
    config, out = _config(tmp_path, tiny_for_gguf("llama", rope_theta=100000.0))
    assert "rope_parameters" not in config
    assert load_model(out)[0].layers[0].self_attn.rope.base == 100000.0
    # the trap is real: the same value nested is lost
    nested = {k: v for k, v in config.items() if k != "rope_theta"}
    nested["rope_parameters"] = {"rope_type": "default", "rope_theta": 100000.0}
    (out / "config.json").write_text(json.dumps(nested))
    assert load_model(out)[0].layers[0].self_attn.rope.base == 10000.0


@pytest.mark.parametrize("pattern", ["int", "flags"])
def test_config_gemma3(tmp_path, pattern):
    model = tiny_for_gguf("gemma3_text", rope_theta=1e6, sliding_window=16, sliding_window_pattern=2)
    config, out = _config(tmp_path, model, pattern=pattern)
    assert config["model_type"] == "gemma3_text"
    assert (config["sliding_window"], config["sliding_window_pattern"]) == (16, 2)
    assert (config["rope_theta"], config["rope_local_base_freq"]) == (1e6, 10000.0)
    assert config["query_pre_attn_scalar"] == 16  # head_dim, as llama.cpp scales
    loaded, _ = load_model(out)
    assert [l.self_attn.is_sliding for l in loaded.layers] == [True, False]
    assert [l.self_attn.rope.base for l in loaded.layers] == [10000.0, 1e6]


def test_config_gemma3_defaults_follow_llama_cpp(tmp_path):
    """No pattern key -> llama.cpp's Gemma 3 default of 6; a ``freq_base_swa`` key is read."""
    model = tiny_for_gguf("gemma3_text", sliding_window=16)
    config = gguf_config_of(write_gguf(tmp_path / "a.gguf", model, pattern=None))
    assert config["sliding_window_pattern"] == 6
    config = gguf_config_of(write_gguf(tmp_path / "b.gguf", model, rope_base_swa=50000.0))
    assert config["rope_local_base_freq"] == 50000.0


def gguf_config_of(path):
    from gain_mlx.gguf.config import gguf_config

    return gguf_config(open_gguf(path))


def test_linear_rope_scaling(tmp_path):
    config, out = _config(tmp_path, tiny_for_gguf("llama"), rope_scale=4.0)
    assert config["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}
    assert load_model(out)[0].layers[0].self_attn.rope.scale == 0.25


def test_llama3_rope_freqs(tmp_path):
    model = tiny_for_gguf("llama", rope_theta=500000.0)
    factors = llama3_rope_factors(500000.0, 16, factor=8.0)
    assert 1.0 < np.median(factors) < 8.0  # some of the 8 frequencies fall in each region
    config, out = _config(tmp_path, model, extra_tensors=[("rope_freqs.weight", factors, None)])
    assert config["rope_scaling"]["rope_type"] == "llama3"
    rope = load_model(out)[0].layers[0].self_attn.rope
    base_freqs = 500000.0 ** (np.arange(0, 16, 2) / 16)
    np.testing.assert_allclose(np.array(rope._freqs), base_freqs * factors, rtol=1e-5)


def test_rope_freqs_that_are_not_llama3_are_refused(tmp_path):
    factors = np.linspace(1, 3, 8).astype(np.float32)
    path = write_gguf(tmp_path / "m.gguf", tiny_for_gguf("llama"),
                      extra_tensors=[("rope_freqs.weight", factors, None)])
    with pytest.raises(GGUFImportError, match="rope_freqs"):
        gguf_config_of(path)


def test_unsupported_architecture(tmp_path):
    path = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(path), "bloom")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(GGUFImportError, match="'bloom' is not supported; supported: llama"):
        convert_gguf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]  # no temp folder left


def test_unsupported_ggml_type(tmp_path):
    """Q8_K (llama.cpp's internal activation type) has no gguf-py dequantizer."""
    model_256 = tiny_for_gguf("llama", intermediate_size=256)
    tensors = [
        (n, np.zeros((64, 292), np.uint8), Q.Q8_K) if n == "blk.0.ffn_down.weight" else (n, d, r)
        for n, d, r in gguf_tensors(model_256)
    ]
    path = write_gguf(tmp_path / "m.gguf", model_256, tensors=tensors)
    with pytest.raises(GGUFImportError, match="blk.0.ffn_down.weight.*Q8_K"):
        convert_gguf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_tensors_that_disagree_with_the_metadata(tmp_path):
    model = tiny_for_gguf("llama")
    wider = gguf_tensors(tiny_for_gguf("llama", intermediate_size=128))
    path = write_gguf(tmp_path / "a.gguf", model, tensors=wider)
    with pytest.raises(GGUFImportError, match=r"blk.0.ffn_\w+.weight' has shape .* expects"):
        convert_gguf(path, tmp_path / "out")
    fewer = [t for t in gguf_tensors(model) if not t[0].startswith("blk.1.ffn_up")]
    path = write_gguf(tmp_path / "b.gguf", model, tensors=fewer)
    with pytest.raises(GGUFImportError, match="no tensors for model.layers.1.mlp.up_proj.weight"):
        convert_gguf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_quantize_option_matches_mlx_quantization(tmp_path):
    model = tiny_for_gguf("qwen2")
    path = write_gguf(tmp_path / "m.gguf", model)
    q, _ = mlx_lm.load(str(convert_gguf(path, tmp_path / "q", q_bits=4, q_group_size=32)))
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization"] == {"group_size": 32, "bits": 4, "mode": "affine"}
    assert isinstance(q.layers[0].mlp.down_proj, nn.QuantizedLinear)
    reference = tiny_for_gguf("qwen2")
    nn.quantize(reference, group_size=32, bits=4)
    np.testing.assert_allclose(logits(q), logits(reference), atol=1e-4)


def test_bfloat16_output(tmp_path):
    model = tiny_for_gguf("llama")
    path = write_gguf(tmp_path / "m.gguf", model)
    out = convert_gguf(path, tmp_path / "bf16", form="bfloat16")
    weights = mx.load(str(out / "model.safetensors"))
    assert {v.dtype for v in weights.values()} == {mx.bfloat16}
    reference = tiny_for_gguf("llama")
    reference.set_dtype(mx.bfloat16)
    np.testing.assert_allclose(logits(load_model(out)[0]), logits(reference), atol=1e-2)


def test_shards_are_written_as_the_stream_fills_them(tmp_path, monkeypatch):
    model = tiny_for_gguf("llama")
    path = write_gguf(tmp_path / "m.gguf", model)
    monkeypatch.setattr(conv, "MAX_SHARD_BYTES", 100_000)
    out = tmp_path / "mlx"
    out.mkdir()
    write_model(open_gguf(path), out)
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == {k for k, _ in tree_flatten(model.parameters())}
    np.testing.assert_allclose(logits(load_model(out)[0]), logits(model), atol=2e-5)


def test_convert_refuses_an_existing_output(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", tiny_for_gguf("llama"))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        convert_gguf(path, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_cached_convert(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GAIN_MLX_CACHE", str(tmp_path / "cache"))
    path = write_gguf(tmp_path / "m.gguf", tiny_for_gguf("llama"))
    first = cached_convert(path)
    assert "converting" in capsys.readouterr().err
    assert first.parent == tmp_path / "cache" / "gguf"
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert cached_convert(path) == first
    assert "using cached" in capsys.readouterr().err
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp  # not rebuilt
    assert cached_convert(path, form="bfloat16") != first
    os.utime(path, ns=(stamp + 10**9, stamp + 10**9))  # the file changed: a new conversion
    assert cached_convert(path) not in (first,)
    assert "converting" in capsys.readouterr().err
    assert not [p for p in first.parent.iterdir() if p.name.startswith(".")]  # no temp left


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "gain_mlx.convert", *args],
                          capture_output=True, text=True)


def test_cli(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", tiny_for_gguf("qwen2"))
    r = _cli("--gguf", str(path), "--out", str(tmp_path / "out"), "--quantize", "--q-bits", "8",
             "--q-group-size", "32")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "out" / "config.json").read_text())["quantization"]["bits"] == 8
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in (tmp_path / "out").iterdir()}


@pytest.mark.parametrize("case", ["missing", "not-gguf", "exists"])
def test_cli_errors_are_one_line(tmp_path, case):
    path = write_gguf(tmp_path / "m.gguf", tiny_for_gguf("llama"))
    (tmp_path / "junk.gguf").write_text("not a gguf")
    (tmp_path / "exists").mkdir()
    (tmp_path / "exists" / "x").write_text("x")
    gguf_arg, out = {
        "missing": (tmp_path / "nope.gguf", tmp_path / "o"),
        "not-gguf": (tmp_path / "junk.gguf", tmp_path / "o"),
        "exists": (path, tmp_path / "exists"),
    }[case]
    r = _cli("--gguf", str(gguf_arg), "--out", str(out))
    assert r.returncode != 0
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    assert not (tmp_path / "o").exists()
