"""GGUF metadata -> mlx-lm config dict, one table row per GGUF architecture."""

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
from gguf import GGUFReader

from . import GGUFImportError

_REQUIRED = object()


@dataclass(frozen=True)
class ArchSpec:
    """How one GGUF architecture maps back to an mlx-lm model.

    permute_qk: llama.cpp's converter interleaved the Q/K rows for its "normal"
        (GPT-J style) RoPE; undo it for mlx-lm's half-split RoPE.
    norm_shift: llama.cpp's converter added this to every ``*norm.weight``
        (Gemma stores ``w`` and multiplies by ``1 + w``).
    extra: the architecture's config: a function of the metadata and the common
        llama-like config that returns the complete mlx-lm config.
    norm: "rms" (``attention.layer_norm_rms_epsilon``) or "layer" (LayerNorm,
        ``attention.layer_norm_epsilon``).
    partial_rope: RoPE may rotate fewer dimensions than head_dim (``extra`` then
        writes the fraction where mlx-lm reads it).
    fixed_head_dim: mlx-lm's model computes head_dim as hidden_size // heads.
    tied_only: mlx-lm's model always ties the output to the embeddings.
    split_qkv: a fused ``attn_qkv`` (q | k | v rows) may stand for mlx-lm's q/k/v_proj.
    qkv_per_head: mlx-lm's fused qkv is per head ``[q_h k_h v_h]`` while llama.cpp's
        converter stored q | k | v (GPT-NeoX).
    """

    model_type: str
    permute_qk: bool = False
    norm_shift: float = 0.0
    extra: Optional[Callable[["Metadata", dict], dict]] = field(default=None)
    norm: str = "rms"
    partial_rope: bool = False
    fixed_head_dim: bool = False
    tied_only: bool = False
    split_qkv: bool = False
    qkv_per_head: bool = False


class Metadata:
    """Typed access to ``<arch>.*`` keys of a GGUF file."""

    def __init__(self, reader: GGUFReader):
        self.reader = reader
        self.arch = self.get("general.architecture", prefix=False)

    def get(self, key: str, default: Any = _REQUIRED, prefix: bool = True) -> Any:
        name = f"{self.arch}.{key}" if prefix else key
        field_ = self.reader.fields.get(name)
        if field_ is None:
            if default is _REQUIRED:
                raise GGUFImportError(f"GGUF metadata key {name!r} is missing")
            return default
        return field_.contents()

    def uniform(self, key: str, default: Any = _REQUIRED) -> Any:
        """A key that may be stored per layer; it must then be the same for all."""
        value = self.get(key, default)
        if isinstance(value, list):
            if len(set(value)) != 1:
                raise GGUFImportError(
                    f"{self.arch}.{key} differs between layers ({sorted(set(value))}); "
                    "per-layer sizes are not supported"
                )
            value = value[0]
        return value


def _f32(value: float) -> float:
    """A float32 metadata value as the decimal it was written from (1e-05, not 9.99e-06)."""
    return float(f"{float(value):.7g}")


def _number(value: float):
    """An int when integral (transformers' config validation wants ints there)."""
    value = _f32(value)
    return int(value) if value.is_integer() else value


def _gemma3(meta: Metadata, config: dict) -> dict:
    pattern = meta.get("attention.sliding_window_pattern", 6)  # llama.cpp's default
    if isinstance(pattern, list):
        pattern = _swa_period(pattern)
    # llama.cpp scales Gemma 3 attention by head_dim**-0.5; the 27B (62 layers) by (d/heads)**-0.5
    if config["num_hidden_layers"] == 62:
        scalar = config["hidden_size"] // config["num_attention_heads"]
    else:
        scalar = config["head_dim"]
    return {
        **config,
        "sliding_window": int(meta.get("attention.sliding_window")),
        "sliding_window_pattern": int(pattern),
        "rope_local_base_freq": _f32(meta.get("rope.freq_base_swa", 10000.0)),
        "query_pre_attn_scalar": _number(scalar),
    }


