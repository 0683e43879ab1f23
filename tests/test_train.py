"""``python -m gain_mlx.train`` on a tiny model folder and a slice of the example data."""

import json
import re

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm import load
from mlx_lm.tuner.trainer import TrainingArgs

from gain_mlx import adapter as A
from gain_mlx.errors import UserError
from gain_mlx.datasets import load_data
from gain_mlx.train import main, parse_args
from gain_mlx.trainer import train_gains

FAST = ["--max-seq-length", "128", "--batch-size", "4", "--steps-per-report", "5"]


def val_losses(text):
    return [float(v) for v in re.findall(r"val ppl ([0-9.]+)", text)]


def test_training_lowers_loss_and_saves_adapter(tiny_model_dir, tiny_data_dir, tmp_path, capsys):
    out = tmp_path / "adapter"
    main(["--model", str(tiny_model_dir), "--data", str(tiny_data_dir), "--adapter-path", str(out),
          "--iters", "30", "--learning-rate", "1e-2", "--steps-per-eval", "30", "--test", *FAST])
    text = capsys.readouterr().out
    losses = val_losses(text)
    assert len(losses) == 2 and losses[1] < losses[0] - 0.05, text
    assert re.search(r"Iter 30: train loss [0-9.]+, lr 1.00e-02, [0-9.]+ it/s, \d+ tok/s, peak mem", text)
    assert "Test loss" in text and "320 trainable parameters" in text
    config, gains = A.read_adapter(out)
    assert config["variant"] == "gain-ffn" and len(gains) == 4
    assert all(np.abs(g - 1).max() > 1e-3 for g in gains.values()), "every gain should have moved"


def test_resume_matches_uninterrupted_run(tiny_model_dir, tiny_data_dir, tmp_path):
    common = ["--model", str(tiny_model_dir), "--data", str(tiny_data_dir), "--learning-rate", "1e-2",
              "--steps-per-eval", "100", "--save-every", "4", "--val-batches", "1", *FAST]
    # 16 steps > one epoch of 12 batches: the resumed run must also replay the reshuffle.
    main([*common, "--adapter-path", str(tmp_path / "straight"), "--iters", "16"])
    main([*common, "--adapter-path", str(tmp_path / "split"), "--iters", "8"])
    main([*common, "--adapter-path", str(tmp_path / "split"), "--iters", "16", "--resume"])
    _, straight = A.read_adapter(tmp_path / "straight")
    _, split = A.read_adapter(tmp_path / "split")
    assert json.loads((tmp_path / "split" / "trainer_state.json").read_text())["step"] == 16
    for k in straight:
        np.testing.assert_allclose(split[k], straight[k], rtol=0, atol=1e-6)
    assert any(np.abs(straight[k] - 1).max() > 1e-3 for k in straight)


def test_quantized_base_trains(tiny_model_dir, tiny_data_dir):
    model, tokenizer = load(str(tiny_model_dir))
    nn.quantize(model, group_size=32, bits=4)
    args = parse_args(["--data", str(tiny_data_dir), *FAST])
    train_set, valid_set, _ = load_data(args, tokenizer)
    A.apply_gains(model, "gain-ffn", tie_kv=True)
    assert isinstance(model.layers[0].self_attn.o_proj.base, nn.QuantizedLinear)
    opt = __import__("mlx.optimizers", fromlist=["Adam"]).Adam(learning_rate=1e-2)
    targs = TrainingArgs(batch_size=4, iters=20, val_batches=2, steps_per_report=10, steps_per_eval=20,
                         steps_per_save=100, max_seq_length=128)
    logs = []
    metrics = train_gains(model, opt, train_set, valid_set, targs, log=logs.append)
    losses = val_losses("\n".join(logs))
    assert losses[-1] < losses[0], logs
    assert mx.abs(model.layers[0].mlp.down_proj.gain - 1).max().item() > 1e-3
    assert metrics["tokens_per_second"] > 0


def test_yaml_config_and_flag_precedence(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("iters: 7\nlearning_rate: 3e-3\nvariant: gain\nlr_schedule:\n  name: cosine_decay\n  arguments: [3e-3, 7]\n")
    args = parse_args(["-c", str(cfg), "--iters", "9"])
    assert (args.iters, args.learning_rate, args.variant) == (9, 3e-3, "gain")
    assert args.lr_schedule["name"] == "cosine_decay"
    cfg.write_text("iterations: 7\n")
    with pytest.raises(UserError, match="unknown option.*iterations"):
        parse_args(["-c", str(cfg)])


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--data", "/nonexistent"], r"/nonexistent/train.jsonl not found"),
        (["--resume"], r"--resume: no checkpoint"),
        (["--batch-size", "0"], r"--batch-size must be positive"),
        (["--model", "/nonexistent/model.gguf"], r"GGUF file /nonexistent/model.gguf not found"),
    ],
)
def test_bad_input_is_one_line_error(tiny_model_dir, tiny_data_dir, tmp_path, extra, message):
    argv = ["--model", str(tiny_model_dir), "--data", str(tiny_data_dir), "--adapter-path", str(tmp_path / "a"), *extra]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert re.search(message, str(e.value)) and "\n" not in str(e.value)
    assert not (tmp_path / "a" / "gains.safetensors").exists()


def test_quantized_folder_trains_through_float_copy(tiny_model_dir, tiny_data_dir, tmp_path, capsys):
    """--dequantize on: train on a float32 copy; the adapter then loads into the quantized base."""
    import shutil

    from conftest import save_tiny_model
    from mlx_lm.utils import quantize_model

    model, _ = load(str(tiny_model_dir))
    config = json.loads((tiny_model_dir / "config.json").read_text())
    model, config = quantize_model(model, config, group_size=32, bits=4)
    qdir = tmp_path / "q4"
    save_tiny_model(model, qdir, config)
    for f in tiny_model_dir.glob("tokenizer*"):
        shutil.copy(f, qdir)
    main(["--model", str(qdir), "--data", str(tiny_data_dir), "--adapter-path", str(tmp_path / "a"),
          "--iters", "4", "--learning-rate", "1e-2", "--dequantize", "on", "--val-batches", "1", *FAST])
    assert "Training on a float32 copy" in capsys.readouterr().out
    quantized, _ = load(str(qdir))
    assert isinstance(quantized.layers[0].mlp.down_proj, nn.QuantizedLinear)
    A.load_adapter(quantized, tmp_path / "a")
    assert mx.abs(quantized.layers[0].mlp.down_proj.gain - 1).max().item() > 1e-3
