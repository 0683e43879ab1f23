"""The architecture table: where the gains go in each mlx-lm model family.

One entry per ``model_type``. A gain scales the INPUT features of a target
projection (attention output, FFN down). Its *producer* is the layer whose output
rows are those input features up to a linear map, which is where the gain can be
folded exactly (see ``gain_mlx.fold``).
"""

from dataclasses import dataclass
from typing import Optional

import numpy as np

from .errors import ConfigError


@dataclass(frozen=True)
class Site:
    """A gained projection inside a block, relative to the block."""

    target: str
    producer: Optional[str] = None
    # Which output rows of the producer feed the target's inputs:
    # "all"; "v" = the last n_kv_heads * head_dim rows of a fused q|k|v weight;
    # "v_per_head" = the v third of each head in a per-head interleaved qkv (gpt_neox);
    # "up" = the second half of a fused gate|up weight.
    rows: str = "all"


@dataclass(frozen=True)
class Arch:
    attn: Site
    ffn: tuple  # candidate Sites, the first one present in a block is used (dense/MoE mixes)
    blocks: str = "model.layers"
    post_norm: bool = False  # an RMSNorm right after each sublayer partly cancels gains


_ATTN = Site("self_attn.o_proj", "self_attn.v_proj")
_GATED = (Site("mlp.down_proj", "mlp.up_proj"),)
_LLAMA_LIKE = Arch(_ATTN, _GATED)
_MOE = (
    Site("mlp.switch_mlp.down_proj", "mlp.switch_mlp.up_proj"),
    Site("mlp.down_proj", "mlp.up_proj"),
)

ARCHITECTURES = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "granite": _LLAMA_LIKE,
    "smollm3": _LLAMA_LIKE,
    "cohere": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": Arch(_ATTN, _GATED, post_norm=True),
    "gemma3_text": Arch(_ATTN, _GATED, post_norm=True),
    "phi3": Arch(
        Site("self_attn.o_proj", "self_attn.qkv_proj", "v"),
        (Site("mlp.down_proj", "mlp.gate_up_proj", "up"),),
    ),
    "phi": Arch(Site("self_attn.dense", "self_attn.v_proj"), (Site("mlp.fc2"),)),
    "gpt2": Arch(
        Site("attn.c_proj", "attn.c_attn", "v"), (Site("mlp.c_proj"),), blocks="model.h"
    ),
    "gpt_neox": Arch(
        Site("attention.dense", "attention.query_key_value", "v_per_head"),
        (Site("mlp.dense_4h_to_h"),),
        blocks="model.h",
    ),
    "starcoder2": Arch(Site("self_attn.o_proj", "self_attn.v_proj"), (Site("mlp.c_proj"),)),
    "qwen2_moe": Arch(_ATTN, _MOE),  # routed experts; the shared expert keeps no gain
    "qwen3_moe": Arch(_ATTN, _MOE),
    "mixtral": Arch(
        _ATTN,
        (Site("block_sparse_moe.switch_mlp.down_proj", "block_sparse_moe.switch_mlp.up_proj"),),
    ),
    "olmoe": Arch(_ATTN, _MOE),
}

VARIANTS = ("gain", "gain-ffn")


@dataclass(frozen=True)
class Target:
    """One gained projection of a loaded model (paths are from the model root)."""

    path: str
    kind: str  # "attn" or "ffn"
    layer: int
    producer: Optional[str] = None
    producer_rows: str = "all"
    tied: bool = False


@dataclass(frozen=True)
class HeadLayout:
    n_heads: int
    n_kv_heads: int
    head_dim: int


def get_arch(model_type: str) -> Arch:
    if model_type not in ARCHITECTURES:
        raise ConfigError(
            f"model_type '{model_type}' is not in gain_mlx's architecture table "
            f"(supported: {', '.join(sorted(ARCHITECTURES))}); "
            "pass --targets with the module paths to gain instead."
        )
    return ARCHITECTURES[model_type]


def get_module(root, path: str):
    """Follow a dotted path (list indices included) from ``root``."""
    node = root
    for part in path.split("."):
        if isinstance(node, list):
            node = node[int(part)] if part.isdigit() and int(part) < len(node) else None
        else:
            node = getattr(node, part, None)
        if node is None:
            return None
    return node


def head_layout(model) -> HeadLayout:
    """Attention head counts from the model's config, head_dim from the o_proj width."""
    args = model.args
    n_heads = next(
        getattr(args, k) for k in ("num_attention_heads", "n_head", "n_heads") if hasattr(args, k)
    )
    n_kv = getattr(args, "num_key_value_heads", None) or n_heads
    arch = get_arch(args.model_type)
    attn_out = get_module(model, f"{arch.blocks}.0.{arch.attn.target}")
    attn_out = getattr(attn_out, "base", attn_out)  # already gain-wrapped
    return HeadLayout(n_heads, n_kv, input_dims(attn_out) // n_heads)


def input_dims(layer) -> int:
    """Input width of a (possibly quantized, possibly switch) linear layer."""
    if hasattr(layer, "bits"):
        return layer.weight.shape[-1] * 32 // layer.bits
    return layer.weight.shape[-1]


def find_targets(model, variant: str, tie_kv: bool = False, paths=None) -> list:
    """The gained projections of ``model`` for ``variant``, or explicit ``paths``."""
    if variant not in VARIANTS:
        raise ConfigError(f"unknown variant '{variant}' (choose from {', '.join(VARIANTS)})")
    if paths:
        missing = [p for p in paths if get_module(model, p) is None]
        if missing:
            raise ConfigError(f"--targets: no module at {', '.join(missing)}")
        return [Target(p, "custom", -1) for p in paths]
    arch = get_arch(model.model_type)
    blocks = get_module(model, arch.blocks)
    targets = []
    for i, _ in enumerate(blocks):
        prefix = f"{arch.blocks}.{i}."
        sites = [("attn", arch.attn)]
        if variant == "gain-ffn":
            present = [s for s in arch.ffn if get_module(model, prefix + s.target) is not None]
            sites += [("ffn", present[0])] if present else []
        for kind, site in sites:
            targets.append(
                Target(
                    path=prefix + site.target,
                    kind=kind,
                    layer=i,
                    producer=prefix + site.producer if site.producer else None,
                    producer_rows=site.rows,
                    tied=tie_kv and kind == "attn",
                )
            )
    return targets


def producer_row_index(target: Target, producer_out: int, layout: HeadLayout) -> np.ndarray:
    """Indices of the producer's output rows that feed the target's inputs, in input order."""
    hd = layout.head_dim
    if target.producer_rows == "all":
        return np.arange(producer_out)
    if target.producer_rows == "v":
        return np.arange(producer_out - layout.n_kv_heads * hd, producer_out)
    if target.producer_rows == "up":
        return np.arange(producer_out // 2, producer_out)
    if target.producer_rows == "v_per_head":
        heads = np.arange(layout.n_heads)[:, None] * 3 * hd
        return (heads + 2 * hd + np.arange(hd)[None, :]).reshape(-1)
    raise ConfigError(f"unknown producer row layout '{target.producer_rows}'")
