"""tools/bench_train.py: the FLOP count against a hand count, the report's columns, and the
training step it times (train.py's loss and its micro-batch split). Speed is not tested."""

import importlib.util
import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models import llama
from mlx_lm.tuner.trainer import default_loss

from gain_mlx import cpu
from gain_mlx.loss import cross_entropy
from gain_mlx.trainer import loss_and_grad

spec = importlib.util.spec_from_file_location(
    "bench_train", Path(__file__).resolve().parent.parent / "tools" / "bench_train.py")
bt = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bt)

# 2 blocks; per block q 16x16, k and v 16x8 (one KV head), o 16x16, gate and up 16x32,
# down 32x16: 2304 weights. Two heads of 8. Tied output layer 64 x 16.
HAND = dict(model_type="llama", hidden_size=16, num_hidden_layers=2, intermediate_size=32,
            num_attention_heads=2, num_key_value_heads=1, rms_norm_eps=1e-5, vocab_size=64,
            tie_word_embeddings=True)
B, T = 2, 4  # M = 8 tokens per step


def hand_model(config="floor"):
    mx.random.seed(0)
    model = llama.Model(llama.ModelArgs.from_dict(HAND))
    mx.eval(model.parameters())
    bt.ADAPTERS[config](model)
    return model


# Attention, per block: each product of (B*H = 4, T, 8) by (4, 8, T) (or back) is
# 2 * 4 * 4 * 8 * 4 = 1024 FLOPs dense, counted causally: x (T + 1) / (2T) = 5/8 -> 640.
# Forward QK^T and PV: 1280; backward dP, dV, dQ, dK: 2560.
ATT_FWD, ATT_BWD = 1280, 2560
OUTPUT = 4 * 8 * 64 * 16  # 2 forward + 2 activation gradient, per weight per token


def test_floor_flops_by_hand():
    # The floor's scalar sits on the embedding output: every weight needs its activation
    # gradient (4 FLOPs per weight per token), every attention its backward.
    count = bt.count_flops(hand_model("floor"), B, T)
    assert count.parts == {"projections": 2 * 4 * 8 * 2304, "attention": 2 * (ATT_FWD + ATT_BWD),
                           "output": OUTPUT, "adapter": 0}
    assert count.total == 187904 and count.per_token == 187904 / 8


def test_gain_ffn_flops_by_hand():
    # Gains scale the inputs of o_proj and down_proj. Block 0: q, k, v and the attention
    # run forward only (nothing trainable upstream); o_proj needs its activation gradient
    # for its gain's; from there on everything is on the gradient's path.
    count = bt.count_flops(hand_model("gain-ffn"), B, T)
    block0 = 2 * 8 * (256 + 128 + 128) + ATT_FWD + 4 * 8 * 256 + 4 * 8 * (512 + 512 + 512)
    block1 = 4 * 8 * 2304 + ATT_FWD + ATT_BWD
    assert block0 == 66816 and block1 == 77568
    assert count.total == block0 + block1 + OUTPUT == 177152
    assert count.parts["attention"] == 2 * ATT_FWD + ATT_BWD
    # the matmuls behind the count: what MatmulLimit times
    assert sum(m[-1] for m in count.matmuls) == count.total
    assert ("nt", 1, 8, 16, 64, 2 * 8 * 16 * 64) in count.matmuls  # logits = h @ E.T
    assert ("nn", 1, 8, 64, 16, 2 * 8 * 64 * 16) in count.matmuls  # dh = dlogits @ E


def test_lora_flops_by_hand():
    # Rank 8 on o_proj (16 -> 16) and down_proj (32 -> 16); per layer and M = 8 tokens:
    # forward x@A, (xA)@B; backward dY@B.T, dB, dA; dX through A only where upstream is
    # trainable (not for block 0's o_proj). Block 0's o_proj base needs no dX either.
    count = bt.count_flops(hand_model("lora-r8"), B, T)
    o0 = 5 * 2 * 8 * 16 * 8
    down = 2 * 8 * 32 * 8 + 2 * 8 * 8 * 16 + 2 * 8 * 16 * 8 + 2 * 8 * 8 * 16 + 2 * 32 * 8 * 8 + 2 * 8 * 8 * 32
    o1 = o0 + 2 * 8 * 8 * 16
    assert count.parts["adapter"] == o0 + down + o1 + down == 59392
    assert count.parts["projections"] == 177152 - OUTPUT - 2 * ATT_FWD - ATT_BWD - 2 * 8 * 256


