"""GGUF metadata -> mlx-lm config dict, one table row per GGUF architecture."""

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
    extra: architecture-specific config keys from the metadata.
    """

    model_type: str
    permute_qk: bool = False
    norm_shift: float = 0.0
    extra: Optional[Callable[["Metadata", dict], dict]] = field(default=None)


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


ARCHS = {
    "llama": ArchSpec("llama", permute_qk=True),
    "qwen2": ArchSpec("qwen2"),
    "qwen3": ArchSpec("qwen3"),
    "gemma3": ArchSpec("gemma3_text", norm_shift=1.0, extra=_gemma3),
}

# mlx-lm model_type -> GGUF general.architecture, where the names differ.
GGUF_ARCH = {
    "mistral": "llama",
    "mixtral": "llama",
    "gemma3_text": "gemma3",
    "phi": "phi2",
    "gpt_neox": "gptneox",
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
    if int(meta.get("rope.dimension_count", head_dim)) != head_dim:
        raise GGUFImportError(
            f"partial RoPE (rope.dimension_count {meta.get('rope.dimension_count')} "
            f"< head_dim {head_dim}) is not supported for {meta.arch}"
        )
    theta = _f32(meta.get("rope.freq_base", 10000.0))  # llama.cpp's default
    config = {
        "model_type": spec.model_type,
        "num_hidden_layers": int(meta.get("block_count")),
        "hidden_size": hidden,
        "intermediate_size": int(meta.uniform("feed_forward_length")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta.uniform("attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "rms_norm_eps": _f32(meta.get("attention.layer_norm_rms_epsilon")),
        "rope_theta": theta,
        "rope_traditional": False,
        "rope_scaling": _rope_scaling(meta, head_dim, theta),
        "max_position_embeddings": int(meta.get("context_length")),
        "vocab_size": int(tensors["token_embd.weight"].shape[1]),
        "tie_word_embeddings": "output.weight" not in tensors,
    }
    if spec.extra is not None:
        config.update(spec.extra(meta, config))
    return config
