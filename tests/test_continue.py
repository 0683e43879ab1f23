"""Continuing an adapter on new domains: --resume-adapter-file, lineage, named retain sets,
mlx-lm's optimizers and --report-to (offline)."""

import glob
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm import load

from conftest import EXAMPLE_DATA, save_tiny_model, tiny_model
from gain_mlx import adapter as A
from gain_mlx.errors import UsageError
from gain_mlx.monitor import HISTORY_FILE, parse_budgets, parse_retain_specs
from gain_mlx.provenance import lineage_lines
from gain_mlx.train import OPTIMIZERS, build_optimizer, main

FAST = ["--max-seq-length", "64", "--batch-size", "4", "--steps-per-report", "2", "--val-batches", "2"]


@pytest.fixture(scope="module")
def domains(tmp_path_factory):
    """Three small 'domains' cut from different parts of the example data."""
    root = tmp_path_factory.mktemp("domains")
    lines = (EXAMPLE_DATA / "train.jsonl").read_text().splitlines()
    for i, name in enumerate(("alpha", "beta", "gamma")):
        part = lines[i * 40:(i + 1) * 40]
        (root / name).mkdir()
        (root / name / "train.jsonl").write_text("\n".join(part[:28]) + "\n")
        (root / name / "valid.jsonl").write_text("\n".join(part[28:36]) + "\n")
    return root


def _train(model_dir, data, out, *extra):
    main(["--model", str(model_dir), "--data", str(data), "--adapter-path", str(out), "--learning-rate", "3e-2",
          "--iters", "4", "--steps-per-eval", "2", *FAST, *extra])


def _history(adapter):
    return json.loads((Path(adapter) / HISTORY_FILE).read_text())


def test_three_stages_watch_every_earlier_domain(tiny_model_dir, domains, tmp_path, capsys):
    a1, a2, a3 = (tmp_path / n for n in ("a1", "a2", "a3"))
    _train(tiny_model_dir, domains / "alpha", a1, "--retain-data", "none")
    capsys.readouterr()
    _train(tiny_model_dir, domains / "beta", a2, "--resume-adapter-file", str(a1), "--retain-data", "none")
    out = capsys.readouterr().out
    assert "Watching the earlier stages' validation data" in out and f"alpha ({domains / 'alpha'}" in out
    # step 0 of stage 2 is stage 1's adapter: its alpha perplexity is stage 1's last validation
    first = _history(a2)["history"][0]
    assert first["alpha_ppl"] == pytest.approx(_history(a1)["history"][-1]["val_ppl"], rel=1e-5)
    _, g1 = A.read_adapter(a1)
    _, g2 = A.read_adapter(a2)
    assert all(np.abs(g2[k] - g1[k]).max() > 1e-4 for k in g1), "stage 2 trains on from stage 1's gains"

    general = domains / "general.jsonl"
    general.write_text((EXAMPLE_DATA / "valid.jsonl").read_text())
    _train(tiny_model_dir, domains / "gamma", a3, "--resume-adapter-file", str(a2 / "gains.safetensors"),
           "--retain-data", f"general={general}", "--retain-budget", "50,alpha=80")
    out = capsys.readouterr().out
    line = re.search(r"Iter 4: (val ppl .*), took", out).group(1)
    assert re.fullmatch(r"val ppl [0-9.]+ \([-+][0-9.]+%\) \| general ppl [0-9.]+ \([-+][0-9.]+%\) \| "
                        r"alpha ppl [0-9.]+ \([-+][0-9.]+%\) \| beta ppl [0-9.]+ \([-+][0-9.]+%\)", line), line

    record = _history(a3)
    assert record["retain_sets"] == ["general", "alpha", "beta"]
    assert record["retain_budget_pct"] == {"general": 50.0, "alpha": 80.0, "beta": 50.0}
    for row in record["history"]:
        for name in ("val", "general", "alpha", "beta"):
            assert row[f"{name}_change"] == pytest.approx(row[f"{name}_ppl"] / record["history"][0][f"{name}_ppl"] - 1)

    config, _ = A.read_adapter(a3)
    lineage = config["lineage"]
    assert [Path(s["data"]).name for s in lineage] == ["alpha", "beta", "gamma"]
    assert len({s["data_fingerprint"] for s in lineage}) == 3
    assert [s["steps"] for s in lineage] == [4, 4, 4] and lineage[2]["learning_rate"] == 3e-2
    assert lineage[1]["continued_from"] == str(a1.resolve()) and lineage[0]["continued_from"] is None
    last = record["history"][-1]
    assert lineage[2]["final"]["val_ppl"] == last["val_ppl"] and lineage[2]["final"]["alpha_ppl"] == last["alpha_ppl"]
    assert lineage[0]["final"] == {k: v for k, v in _history(a1)["history"][-1].items()
                                   if k not in ("lr", "within_budget")} | {"kept": "last"}
    card = "\n".join(lineage_lines(config))
    assert "| 3 | `gamma` |" in card and "; alpha ppl" in card
    assert all(line.count("|") == 7 for line in card.splitlines())  # no | inside a cell


