"""The sequential multi-domain experiment, end to end on a tiny model and tiny data."""

import json
import math
import shutil
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm import load

from conftest import EXAMPLE_DATA
from gain_mlx.experiments import sequential
from gain_mlx.errors import UsageError
from gain_mlx.monitor import evaluate_loss


def _domains(root):
    """Three small 'domains' (and a control) cut from different parts of the example data."""
    lines = (EXAMPLE_DATA / "train.jsonl").read_text().splitlines()
    names = ("alpha", "beta", "gamma", "control")
    for i, name in enumerate(names):
        part = lines[i * 40:(i + 1) * 40]
        (root / name).mkdir()
        (root / name / "train.jsonl").write_text("\n".join(part[:24]) + "\n")
        (root / name / "valid.jsonl").write_text("\n".join(part[24:]) + "\n")
    return names


def _args(tmp_path, model_dir, *extra):
    _domains(tmp_path)
    return sequential.parse_args([
        "--model", str(model_dir), "--out", str(tmp_path / "out"), "--data-root", str(tmp_path),
        "--domains", "alpha,beta,gamma", "--control", "control", "--methods", "gain-ffn,lora",
        "--lr", "gain-ffn=1e-2,3e-2", "--lr", "lora=1e-3,3e-3",
        "--steps", "3", "--batch-size", "2", "--max-seq-length", "48", "--val-examples", "8", *extra,
    ])


def test_results_structure_and_consistency(tmp_path, tiny_model_dir):
    args = _args(tmp_path, tiny_model_dir)
    results = sequential.run(args, log=lambda *a: None)
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["domains"] == ["alpha", "beta", "gamma"]
    assert set(saved["methods"]) == {"gain-ffn", "lora"}
    assert [(r["method"], r["lr"]) for r in saved["sweep"]] == [
        ("gain-ffn", 1e-2), ("gain-ffn", 3e-2), ("lora", 1e-3), ("lora", 3e-3)]
    for r in saved["sweep"]:
        ppl = np.array(r["ppl"])
        assert ppl.shape == (3, 3) and np.isfinite(ppl).all() and (ppl > 1).all()
        assert len(r["control_ppl"]) == 3
        # the summary is recomputable from the perplexities it summarizes
        s = sequential.summarize(r["ppl"], saved["base_ppl"])
        assert r["summary"]["in_domain"] == pytest.approx(s["in_domain"])
        assert r["summary"]["forgetting"] == pytest.approx(
            np.mean([ppl[2, j] / saved["base_ppl"][j] - 1 for j in range(2)]))
    for method, head in saved["methods"].items():
        assert head["lr"] == saved["matched"]["rates"][method]
        # the headline is the method's least-forgetting run reaching the matched level
        reaching = [r["summary"]["forgetting"] for r in saved["sweep"]
                    if r["method"] == method and r["summary"]["in_domain"] <= saved["matched"]["level"] + 1e-9]
        assert head["summary"]["forgetting"] == min(reaching)
        assert any(r["method"] == method and r["lr"] == head["lr"] and r["ppl"] == head["ppl"]
                   for r in saved["sweep"])
    assert "| gain-ffn | 0.01 |" in (tmp_path / "out" / "results.md").read_text()
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        pass
    else:
        assert (tmp_path / "out" / "heatmap.png").stat().st_size > 1000
        assert (tmp_path / "out" / "pareto.png").stat().st_size > 1000

    # base_ppl is exp of the base model's loss, evaluated independently of the experiment
    model, tokenizer = load(str(tiny_model_dir))
    for name, ppl in zip(saved["domains"], saved["base_ppl"]):
        d = sequential.load_domain(tmp_path / name, tokenizer, 48, 8)
        assert ppl == pytest.approx(math.exp(evaluate_loss(model, d.valid, 8, 1, 48)), rel=1e-5)

    # a run is resumable: nothing is retrained, the results are the same
    again = sequential.run(args, log=lambda *a: None)
    assert [r["ppl"] for r in again["sweep"]] == [r["ppl"] for r in results["sweep"]]


def test_methods_train_only_their_modules_and_merge_exactly(tiny_model_dir):
    from mlx.utils import tree_flatten

    base, _ = load(str(tiny_model_dir))
    base.freeze()
    x = mx.array([[1, 5, 9, 13, 2, 7]])
    expected = {"gain": 2 * 64, "gain-ffn": 2 * (64 + 96), "lora": 2 * 8 * (64 + 64 + 96 + 64)}
    cfg = sequential.parse_args(["--out", "x", "--lora-rank", "8"])
    for method, (attach, merge) in sequential.METHODS.items():
        model = sequential.copy_model(base)
        attach(model, cfg)
        params = dict(tree_flatten(model.trainable_parameters()))
        if method in expected:
            assert sum(v.size for v in params.values()) == expected[method], method
        # perturb the trainable parameters, then merging must not change the outputs
        model.update(
            __import__("mlx.utils", fromlist=["tree_unflatten"]).tree_unflatten(
                [(k, v + 0.1 * mx.random.normal(v.shape, key=mx.random.key(3))) for k, v in params.items()]))
        before = model(x)
        merge(model)
        assert not tree_flatten(model.trainable_parameters())
        assert mx.allclose(model(x), before, atol=1e-4).item(), method
    # the base model is untouched by any of it
    fresh, _ = load(str(tiny_model_dir))
    assert mx.array_equal(base(x), fresh(x)).item()


