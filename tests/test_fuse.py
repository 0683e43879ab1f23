"""``python -m gain_mlx.fuse`` end to end on tiny model folders: the output loads and
generates in plain mlx-lm, errors are one line and leave nothing behind, de-fold undoes."""

import json
import shutil
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from conftest import tiny_input, tiny_model, train_tiny_tokenizer
from mlx.utils import tree_flatten
from mlx_lm.utils import load as mlx_load
from mlx_lm.utils import quantize_model, save_config, save_model

from gain_mlx import fuse as F
from gain_mlx.adapter import adapter_config, apply_gains, load_adapter, save_adapter
from gain_mlx.layers import GAIN_LAYERS

VOCAB = 384
CONFIG = dict(
    model_type="llama", hidden_size=128, num_hidden_layers=2, intermediate_size=256,
    num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=VOCAB,
    tie_word_embeddings=False,
)
PROMPT = "Permission is hereby granted"


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    train_tiny_tokenizer(path, vocab_size=VOCAB)
    return path


def write_base(path, tokenizer_dir, dtype=mx.float32, seed=0, bits=4):
    """A quantized tiny llama folder (scales in ``dtype``) that mlx_lm.load reads."""
    model = tiny_model(seed=seed, **CONFIG)
    model.set_dtype(dtype)
    model, config = quantize_model(model, dict(CONFIG), group_size=64, bits=bits)
    save_model(path, model)
    save_config(config, path / "config.json")
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, path / f.name)
    return path


def write_adapter(base, path, seed=0):
    model, _ = mlx_load(str(base))
    targets = apply_gains(model, "gain-ffn", tie_kv=True)
    key = mx.random.key(seed)
    for _, layer in model.named_modules():
        if isinstance(layer, GAIN_LAYERS):
            key, sub = mx.random.split(key)
            layer.gain = mx.random.uniform(0.5, 1.5, layer.gain.shape, key=sub)
    save_adapter(model, path, adapter_config(model, targets, "gain-ffn", True))
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory, tokenizer_dir):
    return write_base(tmp_path_factory.mktemp("base") / "m", tokenizer_dir)


@pytest.fixture(scope="module")
def adapter(base, tmp_path_factory):
    return write_adapter(base, tmp_path_factory.mktemp("adapter") / "a")


def run_fuse(*args):
    F.main([str(a) for a in args])


def runtime_model(base, adapter):
    model, tokenizer = mlx_load(str(base))
    load_adapter(model, adapter)
    return model, tokenizer


def weights(folder):
    return {k: v for f in sorted(folder.glob("model*.safetensors")) for k, v in mx.load(str(f)).items()}


def rel_diff(a, b):
    return (mx.abs(a - b).max() / mx.abs(b).max()).item()


GENERATE = """
import json, sys
from mlx_lm import load, stream_generate
model, tokenizer = load(sys.argv[1])
tokens = [r.token for r in stream_generate(model, tokenizer, sys.argv[2], max_tokens=12)]
print(json.dumps({"tokens": tokens, "gain_mlx": any(m.startswith("gain_mlx") for m in sys.modules)}))
"""


def test_fused_folder_runs_in_plain_mlx_lm(base, adapter, tmp_path):
    out = tmp_path / "fused"
    run_fuse("--model", base, "--adapter-path", adapter, "--save-path", out)
    # same architecture and quantization config, tokenizer copied, card and plan written
    cfg, base_cfg = (json.loads((d / "config.json").read_text()) for d in (out, base))
    assert cfg["quantization"] == base_cfg["quantization"] and cfg["model_type"] == "llama"
    assert (out / "tokenizer.json").read_bytes() == (base / "tokenizer.json").read_bytes()
    plan = json.loads((out / F.PLAN_FILE).read_text())
    assert len(plan["steps"]) == 4 and {s["method"] for s in plan["steps"]} == {"scales"}
    assert str(adapter) in (out / "README.md").read_text()
    assert not list(tmp_path.glob(".*"))  # no temp folder left
    # zero cost: the same tensors (names, shapes, dtypes) as the base, no extra layer
    w, w0 = weights(out), weights(base)
    assert {k: (v.shape, v.dtype) for k, v in w.items()} == {k: (v.shape, v.dtype) for k, v in w0.items()}
    # logits: plain mlx-lm on the folder == base with the adapter applied at run time
    fused, _ = mlx_load(str(out))
    gained, tokenizer = runtime_model(base, adapter)
    x = tiny_input(vocab=VOCAB)
    assert rel_diff(fused(x), gained(x)) <= 1e-5
    # greedy generation in a fresh process that never imports gain_mlx
    from mlx_lm import stream_generate

    want = [r.token for r in stream_generate(gained, tokenizer, PROMPT, max_tokens=12)]
    proc = subprocess.run([sys.executable, "-c", GENERATE, str(out), PROMPT], capture_output=True, text=True, check=True)
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got == {"tokens": want, "gain_mlx": False}
    base_model, _ = mlx_load(str(base))
    assert rel_diff(base_model(x), gained(x)) > 1e-2  # the gains matter


