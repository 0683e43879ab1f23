"""gain_mlx.policy: each device-dependent choice, and the cpu and gpu policies' numbers
compared on the same inputs (the gpu policy forced on this CPU, float32 compute)."""

import os
import re

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import POLICY_ENV, TINY_CONFIGS, tiny_model
from gguf import GGMLQuantizationType as GQ
from mlx.utils import tree_flatten
from mlx_lm.models import llama

from gain_mlx import cpu, policy
from gain_mlx import adapter as A
from gain_mlx.errors import UsageError
from gain_mlx.loss import evaluation_loss, summed_loss, token_losses

QUANTIZED = (nn.QuantizedLinear, nn.QuantizedEmbedding)


@pytest.fixture
def use(monkeypatch):
    """``use("cpu")`` / ``use("gpu")``: switch this test's policy (POLICY_ENV), return it."""

    def switch(name, **env):
        for key in (policy.ENV_POLICY, policy.ENV_DTYPE):
            monkeypatch.delenv(key, raising=False)
        for key, value in {**POLICY_ENV[name], **env}.items():
            monkeypatch.setenv(key, value)
        return policy.current()

    return switch


def test_default_follows_the_device_and_the_environment_forces(monkeypatch):
    monkeypatch.delenv(policy.ENV_POLICY, raising=False)
    monkeypatch.delenv(policy.ENV_DTYPE, raising=False)
    p = policy.current()  # MLX runs on this machine's CPU
    assert (p.name, p.dtype, p.compute_dtype) == ("cpu", "float32", mx.float32)
    assert p.fast_blas and p.cpu_streams and p.cpu_loss and p.float_copies
    monkeypatch.setenv(policy.ENV_POLICY, "GPU")
    p = policy.current()
    assert (p.name, p.dtype) == ("gpu", "float16")
    assert not (p.fast_blas or p.cpu_streams or p.cpu_loss or p.float_copies)
    assert p.why == "GAIN_MLX_POLICY=gpu; MLX on cpu; float16 compute"
    monkeypatch.setenv(policy.ENV_DTYPE, "bfloat16")
    assert policy.current().compute_dtype == mx.bfloat16 and "(GAIN_MLX_DTYPE)" in policy.current().why
    monkeypatch.delenv(policy.ENV_POLICY)
    monkeypatch.delenv(policy.ENV_DTYPE)
    monkeypatch.setattr(policy, "_device", lambda: "gpu (Metal)")
    assert (policy.current().name, policy.current().dtype) == ("gpu", "float16")


@pytest.mark.parametrize("key,value", [(policy.ENV_POLICY, "tpu"), (policy.ENV_DTYPE, "int8")])
def test_bad_environment_values_are_one_line_usage_errors(monkeypatch, key, value):
    monkeypatch.setenv(key, value)
    with pytest.raises(UsageError, match=f"{key}={value}: expected one of"):
        policy.current()


@pytest.mark.parametrize("name,need,available,form", [
    ("gpu", 1e9, 100e9, "quantized"),  # the gpu policy never copies
    ("cpu", 1e9, 10e9, "float"),
    ("cpu", 7e9, 10e9, "float"),  # exactly MEMORY_SHARE
    ("cpu", 7.1e9, 10e9, "quantized"),
])
def test_base_form_from_memory(name, need, available, form):
    got, why = policy.choose_form(name, int(need), int(available))
    assert got == form
    assert why.startswith(f"{name} policy")
    if name == "cpu":
        assert f"{need / 1e9:.1f} GB as float against {available / 1e9:.1f} GB available" in why
        assert ("does not fit" in why) == (form == "quantized")


def test_gguf_form_counts_the_files_parameters(tmp_path, use, monkeypatch):
    from gguf_fixtures import tiny_for_gguf, write_gguf

    model = tiny_for_gguf("llama")
    path = write_gguf(tmp_path / "m.gguf", model, GQ.Q8_0)
    n = sum(v.size for _, v in tree_flatten(model.parameters()))
    use("cpu")
    monkeypatch.setattr(policy, "available_memory", lambda: int(4 * n / policy.MEMORY_SHARE) + 1)
    assert policy.gguf_form(path)[0] == "float32"
    monkeypatch.setattr(policy, "available_memory", lambda: int(4 * n / policy.MEMORY_SHARE) - 8)
    assert policy.gguf_form(path)[0] == "quantized-float32"
    use("gpu")  # float32 compute forced
    assert policy.gguf_form(path)[0] == "quantized-float32"
    use("gpu", GAIN_MLX_DTYPE="float16")  # a GPU's default
    assert policy.gguf_form(path)[0] == "quantized-float16"


def test_available_memory_is_plausible():
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert 0 < policy.available_memory() <= total


def test_step_parallelism(use):
    use("cpu")
    assert policy.step_parallelism(4, cores=2) == cpu.step_parallelism(4, cores=2) == (2, 1)
    use("gpu")
    assert policy.step_parallelism(4, cores=2) == (1, None)


def _quantized_tiny():
    model = tiny_model("qwen2")
    nn.quantize(model, group_size=32, bits=4)
    mx.eval(model.parameters())
    return model


