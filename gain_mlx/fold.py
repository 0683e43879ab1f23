"""The fold plan: where each input-side gain goes when it is merged into the weights.

A gain ``s`` on the inputs of a target ``W`` (``y = W (s * x)``) can be absorbed in two
places (DESIGN.md section 2):

- the target's input *columns*, ``W diag(s)``: exact for float weights, but quantized
  groups run along a row's inputs, so a quantized target must be requantized;
- the output *rows* of the layer that produces those inputs, when that is linear up to
  the target: the up rows of a gated FFN (or the up half of a fused gate|up weight), and
  the V rows of attention (or of a fused qkv) when every query head that shares a KV head
  carries the same gains (MHA, or gains tied per KV head). Row scaling is exact even for
  quantized weights: it scales each row's quantization scales (and affine biases) and
  the row's bias.

``plan_folds`` decides; ``gain_mlx.fuse`` (MLX) and ``gain_mlx.export`` (GGUF) execute.
"""

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from .arch import HeadLayout, Target, producer_row_index


@dataclass(frozen=True)
class FoldStep:
    """Multiply ``dest``'s rows (or input columns) by ``factor``.

    ``rows``: indices of ``dest``'s output rows, in the order of ``factor``'s last axis
    (for ``axis="rows"``; None = all rows). ``factor``: ``(n,)``, or ``(E, n)`` for
    mixture-of-experts switch layers (one factor per expert).
    """

    target: str
    dest: str
    axis: str  # "rows" or "columns"
    rows: Optional[np.ndarray]
    factor: np.ndarray


def _qkv_rows(target: Target, layout: HeadLayout) -> np.ndarray:
    """The V rows of a fused qkv producer, in the target's input order."""
    hd = layout.head_dim
    producer_out = {
        "v": (layout.n_heads + 2 * layout.n_kv_heads) * hd,
        "v_per_head": 3 * layout.n_heads * hd,
    }[target.producer_rows]
    return producer_row_index(target, producer_out, layout)


def _attention_v_factor(gain: np.ndarray, layout: Optional[HeadLayout]) -> Optional[np.ndarray]:
    """The V-row factor equal to an attention gain, or None when there is none.

    Query head h reads KV head ``h // (n_heads // n_kv_heads)``; the gain folds into V
    only if all query heads of a KV group carry the same gains.
    """
    if layout is None or gain.shape != (layout.n_heads * layout.head_dim,):
        return None
    repeats = layout.n_heads // layout.n_kv_heads
    grouped = gain.reshape(layout.n_kv_heads, repeats, layout.head_dim)
    if not np.array_equal(grouped, np.broadcast_to(grouped[:, :1], grouped.shape)):
        return None
    return grouped[:, 0].reshape(-1)


def _row_factor(target: Target, gain: np.ndarray, layout: Optional[HeadLayout]):
    if target.kind == "attn":
        return _attention_v_factor(gain, layout)
    if target.kind == "ffn":
        return gain
    return None


def fold_step(
    target: Target,
    gain: np.ndarray,
    quantized: bool,
    layout: Optional[HeadLayout] = None,
) -> FoldStep:
    """The fold of one target's gain (see ``plan_folds``)."""
    gain = np.asarray(gain, dtype=np.float32)
    columns = FoldStep(target.path, target.path, "columns", None, gain)
    if not quantized or target.producer is None:
        return columns
    factor = _row_factor(target, gain, layout)
    if factor is None:
        return columns
    n = factor.shape[-1]
    if target.producer_rows == "all":
        rows = None
    elif target.producer_rows == "up":  # gate|up stacked: the second half
        rows = np.arange(n, 2 * n)
    else:  # an attention factor exists only with a layout
        rows = _qkv_rows(target, layout)
    return FoldStep(target.path, target.producer, "rows", rows, factor)


def plan_folds(
    targets: list,
    gains: dict,
    is_quantized: Callable[[str], bool],
    layout: Optional[HeadLayout] = None,
) -> list:
    """Decide, per target, where its gain goes.

    targets: ``gain_mlx.arch.Target`` list; gains: ``{target path: full gain}`` of shape
    ``(in,)`` or ``(E, in)`` (KV-tied attention gains expanded, ``GainLinear.full_gain``);
    is_quantized: whether the target at a path has quantized weights; layout: the
    model's ``arch.HeadLayout`` (without it attention gains never go to V rows).

    Float target -> its columns. Quantized target whose producer is exact (gated FFN ->
    up rows; attention whose gains are equal across each KV group -> V rows) -> the
    producer's rows. Otherwise the target's columns, which a quantized target can only
    take by requantization (the executor measures and reports that error).
    """
    return [fold_step(t, gains[t.path], is_quantized(t.path), layout) for t in targets]


def invert(step: FoldStep) -> FoldStep:
    """The step that divides the gain back out (``--de-fold``)."""
    return FoldStep(step.target, step.dest, step.axis, step.rows, 1.0 / step.factor)


def is_power_of_two(factor: np.ndarray) -> bool:
    """True if every factor is an exact power of two (foldable into E8M0 scales)."""
    mantissa, _ = np.frexp(np.asarray(factor, dtype=np.float32))
    return bool(np.all(mantissa == 0.5))