def test_matmul_limit_seconds():
    count = bt.count_flops(hand_model("gain-ffn"), B, T)
    rates = {m[:5]: 1e9 for m in count.matmuls}
    assert bt.MatmulLimit.seconds(count, rates) == pytest.approx(count.total / 1e9)
    limit = bt.MatmulLimit([m[:5] for m in count.matmuls], parallel=(2, 1), min_time=0.001)
    assert set(limit.measure()) == {m[:5] for m in count.matmuls}
    assert all(r > 0 for r in limit.rates.values())


def test_report_columns_and_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    results = bt.main(["--preset", "tiny", "--configs", "floor,gain-ffn", "--batch-size", "2",
                       "--seq-len", "16", "--steps", "2", "--warmup", "1", "--json", str(out)])
    text = capsys.readouterr().out
    header = next(line for line in text.splitlines() if line.startswith("config"))
    for column in ("tok/s", "GFLOP/tok", "GFLOP/s", "mm GFLOP/s", "x matmul"):
        assert column in header
    saved = json.loads(out.read_text())
    assert set(saved) == {"floor", "gain-ffn"}
    for name, r in saved.items():
        tiny = bt.load_preset("tiny")
        bt.ADAPTERS[name](tiny)
        count = bt.count_flops(tiny, 2, 16)
        assert r["gflop_per_token"] == pytest.approx(count.per_token / 1e9)
        assert r["gflops"] == pytest.approx(count.total / r["step_s"] / 1e9)
        assert r["matmul_gflops"] == pytest.approx(count.total / r["matmul_s"] / 1e9)
        assert 0 < r["x_matmul"] and r["tokens_per_s"] == pytest.approx(2 * 16 / r["step_s"])
    assert results["gain-ffn"]["gflop_per_token"] < results["floor"]["gflop_per_token"]


def test_cross_entropy_matches_mlx():
    mx.random.seed(1)
    logits, targets = mx.random.normal((3, 5, 300)) * 4, mx.random.randint(0, 300, (3, 5))
    weights = mx.random.uniform(shape=(3, 5))

    def total(ce):
        return lambda x: (ce(x, targets) * weights).sum()

    ours, g_ours = mx.value_and_grad(total(cross_entropy))(logits)
    ref, g_ref = mx.value_and_grad(total(nn.losses.cross_entropy))(logits)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-6)
    np.testing.assert_allclose(np.array(g_ours), np.array(g_ref), atol=1e-6)


@pytest.mark.parametrize("micro_batches", [1, 2, 3])
def test_loss_and_grad_matches_mlx_lm(micro_batches):
    # The split step (one micro-batch per CPU stream) gives mlx-lm's loss and gradient,
    # with uneven parts and padding (lengths) included.
    model = hand_model("gain-ffn")
    batch = mx.random.randint(0, 64, (4, 9), key=mx.random.key(3))
    lengths = mx.array([[0, 8], [0, 5], [2, 8], [0, 3]])
    (loss, ntoks), grad = loss_and_grad(model, micro_batches)(batch, lengths)
    (ref, ref_ntoks), ref_grad = nn.value_and_grad(model, default_loss)(model, batch, lengths)
    assert ntoks.item() == ref_ntoks.item() == 8 + 5 + 7 + 3
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    for (k, g), (_, r) in zip(tree_flatten(grad), tree_flatten(ref_grad)):
        np.testing.assert_allclose(np.array(g), np.array(r), rtol=1e-4, atol=1e-6, err_msg=k)


def test_step_parallelism_and_blas_threads():
    assert cpu.step_parallelism(4, cores=2) == (2, 1)
    assert cpu.step_parallelism(4, cores=16) == (4, 4)
    assert cpu.step_parallelism(1, cores=2) == (1, None)
    assert cpu.step_parallelism(8, cores=1) == (1, None)
    with cpu.blas_threads(1):  # a no-op without a preloaded BLAS (tests run on the stock one)
        pass
