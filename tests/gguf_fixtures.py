"""Tiny GGUF files in llama.cpp's own layout, written with gguf-py, and parity helpers.

``write_gguf`` lays out an mlx-lm model the way llama.cpp's ``convert_hf_to_gguf.py``
does (independently of gain_mlx's importer): gguf-py's HF -> GGUF name table,
Q/K rows permuted for llama's interleaved RoPE, Gemma norms stored as ``1 + w``,
1-D tensors in F32, matrices in the requested ggml type, and a real tokenizer
vocabulary so that llama.cpp loads and runs the file.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import gguf
import mlx.core as mx
import numpy as np
from gguf import GGMLQuantizationType as Q
from mlx.utils import tree_flatten

from gguf_vocab import add_vocab

# mlx-lm model_type -> (GGUF architecture, tokenizer style, permute Q/K, norm shift)
LAYOUT = {
    "llama": ("llama", "smollm", True, 0.0),
    "qwen2": ("qwen2", "qwen2", False, 0.0),
    "qwen3": ("qwen3", "qwen2", False, 0.0),
    "gemma3_text": ("gemma3", "gemma", False, 1.0),
    "phi3": ("phi3", "smollm", False, 0.0),
    "gemma2": ("gemma2", "gemma", False, 1.0),
    "gemma": ("gemma", "gemma", False, 1.0),
    "smollm3": ("smollm3", "smollm", True, 0.0),  # SmolLM3Model(LlamaModel): permuted
    "granite": ("granite", "smollm", True, 0.0),  # GraniteModel(LlamaModel): permuted
    "starcoder2": ("starcoder2", "smollm", False, 0.0),
    "qwen2_moe": ("qwen2moe", "qwen2", False, 0.0),
    "qwen3_moe": ("qwen3moe", "qwen2", False, 0.0),
    "mixtral": ("llama", "smollm", True, 0.0),  # LlamaModel with experts
    "olmoe": ("olmoe", "smollm", False, 0.0),
    "phi": ("phi2", "smollm", False, 0.0),
    "gpt2": ("gpt2", "smollm", False, 0.0),
    "gpt_neox": ("gptneox", "smollm", False, 0.0),
    "cohere": ("command-r", "smollm", False, 0.0),
}


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute`` (convert_hf_to_gguf.py)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def neox_qkv(w: np.ndarray, n_head: int) -> np.ndarray:
    """``GPTNeoXModel.modify_tensors``: per-head ``[q_h k_h v_h]`` rows -> all q | all k | all v."""
    per_head = w.reshape(n_head, 3, w.shape[0] // n_head // 3, *w.shape[1:])
    return np.concatenate([per_head[:, i].reshape(-1, *w.shape[1:]) for i in range(3)])


def hf_name(name: str, model_type: str) -> str:
    """The Hugging Face checkpoint name of an mlx-lm parameter as llama.cpp's converter
    maps it (mlx-lm keeps HF names except for stacked experts and a ``model.`` prefix)."""
    if model_type == "mixtral":  # LlamaModel merges Mixtral's experts.{e}.w1/w2/w3
        for mine, theirs in (("gate_proj", "w1"), ("down_proj", "w2"), ("up_proj", "w3")):
            name = name.replace(f"switch_mlp.{mine}.", f"experts.{theirs}.")
    name = name.replace(".switch_mlp.", ".experts.")  # Qwen2MoeModel's merged_name
    if model_type == "gpt2":
        name = name[len("model."):]
    if model_type == "gpt_neox":
        name = name[len("model."):]
        if not name.startswith("embed_out"):
            name = "gpt_neox." + (name.replace("h.", "layers.", 1) if name.startswith("h.") else name)
    return name


def _n_layers(config: dict) -> int:
    return config.get("num_hidden_layers") or config["n_layer"]


def gguf_tensors(model, qtype=Q.F32, fused_qkv=False):
    """``(gguf name, array, raw ggml type or None)`` for each parameter, llama.cpp layout.

    ``fused_qkv``: (Phi-2) q | k | v in one ``attn_qkv``, as in GGUFs converted from the
    original checkpoint's ``mixer.Wqkv`` before Phi-2 moved to separate projections.
    """
    config = vars(model.args)
    model_type = config["model_type"]
    arch, _, permute_qk, shift = LAYOUT[model_type]
    arch_enum = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch]
    names = gguf.TensorNameMap(arch_enum, _n_layers(config))
    heads = {"q_proj": config.get("num_attention_heads"), "k_proj": config.get("num_key_value_heads")}
    params = dict(tree_flatten(model.parameters()))
    if fused_qkv:
        for i in range(_n_layers(config)):
            for suffix in ("weight", "bias"):
                parts = [params.pop(f"model.layers.{i}.self_attn.{p}_proj.{suffix}") for p in "qkv"]
                params[f"transformer.h.{i}.mixer.Wqkv.{suffix}"] = mx.concatenate(parts)
    for name, p in params.items():
        w = np.array(p.astype(mx.float32))
        gguf_name = names.get_name(hf_name(name, model_type), try_suffixes=(".weight", ".bias"))
        assert gguf_name is not None, name
        kind = name.split(".")[-2]
        if permute_qk and kind in heads:
            w = permute(w, heads[kind])
        if model_type == "gpt_neox" and kind == "query_key_value":
            w = neox_qkv(w, config["num_attention_heads"])
        if shift and name.endswith("norm.weight"):
            w = w + np.float32(shift)
        if w.ndim == 1 or qtype == Q.F32:
            yield gguf_name, w, None
        elif qtype == Q.F16:
            yield gguf_name, w.astype(np.float16), None
        else:
            yield gguf_name, gguf.quants.quantize(w, qtype), qtype


def _llama_metadata(w, config, rope_scale, rope_orig_ctx, pattern, rope_base_swa) -> None:
    """LlamaModel / Qwen2Model / Gemma3Model's keys (the architectures imported first)."""
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    w.add_block_count(config["num_hidden_layers"])
    w.add_context_length(config.get("max_position_embeddings") or 512)
    w.add_embedding_length(config["hidden_size"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(config["num_key_value_heads"])
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_rope_freq_base(config["rope_theta"])
    if rope_scale:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope_scale)
    if rope_orig_ctx:
        w.add_rope_scaling_orig_ctx_len(rope_orig_ctx)
    if config["model_type"] == "gemma3_text":
        w.add_sliding_window(config["sliding_window"])
        period, n = config["sliding_window_pattern"], config["num_hidden_layers"]
        if pattern == "int":
            w.add_sliding_window_pattern(period)
        elif pattern == "flags":
            w.add_sliding_window_pattern([(i + 1) % period != 0 for i in range(n)])
        if rope_base_swa:
            w.add_rope_freq_base_swa(rope_base_swa)


def _rope_dims(config: dict, head_dim: int) -> int:
    """``rope.dimension_count`` as the converters compute it: int(pct * n_embd) // n_head."""
    pct = config.get("partial_rotary_factor") or config.get("rotary_pct") or 1.0
    return int(pct * config["hidden_size"]) // config["num_attention_heads"] if pct != 1.0 else head_dim


def _text_model_metadata(w, config: dict) -> None:
    """``TextModel.set_gguf_parameters``: the keys written from whatever the HF config has."""
    w.add_block_count(config["num_hidden_layers"])
    w.add_context_length(config.get("max_position_embeddings") or 512)
    w.add_embedding_length(config["hidden_size"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(config["num_attention_heads"])
    w.add_head_count_kv(config["num_key_value_heads"])
    if config.get("rope_theta") is not None:
        w.add_rope_freq_base(config["rope_theta"])
    if config.get("rms_norm_eps") is not None:
        w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    else:
        w.add_layer_norm_eps(config.get("layer_norm_eps") or config["norm_epsilon"])
    if config.get("head_dim"):
        w.add_key_length(config["head_dim"])
        w.add_value_length(config["head_dim"])
    experts = config.get("num_experts") or config.get("num_local_experts")
    if experts:
        w.add_expert_count(experts)
        w.add_expert_used_count(config["num_experts_per_tok"])


def _metadata(w, config: dict, **llama_options) -> None:
    """What each architecture's converter class writes (convert_hf_to_gguf.py)."""
    mt = config["model_type"]
    if mt in ("llama", "qwen2", "qwen3", "gemma3_text", "smollm3"):
        _llama_metadata(w, config, **llama_options)
    elif mt == "gpt2":  # GPT2Model
        w.add_block_count(config["n_layer"])
        w.add_context_length(config["n_ctx"])
        w.add_embedding_length(config["n_embd"])
        w.add_feed_forward_length(4 * config["n_embd"])
        w.add_head_count(config["n_head"])
        w.add_layer_norm_eps(config["layer_norm_epsilon"])
    elif mt in ("phi", "gpt_neox"):  # Phi2Model, GPTNeoXModel
        hidden, heads = config["hidden_size"], config["num_attention_heads"]
        w.add_context_length(config["max_position_embeddings"])
        w.add_embedding_length(hidden)
        w.add_feed_forward_length(4 * hidden)  # (mlx-lm's gpt_neox MLP: 4 * hidden)
        w.add_block_count(config["num_hidden_layers"])
        w.add_head_count(heads)
        if mt == "phi":
            w.add_head_count_kv(heads)
        else:
            w.add_parallel_residual(config["use_parallel_residual"])
        w.add_layer_norm_eps(config["layer_norm_eps"])
        w.add_rope_dimension_count(_rope_dims(config, hidden // heads))
    elif mt == "phi3":  # Phi3MiniModel
        hidden, heads = config["hidden_size"], config["num_attention_heads"]
        w.add_context_length(config["max_position_embeddings"])
        w.add_rope_scaling_orig_ctx_len(config["original_max_position_embeddings"])
        w.add_embedding_length(hidden)
        w.add_feed_forward_length(config["intermediate_size"])
        w.add_block_count(config["num_hidden_layers"])
        w.add_head_count(heads)
        w.add_head_count_kv(config["num_key_value_heads"])
        w.add_layer_norm_rms_eps(config["rms_norm_eps"])
        w.add_rope_dimension_count(_rope_dims(config, hidden // heads))
        w.add_rope_freq_base(config["rope_theta"])
        w.add_sliding_window(0)
    elif mt in ("gemma", "gemma2"):  # GemmaModel, Gemma2Model (no rope_theta key: llama.cpp's 10000)
        w.add_context_length(config.get("max_position_embeddings") or 8192)
        w.add_embedding_length(config["hidden_size"])
        w.add_block_count(config["num_hidden_layers"])
        w.add_feed_forward_length(config["intermediate_size"])
        w.add_head_count(config["num_attention_heads"])
        w.add_head_count_kv(config["num_key_value_heads"])
        w.add_layer_norm_rms_eps(config["rms_norm_eps"])
        w.add_key_length(config["head_dim"])
        w.add_value_length(config["head_dim"])
        if mt == "gemma":
            return
        w.add_attn_logit_softcapping(config["attn_logit_softcapping"])
        w.add_final_logit_softcapping(config["final_logit_softcapping"])
        w.add_sliding_window(4096)
    else:
        _text_model_metadata(w, config)
        if mt in ("granite", "mixtral"):  # LlamaModel
            w.add_rope_dimension_count(config["hidden_size"] // config["num_attention_heads"])
        if mt == "granite":
            w.add_embedding_scale(config["embedding_multiplier"])
            w.add_residual_scale(config["residual_multiplier"])
            w.add_attention_scale(config["attention_multiplier"])
            w.add_logit_scale(config["logits_scaling"])
        if mt in ("qwen2_moe", "qwen3_moe"):
            w.add_expert_feed_forward_length(config["moe_intermediate_size"])
        if mt == "qwen2_moe":
            w.add_expert_shared_feed_forward_length(config["shared_expert_intermediate_size"])
        if mt == "cohere":  # CommandR2Model
            w.add_logit_scale(config["logit_scale"])
            w.add_rope_scaling_type(gguf.RopeScalingType.NONE)


def write_gguf(
    path: Path, model, qtype=Q.F32, rope_scale=None, rope_orig_ctx=None, pattern="int",
    rope_base_swa=None, tensors=None, extra_tensors=(), metadata=None,
) -> Path:
    """Write an mlx-lm ``model`` as a GGUF file that llama.cpp loads.

    ``tensors``: ``(name, data, raw type)`` to write instead of the model's own;
    ``extra_tensors``: more of them (e.g. ``rope_freqs.weight``); ``pattern``: how
    Gemma 3's sliding-window layer pattern is stored ("int", per-layer "flags", or None);
    ``metadata``: a function of the writer that adds more keys.
    """
    config = vars(model.args)
    arch, style, _, _ = LAYOUT[config["model_type"]]
    w = gguf.GGUFWriter(str(path), arch)
    _metadata(w, config, rope_scale=rope_scale, rope_orig_ctx=rope_orig_ctx, pattern=pattern,
              rope_base_swa=rope_base_swa)
    if metadata:
        metadata(w)
    add_vocab(w, style, config["vocab_size"])
    for name, data, raw in [*(tensors or gguf_tensors(model, qtype)), *extra_tensors]:
        w.add_tensor(name, data, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def kl_top1(reference: np.ndarray, logits: np.ndarray):
    """Mean KL(reference || logits) in nats and top-1 agreement, over positions."""
    p, q = log_softmax(reference), log_softmax(logits)
    kl = float((np.exp(p) * (p - q)).sum(-1).mean())
    return kl, float((p.argmax(-1) == q.argmax(-1)).mean())


def llamacpp_logits(path, ids) -> np.ndarray:
    """llama.cpp's logits for every position of ``ids`` (one sequence, no BOS added)."""
    import llama_cpp.llama as L

    # Some VMs advertise AMX in cpuid without enabling it: ggml's AMX repacked
    # buffers then die with SIGILL. Plain CPU buffers compute the same products.
    default_params = L.llama_cpp.llama_model_default_params

    def params():
        p = default_params()
        p.use_extra_bufts = False
        return p

    L.llama_cpp.llama_model_default_params = params
    try:
        n = len(ids)
        llm = L.Llama(model_path=str(path), n_ctx=n, n_batch=n, logits_all=True, verbose=False,
                      n_threads=os.cpu_count(), n_threads_batch=os.cpu_count())
    finally:
        L.llama_cpp.llama_model_default_params = default_params
    llm.eval(list(ids))
    logits = np.array(llm.scores[:n], dtype=np.float32)
    llm.close()
    return logits


_MLX_LOGITS = textwrap.dedent(
    """
    import json, sys
    import mlx.core as mx, numpy as np
    from pathlib import Path
    from mlx_lm.utils import load_model
    model_dir, ids_file, out_file, overrides = sys.argv[1:5]
    model, _ = load_model(Path(model_dir), model_config=json.loads(overrides))
    if json.loads(sys.argv[5]):  # re-apply llama.cpp's Q/K permutation: a missing unpermute
        sys.path.insert(0, sys.argv[6])
        from gguf_fixtures import permute
        for layer in model.layers:
            a = layer.self_attn
            a.q_proj.weight = mx.array(permute(np.array(a.q_proj.weight), a.n_heads))
            a.k_proj.weight = mx.array(permute(np.array(a.k_proj.weight), a.n_kv_heads))
    ids = np.load(ids_file)
    np.save(out_file, np.array(model(mx.array(ids)[None])[0].astype(mx.float32)))
    """
)


def mlx_logits_fast(model_dir, ids, tmp_path, overrides=None, repermute=False) -> np.ndarray:
    """MLX logits of a model folder, computed in a child process with an optimized BLAS.

    The mlx[cpu] wheel's reference BLAS makes a 135M-parameter forward pass over
    512 tokens take minutes; LD_PRELOAD must be set before a process starts.
    ``overrides`` patch config.json keys (to inject a config mistake).
    """
    from gain_mlx.cpu import find_fast_blas

    env = dict(os.environ)
    found = find_fast_blas()
    if found:
        env["LD_PRELOAD"] = " ".join(filter(None, [found[1], env.get("LD_PRELOAD")]))
    ids_file, out_file = tmp_path / "ids.npy", tmp_path / "logits.npy"
    np.save(ids_file, np.asarray(ids, dtype=np.int32))
    import json

    subprocess.run(
        [sys.executable, "-c", _MLX_LOGITS, str(model_dir), str(ids_file), str(out_file),
         json.dumps(overrides or {}), json.dumps(repermute), str(Path(__file__).parent)],
        env=env, check=True,
    )
    return np.load(out_file)


def random_raw(rows: int, cols: int, qtype, std: float, rng) -> np.ndarray:
    """Raw ``qtype`` bytes of a ``(rows, cols)`` tensor: random quant bits, scale fields set
    so that the dequantized values have standard deviation ``std`` (for types gguf-py
    cannot quantize: K-quants, IQ types, ternary, MXFP4)."""
    from gain_mlx.gguf.quants import CODECS, SCALES, blocks_of, scale_blocks

    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (rows, cols // block * size), dtype=np.uint8)
    blocks = blocks_of(raw, qtype)
    layout = SCALES[qtype]
    put = CODECS[layout.kind][1]
    for offset in layout.offsets:
        put(blocks, offset, np.ones(blocks.shape[:-1]))
    if len(layout.offsets) == 2:  # a min field: choose it so that the values centre on 0
        put(blocks, layout.offsets[1], np.zeros(blocks.shape[:-1]))
        a = gguf.quants.dequantize(raw, qtype).mean()
        put(blocks, layout.offsets[1], np.ones(blocks.shape[:-1]))
        b = gguf.quants.dequantize(raw, qtype).mean() - a
        put(blocks, layout.offsets[1], np.full(blocks.shape[:-1], -a / b))
    factor = std / gguf.quants.dequantize(raw, qtype).std()
    if layout.kind == "e8m0":
        factor = 2.0 ** np.round(np.log2(factor))
    scale_blocks(blocks, qtype, factor)
    return raw


OUT_GAIN = {"output.weight": 4.0}  # peaked next-token distributions: mistakes show in KL


def write_random_gguf(path: Path, model, qtype, seed: int = 0) -> Path:
    """Like ``write_gguf``, but every matrix holds random ``qtype`` blocks (norms and
    biases keep the model's values). The model itself is only a shape template."""
    rng = np.random.default_rng(seed)
    tensors = []
    for name, data, _ in gguf_tensors(model, Q.F32):
        if data.ndim == 2:
            std = 1.0 if name == "token_embd.weight" else OUT_GAIN.get(name, 1.0) * data.shape[1] ** -0.5
            data = random_raw(*data.shape, qtype, std, rng)
            tensors.append((name, data, qtype))
        else:
            tensors.append((name, data, None))
    return write_gguf(path, model, tensors=tensors)


# What a tiny model needs to be one that llama.cpp's converter could have produced.
GGUF_TINY = {
    "gemma3_text": dict(query_pre_attn_scalar=16),  # llama.cpp: head_dim**-0.5
    "gemma2": dict(query_pre_attn_scalar=16),
    "qwen3_moe": dict(mlp_only_layers=[]),  # llama.cpp's qwen3moe: experts in every layer
    "phi": dict(intermediate_size=256),  # Phi2Model writes 4 * n_embd
    "olmoe": dict(num_key_value_heads=4),  # llama.cpp's olmoe: k_norm n_embd wide (no GQA)
}
# Architectures of the GGUF table that conftest's (training) table does not have.
EXTRA_TINY = {
    "qwen2_moe": dict(
        hidden_size=64, num_hidden_layers=2, intermediate_size=96, num_attention_heads=4,
        num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=128, tie_word_embeddings=False,
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
        shared_expert_intermediate_size=64, rope_theta=10000.0,
    ),
}


def tiny_for_gguf(model_type: str, seed: int = 0, **overrides):
    """A tiny random mlx-lm model as llama.cpp would hold it: a vocabulary large enough
    for a real tokenizer, and Gemma's embeddings tied (its GGUFs have no output.weight)."""
    from conftest import tiny_model

    defaults = {"vocab_size": 512, **GGUF_TINY.get(model_type, {})}
    if model_type in ("gemma3_text", "gemma2"):  # llama.cpp scales by head_dim**-0.5
        defaults["query_pre_attn_scalar"] = overrides.get("head_dim", 16)
    if model_type in EXTRA_TINY:
        model = _tiny_extra(model_type, seed, {**defaults, **overrides})
    else:
        model = tiny_model(model_type, seed=seed, **{**defaults, **overrides})
    if model_type == "gemma3_text":
        model.pop("lm_head")
        model.tie_word_embeddings = True
    return model


def _tiny_extra(model_type: str, seed: int, overrides: dict):
    """conftest.tiny_model for the architectures only this table has."""
    from mlx.utils import tree_map_with_path
    from mlx_lm.utils import _get_classes

    config = {"model_type": model_type, **EXTRA_TINY[model_type], **overrides}
    model_class, args_class = _get_classes(config)
    mx.random.seed(seed)
    model = model_class(args_class.from_dict(config))
    model.update(tree_map_with_path(
        lambda path, p: p + 0.1 * mx.random.normal(p.shape) if p.ndim == 1 else p, model.parameters()))
    mx.eval(model.parameters())
    return model


def llama3_rope_factors(base: float, dim: int, factor: float = 8.0, low: float = 1.0,
                        high: float = 4.0, old_context: int = 8192) -> np.ndarray:
    """``rope_freqs.weight`` as llama.cpp's converter computes it for Llama 3 RoPE scaling."""
    freqs = 1.0 / base ** (np.arange(0, dim, 2, dtype=np.float32) / dim)
    factors = []
    for freq in freqs:
        wavelen = 2 * np.pi / freq
        if wavelen < old_context / high:
            factors.append(1.0)
        elif wavelen > old_context / low:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def field_mask(qtype) -> np.ndarray:
    """Boolean mask over one block's bytes: True where scale fields live (for IQ1_M the
    whole scale words, of which only the top nibbles change)."""
    from gguf import GGML_QUANT_SIZES

    from gain_mlx.gguf.quants import FIELD_BYTES, check_type

    layout = check_type(qtype)
    mask = np.zeros(GGML_QUANT_SIZES[qtype][1], dtype=bool)
    for o in layout.offsets:
        mask[o : o + FIELD_BYTES[layout.kind]] = True
    return mask