def _swa_period(is_sliding: list) -> int:
    """Per-layer sliding flags -> mlx-lm's period (every p-th layer is global)."""
    period = is_sliding.index(False) + 1 if False in is_sliding else len(is_sliding) + 1
    if [(i + 1) % period != 0 for i in range(len(is_sliding))] != list(is_sliding):
        raise GGUFImportError(
            f"sliding-window layer pattern {is_sliding} is not periodic; not supported"
        )
    return period


def _fraction(dims: int, of: int) -> float:
    """dims / of as a float f with int(f * of) == dims (how mlx-lm turns it back)."""
    f = round(dims / of, 6)
    while int(f * of) < dims:
        f = float(np.nextafter(f, np.inf))
    return f


def _has(meta: Metadata, name: str) -> bool:
    return any(t.name == name for t in meta.reader.tensors)


def _experts(meta: Metadata) -> dict:
    return {"num_experts": int(meta.get("expert_count")),
            "num_experts_per_tok": int(meta.get("expert_used_count"))}


def _llama(meta: Metadata, config: dict) -> dict:
    """llama; with experts (``expert_count``) it is Mixtral."""
    if not int(meta.get("expert_count", 0)):
        return config
    if config["rope_scaling"]:
        raise GGUFImportError("RoPE scaling is not supported for Mixtral (mlx-lm's mixtral has none)")
    _same_head_dim(meta, config)
    experts = _experts(meta)
    return {**config, "model_type": "mixtral", "num_local_experts": experts["num_experts"],
            "num_experts_per_tok": experts["num_experts_per_tok"]}


def _same_head_dim(meta: Metadata, config: dict) -> None:
    if config["head_dim"] != config["hidden_size"] // config["num_attention_heads"]:
        raise GGUFImportError(
            f"{meta.arch}: head_dim {config['head_dim']} is not hidden_size / heads "
            f"({config['hidden_size']} / {config['num_attention_heads']}), which the mlx-lm model assumes"
        )


def _phi3(meta: Metadata, config: dict) -> dict:
    out = {**config, "original_max_position_embeddings": int(
        meta.get("rope.scaling.original_context_length", config["max_position_embeddings"]))}
    dims = int(meta.get("rope.dimension_count", config["head_dim"]))
    if dims != config["head_dim"]:
        out["partial_rotary_factor"] = _fraction(dims, config["head_dim"])
    long = [t for t in meta.reader.tensors if t.name == "rope_factors_long.weight"]
    if long:
        short = [t for t in meta.reader.tensors if t.name == "rope_factors_short.weight"]
        factor = out["max_position_embeddings"] / out["original_max_position_embeddings"]
        mlx_scale = math.sqrt(1 + math.log(factor) / math.log(out["original_max_position_embeddings"])) \
            if factor > 1.0 else 1.0
        scale = float(meta.get("rope.scaling.attn_factor", mlx_scale))
        if not math.isclose(scale, mlx_scale, rel_tol=1e-5) or not short:
            raise GGUFImportError(
                f"phi3 LongRoPE with attn_factor {scale:.6g} (mlx-lm computes {mlx_scale:.6g}) "
                "or without short factors is not supported")
        out["rope_scaling"] = {
            "type": "longrope",
            "long_factor": [_f32(v) for v in np.asarray(long[0].data, np.float32)],
            "short_factor": [_f32(v) for v in np.asarray(short[0].data, np.float32)],
        }
    return out


def _gemma2(meta: Metadata, config: dict) -> dict:
    # llama.cpp: f_attention_scale = (n_embd / n_head)**-0.5 for the 27B (46 layers), else head_dim**-0.5
    if config["num_hidden_layers"] == 46:
        scalar = config["hidden_size"] // config["num_attention_heads"]
    else:
        scalar = config["head_dim"]
    return {
        **config,
        "query_pre_attn_scalar": _number(scalar),
        # llama.cpp's defaults when the keys are absent
        "attn_logit_softcapping": _f32(meta.get("attn_logit_softcapping", 50.0)),
        "final_logit_softcapping": _f32(meta.get("final_logit_softcapping", 30.0)),
        # mlx-lm's gemma2 attends globally in every layer; llama.cpp uses this window on
        # every other layer: the two agree up to this many positions.
        "sliding_window": int(meta.get("attention.sliding_window", 4096)),
    }


