"""GGUF import and export for every architecture beyond llama / qwen2 / qwen3 / gemma3,
checked against llama.cpp itself.

One row of ``CASES`` per architecture: a tiny random mlx-lm model is written in
llama.cpp's layout by ``gguf_fixtures`` (what each class of convert_hf_to_gguf.py
writes: fused qkv and gate|up, stacked experts, Gemma's ``1 + w`` norms, GPT-NeoX's
q | k | v reordering, Q/K permutation, each converter's metadata keys), then

- import, F32: MLX vs llama.cpp, KL <= 1e-4 and top-1 1.0 (no activation quantization);
- import, one quantized type: KL <= 0.01 and top-1 >= 0.9 (llama.cpp quantizes
  activations inside quantized matmuls);
- the injected layout mistakes of the row's family each break the F32 criterion;
- export: random gains (KV-tied) folded into a quantized GGUF; llama.cpp on the patched
  file vs the MLX model with the gains applied, against the unpatched file.
"""

import json

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from mlx_lm.utils import load_model

from gain_mlx.adapter import adapter_config, apply_gains, save_adapter
from gain_mlx.gguf import GGUFImportError
from gain_mlx.gguf.config import ARCHS
from gain_mlx.gguf.convert import convert_gguf
from gain_mlx.gguf.export import ExportError, export_gguf
from gain_mlx.layers import GAIN_LAYERS
from gguf_fixtures import (
    gguf_tensors,
    kl_top1,
    llamacpp_logits,
    neox_qkv,
    permute,
    tiny_for_gguf,
    write_gguf,
)

pytest.importorskip("llama_cpp", reason="needs llama-cpp-python (pip install 'gain-mlx[llamacpp]')")
pytestmark = pytest.mark.llamacpp

IDS = np.random.default_rng(0).integers(0, 512, 64)
F32_KL = 1e-4
KL_MAX, TOP1_MIN = 0.01, 0.90
MISTAKE_FACTOR = 100  # a caught mistake: KL at least this many times the correct import's


# --- injected layout mistakes: each edits the imported MLX model ----------------------

def _layers(model):
    return model.layers


def _swap_rows(w: mx.array, a: slice, b: slice) -> mx.array:
    w = np.array(w)
    w[a], w[b] = w[b].copy(), w[a].copy()
    return mx.array(w)


def qkv_k_v_swapped(model):
    """Fused qkv read as q | v | k."""
    for layer in _layers(model):
        attn = getattr(layer, "self_attn", None) or layer.attn
        proj = getattr(attn, "qkv_proj", None) or attn.c_attn
        n = proj.weight.shape[0]
        kv = (n - model.args.hidden_size) // 2 if hasattr(model.args, "hidden_size") else n // 3
        q = n - 2 * kv
        for name in ("weight", "bias"):
            if name in proj:
                proj[name] = _swap_rows(proj[name], slice(q, q + kv), slice(q + kv, n))


def gate_up_swapped(model):
    """Fused gate|up read as up|gate."""
    for layer in _layers(model):
        w = layer.mlp.gate_up_proj.weight
        h = w.shape[0] // 2
        layer.mlp.gate_up_proj.weight = _swap_rows(w, slice(0, h), slice(h, 2 * h))


def norm_not_unshifted(model):
    """Gemma's stored 1 + w used as w."""
    model.update({k: v for k, v in _norms(model, lambda w: w + 1.0).items()})


def _norms(model, f):
    from mlx.utils import tree_flatten, tree_unflatten

    return tree_unflatten([(k, f(v)) for k, v in tree_flatten(model.parameters()) if k.endswith("norm.weight")])


def biases_dropped(model):
    """Bias tensors ignored."""
    from mlx.utils import tree_flatten, tree_unflatten

    model.update(tree_unflatten([(k, mx.zeros_like(v)) for k, v in tree_flatten(model.parameters())
                                 if k.endswith(".bias") and "norm" not in k and "ln_" not in k]))


def experts_reversed(model):
    """Experts stacked in the wrong order."""
    for layer in _layers(model):
        moe = getattr(layer, "block_sparse_moe", None) or layer.mlp
        for proj in (moe.switch_mlp.gate_proj, moe.switch_mlp.up_proj, moe.switch_mlp.down_proj):
            proj.weight = proj.weight[::-1]