def test_bad_input_is_one_line(tmp_path):
    with pytest.raises(UsageError, match="unknown method"):
        sequential.parse_args(["--out", "x", "--methods", "gain,adapterz"])
    with pytest.raises(UsageError, match="multiple of 8"):
        sequential.parse_args(["--out", "x", "--val-examples", "12"])
    with pytest.raises(UsageError, match="METHOD=R1,R2"):
        sequential.parse_args(["--out", "x", "--lr", "gain"])
    r = subprocess.run([sys.executable, "-m", "gain_mlx.sequential", "--out", str(tmp_path / "o"), "--steps", "0"],
                       capture_output=True, text=True)
    assert (r.returncode, r.stderr.strip().splitlines()) == (2, ["error: --steps must be positive"])
    with pytest.raises(SystemExit, match="make_corpora"):
        sequential.main(["--out", str(tmp_path / "o"), "--data-root", str(tmp_path), "--model", "x"])
    assert not (tmp_path / "o").exists()  # nothing written for a run that cannot start
    # --report on a folder with no runs: one line, and no empty output folder left behind
    r = subprocess.run([sys.executable, "-m", "gain_mlx.sequential", "--out", str(tmp_path / "none"), "--report"],
                       capture_output=True, text=True)
    assert r.returncode != 0 and r.stderr.strip().splitlines()[-1].endswith("(run without --report first)")
    assert "Traceback" not in r.stderr and not (tmp_path / "none").exists()


def test_pareto_front_and_matched_level():
    def run(method, lr, in_domain, forgetting):
        return {"method": method, "lr": lr, "summary": {"in_domain": in_domain, "forgetting": forgetting}}

    a, b, c, d = run("x", 1, -0.10, 0.05), run("x", 2, -0.05, -0.02), run("y", 1, -0.08, 0.06), run("y", 2, -0.10, 0.04)
    assert sequential.pareto_front([a, b, c, d]) == [b, d]  # d beats a and c on both axes
    m = sequential.matched([a, b, c, d], ["x", "y"])
    assert m["level"] == pytest.approx(-0.10)  # both methods reach -10%
    assert m["runs"]["x"] is a and m["runs"]["y"] is d
    e = run("y", 3, -0.20, 0.01)  # y also goes further, forgetting less: that is its best at the level
    assert sequential.matched([a, b, c, d, e], ["x", "y"])["runs"]["y"] is e


def test_runs_are_listed_by_method_then_rate():
    # a resumed or combined sweep appends runs in the order they finished, not by rate
    # (and whichever process writes the report, it lists them in one order: METHODS, then others)
    runs = [{"method": m, "lr": lr, "ppl": [[2.0, 3.0], [2.5, 2.0]], "control_ppl": None} for m, lr in
            [("z", 1e-3), ("lora", 3e-3), ("gain-ffn", 1e-2), ("lora", 1e-3), ("gain-ffn", 1e-3), ("lora", 1e-2)]]
    results = sequential.finish({"base_ppl": [3.0, 3.0], "sweep": runs})
    assert [(r["method"], r["lr"]) for r in results["sweep"]] == [
        ("gain-ffn", 1e-3), ("gain-ffn", 1e-2), ("lora", 1e-3), ("lora", 3e-3), ("lora", 1e-2), ("z", 1e-3)]
    # every method in the sweep gets a headline, whether this process trains it or not
    # (resumed, combined), so results.json written after each run matches the one written at the end
    assert list(results["methods"]) == ["gain-ffn", "lora", "z"]
    assert set(results["matched"]["rates"]) == {"gain-ffn", "lora", "z"}


def test_lora_runs_do_not_depend_on_what_ran_before(tmp_path, tiny_model_dir):
    # LoRA draws its initial weights from MLX's global generator, which a fresh process
    # seeds from the clock: a run must give the same result first in a process or later
    args = _args(tmp_path, tiny_model_dir, "--control", "none")
    model, tokenizer = load(str(tiny_model_dir))
    model.freeze()
    domains = [sequential.load_domain(tmp_path / n, tokenizer, 48, 8) for n in ("alpha", "beta")]
    runs = []
    for seed in (1, 2):
        mx.random.seed(seed)
        mx.random.normal((3,))  # whatever ran before leaves the generator somewhere else
        runs.append(sequential.run_method(model, "lora", 1e-3, domains, domains, args, log=lambda *a: None))
    assert runs[0]["ppl"] == runs[1]["ppl"]