def _granite(meta: Metadata, config: dict) -> dict:
    scale = _f32(meta.get("attention.scale", 0.0))
    return {
        **config,
        "embedding_multiplier": _f32(meta.get("embedding_scale")),
        "residual_multiplier": _f32(meta.get("residual_scale")),
        # llama.cpp: 0 (unset) means the usual head_dim**-0.5
        "attention_multiplier": scale or _f32(config["head_dim"] ** -0.5),
        "logits_scaling": _f32(meta.get("logit_scale")),
        "attention_bias": _has(meta, "blk.0.attn_q.bias"),
        "mlp_bias": _has(meta, "blk.0.ffn_up.bias"),
    }


def _layer_norm(config: dict, key: str) -> dict:
    out = {k: v for k, v in config.items() if k != "rms_norm_eps"}
    out[key] = config["rms_norm_eps"]
    return out


def _starcoder2(meta: Metadata, config: dict) -> dict:
    return _layer_norm(config, "norm_epsilon")


def _qwen2moe(meta: Metadata, config: dict) -> dict:
    return {
        **config, **_experts(meta),
        "moe_intermediate_size": int(meta.get("expert_feed_forward_length")),
        "shared_expert_intermediate_size": int(meta.get("expert_shared_feed_forward_length")),
    }


def _qwen3moe(meta: Metadata, config: dict) -> dict:
    return {
        **config, **_experts(meta),
        "moe_intermediate_size": int(meta.get("expert_feed_forward_length")),
        "decoder_sparse_step": 1,  # llama.cpp's qwen3moe: experts in every layer
        "mlp_only_layers": [],
        "norm_topk_prob": True,  # llama.cpp renormalizes the chosen experts' weights
    }


def _olmoe(meta: Metadata, config: dict) -> dict:
    # llama.cpp's olmoe does not renormalize the chosen experts' weights
    return {**config, **_experts(meta), "norm_topk_prob": False,
            "attention_bias": _has(meta, "blk.0.attn_q.bias")}


def _mlp_is_4x(meta: Metadata, config: dict) -> None:
    if config["intermediate_size"] != 4 * config["hidden_size"]:
        raise GGUFImportError(
            f"{meta.arch}: feed_forward_length {config['intermediate_size']} is not 4 * "
            f"embedding_length, which mlx-lm's {config['model_type']} assumes"
        )


def _rope_fraction(meta: Metadata, config: dict) -> float:
    return _fraction(int(meta.get("rope.dimension_count", config["head_dim"])), config["head_dim"])


def _phi2(meta: Metadata, config: dict) -> dict:
    out = _layer_norm(config, "layer_norm_eps")
    out["partial_rotary_factor"] = _rope_fraction(meta, config)
    return out


def _gpt2(meta: Metadata, config: dict) -> dict:
    _mlp_is_4x(meta, config)
    positions = [t for t in meta.reader.tensors if t.name == "position_embd.weight"]
    if not positions:
        raise GGUFImportError("gpt2 GGUF file has no position_embd.weight tensor")
    return {
        "model_type": "gpt2",
        "n_embd": config["hidden_size"],
        "n_head": config["num_attention_heads"],
        "n_layer": config["num_hidden_layers"],
        "n_ctx": config["max_position_embeddings"],
        "n_positions": int(positions[0].shape[1]),
        "layer_norm_epsilon": config["rms_norm_eps"],
        "vocab_size": config["vocab_size"],
    }