def gate_up_exps_swapped(model):
    """ffn_gate_exps and ffn_up_exps exchanged."""
    for layer in _layers(model):
        moe = getattr(layer, "block_sparse_moe", None) or layer.mlp
        g, u = moe.switch_mlp.gate_proj.weight, moe.switch_mlp.up_proj.weight
        moe.switch_mlp.gate_proj.weight, moe.switch_mlp.up_proj.weight = u, g


def qk_still_permuted(model):
    """llama.cpp's Q/K permutation not undone."""
    for layer in _layers(model):
        a = layer.self_attn
        n_heads, n_kv = model.args.num_attention_heads, model.args.num_key_value_heads
        a.q_proj.weight = mx.array(permute(np.array(a.q_proj.weight), n_heads))
        a.k_proj.weight = mx.array(permute(np.array(a.k_proj.weight), n_kv))


def qk_permuted(model):
    """Q/K un-permuted although the converter never permuted them (interleaved RoPE)."""
    from gain_mlx.gguf.weights import unpermute_qk

    for layer in _layers(model):
        a = layer.self_attn
        n_heads, n_kv = model.args.num_attention_heads, model.args.num_key_value_heads
        a.q_proj.weight = mx.array(unpermute_qk(np.array(a.q_proj.weight), n_heads))
        a.k_proj.weight = mx.array(unpermute_qk(np.array(a.k_proj.weight), n_kv))


def neox_qkv_not_reordered(model):
    """GPT-NeoX's q | k | v rows used as mlx-lm's per-head layout."""
    for layer in _layers(model):
        proj = layer.attention.query_key_value
        for name in ("weight", "bias"):
            proj[name] = mx.array(neox_qkv(np.array(proj[name]), model.args.num_attention_heads))


def positions_ignored(model):
    """GPT-2's learned positions dropped."""
    model.model.wpe.weight = mx.zeros_like(model.model.wpe.weight)


def attn_v_is_qkv_head(model):
    """Phi-2 fused attn_qkv split as k | q | v."""
    for layer in _layers(model):
        a = layer.self_attn
        for name in ("weight", "bias"):
            q, k = a.q_proj[name], a.k_proj[name]
            a.q_proj[name], a.k_proj[name] = k, q


_LONG = [2.535, 3.851, 1.432, 3.846, 1.935, 2.27, 3.483, 2.228]
_SHORT = [1.275, 1.014, 1.377, 1.269, 1.165, 1.394, 1.152, 1.227]
# Phi3MiniModel.generate_extra_tensors: LongRoPE factors as tensors and the attention factor
# sqrt(1 + ln(128 / 32) / ln(32)). llama.cpp takes the long factors when its context (64 ids,
# padded to 256) exceeds the original 32, which is what mlx-lm's SuScaledRoPE always uses.
LONGROPE = dict(
    tiny=dict(rope_theta=100.0, max_position_embeddings=128, original_max_position_embeddings=32,
              rope_scaling={"type": "longrope", "long_factor": _LONG, "short_factor": _SHORT}),
    metadata=lambda w: w.add_rope_scaling_attn_factors(float(np.sqrt(1 + np.log(4) / np.log(32)))),
    extra=[("rope_factors_long.weight", np.array(_LONG, np.float32), None),
           ("rope_factors_short.weight", np.array(_SHORT, np.float32), None)],
)

