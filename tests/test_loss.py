"""gain_mlx.loss's evaluation path: the numpy cross entropy against a float64 reference and
against mlx, and token_losses split across CPU streams against one forward pass."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.models import llama

from gain_mlx import cpu
from gain_mlx.loss import _numpy_token_losses, evaluation_loss, summed_loss, token_losses


def _float64_cross_entropy(logits, targets):
    x = logits.astype(np.float64)
    top = x.max(-1)
    return np.log(np.exp(x - top[:, None]).sum(-1)) + top - x[np.arange(len(targets)), targets]


def test_numpy_cross_entropy_is_exact_to_float32():
    # 70,000 words: blocks of 3 positions, so 10 positions make 3 full blocks and a partial one
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((10, 70_000)) * 6).astype(np.float32)
    targets = rng.integers(0, 70_000, 10)
    rows = np.array([0, 2, 3, 4, 5, 6, 7, 9])  # positions 1 and 8 masked out
    got = _numpy_token_losses(logits, targets, rows)
    want = _float64_cross_entropy(logits[rows], targets[rows])
    np.testing.assert_allclose(got, want, rtol=2e-6)
    mlx = np.asarray(nn.losses.cross_entropy(mx.array(logits[rows]), mx.array(targets[rows])))
    np.testing.assert_allclose(got, mlx, rtol=1e-4)  # mlx's float32 sums drift further from float64


@pytest.fixture(scope="module")
def tiny_llama():
    mx.random.seed(0)
    model = llama.Model(llama.ModelArgs.from_dict(dict(
        model_type="llama", hidden_size=32, num_hidden_layers=2, intermediate_size=64, num_attention_heads=4,
        num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=300, tie_word_embeddings=False)))
    mx.eval(model.parameters())
    return model


@pytest.mark.parametrize("n_streams", [1, 2, 3])
def test_token_losses_split_across_streams(tiny_llama, n_streams):
    rng = np.random.default_rng(1)
    inputs, targets = rng.integers(0, 300, (5, 7)), rng.integers(0, 300, (5, 7))
    mask = rng.random((5, 7)) < 0.7
    got = token_losses(tiny_llama, (inputs,), targets, mask, cpu.streams(n_streams))
    logits = np.asarray(tiny_llama(mx.array(inputs)).astype(mx.float32)).reshape(-1, 300)
    want = _float64_cross_entropy(logits, targets.reshape(-1)).reshape(5, 7) * mask
    assert got.shape == (5, 7) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert (got[~mask] == 0).all()


def test_evaluation_loss_equals_the_training_loss(tiny_llama):
    batch = mx.random.randint(0, 300, (4, 9), key=mx.random.key(3))
    lengths = mx.array([[0, 8], [0, 5], [2, 8], [0, 3]])  # padding and a masked-out prompt
    total, count = evaluation_loss(tiny_llama, batch, lengths, cpu.streams(2))
    ref, ref_count = summed_loss(tiny_llama, batch, lengths)
    assert count == ref_count.item() == 8 + 5 + 7 + 3
    assert total == pytest.approx(ref.item(), rel=1e-5)