def test_continued_adapter_equals_independent_load(tiny_model_dir, domains, tmp_path):
    """The retain perplexity of a lineage set at step 0 is the continued adapter's own,
    measured by loading it independently."""
    from gain_mlx.monitor import evaluate_loss, load_retain_set
    from gain_mlx.train import parse_args

    a1, a2 = tmp_path / "a1", tmp_path / "a2"
    _train(tiny_model_dir, domains / "alpha", a1, "--retain-data", "none")
    _train(tiny_model_dir, domains / "beta", a2, "--resume-adapter-file", str(a1), "--iters", "2",
           "--retain-data", "none")
    model, tokenizer = load(str(tiny_model_dir))
    A.load_adapter(model, a1)
    _, alpha = load_retain_set(str(domains / "alpha"), tokenizer, parse_args(["--max-seq-length", "64"]))
    assert _history(a2)["history"][0]["alpha_ppl"] == pytest.approx(
        math.exp(evaluate_loss(model, alpha, 4, 2, 64)), rel=1e-5)


def _other_base(tmp_path, tiny_model_dir):
    config = json.loads((tiny_model_dir / "config.json").read_text())
    other = save_tiny_model(tiny_model("llama", seed=5, vocab_size=384), tmp_path / "other", config)
    for f in tiny_model_dir.glob("tokenizer*"):
        shutil.copy(f, other)
    return other


@pytest.mark.parametrize("case, message", [
    ("variant", r"has --variant gain-ffn, not gain: continue it with the same --variant"),
    ("base", r"trained on different base weights"),
    ("both", r"--resume continues an interrupted run.*pass one of them"),
    ("missing", r"--resume-adapter-file .*: no gains.safetensors and gain_config.json there"),
    ("report", r"--report-to tensorboard: unknown tensorboard; choose from wandb, swanlab"),
])
def test_continue_refuses_a_mismatch_in_one_line(tiny_model_dir, domains, tmp_path, adapter_dir, case, message):
    model = _other_base(tmp_path, tiny_model_dir) if case == "base" else tiny_model_dir
    extra = {"variant": ["--variant", "gain"], "base": [], "both": ["--resume"], "missing": [],
             "report": ["--report-to", "tensorboard"]}[case]
    source = tmp_path / "nowhere" if case == "missing" else adapter_dir
    with pytest.raises(SystemExit) as e:
        _train(model, domains / "beta", tmp_path / "out", "--resume-adapter-file", str(source), *extra)
    assert re.search(message, str(e.value)) and "\n" not in str(e.value), str(e.value)
    assert not (tmp_path / "out" / "gains.safetensors").exists()


def test_retain_and_budget_specs(tmp_path):
    (tmp_path / "legal").mkdir()
    f = tmp_path / "general.jsonl"
    assert parse_retain_specs(f"legal={tmp_path / 'legal'},{f}") == [("legal", tmp_path / "legal"), ("general", f)]
    assert parse_retain_specs(str(tmp_path / "legal")) == [("legal", tmp_path / "legal")]
    assert parse_retain_specs(str(tmp_path / "legal" / "valid.jsonl"))[0][0] == "legal"
    assert parse_retain_specs("none") == [] and parse_retain_specs(None)[0][0] == "retain"
    assert parse_retain_specs({"a": "x.jsonl"}) == [("a", Path("x.jsonl"))]
    with pytest.raises(UsageError, match="two sets named 'general'"):
        parse_retain_specs(f"{f},general={f}")
    with pytest.raises(UsageError, match="not 'val'"):
        parse_retain_specs(f"val={f}")
    assert parse_budgets("2", ["a", "b"]) == {"a": 2.0, "b": 2.0}
    assert parse_budgets("b=5,2", ["a", "b"]) == {"a": 2.0, "b": 5.0}
    assert parse_budgets("b=5", ["a", "b"]) == {"b": 5.0}
    assert parse_budgets(1.5, ["a"]) == {"a": 1.5} and parse_budgets(None, ["a"]) == {}
    with pytest.raises(UsageError, match="no retain set named 'c'"):
        parse_budgets("c=1", ["a", "b"])


