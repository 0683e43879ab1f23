"""The token loss every part of gain_mlx computes: training, evaluation and the probe.

On a CPU, cross entropy takes one exponential pass over the vocabulary (as ``2 ** x``,
which MLX's Linux wheel runs ~2.5x faster than ``exp``) and keeps it for the backward
pass; on a GPU, mlx's fused kernel.
"""

import math

import mlx.core as mx
import mlx.nn as nn


LOG2E = math.log2(math.e)


@mx.custom_function
def _cpu_cross_entropy(logits, targets):
    # exp as 2 ** (x * log2 e): MLX's CPU exp (also in softmax and logsumexp) runs ~2.5x
    # slower than its pow in the Linux wheel. p = exp(logits - max) is kept for the
    # backward pass, which then needs no second exponential over the vocabulary.
    logits = logits.astype(mx.float32)
    top = mx.stop_gradient(logits.max(-1, keepdims=True))
    p = mx.power(mx.array(2.0), (logits - top) * LOG2E)
    total = p.sum(-1, keepdims=True)
    picked = mx.take_along_axis(logits, targets[..., None], -1)
    return (mx.log(total) + top - picked).squeeze(-1), p, total


@_cpu_cross_entropy.vjp
def _cpu_cross_entropy_vjp(primals, cotangents, outputs):
    logits, targets = primals
    _, p, total = outputs
    g = cotangents[0][..., None]
    hit = mx.arange(p.shape[-1], dtype=targets.dtype) == targets[..., None]
    return (p * (g / total) - mx.where(hit, g, 0.0)).astype(logits.dtype), mx.zeros_like(targets)


def cross_entropy(logits, targets):
    """Per-token cross entropy, ``nn.losses.cross_entropy(logits, targets)`` computed in float32.

    On a CPU one exponential pass over the logits serves forward and backward (against
    three full passes plus two exponentials in mlx's version); on a GPU, mlx's fused kernel.
    """
    if mx.default_device() != mx.cpu:
        return nn.losses.cross_entropy(logits, targets)
    return _cpu_cross_entropy(logits, targets)[0]


def summed_loss(model, batch, lengths):
    """``(sum of the token losses, token count)``: mlx-lm's ``default_loss`` before its mean."""
    inputs, targets = batch[:, :-1], batch[:, 1:]
    steps = mx.arange(1, targets.shape[1] + 1)
    mask = mx.logical_and(steps >= lengths[:, 0:1], steps <= lengths[:, 1:])
    ce = cross_entropy(model(inputs), targets) * mask
    return ce.astype(mx.float32).sum(), mask.sum()


def across_streams(fn, streams, *arrays) -> list:
    """``fn(*parts)`` for the arrays split along their first axis into one part per CPU
    stream; the streams run side by side, one core each. No streams: ``[fn(*arrays)]``."""
    if not streams:
        return [fn(*arrays)]
    n = arrays[0].shape[0]
    streams = streams[:n]  # no empty parts
    k = len(streams)
    bounds = [round(i * n / k) for i in range(k + 1)]
    parts = []
    for stream, lo, hi in zip(streams, bounds, bounds[1:]):
        with mx.stream(stream):
            parts.append(fn(*(a[lo:hi] for a in arrays)))
    return parts


def split_summed_loss(model, batch, lengths, streams):
    """:func:`summed_loss`, split :func:`across_streams`."""
    parts = across_streams(lambda b, l: summed_loss(model, b, l), streams, batch, lengths)
    return sum(p[0] for p in parts), sum(p[1] for p in parts)