def test_fp32_scales_on_a_bf16_base(tmp_path, tokenizer_dir):
    base = write_base(tmp_path / "base", tokenizer_dir, dtype=mx.bfloat16)
    adapter = write_adapter(base, tmp_path / "a")
    out = tmp_path / "fused"
    run_fuse("--model", base, "--adapter-path", adapter, "--save-path", out, "--fp32-scales")
    w, w0 = weights(out), weights(base)
    v = "model.layers.0.self_attn.v_proj"
    assert w[f"{v}.scales"].dtype == mx.float32 and w[f"{v}.biases"].dtype == mx.float32
    assert w["model.layers.0.self_attn.q_proj.scales"].dtype == mx.bfloat16
    assert mx.array_equal(w[f"{v}.weight"], w0[f"{v}.weight"])
    plan = json.loads((out / F.PLAN_FILE).read_text())
    assert plan["scales"] == "float32" and max(s["rel_error"] for s in plan["steps"]) < 1e-6
    fused, _ = mlx_load(str(out))  # mixed fp32/bf16 scales load per tensor
    assert fused.layers[0].self_attn.v_proj.scales.dtype == mx.float32
    assert fused.layers[0].self_attn.q_proj.scales.dtype == mx.bfloat16
    x = tiny_input(vocab=VOCAB)
    mixed = fused(x)  # runs as is: fp32 scales promote the activations after them
    assert mixed.dtype == mx.float32 and mx.all(mx.isfinite(mixed)).item()
    # computed in float32 throughout, the fused model is the gained base
    gained, _ = runtime_model(base, adapter)
    fused.set_dtype(mx.float32)
    gained.set_dtype(mx.float32)
    assert rel_diff(fused(x), gained(x)) <= 1e-5


def test_dequantize_writes_a_float_model(base, adapter, tmp_path):
    out = tmp_path / "float"
    run_fuse("--model", base, "--adapter-path", adapter, "--save-path", out, "--dequantize")
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization" not in cfg and "quantization_config" not in cfg
    assert not any(k.endswith(".scales") for k in weights(out))
    plan = json.loads((out / F.PLAN_FILE).read_text())
    assert {s["method"] for s in plan["steps"]} == {"float"} and plan["dequantized"]
    fused, _ = mlx_load(str(out))
    gained, _ = runtime_model(base, adapter)
    x = tiny_input(vocab=VOCAB)
    assert rel_diff(fused(x), gained(x)) <= 1e-5


def test_de_fold_round_trip(base, adapter, tmp_path, tokenizer_dir):
    fused, back = tmp_path / "fused", tmp_path / "back"
    run_fuse("--model", base, "--adapter-path", adapter, "--save-path", fused)
    run_fuse("--model", fused, "--adapter-path", adapter, "--save-path", back, "--de-fold")
    w, w0 = weights(back), weights(base)
    assert w.keys() == w0.keys()
    for k, v in w.items():
        if v.dtype == mx.uint32:
            assert mx.array_equal(v, w0[k]), k
        else:
            np.testing.assert_allclose(np.array(v), np.array(w0[k]), rtol=1e-5, atol=1e-7, err_msg=k)
    plan = json.loads((back / F.PLAN_FILE).read_text())
    assert [h["operation"] for h in plan["history"]] == ["fold", "de-fold"]
    assert max(s["rel_error"] for s in plan["steps"]) < 1e-6
    # nothing left to de-fold, and another adapter was never folded in
    with pytest.raises(SystemExit, match="records no fold"):
        run_fuse("--model", back, "--adapter-path", adapter, "--save-path", tmp_path / "x", "--de-fold")
    other = write_adapter(base, tmp_path / "other", seed=1)
    with pytest.raises(SystemExit, match="records no fold"):
        run_fuse("--model", fused, "--adapter-path", other, "--save-path", tmp_path / "x", "--de-fold")
    assert not (tmp_path / "x").exists()


def _one_line_error(args, match):
    with pytest.raises(SystemExit) as e:
        run_fuse(*args)
    message = str(e.value)
    assert message.startswith("error: ") and "\n" not in message and match in message, message