def test_compute_model_float_copy_only_on_cpu_and_when_it_fits(use, monkeypatch):
    q = _quantized_tiny()
    tokens = mx.array([[3, 17, 99, 4, 56, 8, 21]])
    want = np.array(q(tokens))
    use("cpu")
    m, note = policy.compute_model(q)
    assert not any(isinstance(x, QUANTIZED) for _, x in m.named_modules())
    assert note.startswith("a float32 copy of the quantized base (cpu policy")
    np.testing.assert_allclose(np.array(m(tokens)), want, rtol=1e-4, atol=1e-4)
    monkeypatch.setattr(policy, "available_memory", lambda: 1000)
    m, note = policy.compute_model(q)
    assert isinstance(m.layers[0].mlp.down_proj, nn.QuantizedLinear) and "does not fit" in note
    use("gpu")
    m, note = policy.compute_model(q)
    assert isinstance(m.layers[0].mlp.down_proj, nn.QuantizedLinear) and "gpu policy" in note
    np.testing.assert_allclose(np.array(m(tokens)), want, rtol=1e-5, atol=1e-5)
    m, note = policy.compute_model(q, dequantize="on")
    assert not any(isinstance(x, QUANTIZED) for _, x in m.named_modules()) and "--dequantize on" in note


def test_compute_dtype_casts_a_copy_and_leaves_the_model(use):
    q = _quantized_tiny()
    use("gpu", GAIN_MLX_DTYPE="float16")
    m, _ = policy.compute_model(q)
    layer = m.layers[0].mlp.down_proj
    assert layer.scales.dtype == mx.float16 and layer.weight.dtype == mx.uint32
    assert m.layers[0].input_layernorm.weight.dtype == mx.float16
    assert q.layers[0].mlp.down_proj.scales.dtype == mx.float32  # the original is untouched
    assert q.layers[0].input_layernorm.weight.dtype == mx.float32
    m, note = policy.compute_model(tiny_model("llama"))
    assert note is None and m.layers[0].self_attn.o_proj.weight.dtype == mx.float16


def test_compute_dtype_copy_that_does_not_fit_keeps_the_stored_dtype(use, monkeypatch):
    model = tiny_model("llama")
    model.set_dtype(mx.bfloat16)
    use("cpu")
    m, note = policy.compute_model(model)
    assert note is None and m.layers[0].self_attn.o_proj.weight.dtype == mx.float32
    monkeypatch.setattr(policy, "available_memory", lambda: 1000)
    m, note = policy.compute_model(model)
    assert m is model and note.startswith("the model kept as stored: a float32 copy does not fit")


def _llama(vocab):
    mx.random.seed(0)
    model = llama.Model(llama.ModelArgs.from_dict(dict(
        model_type="llama", hidden_size=32, num_hidden_layers=2, intermediate_size=64, num_attention_heads=4,
        num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=vocab, tie_word_embeddings=False)))
    mx.eval(model.parameters())
    return model


@pytest.mark.parametrize("budget", [1 << 20, 128 * 16384 * 4], ids=["positions", "rows"])
def test_gpu_evaluation_chunks_equal_and_bounded(use, monkeypatch, budget):
    """The gpu policy's evaluation in chunks of positions (1 MB: 16 positions of a row,
    through a KV cache) or of rows (one row's logits) equals the cpu policy's, and holds
    about twice its budget (logits and their exponentials), never the batch's float32
    logits (4 x 128 x 16K x 4 B = 33.6 MB)."""
    vocab, rows, width = 16384, 4, 129
    model = _llama(vocab)
    batch = mx.random.randint(0, vocab, (rows, width), key=mx.random.key(3))
    lengths = mx.array([[0, 128], [0, 70], [5, 128], [0, 3]])
    full = rows * (width - 1) * vocab * 4
    monkeypatch.setattr(policy, "LOGITS_BYTES", budget)
    peaks = {}
    for name in ("cpu", "gpu"):
        use(name)
        mx.eval(batch, lengths)
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        peaks[name] = (evaluation_loss(model, batch, lengths, cpu.streams(2) if name == "cpu" else ()),
                       mx.get_peak_memory() - base)
    (cpu_total, cpu_n), cpu_peak = peaks["cpu"]
    (gpu_total, gpu_n), gpu_peak = peaks["gpu"]
    assert cpu_n == gpu_n == 128 + 70 + 124 + 3
    assert gpu_total == pytest.approx(cpu_total, rel=1e-5)
    assert cpu_peak >= full  # the cpu policy takes the whole batch's logits into numpy
    assert gpu_peak < 2 * budget + (4 << 20) < full, (gpu_peak, budget)


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_position_chunks_equal_the_training_loss_on_every_architecture(use, monkeypatch, model_type):
    """Chunks of 7 positions through each architecture's KV cache (gemma3's sliding window
    of 16 included) give the training loss of one whole forward pass."""
    model = tiny_model(model_type)
    batch = mx.random.randint(0, 128, (2, 40), key=mx.random.key(0))
    lengths = mx.array([[0, 39], [3, 20]])
    use("gpu")
    monkeypatch.setattr(policy, "LOGITS_BYTES", 2 * 7 * 128 * 4)
    total, count = evaluation_loss(model, batch, lengths, ())
    ref, ref_count = summed_loss(model, batch, lengths)
    assert count == ref_count.item() == 39 + 18
    assert total == pytest.approx(ref.item(), rel=1e-5)