def test_stop_on_budget_of_one_named_set(tiny_model_dir, domains, tmp_path, capsys, monkeypatch):
    """--stop-on-budget with two sets: only 'b' is scripted to rise past its own budget (1%);
    'a' rises more but has a budget of 10%."""
    from gain_mlx.monitor import Monitor

    scripted = {"a set": iter([100.0, 102.0, 105.0, 108.0]), "b set": iter([100.0, 100.5, 101.5, 102.0])}
    real = Monitor._ppl
    monkeypatch.setattr(Monitor, "_ppl", lambda self, model, ds, what, step:
                        next(scripted[what]) if what in scripted else real(self, model, ds, what, step))
    adapter = tmp_path / "stop"
    _train(tiny_model_dir, domains / "alpha", adapter, "--iters", "8",
           "--retain-data", f"a={domains / 'beta'},b={domains / 'gamma'}", "--retain-budget", "1,a=10",
           "--stop-on-budget", "--keep", "best")
    rows = _history(adapter)["history"]
    assert [r["step"] for r in rows] == [0, 2, 4] and [r["within_budget"] for r in rows] == [True, True, False]
    assert "at step 4 b perplexity is +1.5% (budget 1%)" in capsys.readouterr().err
    assert _history(adapter)["kept_step"] in (0, 2)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_every_mlx_lm_optimizer_trains_and_resumes(tiny_model_dir, domains, tmp_path, name):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"optimizer: {name}\noptimizer_config:\n  adamw:\n    weight_decay: 0.0\n")
    _train(tiny_model_dir, domains / "alpha", tmp_path / "a", "-c", str(cfg), "--retain-data", "none",
           "--iters", "2", "--save-every", "2", "--learning-rate", "1e-2")
    _train(tiny_model_dir, domains / "alpha", tmp_path / "a", "-c", str(cfg), "--retain-data", "none",
           "--iters", "3", "--resume", "--learning-rate", "1e-2")
    _, gains = A.read_adapter(tmp_path / "a")
    assert all(np.isfinite(g).all() for g in gains.values())
    assert any(np.abs(g - 1).max() > 1e-7 for g in gains.values())  # muon moves 1-D gains slowly


def test_optimizer_config_reaches_the_optimizer():
    opt = build_optimizer("adamw", 1e-3, {"adamw": {"weight_decay": 0.125}, "adam": {"eps": 1.0}})
    assert opt.weight_decay == 0.125
    from gain_mlx.errors import UserError

    with pytest.raises(UserError, match="optimizer_config.sgd"):
        build_optimizer("sgd", 1e-3, {"sgd": {"no_such_argument": 1}})


def _wandb_records(path):
    """The records of a wandb run file (its leveldb-style log of protobuf records)."""
    from wandb.proto import wandb_internal_pb2 as pb2

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B"
    pos, block, chunks = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunks += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = pb2.Record()
            record.ParseFromString(chunks)
            chunks = b""
            yield record


