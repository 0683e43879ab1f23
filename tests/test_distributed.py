"""Data-parallel training: ``mlx.launch -n 2 --backend ring`` over loopback.

Two ranks each take half of every global batch (mlx-lm's ``iterate_batches`` with the
world group) and average gradients, so after training the gains must be the same on
both ranks and match one process trained on the same global batches. Every sequence is
cut to the same length, so both ranks average over equally many tokens (the mean of the
two ranks' mean losses is then exactly the global mean).
"""

import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = shutil.which("mlx.launch", path=str(Path(sys.executable).parent)) or shutil.which("mlx.launch")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(LAUNCH is None, reason="mlx.launch (from the mlx package) not found")]

TRAIN_ARGS = [
    "--batch-size", "4", "--max-seq-length", "24", "--iters", "4", "--learning-rate", "1e-2",
    "--steps-per-report", "2", "--steps-per-eval", "100", "--val-batches", "1", "--seed", "3",
]

# Runs gain_mlx.train's own main() on every rank and then dumps that rank's gains.
SPY = textwrap.dedent(
    """
    import sys
    import mlx.core as mx
    from gain_mlx import adapter, train

    world = mx.distributed.init()
    trained = train.train_gains

    def train_and_dump(model, *args, **kwargs):
        metrics = trained(model, *args, **kwargs)
        gains = {k: v.astype(mx.float32) for k, v in adapter.gain_parameters(model).items()}
        mx.save_safetensors(f"{sys.argv[1]}/rank{world.rank()}.safetensors", gains)
        return metrics

    train.train_gains = train_and_dump
    train.main(sys.argv[2:])
    """
)


def _env():
    env = dict(os.environ, GAIN_MLX_FAST_BLAS="0")  # same BLAS in every run compared
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def _free_ports(n=2):
    """A first port p such that p .. p+n-1 are free on loopback."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + n > 65535:
            continue
        socks = []
        try:
            for p in range(port, port + n):
                socks.append(socket.socket())
                socks[-1].bind(("127.0.0.1", p))
            return port
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    pytest.skip("no free loopback ports for the ring backend")


def _launch(command, timeout=600):
    cmd = [LAUNCH, "-n", "2", "--backend", "ring", "--starting-port", str(_free_ports()), "--", *command]
    run = subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    return run


def _gains(path):
    return {k: np.array(v) for k, v in mx.load(str(path)).items()}


def _assert_same(a, b, tol):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=0, atol=tol, err_msg=k)


@pytest.fixture(scope="module")
def single_run(tiny_model_dir, tiny_data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    argv = ["--model", str(tiny_model_dir), "--data", str(tiny_data_dir), "--adapter-path", str(out), *TRAIN_ARGS]
    subprocess.run(
        [sys.executable, "-m", "gain_mlx.train", *argv], env=_env(), cwd=ROOT, check=True, capture_output=True, timeout=600
    )
    gains = _gains(out / "gains.safetensors")
    assert max(np.abs(g - 1).max() for g in gains.values()) > 1e-3, "gains did not train"
    return gains


def test_two_ranks_match_single_process(tiny_model_dir, tiny_data_dir, tmp_path, single_run):
    out = tmp_path / "ring"
    argv = ["--model", str(tiny_model_dir), "--data", str(tiny_data_dir), "--adapter-path", str(out), *TRAIN_ARGS]
    _launch([sys.executable, "-m", "gain_mlx.train", *argv])
    _assert_same(_gains(out / "gains.safetensors"), single_run, tol=1e-5)


def test_gains_identical_on_every_rank(tiny_model_dir, tiny_data_dir, tmp_path, single_run):
    spy = tmp_path / "spy.py"
    spy.write_text(SPY)
    argv = ["--model", str(tiny_model_dir), "--data", str(tiny_data_dir), "--adapter-path", str(tmp_path / "a"), *TRAIN_ARGS]
    _launch([sys.executable, str(spy), str(tmp_path), *argv])
    rank0, rank1 = _gains(tmp_path / "rank0.safetensors"), _gains(tmp_path / "rank1.safetensors")
    _assert_same(rank0, rank1, tol=0)
    saved = _gains(tmp_path / "a" / "gains.safetensors")
    # the dump holds the gains by module path, the adapter file under "<path>.gain"
    _assert_same({f"{k}.gain": v for k, v in rank0.items()}, saved, tol=0)
    _assert_same(saved, single_run, tol=1e-5)