def test_gpu_token_losses_chunk_rows_equal(use, monkeypatch):
    vocab = 4096
    model = _llama(vocab)
    rng = np.random.default_rng(1)
    inputs, targets = rng.integers(0, vocab, (7, 9)), rng.integers(0, vocab, (7, 9))
    mask = rng.random((7, 9)) < 0.7
    use("cpu")
    want = token_losses(model, (inputs,), targets, mask, cpu.streams(2))
    use("gpu")
    monkeypatch.setattr(policy, "LOGITS_BYTES", 2 * 9 * vocab * 4)  # two rows at a time
    got = token_losses(model, (inputs,), targets, mask, ())
    assert got.shape == (7, 9) and (got[~mask] == 0).all()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_training_is_the_same_under_both_policies(use, tiny_model_dir, tiny_data_dir, tmp_path, capsys):
    """cpu: micro-batches on CPU streams and the one-exponential cross entropy; gpu: one
    batch and mlx's cross entropy, evaluation in chunks. Same gains and perplexities."""
    from gain_mlx.train import main

    results = {}
    for name in ("cpu", "gpu"):
        use(name)
        out = tmp_path / name
        main(["--model", str(tiny_model_dir), "--data", str(tiny_data_dir), "--adapter-path", str(out),
              "--iters", "6", "--learning-rate", "1e-2", "--steps-per-eval", "6", "--val-batches", "2",
              "--max-seq-length", "128", "--batch-size", "4", "--retain-data", "none"])
        ppl = [float(v) for v in re.findall(r"val ppl ([0-9.]+)", capsys.readouterr().out)]
        results[name] = ppl, A.read_adapter(out)[1]
    (cpu_ppl, cpu_gains), (gpu_ppl, gpu_gains) = results["cpu"], results["gpu"]
    assert len(cpu_ppl) == 2 and cpu_ppl == pytest.approx(gpu_ppl, rel=1e-4)
    assert cpu_gains.keys() == gpu_gains.keys()
    for k in cpu_gains:
        np.testing.assert_allclose(gpu_gains[k], cpu_gains[k], rtol=0, atol=1e-5)
    assert any(np.abs(g - 1).max() > 1e-3 for g in cpu_gains.values())


def test_start_says_the_policy_in_one_line(use, capsys):
    use("gpu")
    assert policy.start().name == "gpu"
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["[gain_mlx] policy: gpu (GAIN_MLX_POLICY=gpu; MLX on cpu; float32 compute (GAIN_MLX_DTYPE); "
                   "plain MLX path)"]


def test_form_names_are_the_converters():
    from gain_mlx.gguf.convert import FORMS

    assert set(policy.DTYPES) <= set(FORMS)
    assert {f"quantized-{d}" for d in policy.QUANTIZED_SCALES.values()} <= set(FORMS)


def test_gguf_trains_alike_on_the_float_and_the_quantized_conversion(use, tiny_data_dir, tmp_path, monkeypatch,
                                                                     capsys):
    """cpu: the float32 conversion; gpu: the quantized one (Q8_0 maps exactly onto MLX's
    8-bit affine, float32 scales), trained on directly. Same gains and perplexities."""
    from gguf_fixtures import tiny_for_gguf, write_gguf

    from gain_mlx.train import main

    monkeypatch.setenv("GAIN_MLX_CACHE", str(tmp_path / "cache"))
    gguf = write_gguf(tmp_path / "m.gguf", tiny_for_gguf("llama"), GQ.Q8_0)
    results = {}
    for name, form, base in (("cpu", "float32", None), ("gpu", "quantized-float32", "the quantized base (gpu")):
        use(name)
        out = tmp_path / name
        main(["--model", str(gguf), "--data", str(tiny_data_dir), "--adapter-path", str(out), "--iters", "4",
              "--learning-rate", "1e-2", "--steps-per-eval", "4", "--val-batches", "1", "--max-seq-length", "64",
              "--batch-size", "2", "--retain-data", "none"])
        text = capsys.readouterr()
        assert f"m.gguf: {form} conversion ({name} policy" in text.err
        assert (base in text.out) if base else "Training on" not in text.out
        ppl = [float(v) for v in re.findall(r"val ppl ([0-9.]+)", text.out)]
        results[name] = ppl, A.read_adapter(out)[1]
    (cpu_ppl, cpu_gains), (gpu_ppl, gpu_gains) = results["cpu"], results["gpu"]
    assert len(cpu_ppl) == 2 and cpu_ppl == pytest.approx(gpu_ppl, rel=1e-4)
    for k in cpu_gains:
        np.testing.assert_allclose(gpu_gains[k], cpu_gains[k], rtol=0, atol=1e-5)
    assert any(np.abs(g - 1).max() > 1e-3 for g in cpu_gains.values())