# model_type -> tiny overrides, quantized type for the import, export base type,
# [mistakes: a function of the loaded model or a config override]
CASES = {
    "phi3": dict(quant=Q.Q4_0, mistakes=[qkv_k_v_swapped, gate_up_swapped,
                                         {"partial_rotary_factor": 0.5}]),
    "phi3-partial": dict(model_type="phi3", tiny=dict(partial_rotary_factor=0.5), quant=Q.Q8_0,
                         mistakes=[{"partial_rotary_factor": 1.0}], export=False),
    "phi3-longrope": dict(model_type="phi3", **LONGROPE, quant=Q.Q8_0, mistakes=[{"rope_scaling": None}],
                          export=False),
    "gemma2": dict(tiny=dict(attn_logit_softcapping=2.0, final_logit_softcapping=3.0), quant=Q.Q8_0,
                   mistakes=[norm_not_unshifted, {"attn_logit_softcapping": 1000.0},
                             {"final_logit_softcapping": 1000.0}]),
    "gemma": dict(quant=Q.Q8_0, mistakes=[norm_not_unshifted]),
    "smollm3": dict(tiny=dict(num_hidden_layers=4, rope_theta=100.0), quant=Q.Q4_0,
                    mistakes=[qk_still_permuted, {"no_rope_layer_interval": 1000}]),
    "granite": dict(tiny=dict(rope_theta=100.0), quant=Q.Q5_0,
                    mistakes=[qk_still_permuted, {"embedding_multiplier": 1.0}, {"residual_multiplier": 1.0},
                              {"attention_multiplier": 1.0}, {"logits_scaling": 1.0}]),
    "starcoder2": dict(quant=Q.Q8_0, mistakes=[biases_dropped]),
    "qwen2_moe": dict(quant=Q.Q8_0, mistakes=[experts_reversed, gate_up_exps_swapped]),
    "qwen3_moe": dict(quant=Q.Q8_0, mistakes=[experts_reversed, {"norm_topk_prob": False}]),
    "mixtral": dict(quant=Q.Q4_1, mistakes=[experts_reversed, qk_still_permuted]),
    "olmoe": dict(quant=Q.Q8_0, mistakes=[gate_up_exps_swapped, {"norm_topk_prob": True}]),
    "phi": dict(quant=Q.Q8_0, mistakes=[{"partial_rotary_factor": 1.0}, biases_dropped]),
    "phi-fused": dict(model_type="phi", fused_qkv=True, quant=Q.Q8_0, mistakes=[attn_v_is_qkv_head]),
    "gpt2": dict(quant=Q.Q8_0, mistakes=[qkv_k_v_swapped, positions_ignored]),
    "gpt_neox": dict(quant=Q.Q8_0, mistakes=[neox_qkv_not_reordered, {"rotary_pct": 1.0},
                                             {"use_parallel_residual": False}]),
    "cohere": dict(tiny=dict(logit_scale=4.0), quant=Q.Q8_0, mistakes=[qk_permuted, {"logit_scale": 1.0}]),
}


def _model_type(case: str) -> str:
    return CASES[case].get("model_type", case)


def _write(path, case: str, qtype=Q.F32, seed: int = 0):
    c = CASES[case]
    model = tiny_for_gguf(_model_type(case), seed=seed, **c.get("tiny", {}))
    tensors = list(gguf_tensors(model, qtype, fused_qkv=c.get("fused_qkv", False)))
    return write_gguf(path, model, tensors=tensors, extra_tensors=c.get("extra", ()),
                      metadata=c.get("metadata")), model


def _logits(model, ids=IDS) -> np.ndarray:
    return np.array(model(mx.array(ids)[None])[0].astype(mx.float32))


def _load(folder, **config):
    model, _ = load_model(folder, model_config=config or None)
    return model


@pytest.fixture(scope="module")
def f32(tmp_path_factory):
    """Per case: (GGUF path, converted folder, llama.cpp's logits), built once."""
    cache = {}

    def get(case):
        if case not in cache:
            d = tmp_path_factory.mktemp(case)
            path, _ = _write(d / "m.gguf", case)
            cache[case] = path, convert_gguf(path, d / "mlx"), llamacpp_logits(path, IDS)
        return cache[case]

    return get


def _mistake_ids():
    for case, c in CASES.items():
        for i, m in enumerate(c["mistakes"]):
            name = m.__name__ if callable(m) else ",".join(f"{k}={v}" for k, v in m.items())
            yield pytest.param(case, i, id=f"{case}-{name}")


@pytest.mark.parametrize("case", list(CASES))
def test_import_f32_matches_llama_cpp(f32, case):
    path, out, reference = f32(case)
    model, tokenizer = mlx_lm.load(str(out))  # a complete folder: tokenizer files too
    assert tokenizer.encode("hello world")
    assert json.loads((out / "config.json").read_text())["model_type"] == _model_type(case)
    kl, top1 = kl_top1(reference, _logits(model))
    print(f"{case} F32: KL {kl:.2e} top-1 {top1:.3f}")
    assert kl <= F32_KL and top1 == 1.0, (kl, top1)


@pytest.mark.parametrize("case,index", list(_mistake_ids()))
def test_layout_mistake_is_caught(f32, case, index):
    path, out, reference = f32(case)
    mistake = CASES[case]["mistakes"][index]
    if callable(mistake):
        model = _load(out)
        mistake(model)
    else:
        model = _load(out, **mistake)
    kl, top1 = kl_top1(reference, _logits(model))
    print(f"{case} with {getattr(mistake, '__name__', mistake)}: KL {kl:.2e} top-1 {top1:.3f}")
    correct, _ = kl_top1(reference, _logits(_load(out)))
    assert not (kl <= F32_KL and top1 == 1.0) and kl > MISTAKE_FACTOR * correct, (kl, top1, correct)


