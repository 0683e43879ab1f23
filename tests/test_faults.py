"""Fault suite: bad input to every CLI ends in one ``error:`` line with no traceback, the
inputs unchanged and no output; fuzzed GGUF headers and adapters are a clean error or a
correct read, never a crash."""

import hashlib
import resource
import signal
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm import load

from gain_mlx import adapter as A
from gain_mlx.errors import UserError
from gain_mlx.gguf.header import GGUFFile
from gain_mlx.trainer import check_finite

from gguf_fixtures import tiny_for_gguf, write_gguf  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def digest(path: Path) -> str:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()


def run_cli(module, *args, cwd=None, preexec_fn=None):
    """Run ``python -m module args``; return (exit code, stderr).

    The child writes no bytecode: under ``_small_disk`` a .pyc is cut at the limit and
    renamed into place, breaking every later import of that module.
    """
    env = {"OPENBLAS_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONDONTWRITEBYTECODE": "1"}
    r = subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True,
                       cwd=cwd or ROOT, preexec_fn=preexec_fn, env=env, timeout=300)
    return r.returncode, r.stderr


def assert_one_line(code, err, match, want_code=1):
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith(("Note:", "No --data"))]
    assert "Traceback" not in err, err
    assert code == want_code, (code, err)
    assert lines and lines[-1].startswith("error: ") and match in lines[-1], err


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    return write_gguf(tmp_path_factory.mktemp("gguf") / "m.gguf", tiny_for_gguf("llama"))


def broken_adapter(src: Path, dst: Path, how: str) -> Path:
    shutil.copytree(src, dst)
    gains, cfg = dst / A.GAINS_FILE, dst / A.CONFIG_FILE
    if how == "truncated":
        gains.write_bytes(gains.read_bytes()[:40])
    elif how == "empty":
        gains.write_bytes(b"")
    elif how == "json":
        cfg.write_text(cfg.read_text()[:30])
    elif how == "nan":
        w = mx.load(str(gains))
        k = next(iter(w))
        w[k] = w[k] * float("nan")
        mx.save_safetensors(str(gains), w)
    elif how == "no-config":
        cfg.unlink()
    return dst


ADAPTER_FAULTS = {  # how the adapter is broken -> what the line says
    "truncated": "truncated or corrupt",
    "empty": "truncated or corrupt",
    "json": "not valid JSON",
    "nan": "not finite",
    "no-config": "not found",
}


@pytest.mark.parametrize("how", ADAPTER_FAULTS)
def test_read_adapter_refuses(adapter_dir, tmp_path, how):
    bad = broken_adapter(adapter_dir, tmp_path / "bad", how)
    with pytest.raises(A.AdapterError, match=ADAPTER_FAULTS[how]):
        A.read_adapter(bad)


def test_adapter_path_is_a_file(tmp_path):
    f = tmp_path / "f"
    f.write_text("x")
    with pytest.raises(A.AdapterError, match="is a file"):
        A.read_adapter(f)


@pytest.mark.parametrize("how", ADAPTER_FAULTS)
def test_fuse_refuses_bad_adapter(tiny_model_dir, adapter_dir, tmp_path, how):
    bad = broken_adapter(adapter_dir, tmp_path / "bad", how)
    before = digest(bad), digest(tiny_model_dir)
    code, err = run_cli("gain_mlx.fuse", "--model", tiny_model_dir, "--adapter-path", bad,
                        "--save-path", tmp_path / "out", "--no-fast-blas")
    assert_one_line(code, err, ADAPTER_FAULTS[how])
    assert (digest(bad), digest(tiny_model_dir)) == before and not (tmp_path / "out").exists()


@pytest.mark.parametrize("how", ["truncated", "json", "nan"])
def test_export_refuses_bad_adapter(gguf_file, adapter_dir, tmp_path, how):
    bad = broken_adapter(adapter_dir, tmp_path / "bad", how)
    before = digest(bad), digest(gguf_file)
    code, err = run_cli("gain_mlx.export", "--gguf", gguf_file, "--adapter-path", bad,
                        "--out", tmp_path / "o.gguf")
    assert_one_line(code, err, ADAPTER_FAULTS[how])
    assert (digest(bad), digest(gguf_file)) == before and not (tmp_path / "o.gguf").exists()


