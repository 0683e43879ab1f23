"""Serving gain adapters without fusing: per-sequence gains in a mixed batch."""

import mlx.core as mx
import numpy as np
import pytest

from mlx.utils import tree_flatten

from conftest import tiny_input, tiny_model
from gain_mlx.adapter import AdapterError, adapter_config, apply_gains, load_adapter, read_adapter, save_adapter, targets_from_config
from gain_mlx.multi import AdapterSet, greedy_batch


def make_adapter(path, model_fn, variant, seed, tie_kv=False):
    model = model_fn()
    targets = apply_gains(model, variant, tie_kv)
    rng = np.random.default_rng(seed)
    for path_, layer in model.named_modules():
        if hasattr(layer, "gain"):
            layer.gain = mx.array(rng.uniform(0.5, 1.5, layer.gain.shape).astype(np.float32))
    return save_adapter(model, path, adapter_config(model, targets, variant, tie_kv))


@pytest.fixture
def three_adapters(tmp_path):
    fn = lambda: tiny_model("llama")
    return [
        make_adapter(tmp_path / "a", fn, "gain-ffn", 1),
        make_adapter(tmp_path / "b", fn, "gain", 2, tie_kv=True),
        make_adapter(tmp_path / "c", fn, "gain-ffn", 3, tie_kv=True),
    ]


def test_mixed_batch_equals_each_adapter(three_adapters):
    model = tiny_model("llama")
    ref_base = model(tiny_input(batch=1))
    aset = AdapterSet(model)
    for name, path in zip("abc", three_adapters):
        aset.add(name, path)
    x = tiny_input(batch=1)
    names = [None, "a", "b", "c", "a"]
    aset.select([aset.row(n) for n in names])
    mixed = model(mx.concatenate([x] * len(names)))
    for i, name in enumerate(names):
        if name is None:
            ref = ref_base
        else:
            single = tiny_model("llama")
            load_adapter(single, three_adapters["abc".index(name)])
            ref = single(x)
        np.testing.assert_allclose(np.array(mixed[i]), np.array(ref[0]), rtol=1e-4, atol=1e-4)
    assert not np.allclose(np.array(mixed[0]), np.array(mixed[1]), atol=1e-3)


def test_add_remove_keeps_base_untouched(three_adapters):
    model = tiny_model("llama")
    x = tiny_input(batch=1)
    before = model(x)
    weights = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    aset = AdapterSet(model)
    aset.add("a", three_adapters[0])
    aset.add("b", three_adapters[1])
    with pytest.raises(AdapterError, match="already loaded"):
        aset.add("a", three_adapters[2])
    aset.remove("a")
    assert aset.row("b") == 2  # rows are stable: in-flight sequences keep theirs
    aset.add("c", three_adapters[2])
    assert aset.row("c") == 1  # the free row is reused
    aset.remove("c")
    with pytest.raises(AdapterError, match="no adapter named 'a'"):
        aset.row("a")
    aset.remove("b")
    np.testing.assert_array_equal(np.array(model(x)), np.array(before))
    after = dict(tree_flatten(model.parameters()))
    assert set(after) == set(weights)
    for k, v in weights.items():
        np.testing.assert_array_equal(np.array(after[k]), v)


def test_wrong_base_rejected(three_adapters):
    aset = AdapterSet(tiny_model("llama", seed=7))
    with pytest.raises(AdapterError, match="fingerprint"):
        aset.add("a", three_adapters[0])


def test_greedy_mixed_batch_equals_fused_generate(tmp_path, tiny_model_dir):
    """Greedy decoding of a mixed batch equals mlx_lm.generate on each fused model."""
    from mlx_lm import load, stream_generate

    from gain_mlx.fuse import fuse_model

    fn = lambda: load(str(tiny_model_dir))[0]
    paths = [make_adapter(tmp_path / n, fn, "gain-ffn", i, tie_kv=True) for i, n in enumerate("ab")]
    model, tok = load(str(tiny_model_dir))
    aset = AdapterSet(model)
    aset.add("a", paths[0])
    aset.add("b", paths[1])
    prompt = tok.encode("The court held that")
    names = ["a", None, "b", "a"]
    got = greedy_batch(model, aset, [prompt] * len(names), [aset.row(n) for n in names], 12)
    for name, tokens in zip(names, got):
        ref_model, _ = load(str(tiny_model_dir))
        if name is not None:
            p = paths["ab".index(name)]
            load_adapter(ref_model, p)
            fuse_model(ref_model, targets_from_config(read_adapter(p)[0]))
        ref = [r.token for r in stream_generate(ref_model, tok, prompt, max_tokens=12)]
        assert tokens == ref, name
    assert len({tuple(t) for t in got}) == 3  # each adapter changes the output


def test_generate_cli_equals_fused(tmp_path, tiny_model_dir, capsys):
    from mlx_lm import generate, load

    from gain_mlx import generate as G
    from gain_mlx.fuse import fuse_model

    path = make_adapter(tmp_path / "a", lambda: load(str(tiny_model_dir))[0], "gain-ffn", 5, tie_kv=True)
    G.main(["--model", str(tiny_model_dir), "--adapter-path", str(path), "-p", "The court", "-m", "10", "--no-fast-blas"])
    got = capsys.readouterr().out
    ref_model, tok = load(str(tiny_model_dir))
    load_adapter(ref_model, path)
    fuse_model(ref_model, targets_from_config(read_adapter(path)[0]))
    assert got == generate(ref_model, tok, "The court", max_tokens=10) + "\n"
    with pytest.raises(SystemExit) as e:
        G.main(["--model", str(tiny_model_dir), "--adapter-path", str(tmp_path / "none"), "-p", "x", "--no-fast-blas"])
    assert e.value.code == 1
    assert "not found" in capsys.readouterr().err


def test_chat_cli(tmp_path, tiny_model_dir, monkeypatch, capsys):
    import json
    import shutil

    from gain_mlx import chat

    with pytest.raises(SystemExit):
        chat.main(["--model", str(tiny_model_dir), "--no-fast-blas"])
    assert "no chat template" in capsys.readouterr().err
    model_dir = shutil.copytree(tiny_model_dir, tmp_path / "m")
    cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
    (model_dir / "tokenizer_config.json").write_text(json.dumps(cfg))
    lines = iter(["hello", "r", "again", "q"])
    monkeypatch.setattr("builtins.input", lambda _: next(lines))
    chat.main(["--model", str(model_dir), "-m", "5", "--no-fast-blas"])
    out = capsys.readouterr().out
    assert out.count("\n") == 3  # the help line and two replies


def test_adapter_from_offline_hub_cache(tmp_path, tiny_model_dir, offline_hub, capsys):
    """A Hub repo id resolves from a pre-populated Hub cache with HF_HUB_OFFLINE=1."""
    from mlx_lm import load

    from gain_mlx import generate as G

    src = make_adapter(tmp_path / "a", lambda: load(str(tiny_model_dir))[0], "gain-ffn", 5)
    offline_hub(src, "someone/legal-gain")
    args = ["--model", str(tiny_model_dir), "-p", "The court", "-m", "6", "--no-fast-blas"]
    G.main(args + ["--adapter-path", str(src)])
    local = capsys.readouterr().out
    G.main(args + ["--adapter-path", "someone/legal-gain"])
    assert capsys.readouterr().out == local
    with pytest.raises(SystemExit):
        G.main(args + ["--adapter-path", "someone/missing"])
    assert "not found on the Hub or in its cache" in capsys.readouterr().err
