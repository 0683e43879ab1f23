"""Fault suite, part 2: processes killed (SIGKILL), interrupted (SIGINT/SIGTERM), out of
disk and denied permission. After each: at most a ``.tmp-<pid>-*`` temporary remains,
the next run removes it, a previous output is intact, a resumed training run ends where
an uninterrupted one does, and the GGUF cache never serves a half-written conversion.

Kill points are chosen with Python audit events (``tests/kill_at.py``): no test hook in
the code under test.
"""

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from mlx_lm import load

from gain_mlx import adapter as A
from gain_mlx.trainer import CHECKPOINT_FILE

from gguf_fixtures import tiny_for_gguf, write_gguf  # noqa: E402
from test_faults import assert_one_line, digest  # noqa: E402

pytestmark = pytest.mark.slow  # each test runs and kills CLI processes

ROOT = Path(__file__).resolve().parents[1]
KILL_AT = Path(__file__).resolve().parent / "kill_at.py"
ENV = {"OPENBLAS_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}


def _default_sigint():
    """A shell's background job starts with SIGINT ignored, and Python then keeps ignoring it:
    give the child the default disposition, as an interactive Ctrl-C would find it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run(module, *args, kill=None, cwd=None, preexec_fn=None, env=None):
    """``python -m module args``, optionally under kill_at.py with ``kill`` =
    (event, pattern, nth, *flags); returns (exit code, stdout + stderr)."""
    cmd = [sys.executable, "-m", module, *map(str, args)]
    if kill:
        event, pattern, nth, *flags = kill
        cmd = [sys.executable, str(KILL_AT), event, pattern, str(nth), *flags, "-m", module, *map(str, args)]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd or ROOT, preexec_fn=preexec_fn or _default_sigint,
                       env={**ENV, **(env or {})}, timeout=300)
    return r.returncode, r.stdout + r.stderr


def temporaries(folder: Path):
    return sorted(p.name for p in folder.rglob(".tmp-*")) + sorted(p.name for p in folder.rglob(".old-*"))


def killed(code, out):
    assert code == -signal.SIGKILL, (code, out)


@pytest.fixture(scope="module")
def trained_adapter(tiny_model_dir, tiny_data_dir, tmp_path_factory):
    """An adapter whose gains moved away from 1 (so a fold changes the weights)."""
    path = tmp_path_factory.mktemp("trained") / "a"
    code, out = run("gain_mlx.train", *TRAIN(tiny_model_dir, tiny_data_dir), "--adapter-path", path, "--iters", "4")
    assert code == 0, out
    return path


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    return write_gguf(tmp_path_factory.mktemp("gguf") / "m.gguf", tiny_for_gguf("llama"))


def TRAIN(model, data):
    return ["--model", model, "--data", data, "--learning-rate", "1e-2", "--steps-per-eval", "100",
            "--save-every", "4", "--val-batches", "1", "--max-seq-length", "128", "--batch-size", "4",
            "--steps-per-report", "5", "--retain-data", "none", "--no-fast-blas"]


# --- train: kill -9 and resume --------------------------------------------------------

@pytest.fixture(scope="module")
def straight(tiny_model_dir, tiny_data_dir, tmp_path_factory):
    """Gains of an uninterrupted 8-step run (tests/test_train.py resumes across an epoch)."""
    path = tmp_path_factory.mktemp("straight") / "a"
    code, out = run("gain_mlx.train", *TRAIN(tiny_model_dir, tiny_data_dir), "--adapter-path", path, "--iters", "8",
                    "--save-every", "2")
    assert code == 0, out
    return A.read_adapter(path)[1]


RESUME_KILLS = [  # where the first run dies (checkpoints at steps 2, 4, 6, 8)
    ("rename", ".tmp-*-trainer_state.json", 2),  # step 4: checkpoint and adapter written, state not
    ("rename", ".tmp-*-history.json", 2),  # step 4: all but the history written
    ("rename", ".tmp-*-checkpoint.safetensors", 3, "--truncate"),  # mid-write of step 6's checkpoint
    ("rename", ".tmp-*-gain_config.json", 3),  # step 6: checkpoint and gains written, config not
]


@pytest.mark.parametrize("kill", RESUME_KILLS, ids=lambda k: f"{k[1]}#{k[2]}")
def test_resume_after_kill_matches_uninterrupted(tiny_model_dir, tiny_data_dir, tmp_path, straight, kill):
    adapter = tmp_path / "a"
    common = [*TRAIN(tiny_model_dir, tiny_data_dir), "--adapter-path", adapter, "--iters", "8", "--save-every", "2"]
    killed(*run("gain_mlx.train", *common, kill=kill))
    assert len(temporaries(adapter)) <= 1
    A.read_adapter(adapter)  # the adapter on disk is a whole one (an earlier checkpoint's)
    code, out = run("gain_mlx.train", *common, "--resume")
    assert code == 0, out
    want = 6 if kill[2] == 3 and "--truncate" not in kill else 4
    assert f"Resuming from step {want}" in out, out
    _, gains = A.read_adapter(adapter)
    for k in straight:
        np.testing.assert_allclose(gains[k], straight[k], rtol=0, atol=1e-6)
    assert temporaries(adapter) == []
    assert json.loads((adapter / "trainer_state.json").read_text())["step"] == 8


def test_train_killed_mid_first_checkpoint(tiny_model_dir, tiny_data_dir, tmp_path):
    adapter = tmp_path / "a"
    common = [*TRAIN(tiny_model_dir, tiny_data_dir), "--adapter-path", adapter, "--iters", "4"]
    killed(*run("gain_mlx.train", *common, kill=("rename", ".tmp-*-checkpoint.safetensors", 1, "--truncate")))
    assert [p.name for p in adapter.iterdir()] == temporaries(adapter) and len(temporaries(adapter)) == 1
    code, out = run("gain_mlx.train", *common, "--resume")
    assert_one_line(code, out, "--resume: no checkpoint")
    code, out = run("gain_mlx.train", *common)
    assert code == 0, out
    assert temporaries(adapter) == [] and (adapter / CHECKPOINT_FILE).is_file()


# --- fuse, export, convert: kill -9 --------------------------------------------------

def fuse_args(model, adapter, out, *extra):
    return ["--model", model, "--adapter-path", adapter, "--save-path", out, "--no-fast-blas", *extra]


@pytest.mark.parametrize("kill", [("mkdir", ".tmp-*-out", 1), ("open", "README.md", 1),
                                  ("rename", ".tmp-*-out", 1, "--truncate")], ids=lambda k: k[1])
def test_fuse_killed_leaves_no_output(tiny_model_dir, trained_adapter, tmp_path, kill):
    out = tmp_path / "out"
    killed(*run("gain_mlx.fuse", *fuse_args(tiny_model_dir, trained_adapter, out), kill=kill))
    assert not out.exists() and len(temporaries(tmp_path)) <= 1
    code, text = run("gain_mlx.fuse", *fuse_args(tiny_model_dir, trained_adapter, out))
    assert code == 0, text
    assert temporaries(tmp_path) == [] and (out / "config.json").is_file()


@pytest.fixture(scope="module")
def fused_twice(tiny_model_dir, adapter_dir, trained_adapter, tmp_path_factory):
    """Two different complete fused folders (identity gains and trained gains)."""
    base = tmp_path_factory.mktemp("fused")
    outs = []
    for name, adapter in (("first", adapter_dir), ("second", trained_adapter)):
        code, text = run("gain_mlx.fuse", *fuse_args(tiny_model_dir, adapter, base / name))
        assert code == 0, text
        outs.append(base / name)
    assert digest(outs[0]) != digest(outs[1])
    return outs


FORCE_KILLS = [  # (kill point, --no-swap, what --save-path holds right after the kill)
    (("rename", ".tmp-*-out", 1), False, "previous"),  # finished, not yet swapped in
    (("rmtree", ".tmp-*-out", 1), False, "new"),  # swapped; removing the previous output
    (("rename", "out", 3, "--no-swap"), True, "missing"),  # two-rename path: previous moved aside
]


@pytest.mark.parametrize("kill, no_swap, after", FORCE_KILLS, ids=lambda x: str(x)[:30])
def test_fuse_force_killed_keeps_previous(tiny_model_dir, trained_adapter, fused_twice, tmp_path, kill, no_swap, after):
    out = tmp_path / "out"
    shutil.copytree(fused_twice[0], out)
    previous = digest(out)
    killed(*run("gain_mlx.fuse", *fuse_args(tiny_model_dir, trained_adapter, out, "--force"), kill=kill))
    assert {"previous": out.exists() and digest(out) == previous, "new": out.exists() and digest(out) != previous,
            "missing": not out.exists()}[after], temporaries(tmp_path)
    # the next run cleans up first: without --force it refuses, with the previous output back
    code, text = run("gain_mlx.fuse", *fuse_args(tiny_model_dir, trained_adapter, out))
    assert_one_line(code, text, "already exists")
    assert temporaries(tmp_path) == []
    if after != "new":
        assert digest(out) == previous
    code, text = run("gain_mlx.fuse", *fuse_args(tiny_model_dir, trained_adapter, out, "--force"))
    assert code == 0 and temporaries(tmp_path) == [] and digest(out) != previous, text


def export_args(gguf, adapter, out, *extra):
    return ["--gguf", gguf, "--adapter-path", adapter, "--out", out, *extra]


@pytest.mark.parametrize("kill, force", [(("open", ".tmp-*-o.gguf", 1), False),
                                         (("rename", ".tmp-*-o.gguf", 1, "--truncate"), False),
                                         (("rename", ".tmp-*-o.gguf", 1, "--truncate"), True)],
                         ids=["fresh-open", "fresh-rename", "force-rename"])
def test_export_killed(gguf_file, adapter_dir, trained_adapter, tmp_path, kill, force):
    out = tmp_path / "o.gguf"
    previous = None
    if force:
        code, text = run("gain_mlx.export", *export_args(gguf_file, adapter_dir, out))
        assert code == 0, text
        previous = digest(out)
    before = digest(gguf_file)
    killed(*run("gain_mlx.export", *export_args(gguf_file, trained_adapter, out, "--force"), kill=kill))
    assert digest(gguf_file) == before
    assert (digest(out) if out.exists() else None) == previous
    assert len(temporaries(tmp_path)) <= 1  # none if killed as the temporary was being created
    code, text = run("gain_mlx.export", *export_args(gguf_file, trained_adapter, out, "--force"))
    assert code == 0, text
    assert temporaries(tmp_path) == [] and digest(out) != previous


@pytest.mark.parametrize("kill", [("open", "config.json", 1), ("rename", ".tmp-*-conv", 1, "--truncate")],
                         ids=lambda k: k[0])
def test_convert_killed(gguf_file, tmp_path, kill):
    out = tmp_path / "conv"
    killed(*run("gain_mlx.convert", "--gguf", gguf_file, "--out", out, kill=kill))
    assert not out.exists() and len(temporaries(tmp_path)) == 1
    code, text = run("gain_mlx.convert", "--gguf", gguf_file, "--out", out)
    assert code == 0, text
    assert temporaries(tmp_path) == [] and (out / "config.json").is_file()


# --- the GGUF conversion cache -------------------------------------------------------

CACHED = "import sys; from gain_mlx.gguf.convert import cached_convert; print(cached_convert(sys.argv[1]))"


def cached(gguf, cache, kill=None):
    cmd = [sys.executable, "-c", CACHED, str(gguf)]
    if kill:
        event, pattern, nth, *flags = kill
        cmd = [sys.executable, str(KILL_AT), event, pattern, str(nth), *flags, "-c", CACHED, str(gguf)]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**ENV, "GAIN_MLX_CACHE": str(cache)},
                       timeout=300)
    return r.returncode, r.stdout.strip(), r.stderr


@pytest.mark.parametrize("kill", [("open", "*complete*", 1), ("rename", ".tmp-*-m-float32-*", 1, "--truncate")],
                         ids=lambda k: k[1])
def test_cache_never_serves_half_a_conversion(gguf_file, tmp_path, kill):
    code, _, err = cached(gguf_file, tmp_path, kill=kill)
    assert code == -signal.SIGKILL, err
    root = tmp_path / "gguf"
    assert [p.name for p in root.iterdir() if p.name != "locks" and not p.name.startswith(".tmp-")] == []
    code, out, err = cached(gguf_file, tmp_path)
    assert code == 0 and "converting" in err, err
    assert temporaries(root) == [] and (Path(out) / "config.json").is_file()
    code, again, err = cached(gguf_file, tmp_path)
    assert code == 0 and again == out and "using cached" in err, err
    load(out)


def test_cache_replaces_an_unmarked_folder(gguf_file, tmp_path):
    code, out, err = cached(gguf_file, tmp_path)
    assert code == 0, err
    out = Path(out)
    (out / ".gain_mlx-complete.json").unlink()
    (out / "model.safetensors").write_bytes(b"half")  # what an old, non-atomic writer might leave
    code, again, err = cached(gguf_file, tmp_path)
    assert code == 0 and again == str(out) and "removing incomplete" in err, err
    load(str(out))


def test_cache_concurrent_runs_convert_once(gguf_file, tmp_path):
    """Runs that meet at the lock wait for each other (the test holds it first, as a
    converting process would) and convert once."""
    fcntl = pytest.importorskip("fcntl")
    from gain_mlx.gguf.convert import cache_key

    env = {**ENV, "GAIN_MLX_CACHE": str(tmp_path)}
    locks = tmp_path / "gguf" / "locks"
    locks.mkdir(parents=True)
    with open(locks / f"{cache_key(gguf_file, 'float32')}.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        procs = [subprocess.Popen([sys.executable, "-c", CACHED, str(gguf_file)], cwd=ROOT, env=env, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(3)]
        errs = [[] for _ in procs]  # stderr lines, read as they come: the lock is released once all wait
        readers = [threading.Thread(target=lambda p, e: e.extend(p.stderr), args=(p, e)) for p, e in zip(procs, errs)]
        for reader in readers:
            reader.start()
        deadline = time.monotonic() + 240  # a loaded machine takes long to start three Pythons
        while time.monotonic() < deadline and not all(any("waiting for another" in x for x in e) for e in errs):
            assert all(p.poll() is None for p in procs), errs  # none may convert while the lock is held
            time.sleep(0.2)
    outs = [p.stdout.read() for p in procs]  # stderr is the readers' (communicate would race them)
    for p, reader in zip(procs, readers):
        p.wait(timeout=300)
        reader.join()
    results = [(out, "".join(err), p.returncode) for out, err, p in zip(outs, errs, procs)]
    assert sum("waiting for another process" in err for _, err, _ in results) == 3, results
    assert all(code == 0 for _, _, code in results), results
    assert len({out.strip() for out, _, _ in results}) == 1
    assert sum("] converting" in err for _, err, _ in results) == 1, results
    assert temporaries(tmp_path) == []


# --- SIGINT / SIGTERM: one line, temporaries removed ---------------------------------

def interrupted(code, out, sig):
    assert code == (130 if sig == "--signal=INT" else 128 + signal.SIGTERM), (code, out)
    assert "Traceback" not in out, out
    assert out.strip().splitlines()[-1].startswith("error: interrupted"), out


SIGNAL_CASES = [  # (module, args builder, kill point); the signal arrives just after the open
    ("gain_mlx.train", lambda m, d, a, g, t: [*TRAIN(m, d), "--adapter-path", t / "a", "--iters", "8"],
     ("open", ".tmp-*-trainer_state.json", 2)),
    ("gain_mlx.fuse", lambda m, d, a, g, t: fuse_args(m, a, t / "out"), ("open", "README.md", 1)),
    ("gain_mlx.export", lambda m, d, a, g, t: export_args(g, a, t / "o.gguf"), ("open", ".tmp-*-o.gguf", 1)),
    ("gain_mlx.convert", lambda m, d, a, g, t: ["--gguf", g, "--out", t / "conv"], ("open", "config.json", 1)),
]


@pytest.mark.parametrize("module, args, kill, sig", [(*c, s) for c, s in zip(SIGNAL_CASES, ["--signal=INT", "--signal=TERM"] * 2)],
                         ids=lambda x: x if isinstance(x, str) else "")
def test_interrupt_removes_temporaries(tiny_model_dir, tiny_data_dir, trained_adapter, gguf_file, tmp_path,
                                       module, args, kill, sig):
    argv = args(tiny_model_dir, tiny_data_dir, trained_adapter, gguf_file, tmp_path)
    code, out = run(module, *argv, kill=(*kill, sig))
    interrupted(code, out, sig)
    assert temporaries(tmp_path) == [], temporaries(tmp_path)
    assert not (tmp_path / "out").exists() and not (tmp_path / "o.gguf").exists() and not (tmp_path / "conv").exists()


def test_sigterm_from_outside_during_training(tiny_model_dir, tiny_data_dir, tmp_path):
    """A real SIGTERM from another process in the middle of a long run."""
    adapter = tmp_path / "a"
    p = subprocess.Popen([sys.executable, "-m", "gain_mlx.train", *map(str, TRAIN(tiny_model_dir, tiny_data_dir)),
                          "--adapter-path", str(adapter), "--iters", "100000", "--save-every", "1"],
                         cwd=ROOT, env=ENV, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (adapter / CHECKPOINT_FILE).exists() and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=60)
    interrupted(p.returncode, err, "--signal=TERM")
    assert temporaries(adapter) == []
    A.read_adapter(adapter)
    code, text = run("gain_mlx.train", *TRAIN(tiny_model_dir, tiny_data_dir), "--adapter-path", adapter,
                     "--iters", "2", "--resume")
    assert code == 0 and "Resuming from step" in text, text


# --- disk full (RLIMIT_FSIZE) for export and fuse: previous output intact ------------

def _limit(size):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
    return apply


def test_export_disk_full_keeps_previous(gguf_file, adapter_dir, trained_adapter, tmp_path):
    out = tmp_path / "o.gguf"
    code, text = run("gain_mlx.export", *export_args(gguf_file, adapter_dir, out))
    assert code == 0, text
    previous, before = digest(out), digest(gguf_file)
    code, text = run("gain_mlx.export", *export_args(gguf_file, trained_adapter, out, "--force"),
                     preexec_fn=_limit(gguf_file.stat().st_size // 2))
    assert_one_line(code, text, "no space left")
    assert digest(out) == previous and digest(gguf_file) == before and temporaries(tmp_path) == []


def test_fuse_disk_full_keeps_previous(tiny_model_dir, trained_adapter, fused_twice, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(fused_twice[0], out)
    previous = digest(out)
    code, text = run("gain_mlx.fuse", *fuse_args(tiny_model_dir, trained_adapter, out, "--force"),
                     preexec_fn=_limit(64 * 1024))
    assert_one_line(code, text, "disk full")
    assert digest(out) == previous and temporaries(tmp_path) == []


def test_fuse_disk_full_fresh(tiny_model_dir, trained_adapter, tmp_path):
    code, text = run("gain_mlx.fuse", *fuse_args(tiny_model_dir, trained_adapter, tmp_path / "out"),
                     preexec_fn=_limit(64 * 1024))
    assert_one_line(code, text, "disk full")
    assert list(tmp_path.iterdir()) == []


def test_train_disk_full_keeps_checkpoint(tiny_model_dir, tiny_data_dir, tmp_path):
    adapter = tmp_path / "a"
    common = [*TRAIN(tiny_model_dir, tiny_data_dir), "--adapter-path", adapter]
    code, text = run("gain_mlx.train", *common, "--iters", "4")
    assert code == 0, text
    previous = digest(adapter)
    size = (adapter / CHECKPOINT_FILE).stat().st_size
    code, text = run("gain_mlx.train", *common, "--iters", "8", "--resume", preexec_fn=_limit(size - 1))
    assert_one_line(code, text, "disk full")
    assert temporaries(adapter) == []
    A.read_adapter(adapter)
    code, text = run("gain_mlx.train", *common, "--iters", "8", "--resume")
    assert code == 0 and "Resuming from step 4" in text, (text, previous)


# --- permissions: root ignores chmod, so /sys (EACCES even for root) and an unprivileged user --

needs_sys = pytest.mark.skipif(not Path("/sys/kernel").is_dir(), reason="no sysfs (Linux only)")


@needs_sys
@pytest.mark.parametrize("module, args", [
    ("gain_mlx.export", lambda t, m, a, g: export_args(g, a, "/sys/o.gguf")),
    ("gain_mlx.fuse", lambda t, m, a, g: fuse_args(m, a, "/sys/kernel/fused")),
    ("gain_mlx.convert", lambda t, m, a, g: ["--gguf", g, "--out", "/sys/kernel/conv"]),
], ids=lambda x: x if isinstance(x, str) else "")
def test_unwritable_output_is_one_line(tmp_path, tiny_model_dir, trained_adapter, gguf_file, module, args):
    code, text = run(module, *args(tmp_path, tiny_model_dir, trained_adapter, gguf_file))
    assert_one_line(code, text, "/sys")


@needs_sys
def test_train_unwritable_adapter_path(tiny_model_dir, tiny_data_dir):
    code, text = run("gain_mlx.train", *TRAIN(tiny_model_dir, tiny_data_dir), "--adapter-path", "/sys/kernel/a",
                     "--iters", "1")
    assert_one_line(code, text, "/sys/kernel/a")


def _as_nobody():
    os.setgid(65534)
    os.setgroups([])
    os.setuid(65534)


@pytest.fixture
def shared_dir(tmp_path_factory):
    """A folder an unprivileged user can enter (pytest's are private to root)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to the unprivileged user 'nobody'")
    path = Path(__import__("tempfile").mkdtemp(prefix="gain-perm-"))
    path.chmod(0o755)
    try:
        r = subprocess.run([sys.executable, "-c", "import gain_mlx.fuse"], preexec_fn=_as_nobody, cwd=path,
                           capture_output=True, env=ENV)
        why = r.stderr.decode()[-200:] if r.returncode else None
    except OSError as e:
        why = str(e)
    if why:
        shutil.rmtree(path)
        pytest.skip(f"the unprivileged user 'nobody' cannot run this Python ({why})")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_permission_denied_as_unprivileged_user(shared_dir, tiny_model_dir, trained_adapter, gguf_file):
    model, adapter, gguf = shared_dir / "model", shared_dir / "adapter", shared_dir / "m.gguf"
    shutil.copytree(tiny_model_dir, model)
    shutil.copytree(trained_adapter, adapter)
    shutil.copy(gguf_file, gguf)
    for p in [shared_dir, *shared_dir.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    locked = shared_dir / "locked"
    locked.mkdir(mode=0o755)  # owned by root: not writable for nobody
    secret = shared_dir / "secret.gguf"
    shutil.copy(gguf_file, secret)
    secret.chmod(0o600)
    cases = [
        ("gain_mlx.fuse", fuse_args(model, adapter, locked / "out"), "permission denied"),
        ("gain_mlx.export", export_args(gguf, adapter, locked / "o.gguf"), "permission denied"),
        ("gain_mlx.convert", ["--gguf", gguf, "--out", locked / "conv"], "permission denied"),
        ("gain_mlx.export", export_args(secret, adapter, shared_dir / "o.gguf"), "secret.gguf"),
    ]
    for module, args, match in cases:
        code, text = run(module, *args, preexec_fn=_as_nobody, cwd=shared_dir)
        assert_one_line(code, text, match)
    assert list(locked.iterdir()) == [] and not (shared_dir / "o.gguf").exists()


# --- tools/make_corpora.py: one line, exit 2 for usage, 1 for a broken download ------

@pytest.mark.parametrize("args, want_code, match", [
    (["--domains", "nope"], 2, "unknown domain"),
    (["--flat", "--domains", "legal,drama"], 2, "--flat"),
    (["--train-chars", "0"], 2, "--train-chars must be positive"),
    (["--domains", "legal"], 1, "unreadable"),
], ids=lambda x: str(x)[:30])
def test_make_corpora_errors(tmp_path, args, want_code, match):
    cache = tmp_path / "cache"
    (cache / "npm").mkdir(parents=True)
    (cache / "npm" / "spdx-license-list-6.12.0.tgz").write_bytes(b"not a tarball")  # a broken download
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "make_corpora.py"), "--out", str(tmp_path / "out"),
                        "--cache", str(cache), *args], capture_output=True, text=True, env=ENV, timeout=60)
    assert_one_line(r.returncode, r.stderr, match, want_code)
    assert not (tmp_path / "out").exists() or temporaries(tmp_path / "out") == []
