"""--tie-kv auto: tie where an exact fold into a quantized GQA base needs it."""
import mlx.core as mx
import mlx.nn as nn
import pytest
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
