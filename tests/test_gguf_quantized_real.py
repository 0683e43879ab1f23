"""Quantization-preserving import of real tensors: SmolLM2-135M requantized by llama.cpp's own
quantizer (Q4_0, Q4_K_M, Q5_K_M, Q8_0), checked against gguf-py's dequantization and against
llama.cpp's logits; gains trained on the quantized import fold into the original GGUF."""

import ctypes

import gguf
import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.utils import load_model

from gain_mlx.adapter import adapter_config, apply_gains, save_adapter
from gain_mlx.gguf.affine import EXACT
from gain_mlx.gguf.convert import convert_gguf
from gain_mlx.gguf.export import export_gguf
from gguf_fixtures import kl_top1, llamacpp_logits, mlx_logits_fast

llama_cpp = pytest.importorskip("llama_cpp", reason="needs llama-cpp-python (pip install 'gain-mlx[llamacpp]')")
pytestmark = [pytest.mark.real, pytest.mark.llamacpp]

FTYPES = ["Q4_0", "Q4_K_M", "Q5_K_M", "Q8_0"]
N_POSITIONS = 64  # quantized matmuls are slow on CPU


@pytest.fixture(scope="module")
def quantized_files(tmp_path_factory):
    """The packaged SmolLM2 (Q4_1) requantized by ``llama_model_quantize``."""
    from gain_mlx.loading import default_model_path

    try:
        src = default_model_path()
    except FileNotFoundError as e:
        pytest.skip(f"SmolLM2 not installed: {e}")
    folder = tmp_path_factory.mktemp("smollm2-quants")
    files = {}
    for name in FTYPES:
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{name}")
        params.allow_requantize = True
        out = folder / f"smollm2-{name}.gguf"
        assert llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(params)) == 0
        files[name] = out
    vocab = llama_cpp.Llama(model_path=str(src), vocab_only=True, verbose=False)
    ids = vocab.tokenize(TEXT.encode(), add_bos=False, special=False)[:N_POSITIONS]
    return files, ids


# Real text: on random token ids the next-token distributions are flat and llama.cpp's
# quantized activations flip near-tied logits (KL 0.017 where this text gives 0.008).
TEXT = __import__("json").__doc__ + __import__("pydoc_data.topics").topics.topics["assert"]


@pytest.fixture(scope="module")
def q4_k_m(quantized_files, tmp_path_factory):
    """Q4_K_M (Q4_K, Q5_0, Q8_0 and Q6_K tensors) imported quantized and as float32."""
    files, _ = quantized_files
    folder = tmp_path_factory.mktemp("q4_k_m")
    path = files["Q4_K_M"]
    return path, {form: convert_gguf(path, folder / form, form=form) for form in ("quantized-float32", "float32")}


GGUF_OF = {"model.embed_tokens": "token_embd", "self_attn.o_proj": "attn_output", "self_attn.v_proj": "attn_v",
           "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}  # not permuted


@pytest.mark.parametrize("name", FTYPES)
def test_real_tensors_reproduce_gguf_py(quantized_files, tmp_path, name):
    files, _ = quantized_files
    tensors = {t.name: t for t in gguf.GGUFReader(files[name]).tensors}
    model, _ = load_model(convert_gguf(files[name], tmp_path / "q", form="quantized-float16"))
    checked = set()
    for path, m in model.named_modules():
        parts = path.split(".")  # model.layers.<i>.<module path>
        key = ".".join(parts[3:]) if len(parts) > 3 else path
        if key not in GGUF_OF:
            continue
        t = tensors[(f"blk.{parts[2]}." if len(parts) > 3 else "") + GGUF_OF[key] + ".weight"]
        reference = gguf.quants.dequantize(t.data, t.tensor_type)
        got = np.array(mx.dequantize(m.weight, m.scales.astype(mx.float32), m.biases.astype(mx.float32),
                                     group_size=m.group_size, bits=m.bits))
        err = np.abs(got - reference).max() / np.abs(reference).max()
        # float16 scales round d * sc (~5e-4); Q6_K as 8-bit affine costs ~5e-3
        assert err < (1e-3 if t.tensor_type in EXACT else 2e-2), (path, t.tensor_type.name, err)
        checked.add(t.tensor_type)
    print(f"{name}: checked {sorted(q.name for q in checked)}")
    assert {q for q in checked if q in EXACT}, checked


def test_real_q4_k_m_matches_llama_cpp(q4_k_m, quantized_files, tmp_path):
    """The quantized import agrees with llama.cpp as closely as the float32 import does."""
    path, folders = q4_k_m
    _, ids = quantized_files
    reference = llamacpp_logits(path, ids)
    model, _ = load_model(folders["quantized-float32"])
    kl, top1 = kl_top1(reference, np.array(model(mx.array(ids)[None])[0]))
    kl_float, top1_float = kl_top1(reference, mlx_logits_fast(folders["float32"], ids, tmp_path))
    print(f"SmolLM2 Q4_K_M against llama.cpp: quantized import KL {kl:.4f} top-1 {top1:.3f}; "
          f"float32 import KL {kl_float:.4f} top-1 {top1_float:.3f}")
    assert kl <= max(0.01, kl_float + 0.002) and top1 >= 0.9, (kl, top1, kl_float)


def _tensor_bytes(path) -> dict:
    return {t.name: bytes(t.data.tobytes()) for t in gguf.GGUFReader(path).tensors}


def test_gains_from_quantized_import_fold_into_the_gguf_as_before(q4_k_m, quantized_files, tmp_path):
    """Same gains, trained on the quantized or the float import: the exported GGUFs hold the
    same bytes (same rows, same scale fields), the fingerprint check accepts both, and
    llama.cpp on the export agrees with MLX's quantized import carrying the gains."""
    _, ids = quantized_files
    path, folders = q4_k_m
    rng = np.random.default_rng(0)
    exports, models, gains = {}, {}, None
    for form in ("quantized-float32", "float32"):
        model, _ = load_model(folders[form])
        targets = apply_gains(model, "gain-ffn", tie_kv=True)
        layers = dict(model.named_modules())
        if gains is None:
            gains = {t.path: mx.array(rng.uniform(0.6, 1.4, layers[t.path].gain.shape).astype(np.float32))
                     for t in targets}
        for t in targets:
            layers[t.path].gain = gains[t.path]
        adapter = save_adapter(model, tmp_path / f"adapter-{form}", adapter_config(model, targets, "gain-ffn", True))
        exports[form] = tmp_path / f"out-{form}.gguf"
        export_gguf(path, adapter, exports[form], log=lambda line: None)  # checks the fingerprint
        models[form] = model
    assert _tensor_bytes(exports["quantized-float32"]) == _tensor_bytes(exports["float32"])
    reference = llamacpp_logits(exports["quantized-float32"], ids)
    kl, top1 = kl_top1(reference, np.array(models["quantized-float32"](mx.array(ids)[None])[0]))
    kl_float, _ = kl_top1(reference, np.array(models["float32"](mx.array(ids)[None])[0]))
    print(f"SmolLM2 Q4_K_M export of gains trained on the quantized import: KL {kl:.4f}, top-1 {top1:.3f} "
          f"(float32 import with the same gains: KL {kl_float:.4f})")
    assert kl <= max(0.01, kl_float + 0.002) and top1 >= 0.9, (kl, top1, kl_float)
