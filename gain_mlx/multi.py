"""Per-sequence gains: many adapters on one shared, untouched base, mixed in one batch.

``load_adapters`` wraps the union of the adapters' targets in :class:`MultiGainLinear`,
which holds a stack of full input gains ``(n_adapters + 1, in)`` (row 0 is the base:
all ones). ``select(model, indices)`` picks a row per sequence, so a batch of ``B``
sequences is scaled by gains of shape ``(B, 1, in)`` before the shared base projection.
"""

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .adapter import AdapterError, check_base, read_adapter, targets_from_config
from .arch import get_module, input_dims
from .adapter import _replace_module
from .layers import expand_tied


class _Selection:
    """The per-sequence adapter rows, shared by every layer of one model."""

    indices = None  # mx.array (B,) of stack rows, or None for the base


class MultiGainLinear(nn.Module):
    """``y = base(x * gains[indices][:, None])``; ``base`` is the model's own layer."""

    def __init__(self, base: nn.Module, gains: mx.array, selection: _Selection):
        super().__init__()
        self.base = base
        self.base.freeze()
        self.gains = gains
        self.freeze()
        self._selection = selection

    def __call__(self, x):
        idx = self._selection.indices
        if idx is None:
            return self.base(x)
        g = self.gains[idx].astype(x.dtype)  # (B, in)
        return self.base(x * g.reshape(g.shape[0], *([1] * (x.ndim - 2)), g.shape[-1]))


def full_gain(stored: np.ndarray, in_dim: int) -> np.ndarray:
    """A stored gain (``(in,)`` or KV-tied ``(n_kv, head_dim)``) as applied to the inputs;
    ``ValueError`` when its shape cannot be the gain of an ``in_dim`` input."""
    if stored.ndim not in (1, 2) or stored.size == 0 or in_dim % stored.size or (stored.ndim == 1 and stored.size != in_dim):
        raise ValueError(f"gain of shape {tuple(stored.shape)} does not fit an input of {in_dim}")
    return expand_tied(stored, in_dim // stored.size).astype(np.float32)


def read_checked(model, adapter_path, source=None) -> dict:
    """``{target path: full gain}`` of one adapter folder, checked against ``model``'s base."""
    config, gains = read_adapter(adapter_path)
    check_base(model, config, source=source or f"adapter {adapter_path}")
    out = {}
    for t in targets_from_config(config):
        layer = get_module(model, t.path)
        if layer is None:
            raise AdapterError(f"adapter {adapter_path}: the base has no layer {t.path}: re-save the adapter")
        if hasattr(layer, "num_experts"):
            raise AdapterError(f"adapter {adapter_path}: per-sequence gains do not cover expert layers yet; fuse it instead")
        if t.path not in gains:
            raise AdapterError(f"adapter {adapter_path} has no gain for {t.path}: re-save the adapter")
        try:
            out[t.path] = full_gain(gains[t.path], input_dims(layer))
        except ValueError as e:
            raise AdapterError(f"adapter {adapter_path}: {t.path}: {e}: re-save the adapter") from None
    return out


class AdapterSet:
    """The adapters a model serves: names -> stack rows, rebuilt on add/remove.

    The base weights are never copied or changed; only the gain stacks are rebuilt.
    Rows are stable: removing an adapter leaves a hole (gains of ones) that the next
    ``add`` reuses, so sequences in flight on other adapters keep their row.
    """

    def __init__(self, model):
        self.model = model
        self.selection = _Selection()
        self.adapters = {}  # name -> {path: full gain}
        self.names = []  # stack row i + 1 -> name (None: a free row)

    def add(self, name: str, adapter_path, source=None):
        if not name or name in self.adapters:
            raise AdapterError(f"adapter name '{name}' is empty or already loaded: choose another name")
        self._unwrap(keep=())  # check against the plain base; _rebuild wraps again
        adapters, names = dict(self.adapters), list(self.names)
        try:  # all or nothing: any failure leaves the set exactly as it was
            self.adapters[name] = read_checked(self.model, adapter_path, source)
            if None in self.names:
                self.names[self.names.index(None)] = name
            else:
                self.names.append(name)
            self._rebuild()
        except BaseException:
            self.adapters, self.names = adapters, names
            self._rebuild()
            raise

    def remove(self, name: str):
        if name not in self.adapters:
            raise AdapterError(f"no adapter named '{name}' is loaded")
        del self.adapters[name]
        self.names[self.names.index(name)] = None
        while self.names and self.names[-1] is None:
            self.names.pop()
        self._rebuild()

    def row(self, name) -> int:
        """The stack row of adapter ``name`` (0 for the base, ``None``)."""
        if name is None:
            return 0
        if name not in self.adapters:
            raise AdapterError(f"no adapter named '{name}' is loaded")
        return self.names.index(name) + 1

    def select(self, rows):
        """Use stack rows ``rows`` (one per sequence) in the next forward passes."""
        self.selection.indices = None if rows is None else mx.array(list(rows), dtype=mx.int32)

    def _unwrap(self, keep):
        for path, layer in list(self.model.named_modules()):
            if isinstance(layer, MultiGainLinear) and path not in keep:
                _replace_module(self.model, path, layer.base)

    def _rebuild(self):
        paths = sorted({p for a in self.adapters.values() for p in a})
        self._unwrap(keep=paths)
        for path in paths:
            layer = get_module(self.model, path)
            base = layer.base if isinstance(layer, MultiGainLinear) else layer
            ones = np.ones(input_dims(base), dtype=np.float32)
            rows = [self.adapters[n].get(path, ones) if n is not None else ones for n in self.names]
            _replace_module(self.model, path, MultiGainLinear(base, mx.array(np.stack([ones] + rows)), self.selection))
        mx.eval(self.model.parameters())


def greedy_batch(model, adapters: AdapterSet, prompts: list, rows: list, max_tokens: int) -> list:
    """Greedy continuations of equal-length token ``prompts``, sequence i under stack row
    ``rows[i]``, all in one batch per step (one shared KV cache, no padding)."""
    from mlx_lm.models.cache import make_prompt_cache

    if len({len(p) for p in prompts}) != 1:
        raise ValueError("greedy_batch needs prompts of one length")
    adapters.select(rows)
    cache = make_prompt_cache(model)
    x, out = mx.array(prompts), []
    try:
        for _ in range(max_tokens):
            x = mx.argmax(model(x, cache=cache)[:, -1, :], axis=-1)[:, None]
            mx.eval(x)
            out.append(x)
    finally:
        adapters.select(None)
    return mx.concatenate(out, axis=1).tolist() if out else [[] for _ in prompts]