@pytest.mark.parametrize("cut", [0, 10, 100, 0.5])
def test_truncated_gguf_is_one_line(gguf_file, adapter_dir, tmp_path, cut):
    data = gguf_file.read_bytes()
    bad = tmp_path / "t.gguf"
    bad.write_bytes(data[: int(len(data) * cut) if isinstance(cut, float) else cut])
    for module, args in (("gain_mlx.export", ["--adapter-path", adapter_dir, "--out", tmp_path / "o.gguf"]),
                         ("gain_mlx.convert", ["--out", tmp_path / "conv"])):
        code, err = run_cli(module, "--gguf", bad, *args)
        assert_one_line(code, err, str(bad))
    assert not (tmp_path / "o.gguf").exists() and not (tmp_path / "conv").exists()


TRAIN_FAULTS = [  # (what is done to a copy of the data, extra flags, exit code, what the line says)
    ("empty-train", [], 1, "train.jsonl is empty"),
    ("broken-line", [], 1, "train.jsonl line 49 is not a valid JSON object"),
    ("none", ["--learning-rate", "nan"], 2, "--learning-rate"),
    ("none", ["--batch-size", "0"], 2, "--batch-size must be positive"),
    ("none", ["--iters", "-1"], 2, "--iters must be positive"),
    ("none", ["--resume"], 1, "--resume: no checkpoint"),
    ("no-data", [], 1, "train.jsonl not found"),
    ("bad-yaml", [], 1, "cannot read config"),
    ("adapter-is-file", [], 2, "is a file: pass a folder"),
]


@pytest.mark.parametrize("fault, extra, want_code, match", TRAIN_FAULTS, ids=lambda x: str(x))
def test_train_bad_input(tiny_model_dir, tiny_data_dir, tmp_path, fault, extra, want_code, match):
    data = tmp_path / "data"
    shutil.copytree(tiny_data_dir, data)
    adapter = tmp_path / "a"
    if fault == "empty-train":
        (data / "train.jsonl").write_text("")
    elif fault == "broken-line":
        with open(data / "train.jsonl", "a") as f:
            f.write('{"text": "unterminated\n')
    elif fault == "no-data":
        shutil.rmtree(data)
    elif fault == "bad-yaml":
        (tmp_path / "c.yaml").write_text("iters: [1\n")
        extra = ["-c", tmp_path / "c.yaml"]
    elif fault == "adapter-is-file":
        adapter.write_text("x")
    before = digest(data) if data.exists() else None
    code, err = run_cli("gain_mlx.train", "--model", tiny_model_dir, "--data", data, "--adapter-path", adapter,
                        "--iters", "2", "--no-fast-blas", *extra)
    assert_one_line(code, err, match, want_code)
    assert (digest(data) if data.exists() else None) == before
    assert not (adapter.is_dir() and (adapter / A.GAINS_FILE).exists())


def test_check_finite_names_the_step(tiny_model_dir):
    model, _ = load(str(tiny_model_dir))
    A.apply_gains(model)
    check_finite(3, mx.array(1.0), model)
    with pytest.raises(UserError, match="step 3.*--learning-rate"):
        check_finite(3, mx.array(float("nan")), model)
    layer = next(m for _, m in model.named_modules() if hasattr(m, "gain"))
    layer.gain = layer.gain * float("inf")
    with pytest.raises(UserError, match="step 7"):
        check_finite(7, mx.array(1.0), model)


# --- fuzz -----------------------------------------------------------------------------