def test_hub_id_adapter_fuses_as_the_local_folder(base, adapter, tmp_path, offline_hub):
    """--adapter-path takes a Hub repo id (from the Hub cache, offline) as generate and serve
    do: the same weights; the plan records the gains file's SHA-256 (as export does)."""
    import hashlib

    offline_hub(adapter, "someone/legal-gain")
    run_fuse("--model", base, "--adapter-path", adapter, "--save-path", tmp_path / "local")
    run_fuse("--model", base, "--adapter-path", "someone/legal-gain", "--save-path", tmp_path / "hub_fused")
    w, w_hub = weights(tmp_path / "local"), weights(tmp_path / "hub_fused")
    assert w.keys() == w_hub.keys() and all(mx.array_equal(w[k], w_hub[k]).item() for k in w)
    want = hashlib.sha256((adapter / "gains.safetensors").read_bytes()).hexdigest()
    plans = [json.loads((tmp_path / d / F.PLAN_FILE).read_text()) for d in ("local", "hub_fused")]
    assert [p["gains_sha256"] for p in plans] == [want, want]


def test_bad_input_fails_in_one_line_and_writes_nothing(base, adapter, tmp_path, tokenizer_dir):
    out = tmp_path / "out"
    _one_line_error(["--model", base, "--adapter-path", tmp_path / "none", "--save-path", out], "not found")
    other_base = write_base(tmp_path / "other_base", tokenizer_dir, seed=1)
    _one_line_error(["--model", other_base, "--adapter-path", adapter, "--save-path", out], "different base weights")
    _one_line_error(["--model", base, "--adapter-path", adapter, "--save-path", base, "--force"], "is the --model folder")
    assert not out.exists() and not list(tmp_path.glob(".out*"))
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _one_line_error(["--model", base, "--adapter-path", adapter, "--save-path", out], "already exists")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    run_fuse("--model", base, "--adapter-path", adapter, "--save-path", out, "--force")
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    assert not list(tmp_path.glob(".out*"))


def test_python_api_fuses_in_memory(base, adapter):
    model, _ = runtime_model(base, adapter)
    targets = adapter_targets(adapter)
    x = tiny_input(vocab=VOCAB)
    want = model(x)
    report = F.fuse_model(model, targets, fp32_scales=True)
    assert len(report) == 4 and "rel_error" in report[0]
    assert not any(isinstance(m, GAIN_LAYERS) for _, m in model.named_modules())
    assert rel_diff(model(x), want) <= 1e-5
    assert "scales: 4 tensors" in F.format_plan(report)
    assert not any(k.endswith(".gain") for k, _ in tree_flatten(model.parameters()))


def adapter_targets(adapter):
    from gain_mlx.adapter import read_adapter, targets_from_config

    return targets_from_config(read_adapter(adapter)[0])


@pytest.mark.real
def test_smollm2_default_model_fuses_exactly(tmp_path):
    """SmolLM2-135M (the packaged GGUF as the device policy imports it: float32 on a CPU,
    quantized on a GPU): the CLI with no --model, then the same weights quantized to 4 bits
    in memory with KV-tied gains (exact scale folds)."""
    from mlx_lm.utils import quantize_model as quantize

    from gain_mlx import policy
    from gain_mlx.loading import load_model

    model, _, _ = load_model(None, verbose=False)
    targets = apply_gains(model, "gain-ffn", tie_kv=True)
    key = mx.random.key(0)
    for _, layer in model.named_modules():
        if isinstance(layer, GAIN_LAYERS):
            key, sub = mx.random.split(key)
            layer.gain = mx.random.uniform(0.5, 1.5, layer.gain.shape, key=sub)
    save_adapter(model, tmp_path / "a", adapter_config(model, targets, "gain-ffn", True))
    x = mx.array([[1, 504, 2364, 314, 253, 1345, 30, 378, 2096, 28, 2]])
    want = model(x)
    run_fuse("--adapter-path", tmp_path / "a", "--save-path", tmp_path / "fused")
    plan = json.loads((tmp_path / "fused" / F.PLAN_FILE).read_text())
    method = "float" if policy.current().float_copies else "scales"  # the quantized import folds into rows
    assert {s["method"] for s in plan["steps"]} == {method} and len(plan["steps"]) == 60
    fused, _ = mlx_load(str(tmp_path / "fused"))
    assert rel_diff(fused(x), want) <= 1e-5
    del fused

    model, _, _ = load_model(None, verbose=False)
    model, _ = quantize(model, {}, 64, 4)
    load_adapter(model, tmp_path / "a")
    want = model(x)
    report = F.fuse_model(model, adapter_targets(tmp_path / "a"))
    assert {r["method"] for r in report} == {"scales"} and max(r["rel_error"] for r in report) < 1e-6
    assert rel_diff(model(x), want) <= 1e-5