def _train_in_subprocess(env, model_dir, data, out, *extra):
    """The CLI in its own process: trackers start threads and hooks a test process should not keep."""
    argv = ["--model", str(model_dir), "--data", str(data), "--adapter-path", str(out), "--learning-rate", "3e-2",
            "--iters", "4", "--steps-per-eval", "2", "--no-fast-blas", *FAST, *extra]
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, **env, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    run = subprocess.run([sys.executable, "-m", "gain_mlx.train", *argv], capture_output=True, text=True, env=env,
                         cwd=root, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def test_report_to_wandb_offline(tiny_model_dir, domains, tmp_path):
    pytest.importorskip("wandb", reason="wandb is an optional extra (pip install 'gain-mlx[report]')")
    a1, a2 = tmp_path / "a1", tmp_path / "a2"
    _train(tiny_model_dir, domains / "alpha", a1, "--retain-data", "none")
    _train_in_subprocess({"WANDB_MODE": "offline", "WANDB_SILENT": "true"}, tiny_model_dir, domains / "beta", a2,
                         "--resume-adapter-file", str(a1), "--report-to", "wandb",
                         "--retain-data", f"general={EXAMPLE_DATA / 'valid.jsonl'}")
    (run_file,) = glob.glob(str(a2 / "wandb" / "offline-run-*" / "run-*.wandb"))
    history, config = [], {}
    for r in _wandb_records(run_file):
        kind = r.WhichOneof("record_type")
        if kind == "history":
            history.append({_key(i): json.loads(i.value_json) for i in r.history.item})
        elif kind == "run":
            config.update({_key(i): json.loads(i.value_json) for i in r.run.config.update})
    rows = _history(a2)["history"]
    evals = [h for h in history if "val_loss" in h]  # wandb merges the train and val reports of a step
    assert [h["_step"] for h in evals] == [r["step"] for r in rows] == [0, 2, 4]
    for h, r in zip(evals, rows):
        assert h["val_loss"] == pytest.approx(math.log(r["val_ppl"]), rel=1e-6)
        assert h["general_ppl"] == pytest.approx(r["general_ppl"]) and h["alpha_ppl"] == pytest.approx(r["alpha_ppl"])
        assert h["alpha_change"] == pytest.approx(r["alpha_change"])
    trains = [h for h in history if "train_loss" in h]
    assert [h["_step"] for h in trains] == [2, 4] and all(h["learning_rate"] == pytest.approx(3e-2) for h in trains)
    assert [Path(s["data"]).name for s in config["lineage"]] == ["alpha", "beta"]
    assert config["retain_sets"]["general"].endswith("valid.jsonl")


def test_report_to_swanlab_offline(tiny_model_dir, domains, tmp_path):
    pytest.importorskip("swanlab", reason="swanlab is an optional extra (pip install 'gain-mlx[report]')")
    from swanlab.proto.swanlab.record.v1.record_pb2 import Record
    from swanlab.sdk.internal.core_python.store import DataStoreReader

    adapter = tmp_path / "s"
    _train_in_subprocess({"SWANLAB_MODE": "offline"}, tiny_model_dir, domains / "alpha", adapter,
                         "--report-to", "swanlab", "--retain-data", f"general={EXAMPLE_DATA / 'valid.jsonl'}")
    (run_file,) = glob.glob(str(adapter / "swanlog" / "run-*" / "run-*.swanlab"))
    reader, scalars = DataStoreReader(), {}
    reader.open(run_file)
    while (data := reader.scan()) is not None:
        record = Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") == "scalar":
            scalars[(record.scalar.key, record.scalar.step)] = record.scalar.value.number
    reader.close()
    for r in _history(adapter)["history"]:
        assert scalars[("general_ppl", r["step"])] == pytest.approx(r["general_ppl"], rel=1e-6)
        assert scalars[("val_loss", r["step"])] == pytest.approx(math.log(r["val_ppl"]), rel=1e-6)
    assert ("train_loss", 4) in scalars
    mx.clear_cache()


def test_cards_show_the_lineage(tiny_model_dir, domains, tmp_path):
    from gain_mlx.fuse import fuse
    from gain_mlx.upload import adapter_card, fused_card

    a1, a2 = tmp_path / "a1", tmp_path / "a2"
    _train(tiny_model_dir, domains / "alpha", a1, "--retain-data", "none", "--iters", "2")
    _train(tiny_model_dir, domains / "beta", a2, "--resume-adapter-file", str(a1), "--iters", "2",
           "--retain-data", "none")
    card = adapter_card(a2, "me/a2")
    assert "## Lineage" in card and "| 1 | `alpha` |" in card and "| 2 | `beta` |" in card
    assert "| start (the adapter it continued) | 0 |" in card and "alpha ppl" in card
    assert "## Lineage" not in adapter_card(a1, "me/a1")
    fuse(str(tiny_model_dir), a2, tmp_path / "fused", verbose=False)
    readme = (tmp_path / "fused" / "README.md").read_text()
    assert "The adapter's training stages" in readme and "| 2 | `beta` |" in readme
    assert "## Lineage" in fused_card(tmp_path / "fused", "me/fused")


def test_interrupted_continued_stage_resumes_exactly(tiny_model_dir, domains, tmp_path):
    """--resume still continues an interrupted run, here a continued stage: same gains as
    the uninterrupted stage, the lineage and the watched sets kept."""
    a1 = tmp_path / "a1"
    _train(tiny_model_dir, domains / "alpha", a1, "--retain-data", "none")
    stage = ["--resume-adapter-file", str(a1), "--retain-data", "none", "--save-every", "2"]
    _train(tiny_model_dir, domains / "beta", tmp_path / "straight", *stage, "--iters", "6")
    _train(tiny_model_dir, domains / "beta", tmp_path / "split", *stage, "--iters", "2")
    _train(tiny_model_dir, domains / "beta", tmp_path / "split", "--resume", "--retain-data", "none",
           "--save-every", "2", "--iters", "6")
    (c1, straight), (c2, split) = A.read_adapter(tmp_path / "straight"), A.read_adapter(tmp_path / "split")
    for k in straight:
        np.testing.assert_allclose(split[k], straight[k], rtol=0, atol=1e-6)
    assert [s["steps"] for s in c2["lineage"]] == [4, 6]
    assert c2["lineage"][1]["final"]["alpha_ppl"] == pytest.approx(c1["lineage"][1]["final"]["alpha_ppl"], rel=1e-6)
    assert [r["step"] for r in _history(tmp_path / "split")["history"]] == [0, 2, 4, 6]


def test_adapter_from_before_lineage_continues(tiny_model_dir, domains, tmp_path, adapter_dir):
    _train(tiny_model_dir, domains / "beta", tmp_path / "b", "--resume-adapter-file", str(adapter_dir),
           "--iters", "1", "--retain-data", "none")
    config, _ = A.read_adapter(tmp_path / "b")
    assert "before gain_mlx recorded lineage" in config["lineage"][0]["note"]
    assert Path(config["lineage"][1]["data"]).name == "beta"