def _mutants(data: bytes, n: int, seed: int):
    rng = np.random.default_rng(seed)
    for cut in np.unique(np.linspace(0, len(data), n // 2).astype(int)):
        yield data[:cut]
    for _ in range(n // 2):
        b = bytearray(data)
        for i in rng.integers(0, min(len(b), 4096), rng.integers(1, 4)):
            b[i] = rng.integers(0, 256)
        yield bytes(b)


def test_fuzz_gguf_header(gguf_file, tmp_path):
    good = GGUFFile(gguf_file)
    names = [t.name for t in good.tensors]
    f = tmp_path / "f.gguf"
    outcomes = {"ok": 0, "error": 0}
    for data in _mutants(gguf_file.read_bytes(), 400, 0):
        f.write_bytes(data)
        try:
            r = GGUFFile(f)
        except UserError as e:
            assert str(f) in str(e) and "\n" not in str(e)
            outcomes["error"] += 1
        else:
            assert len(r.tensors) <= len(names) * 4
            outcomes["ok"] += 1
            del r
    assert outcomes["error"] > 100 and outcomes["ok"] > 0, outcomes


def test_fuzz_read_adapter(adapter_dir, tmp_path):
    good_cfg, good = A.read_adapter(adapter_dir)
    bad = tmp_path / "a"
    shutil.copytree(adapter_dir, bad)
    outcomes = {"ok": 0, "error": 0}
    for name in (A.GAINS_FILE, A.CONFIG_FILE):
        original = (adapter_dir / name).read_bytes()
        for data in _mutants(original, 200, 1):
            (bad / name).write_bytes(data)
            try:
                cfg, gains = A.read_adapter(bad)
            except UserError as e:
                assert "\n" not in str(e)
                outcomes["error"] += 1
            else:
                assert all(np.isfinite(v).all() for v in gains.values())
                outcomes["ok"] += 1
        (bad / name).write_bytes(original)
    assert outcomes["error"] > 100, outcomes


def _small_disk():
    """A 64 KiB file-size limit (writes past it fail with EFBIG, as a full disk would)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))


def test_convert_disk_full_leaves_nothing(gguf_file, tmp_path):
    before = digest(gguf_file)
    code, err = run_cli("gain_mlx.convert", "--gguf", gguf_file, "--out", tmp_path / "conv", preexec_fn=_small_disk)
    assert_one_line(code, err, "disk full")
    assert digest(gguf_file) == before
    assert [p.name for p in tmp_path.iterdir()] == []  # no output, no temporary folder


CLI_FAULTS = [  # (module, arguments with {gguf}, {adapter}, {model}, {tmp}; exit code; what the line says)
    ("gain_mlx.convert", ["--gguf", "{tmp}/none.gguf", "--out", "{tmp}/o"], 1, "not found"),
    ("gain_mlx.convert", ["--gguf", "{tmp}", "--out", "{tmp}/o"], 1, ""),
    ("gain_mlx.convert", ["--out", "{tmp}/o"], 2, "--gguf"),
    ("gain_mlx.export", ["--gguf", "{tmp}/none.gguf", "--adapter-path", "{adapter}", "--out", "{tmp}/o.gguf"], 1, "not found"),
    ("gain_mlx.export", ["--gguf", "{gguf}", "--adapter-path", "{adapter}", "--out", "{gguf}"], 1, "input"),
    ("gain_mlx.export", ["--gguf", "{gguf}", "--adapter-path", "{tmp}/none", "--out", "{tmp}/o.gguf"], 1, "not found"),
    ("gain_mlx.export", ["--gguf", "{gguf}", "--adapter-path", "{adapter}", "--out", "{tmp}/no/o.gguf"], 1, "does not exist"),
    ("gain_mlx.export", ["--gguf", "{gguf}", "--adapter-path", "{adapter}", "--out", "{tmp}/o.gguf", "--fallback", "x"], 2, "--fallback"),
    ("gain_mlx.fuse", ["--model", "{tmp}/none", "--adapter-path", "{adapter}", "--save-path", "{tmp}/o"], 1, ""),
    ("gain_mlx.fuse", ["--model", "{model}", "--adapter-path", "{tmp}/none", "--save-path", "{tmp}/o"], 1, "not found"),
    ("gain_mlx.fuse", ["--model", "{model}", "--adapter-path", "{adapter}/gain_config.json", "--save-path", "{tmp}/o"], 1, "is a file"),
]


@pytest.mark.parametrize("module, args, want_code, match", CLI_FAULTS, ids=lambda x: str(x)[:40])
def test_cli_bad_input(gguf_file, adapter_dir, tiny_model_dir, tmp_path, module, args, want_code, match):
    names = dict(gguf=gguf_file, adapter=adapter_dir, model=tiny_model_dir, tmp=tmp_path)
    before = digest(gguf_file), digest(adapter_dir)
    code, err = run_cli(module, *[a.format(**names) for a in args])
    assert "Traceback" not in err, err
    assert code == want_code, (code, err)
    assert match in err.strip().splitlines()[-1], err
    if want_code == 1:
        assert err.strip().splitlines()[-1].startswith("error: "), err
    assert (digest(gguf_file), digest(adapter_dir)) == before
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.gguf").exists()


def test_atomic_write_removes_stale_temporaries(tmp_path):
    from gain_mlx.files import atomic_write

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".tmp-{dead.stdout.strip()}-x.json"
    stale.write_text("half")
    live = tmp_path / ".tmp-1-x.json"  # pid 1 is alive: its write may be in progress
    live.write_text("in progress")
    atomic_write(tmp_path / "x.json", lambda tmp: tmp.write_text("{}"))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "x.json"])


def test_export_force_disk_full_keeps_previous_output(gguf_file, adapter_dir, tmp_path):
    """A --force export that fails mid-write (disk full) leaves the earlier output as it was."""
    assert gguf_file.stat().st_size > 64 * 1024  # the copy must cross _small_disk's limit
    out = tmp_path / "o.gguf"
    out.write_bytes(b"the previous export")
    code, err = run_cli("gain_mlx.export", "--gguf", gguf_file, "--adapter-path", adapter_dir, "--out", out,
                        "--force", preexec_fn=_small_disk)
    assert_one_line(code, err, f"no space left writing {out}")
    assert out.read_bytes() == b"the previous export"
    assert [p.name for p in tmp_path.iterdir()] == ["o.gguf"]  # no temporary left behind


def _no_model_type(adapter_dir, tmp_path):
    import json

    bad = shutil.copytree(adapter_dir, tmp_path / "no_model_type")
    cfg = json.loads((bad / A.CONFIG_FILE).read_text())
    del cfg["model_type"]
    (bad / A.CONFIG_FILE).write_text(json.dumps(cfg))
    return bad


PROBES = {  # file name -> content
    "malformed.jsonl": '{"word": "a", "choices": ["x", "y"], "answer": 0}\n{not json\n',
    "incomplete.jsonl": '{"word": "a", "choices": ["x", "y"]}\n',
    "bad_answer.jsonl": '{"word": "a", "choices": ["x", "y"], "answer": 5}\n',
    "empty.jsonl": "\n",
}

NEWER_CLI_FAULTS = [
    ("gain_mlx.generate", ["--model", "{model}", "--prompt", "x", "--seed", "-1"], 2, "--seed"),
    ("gain_mlx.generate", ["--model", "{model}", "--prompt", "x", "--temp", "-1"], 2, "--temp"),
    ("gain_mlx.generate", ["--model", "{model}", "--prompt", "x", "--temp", "nan"], 2, "--temp"),
    ("gain_mlx.chat", ["--model", "{model}", "--seed", "18446744073709551616"], 2, "--seed"),
    ("gain_mlx.generate", ["--model", "{model}", "--prompt", "x", "--adapter-path", "{no_model_type}"], 1, "model_type"),
    *[("gain_mlx.probe", ["--model", "{model}", "--probe", "{tmp}/" + name], 1, name) for name in PROBES],
    ("gain_mlx.sequential", ["--out", "{tmp}/seq", "--report"], 1, "bad.json"),
    ("gain_mlx.serve", ["--model", "{model}", "--api-key", ""], 2, "--api-key"),
]


@pytest.mark.parametrize("module, args, want_code, match", NEWER_CLI_FAULTS, ids=lambda x: str(x)[:40])
def test_newer_cli_bad_input(adapter_dir, tiny_model_dir, tmp_path, module, args, want_code, match):
    """generate, chat, probe, sequential --report and serve: one error line naming the flag or file."""
    for name, text in PROBES.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "seq" / "runs").mkdir(parents=True)
    (tmp_path / "seq" / "runs" / "bad.json").write_text('{"run": ')
    names = dict(model=tiny_model_dir, tmp=tmp_path, no_model_type=_no_model_type(adapter_dir, tmp_path))
    code, err = run_cli(module, *[a.format(**names) for a in args])
    assert_one_line(code, err, match, want_code)


def test_generate_stdin_not_utf8(tiny_model_dir):
    env = {"OPENBLAS_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONDONTWRITEBYTECODE": "1"}
    r = subprocess.run([sys.executable, "-m", "gain_mlx.generate", "--model", str(tiny_model_dir), "--prompt", "-"],
                       input=b"caf\xe9\xff", capture_output=True, cwd=ROOT, env=env, timeout=300)
    assert_one_line(r.returncode, r.stderr.decode(), "stdin is not UTF-8")


def test_upload_without_token_sends_nothing(adapter_dir, tmp_path):
    """No token: one line before any request (no Hub is reachable here: a request would hang or fail)."""
    env = {"PATH": "/usr/bin:/bin", "PYTHONDONTWRITEBYTECODE": "1", "HF_HOME": str(tmp_path / "hf"), "HOME": str(tmp_path),
           "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}
    r = subprocess.run([sys.executable, "-m", "gain_mlx.upload", "--path", str(adapter_dir), "--repo-id", "me/x"],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert r.stderr.strip().count("\n") == 0, r.stderr
    assert_one_line(r.returncode, r.stderr, "no Hub token")