@pytest.mark.parametrize("case", list(CASES))
def test_import_quantized_matches_llama_cpp(tmp_path, case):
    qtype = CASES[case]["quant"]
    path, _ = _write(tmp_path / "m.gguf", case, qtype)
    kl, top1 = kl_top1(llamacpp_logits(path, IDS), _logits(_load(convert_gguf(path, tmp_path / "mlx"))))
    print(f"{case} {qtype.name}: KL {kl:.2e} top-1 {top1:.3f}")
    assert kl <= KL_MAX and top1 >= TOP1_MIN, (kl, top1)


# --- export ---------------------------------------------------------------------------

EXPORT_CASES = [c for c in CASES if CASES[c].get("export", True)]


def _random_adapter(model, path, seed=0):
    targets = apply_gains(model, "gain-ffn", tie_kv=True)
    rng = np.random.default_rng(seed)
    for _, layer in model.named_modules():
        if isinstance(layer, GAIN_LAYERS):
            layer.gain = mx.array(rng.uniform(0.5, 1.5, layer.gain.shape).astype(np.float32))
    return save_adapter(model, path, adapter_config(model, targets, "gain-ffn", True))


@pytest.mark.parametrize("case", EXPORT_CASES)
def test_export_matches_mlx_with_gains(tmp_path, case):
    """Q8_0 base: attention gains (KV-tied) on V rows, gated-FFN gains on up rows (the up
    half of a fused gate|up, each expert's up rows), non-gated FFN gains requantized into
    the target's columns. llama.cpp on the patched file must agree with MLX + gains; the
    patched file read back by the import must equal it up to the scale fields' rounding."""
    base, _ = _write(tmp_path / "base.gguf", case, Q.Q8_0)
    model = _load(convert_gguf(base, tmp_path / "mlx"))
    adapter = _random_adapter(model, tmp_path / "adapter")
    out = tmp_path / "patched.gguf"
    report = export_gguf(base, adapter, out, fallback="requant", log=lambda s: None)
    routes = {(r["tensor"].split(".")[-2], r["how"]) for r in report}
    reference = _logits(model)
    kl, top1 = kl_top1(reference, llamacpp_logits(out, IDS))
    kl_base, _ = kl_top1(reference, llamacpp_logits(base, IDS))
    kl_import, top1_import = kl_top1(reference, _logits(_load(convert_gguf(out, tmp_path / "back"))))
    print(f"{case} export Q8_0: llama.cpp KL {kl:.2e} top-1 {top1:.3f} (unpatched KL {kl_base:.2e}); "
          f"re-imported KL {kl_import:.2e}; routes {sorted(routes)}")
    assert kl <= KL_MAX and top1 >= TOP1_MIN, (kl, top1)
    assert kl_base >= 5 * kl, (kl_base, kl)
    exact = {how for kind, how in routes if kind not in ("ffn_down", "ffn_down_exps")}
    assert exact == {"scales"}, routes  # every row fold exact
    if {how for _, how in routes} == {"scales"}:
        assert kl_import <= 1e-6 and top1_import == 1.0, (kl_import, top1_import)
    else:  # non-gated FFN: requantized columns add their rounding
        assert kl_import <= 1e-4 and top1_import >= TOP1_MIN, (kl_import, top1_import)


def test_unsupported_architecture_is_refused_in_one_line(tmp_path):
    import gguf

    path = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(path), "bloom")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(GGUFImportError) as e:
        convert_gguf(path, tmp_path / "out")
    msg = str(e.value)
    assert "'bloom' is not supported" in msg and "\n" not in msg
    assert all(arch in msg for arch in ARCHS)
    base, model = _write(tmp_path / "base.gguf", "starcoder2", Q.Q8_0)
    adapter = _random_adapter(model, tmp_path / "adapter")
    with pytest.raises(ExportError) as e:
        export_gguf(path, adapter, tmp_path / "o.gguf", log=lambda s: None)
    msg = str(e.value)
    assert "'bloom' is not supported" in msg and "\n" not in msg
    assert all(arch in msg for arch in ARCHS)
