"""GGUF tensor names <-> mlx-lm module paths, through gguf-py's TensorNameMap.

Kept free of mlx-lm imports: the GGUF exporter needs the names, not the models.
"""

from typing import Dict, Iterator, Optional

from gguf import MODEL_ARCH_NAMES, TensorNameMap

from . import GGUFImportError

_SUFFIXES = (".weight", ".bias")
_EXPERT_LEAVES = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}


def spellings(path: str) -> Iterator[str]:
    """Names under which gguf-py's TensorNameMap may know an mlx-lm module path."""
    yield path
    stacked = path.replace(".switch_mlp.", ".experts.")  # mlx-lm stacks the experts
    yield stacked
    head, _, leaf = stacked.rpartition(".")
    if ".experts" in head and leaf in _EXPERT_LEAVES:  # Mixtral's w1 / w2 / w3
        yield f"{head}.{_EXPERT_LEAVES[leaf]}"
    if path.startswith("model."):  # gpt2 / gpt_neox keep their blocks at model.h
        rest = path[len("model."):]
        yield rest
        yield "transformer." + rest
        yield "gpt_neox." + (rest.replace("h.", "layers.", 1) if rest.startswith("h.") else rest)


def name_table(arch: str, n_layers: int) -> TensorNameMap:
    """gguf-py's name table of a GGUF architecture (``general.architecture``)."""
    by_value = {v: k for k, v in MODEL_ARCH_NAMES.items()}
    if arch not in by_value:
        raise GGUFImportError(f"GGUF architecture {arch!r} is unknown to the installed gguf-py; upgrade gguf")
    return TensorNameMap(by_value[arch], n_layers)


def gguf_name(table: TensorNameMap, module: str) -> Optional[str]:
    """The GGUF name (without ``.weight``) of an mlx-lm module path, or None."""
    return next(filter(None, (table.get_name(s) for s in spellings(module))), None)


def name_map(arch: str, n_layers: int, mlx_names) -> Dict[str, str]:
    """GGUF tensor name -> mlx-lm parameter name, from gguf-py's own name table."""
    table = name_table(arch, n_layers)
    mapping = {}
    for name in mlx_names:
        module, _, suffix = name.rpartition(".")
        if "." + suffix not in _SUFFIXES:
            continue
        found = gguf_name(table, module)
        if found is not None:
            mapping[f"{found}.{suffix}"] = name
    return mapping