def _gptneox(meta: Metadata, config: dict) -> dict:
    _mlp_is_4x(meta, config)
    if config["num_key_value_heads"] != config["num_attention_heads"]:
        raise GGUFImportError("gptneox with grouped KV heads is not supported")
    return {
        "model_type": "gpt_neox",
        "hidden_size": config["hidden_size"],
        "num_attention_heads": config["num_attention_heads"],
        "num_hidden_layers": config["num_hidden_layers"],
        "max_position_embeddings": config["max_position_embeddings"],
        "layer_norm_eps": config["rms_norm_eps"],
        "vocab_size": config["vocab_size"],
        "rotary_emb_base": _number(config["rope_theta"]),
        "rotary_pct": _rope_fraction(meta, config),
        "use_parallel_residual": bool(meta.get("use_parallel_residual", True)),
    }


def _cohere(meta: Metadata, config: dict) -> dict:
    out = _layer_norm(config, "layer_norm_eps")
    out.update({
        "logit_scale": _f32(meta.get("logit_scale")),
        "use_qk_norm": _has(meta, "blk.0.attn_q_norm.weight"),
        "attention_bias": _has(meta, "blk.0.attn_q.bias"),
        "layer_norm_bias": _has(meta, "blk.0.attn_norm.bias"),
    })
    return out


def _smollm3(meta: Metadata, config: dict) -> dict:
    # llama.cpp's smollm3 leaves RoPE out of every 4th layer (a fixed n_no_rope_layer_step)
    return {**config, "no_rope_layer_interval": 4}


ARCHS = {
    "llama": ArchSpec("llama", permute_qk=True, extra=_llama),
    "qwen2": ArchSpec("qwen2"),
    "qwen3": ArchSpec("qwen3"),
    "gemma3": ArchSpec("gemma3_text", norm_shift=1.0, extra=_gemma3),
    "phi3": ArchSpec("phi3", extra=_phi3, partial_rope=True, fixed_head_dim=True),
    "gemma2": ArchSpec("gemma2", norm_shift=1.0, extra=_gemma2, tied_only=True),
    "gemma": ArchSpec("gemma", norm_shift=1.0, tied_only=True),
    "smollm3": ArchSpec("smollm3", permute_qk=True, extra=_smollm3),
    "granite": ArchSpec("granite", permute_qk=True, extra=_granite, fixed_head_dim=True),
    "starcoder2": ArchSpec("starcoder2", norm="layer", extra=_starcoder2, fixed_head_dim=True),
    "qwen2moe": ArchSpec("qwen2_moe", extra=_qwen2moe, fixed_head_dim=True),
    "qwen3moe": ArchSpec("qwen3_moe", extra=_qwen3moe),
    "olmoe": ArchSpec("olmoe", extra=_olmoe),
    "phi2": ArchSpec("phi", norm="layer", extra=_phi2, partial_rope=True, fixed_head_dim=True,
                     split_qkv=True),
    "gpt2": ArchSpec("gpt2", norm="layer", extra=_gpt2, fixed_head_dim=True, tied_only=True),
    "gptneox": ArchSpec("gpt_neox", norm="layer", extra=_gptneox, partial_rope=True,
                        fixed_head_dim=True, qkv_per_head=True),
    "command-r": ArchSpec("cohere", norm="layer", extra=_cohere, fixed_head_dim=True, tied_only=True),
}

# mlx-lm model_type -> GGUF general.architecture, where the names differ.
GGUF_ARCH = {
    "mistral": "llama",
    "mixtral": "llama",
    "gemma3_text": "gemma3",
    "phi": "phi2",
    "gpt_neox": "gptneox",
    "qwen2_moe": "qwen2moe",
    "qwen3_moe": "qwen3moe",
    "cohere": "command-r",
}


def arch_spec(reader: GGUFReader) -> ArchSpec:
    arch = Metadata(reader).arch
    if arch not in ARCHS:
        raise GGUFImportError(
            f"GGUF architecture {arch!r} is not supported; supported: {', '.join(ARCHS)}"
        )
    return ARCHS[arch]


