"""The forgetting report while training: retain perplexity, budget, --keep best, history."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from mlx_lm import load

from gain_mlx import adapter as A
from gain_mlx.monitor import HISTORY_FILE, Monitor, evaluate_loss, load_retain_set
from gain_mlx.train import main, parse_args

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--max-seq-length", "128", "--batch-size", "4", "--steps-per-report", "5", "--val-batches", "2"]


@pytest.fixture(scope="module")
def retain_file(tmp_path_factory):
    """Retain text the training data never holds: a slice of the shipped public-domain prose."""
    path = tmp_path_factory.mktemp("retain") / "retain.jsonl"
    lines = (ROOT / "examples" / "retain" / "retain.jsonl").read_text().splitlines()[:8]
    path.write_text("\n".join(lines) + "\n")
    return path


def _history(adapter):
    return json.loads((adapter / HISTORY_FILE).read_text())


def _train(tiny_model_dir, tiny_data_dir, adapter, retain, *extra):
    main(["--model", str(tiny_model_dir), "--data", str(tiny_data_dir), "--adapter-path", str(adapter),
          "--retain-data", str(retain), "--learning-rate", "3e-2", *FAST, *extra])


def test_retain_ppl_equals_independent_evaluation(tiny_model_dir, tiny_data_dir, retain_file, tmp_path, capsys):
    adapter = tmp_path / "a"
    _train(tiny_model_dir, tiny_data_dir, adapter, retain_file, "--iters", "10", "--steps-per-eval", "5")
    out = capsys.readouterr().out
    assert "retain ppl" in out and "val ppl" in out
    record = _history(adapter)
    rows = record["history"]
    assert [r["step"] for r in rows] == [0, 5, 10]
    assert rows[0]["retain_change"] == 0 and record["base"]["retain_ppl"] == rows[0]["retain_ppl"]

    model, tokenizer = load(str(tiny_model_dir))
    args = parse_args(["--max-seq-length", "128"])
    _, retain = load_retain_set(str(retain_file), tokenizer, args)
    base = math.exp(evaluate_loss(model, retain, 4, 2, 128))
    A.load_adapter(model, adapter)
    trained = math.exp(evaluate_loss(model, retain, 4, 2, 128))
    assert rows[0]["retain_ppl"] == pytest.approx(base, rel=1e-5)
    assert rows[-1]["retain_ppl"] == pytest.approx(trained, rel=1e-5)
    assert rows[-1]["retain_change"] == pytest.approx(trained / base - 1, rel=1e-4)
    assert abs(trained / base - 1) > 1e-4, "the gains should have changed the retain perplexity"
    assert f"retain ppl {rows[-1]['retain_ppl']:.2f} ({rows[-1]['retain_change']:+.1%})" in out


def test_keep_best_writes_best_checkpoint_within_budget(tiny_model_dir, tiny_data_dir, retain_file, tmp_path):
    adapter = tmp_path / "best"
    _train(tiny_model_dir, tiny_data_dir, adapter, retain_file, "--iters", "12", "--steps-per-eval", "3",
           "--keep", "best", "--retain-budget", "1000")
    record = _history(adapter)
    rows = [r for r in record["history"] if r["within_budget"]]
    best = min(rows, key=lambda r: r["val_ppl"])
    assert record["kept_step"] == best["step"]
    model, _ = load(str(tiny_model_dir))
    A.load_adapter(model, adapter)
    _, tokenizer = load(str(tiny_model_dir))
    from gain_mlx.datasets import load_data

    _, valid, _ = load_data(parse_args(["--data", str(tiny_data_dir), "--max-seq-length", "128"]), tokenizer)
    assert math.exp(evaluate_loss(model, valid, 4, 2, 128)) == pytest.approx(best["val_ppl"], rel=1e-5)


def test_stop_on_budget_stops_at_first_step_over_it(tiny_model_dir, tiny_data_dir, retain_file, tmp_path,
                                                    capsys, monkeypatch):
    """The stop logic, through the real training loop. On a random tiny model every text's
    perplexity falls as gains train, so the retain measurements are scripted to rise:
    +0, +0.5, +0.9, +1.5 (over 1%) at steps 0, 2, 4, 6."""
    adapter = tmp_path / "stop"
    scripted = iter([100.0, 100.5, 100.9, 101.5, 102.0, 103.0])
    real = Monitor._ppl

    def ppl(self, model, dataset, what, step):
        value = real(self, model, dataset, what, step)
        return next(scripted) if what == "retain set" else value

    monkeypatch.setattr(Monitor, "_ppl", ppl)
    _train(tiny_model_dir, tiny_data_dir, adapter, retain_file, "--iters", "30", "--steps-per-eval", "2",
           "--retain-budget", "1", "--stop-on-budget", "--save-every", "10")
    rows = _history(adapter)["history"]
    assert [r["step"] for r in rows] == [0, 2, 4, 6]
    assert [r["within_budget"] for r in rows] == [True, True, True, False]
    assert json.loads((adapter / "trainer_state.json").read_text())["step"] == 6
    assert "at step 6 retain perplexity is +1.5%" in capsys.readouterr().err


def test_retain_none_turns_it_off(tiny_model_dir, tiny_data_dir, tmp_path, capsys):
    adapter = tmp_path / "off"
    _train(tiny_model_dir, tiny_data_dir, adapter, "none", "--iters", "2", "--steps-per-eval", "2")
    out = capsys.readouterr().out
    assert "val ppl" in out and "retain ppl" not in out
    assert all("retain_ppl" not in r for r in _history(adapter)["history"])


def test_progress_without_tty_is_plain_lines(tiny_model_dir, tiny_data_dir, retain_file, tmp_path):
    cmd = [sys.executable, "-m", "gain_mlx.train", "--model", str(tiny_model_dir), "--data", str(tiny_data_dir),
           "--adapter-path", str(tmp_path / "p"), "--retain-data", str(retain_file), "--iters", "3",
           "--no-fast-blas", *FAST]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr
    both = run.stdout + run.stderr
    assert "\r" not in both
    assert "Evaluating the base model" in run.stderr and "Training 3 steps" in run.stderr
    assert "Training: 3/3" in run.stderr  # the final plain progress line


def test_plain_progress_rate_counts_only_new_units(monkeypatch):
    """A resumed bar starts at the done steps; its rate and ETA count only the steps since."""
    import io

    from gain_mlx import progress as progress_mod

    clock = iter([0.0, 10.0, 10.0])
    monkeypatch.setattr(progress_mod.time, "perf_counter", lambda: next(clock))
    out = io.StringIO()
    bar = progress_mod.PlainProgress(total=10, desc="Training", unit="step", file=out, every_s=5.0, initial=5)
    bar.update(1)  # 6/10 after 10 s: 0.10 step/s, 4 steps left -> ETA 0:40
    assert out.getvalue().strip() == "Training: 6/10, 0.10 step/s, ETA 0:40, elapsed 0:10"


def test_evaluate_loss_equals_mlx_lm_default_loss(tiny_model_dir, retain_file):
    """evaluate_loss (our CPU cross entropy) against mlx-lm's default_loss on the same batches."""
    import mlx.core as mx
    from mlx_lm.tuner.trainer import default_loss

    from gain_mlx.monitor import fixed_batches

    model, tokenizer = load(str(tiny_model_dir))
    _, retain = load_retain_set(str(retain_file), tokenizer, parse_args(["--max-seq-length", "128"]))
    total, tokens = 0.0, 0
    for _, (batch, lengths) in zip(range(2), fixed_batches(dataset=retain, batch_size=4, max_seq_length=128)):
        loss, ntoks = default_loss(model, batch, lengths)
        total, tokens = total + (loss * ntoks).item(), tokens + ntoks.item()
    assert tokens > 100
    assert evaluate_loss(model, retain, 4, 2, 128) == pytest.approx(total / tokens, rel=1e-5)
    mx.clear_cache()


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads in /proc/self/task (Linux)")
def test_evaluations_reuse_their_cpu_streams(tiny_model_dir, retain_file):
    """MLX gives every new stream a thread it never frees: repeated evaluations must not add any."""
    import os

    model, tokenizer = load(str(tiny_model_dir))
    _, retain = load_retain_set(str(retain_file), tokenizer, parse_args(["--max-seq-length", "128"]))
    evaluate_loss(model, retain, 4, 2, 128)
    threads = len(os.listdir("/proc/self/task"))
    for _ in range(3):
        evaluate_loss(model, retain, 4, 2, 128)
    assert len(os.listdir("/proc/self/task")) <= threads + 1  # a leak adds 2 an evaluation; tqdm may start its monitor


def test_history_plot_draws_one_curve_per_set(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib", reason="history.png needs matplotlib")
    import matplotlib.pyplot as plt

    from gain_mlx.monitor import plot_history

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    rows = [{"step": s, "val_change": -0.1 * s, "general_change": 0.01 * s, "legal_change": 0.02 * s}
            for s in (0, 5, 10)]
    plot_history(rows, tmp_path / "h.png", {"legal": 3.0})
    (fig,) = figures
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels == ["validation", "general set", "legal set", "legal budget"]
    assert (tmp_path / "h.png").stat().st_size > 1000
    monkeypatch.undo()
    plt.close(fig)