def test_seeds_probe_and_per_run_files(tmp_path, tiny_model_dir):
    from test_probe import _write_probe

    from gain_mlx.experiments.probe import load_probe, score

    _write_probe(tmp_path / "probe.jsonl")
    args = _args(tmp_path, tiny_model_dir, "--control", "none", "--methods", "gain-ffn,lora", "--lr", "gain-ffn=1e-2",
                 "--lr", "lora=1e-3", "--seeds", "0,1", "--probe", str(tmp_path / "probe.jsonl"),
                 "--probe-questions", "4")
    results = sequential.run(args, log=lambda *a: None)
    out = tmp_path / "out"
    assert sorted(p.name for p in (out / "runs").iterdir()) == [
        "gain-ffn_lr0.01_seed0.json", "gain-ffn_lr0.01_seed1.json", "lora_lr0.001_seed0.json", "lora_lr0.001_seed1.json"]
    runs = {(r["method"], r["seed"]): r for r in results["sweep"]}
    assert runs["lora", 0]["ppl"] != runs["lora", 1]["ppl"]  # the seed sets LoRA's init and the data order
    model, tokenizer = load(str(tiny_model_dir))
    assert results["probe_base"] == pytest.approx(score(model, load_probe(tmp_path / "probe.jsonl", tokenizer, 4)))
    for r in results["sweep"]:
        assert len(r["probe"]) == len(results["domains"]) and len(r["stage_seconds"]) == len(results["domains"])
        assert r["summary"]["probe_acc"] == pytest.approx(r["probe"][-1]["acc_norm"] - results["probe_base"]["acc_norm"])
    for row in results["aggregate"]:
        pair = [runs[row["method"], s]["summary"] for s in (0, 1)]
        assert row["seeds"] == [0, 1]
        for key in ("in_domain", "forgetting", "probe_acc"):
            assert row["summary"][key] == pytest.approx(np.mean([p[key] for p in pair]))
            assert row["range"][key] == pytest.approx(sorted(p[key] for p in pair))
    assert "| gain-ffn | 0.01 | 2 |" in (out / "results.md").read_text()
    # the cost table: evaluation's share of each run's stage times
    times = np.array(runs["lora", 1]["stage_seconds"])
    assert sequential.cost(runs["lora", 1]) == pytest.approx({
        "train_s": times[:, 0].mean(), "eval_s": times[:, 1].mean(),
        "eval_share": times[:, 1].sum() / times.sum(), "minutes": times.sum() / 60})
    assert f"| lora | 0.001 | 1 | {runs['lora', 1]['finished']} | {times[:, 0].mean():.0f} |" in (out / "results.md").read_text()
    # resumable from the per-run files: nothing reruns, the base numbers come from base.json
    again = sequential.run(args, log=lambda *a: None)
    assert [r["finished"] for r in again["sweep"]] == [r["finished"] for r in results["sweep"]]
    # --report assembles the same tables from the run files alone, without training or the corpora
    (out / "results.json").unlink()
    for name in ("alpha", "beta", "gamma", "control"):
        shutil.rmtree(tmp_path / name)
    args.report = True
    reported = sequential.run(args, log=lambda *a: None)
    assert reported["aggregate"] == again["aggregate"] and (out / "results.json").is_file()


def test_sequential_equals_stages_run_by_hand(tmp_path, tiny_model_dir, monkeypatch):
    """A sequential GAIN-FFN run and the same stages run one by one with
    ``python -m gain_mlx.train --resume-adapter-file`` end with the same gains."""
    from gain_mlx import adapter as A
    from gain_mlx.train import main

    args = _args(tmp_path, tiny_model_dir, "--methods", "gain-ffn", "--lr", "gain-ffn=3e-2", "--seeds", "5")
    after = []
    real = sequential.evaluate

    def evaluate(model, domains, cfg, probe=None):
        if A.gain_parameters(model):  # not the base model's evaluation
            after.append({k: np.array(v) for k, v in A.gain_parameters(model).items()})
        return real(model, domains, cfg, probe)

    monkeypatch.setattr(sequential, "evaluate", evaluate)
    sequential.run(args, log=lambda *a: None)
    assert len(after) == 4  # control + three domains

    previous = None
    for i, name in enumerate(("control", "alpha", "beta", "gamma")):
        out = tmp_path / f"by_hand_{i}"
        main(["--model", str(tiny_model_dir), "--data", str(tmp_path / name), "--adapter-path", str(out),
              "--learning-rate", "3e-2", "--iters", "3", "--batch-size", "2", "--max-seq-length", "48",
              "--seed", str(5 + i), "--retain-data", "none", "--val-batches", "1", "--steps-per-eval", "3",
              *(["--resume-adapter-file", str(previous)] if previous else [])])
        _, gains = A.read_adapter(out)
        assert set(gains) == set(after[i])
        for k in gains:
            np.testing.assert_allclose(gains[k], after[i][k], rtol=0, atol=1e-5, err_msg=f"stage {name}: {k}")
        previous = out
    assert max(np.abs(g - 1).max() for g in after[-1].values()) > 1e-2, "the gains should have moved"
