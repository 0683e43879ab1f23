"""The token loss every part of gain_mlx computes: training, evaluation and the probe.

Which loss runs is the device policy's choice (:mod:`gain_mlx.policy`, ``cpu_loss``).
cpu: cross entropy takes one exponential pass over the vocabulary (as ``2 ** x``, which
MLX's Linux wheel runs ~2.5x faster than ``exp``) and keeps it for the backward pass;
evaluation needs no gradient, so it takes the logits out of MLX and computes the loss in
numpy, whose vectorized ``exp`` runs ~8x faster than MLX's CPU cross entropy. gpu: mlx's
cross entropy; evaluation takes the logits in chunks of rows, or of one row's positions,
so that at most ``policy.LOGITS_BYTES`` of float32 logits exist at once (4 x 2048 tokens
x a 262K vocabulary would be 8.6 GB).
"""

import math
from concurrent.futures import ThreadPoolExecutor

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.cache import make_prompt_cache

from . import policy


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

    cpu policy: one exponential pass over the logits serves forward and backward (against
    three full passes plus two exponentials in mlx's version); gpu policy: mlx's kernel.
    """
    if not policy.current().cpu_loss:
        return nn.losses.cross_entropy(logits, targets)
    return _cpu_cross_entropy(logits, targets)[0]


def _numpy_token_losses(logits: np.ndarray, targets: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Cross entropy at the flat positions ``rows`` of float32 ``logits`` (N, V), in numpy.

    A few positions at a time, so each pass over the vocabulary stays in the CPU cache.
    """
    vocab = logits.shape[-1]
    step = max(1, (1 << 18) // vocab)  # ~1 MB of logits per block
    out = np.empty(len(rows), np.float32)
    block = np.empty((step, vocab), np.float32)
    for lo in range(0, len(rows), step):
        idx = rows[lo:lo + step]
        b = block[:len(idx)]
        np.take(logits, idx, axis=0, out=b)
        picked = b[np.arange(len(idx)), targets[idx]]
        top = b.max(axis=1)
        np.subtract(b, top[:, None], out=b)
        np.exp(b, out=b)
        out[lo:lo + len(idx)] = np.log(b.sum(axis=1)) + top - picked
    return out


def token_losses(forward, inputs, targets, mask, streams) -> np.ndarray:
    """Per-token cross entropy of the logits ``forward(*inputs)`` for evaluation (no
    gradient), as a float32 numpy array shaped like ``targets``, zeros where ``mask`` is 0.

    ``inputs`` is a tuple of arrays that ``forward`` takes split along their first axis
    (``forward`` a model and ``inputs`` ``(token_ids,)``, say). cpu policy: split
    :func:`across_streams`, then the loss in numpy, one thread per part, only at the
    masked-in positions. gpu policy: a few rows at a time (:func:`policy.logit_chunk`).
    """
    targets, mask = np.asarray(targets), np.asarray(mask)
    if not policy.current().cpu_loss:
        return _row_chunked_losses(forward, inputs, targets, mask)
    parts = across_streams(lambda *x: forward(*x).astype(mx.float32), streams, *map(mx.array, inputs))
    mx.eval(parts)
    bounds = np.cumsum([0] + [p.shape[0] for p in parts])

    def part_losses(i):
        logits = np.asarray(parts[i])
        lo, hi = bounds[i], bounds[i + 1]
        flat_targets = targets[lo:hi].reshape(-1)
        rows = np.flatnonzero(mask[lo:hi].reshape(-1))
        out = np.zeros(flat_targets.shape, np.float32)
        out[rows] = _numpy_token_losses(logits.reshape(-1, logits.shape[-1]), flat_targets, rows)
        return out.reshape(hi - lo, -1)

    with ThreadPoolExecutor(len(parts)) as pool:  # numpy releases the GIL: one core each
        return np.concatenate(list(pool.map(part_losses, range(len(parts)))))


def _chunk_losses(logits, targets, mask) -> np.ndarray:
    """mlx's cross entropy of one chunk of logits, in float32, as numpy."""
    ce = nn.losses.cross_entropy(logits.astype(mx.float32), mx.array(targets)) * mx.array(mask)
    return np.asarray(ce.astype(mx.float32))


def _vocab(forward, inputs) -> int:
    """The vocabulary size, from the shape of a one-row forward pass that is never evaluated."""
    return forward(*(mx.array(a[:1]) for a in inputs)).shape[-1]


def _row_chunked_losses(forward, inputs, targets, mask) -> np.ndarray:
    """:func:`token_losses` under the gpu policy: as many rows at a time as
    :func:`policy.logit_chunk` allows."""
    rows = policy.logit_chunk(targets.shape[1], _vocab(forward, inputs))
    return np.concatenate([
        _chunk_losses(forward(*(mx.array(a[lo:lo + rows]) for a in inputs)), targets[lo:lo + rows], mask[lo:lo + rows])
        for lo in range(0, len(targets), rows)
    ])


def _chunked_losses(model, inputs, targets, mask) -> np.ndarray:
    """Per-token losses of a causal ``model`` under the gpu policy: as many whole rows at a
    time as :func:`policy.logit_chunk` allows; a row whose logits alone exceed that goes
    one at a time over chunks of positions through a KV cache, as generation's prefill."""
    length = inputs.shape[1]
    vocab = _vocab(model, (inputs,))
    rows = policy.logit_chunk(length, vocab)
    step = policy.logit_chunk(min(rows, len(inputs)), vocab)
    out = []
    for lo in range(0, len(inputs), rows):
        cache = make_prompt_cache(model) if step < length else None
        parts = []
        for start in range(0, length, step):
            at = (slice(lo, lo + rows), slice(start, start + step))
            parts.append(_chunk_losses(model(mx.array(inputs[at]), cache=cache), targets[at], mask[at]))
            if cache is not None:
                mx.eval([c.state for c in cache])
        out.append(np.concatenate(parts, axis=1))
    return np.concatenate(out)


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


def evaluation_loss(model, batch, lengths, streams) -> tuple:
    """``(sum of the token losses, token count)`` as :func:`summed_loss` computes them, for
    evaluation, summed in float64. cpu policy: the forward passes split
    :func:`across_streams`, the loss by :func:`token_losses`; gpu policy: in chunks of
    rows or positions (:func:`_chunked_losses`)."""
    batch, lengths = np.asarray(batch), np.asarray(lengths)
    steps = np.arange(1, batch.shape[1])
    mask = (steps >= lengths[:, 0:1]) & (steps <= lengths[:, 1:])
    if policy.current().cpu_loss:
        losses = token_losses(model, (batch[:, :-1],), batch[:, 1:], mask, streams)
    else:
        losses = _chunked_losses(model, batch[:, :-1], batch[:, 1:], mask)
    return float(losses.sum(dtype=np.float64)), int(mask.sum())
