"""Gain-wrapped projections: ``y = base(x * gain)``, input-side, base frozen.

Gains are float32 parameters initialised to 1 and cast to the activation dtype
when applied, so a model with all gains 1 computes exactly what its base does.
"""

import mlx.core as mx
import mlx.nn as nn
import numpy as np


def expand_tied(gain, repeats: int):
    """A gain as applied to the inputs: ``(in,)`` as stored; a KV-tied ``(n_kv, head_dim)``
    gain repeated for the ``repeats`` query heads of each KV head, flattened. Works on
    mx and numpy arrays alike (training, serving and export use this one expansion)."""
    if gain.ndim == 1:
        return gain
    xp = np if isinstance(gain, np.ndarray) else mx
    return xp.repeat(gain, repeats, axis=0).reshape(-1)


class GainLinear(nn.Module):
    """Wraps ``nn.Linear`` / ``nn.QuantizedLinear``.

    ``gain`` has shape ``(in,)``, or ``(n_kv_heads, head_dim)`` when tied across the
    query heads that share a KV head (query head h uses KV head ``h // repeats``).
    """

    def __init__(self, base: nn.Module, gain_shape: tuple, repeats: int = 1):
        super().__init__()
        self.base = base
        self.base.freeze()
        self.gain = mx.ones(gain_shape, dtype=mx.float32)
        self._repeats = repeats

    def full_gain(self) -> mx.array:
        return expand_tied(self.gain, self._repeats)

    def __call__(self, x):
        return self.base(x * self.full_gain().astype(x.dtype))


class GainSwitchLinear(nn.Module):
    """Wraps mlx-lm's ``SwitchLinear`` / ``QuantizedSwitchLinear``: one gain per expert, ``(E, in)``."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.base.freeze()
        self.gain = mx.ones((base.num_experts, base.input_dims), dtype=mx.float32)

    def full_gain(self) -> mx.array:
        return self.gain

    def __call__(self, x, indices, sorted_indices=False):
        # x: indices.shape + (1, in); each token row is scaled by its expert's gain.
        g = mx.expand_dims(self.gain[indices], -2).astype(x.dtype)
        return self.base(x * g, indices, sorted_indices=sorted_indices)


GAIN_LAYERS = (GainLinear, GainSwitchLinear)