def _llama3_scaling(factors: np.ndarray, base: float, head_dim: int, old_context: int) -> dict:
    """Recover Llama 3 RoPE scaling from llama.cpp's ``rope_freqs`` factors.

    The file keeps only the per-frequency factors; the parameters that made them are
    taken as Llama 3's (low 1, high 4) and checked by recomputing the factors.
    """
    scaling = {
        "rope_type": "llama3",
        "factor": _f32(factors.max()),
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": old_context,
    }
    wavelen = 2 * np.pi * base ** (np.arange(0, head_dim, 2) / head_dim)
    low_wl = scaling["original_max_position_embeddings"] / scaling["low_freq_factor"]
    high_wl = scaling["original_max_position_embeddings"] / scaling["high_freq_factor"]
    smooth = (scaling["original_max_position_embeddings"] / wavelen - 1.0) / 3.0
    expect = np.where(
        wavelen < high_wl,
        1.0,
        np.where(
            wavelen > low_wl,
            scaling["factor"],
            1 / ((1 - smooth) / scaling["factor"] + smooth),
        ),
    )
    if factors.shape != expect.shape or not np.allclose(factors, expect, rtol=1e-4):
        raise GGUFImportError(
            "rope_freqs tensor does not match Llama 3 RoPE scaling with its usual "
            "parameters; this RoPE scaling is not supported"
        )
    return scaling


def _rope_scaling(meta: Metadata, head_dim: int, theta: float) -> Optional[dict]:
    rope_freqs = [t for t in meta.reader.tensors if t.name == "rope_freqs.weight"]
    if rope_freqs:
        factors = np.asarray(rope_freqs[0].data, np.float64)
        old_context = int(meta.get("rope.scaling.original_context_length", 8192))
        return _llama3_scaling(factors, theta, head_dim, old_context)
    kind = meta.get("rope.scaling.type", "none")
    factor = meta.get("rope.scaling.factor", meta.get("rope.scale_linear", 1.0))
    if kind == "none" and factor == 1.0:
        return None
    if kind in ("linear", "none"):
        return {"rope_type": "linear", "factor": _f32(factor)}
    raise GGUFImportError(f"RoPE scaling type {kind!r} is not supported (only linear and llama3)")


def gguf_config(reader: GGUFReader) -> dict:
    """The mlx-lm ``config.json`` dict for a GGUF file, from its metadata.

    Every value mlx-lm reads is written flat under the key its ModelArgs
    expects (``rope_theta``, not a nested ``rope_parameters`` that mlx-lm's
    llama would silently ignore).
    """
    spec = arch_spec(reader)
    meta = Metadata(reader)
    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise GGUFImportError("GGUF file has no token_embd.weight tensor")
    hidden = int(meta.get("embedding_length"))
    heads = int(meta.uniform("attention.head_count"))
    head_dim = int(meta.get("attention.key_length", hidden // heads))
    if not spec.partial_rope and int(meta.get("rope.dimension_count", head_dim)) != head_dim:
        raise GGUFImportError(
            f"partial RoPE (rope.dimension_count {meta.get('rope.dimension_count')} "
            f"< head_dim {head_dim}) is not supported for {meta.arch}"
        )
    eps_key = "attention.layer_norm_rms_epsilon" if spec.norm == "rms" else "attention.layer_norm_epsilon"
    theta = _f32(meta.get("rope.freq_base", 10000.0))  # llama.cpp's default
    config = {
        "model_type": spec.model_type,
        "num_hidden_layers": int(meta.get("block_count")),
        "hidden_size": hidden,
        "intermediate_size": int(meta.uniform("feed_forward_length")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta.uniform("attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "rms_norm_eps": _f32(meta.get(eps_key)),
        "rope_theta": theta,
        "rope_traditional": False,
        "rope_scaling": _rope_scaling(meta, head_dim, theta),
        "max_position_embeddings": int(meta.get("context_length")),
        "vocab_size": int(tensors["token_embd.weight"].shape[1]),
        "tie_word_embeddings": "output.weight" not in tensors,
    }
    if spec.fixed_head_dim:
        _same_head_dim(meta, config)
    if spec.extra is not None:
        config = spec.extra(meta, config)
    return config
