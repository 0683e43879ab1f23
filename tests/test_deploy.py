"""--tie-kv auto: tie where an exact fold into a quantized GQA base needs it."""
import json

import pytest
from gguf import GGMLQuantizationType as GQ
from mlx_lm.models import llama

from gain_mlx.train import parse_args, resolve_tie_kv


def tiny(n_kv):
    args = llama.ModelArgs.from_dict(dict(
        model_type="llama", hidden_size=64, num_hidden_layers=1, intermediate_size=128,
        num_attention_heads=4, num_key_value_heads=n_kv, rms_norm_eps=1e-5, vocab_size=64,
    ))
    return llama.Model(args)


@pytest.mark.parametrize("n_kv,quantized,want", [(2, True, True), (2, False, False), (4, True, False)])
def test_auto_ties_only_quantized_gqa(n_kv, quantized, want):
    tie, why = resolve_tie_kv("auto", tiny(n_kv), quantized)
    assert tie is want and why.startswith("auto")


def test_flag_values():
    assert parse_args([]).tie_kv == "auto"
    assert parse_args(["--tie-kv"]).tie_kv == "on"
    assert parse_args(["--tie-kv", "off"]).tie_kv == "off"
    assert resolve_tie_kv("off", tiny(2), True)[0] is False
    assert resolve_tie_kv(True, tiny(4), False)[0] is True


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    from gguf_fixtures import tiny_for_gguf, write_gguf

    return write_gguf(tmp_path_factory.mktemp("gguf") / "m.gguf", tiny_for_gguf("llama"), GQ.Q8_0)


def _train_tie(model, data, out) -> bool:
    from gain_mlx.train import main

    main(["--model", str(model), "--data", str(data), "--adapter-path", str(out), "--iters", "1",
          "--batch-size", "2", "--max-seq-length", "64", "--val-batches", "1", "--retain-data", "none",
          "--no-fast-blas"])
    return json.loads((out / "gain_config.json").read_text())["tie_kv"]


def test_default_training_ties_on_a_gguf_base_only(tiny_gguf, tiny_model_dir, tiny_data_dir, tmp_path, monkeypatch):
    """Through the CLI: a GQA GGUF ties (by path and by a packaged model's short name, the
    way `--model gemma3-270m` reaches it); a float MLX folder does not."""
    from gain_mlx import loading

    assert _train_tie(tiny_gguf, tiny_data_dir, tmp_path / "path") is True
    monkeypatch.setitem(loading.MODELS, "tiny-gguf", loading.MODELS[loading.DEFAULT_MODEL])
    monkeypatch.setattr(loading, "model_path", lambda name, verify=True: tiny_gguf)
    assert _train_tie("tiny-gguf", tiny_data_dir, tmp_path / "short") is True
    assert _train_tie(tiny_model_dir, tiny_data_dir, tmp_path / "float") is False
