"""gain_mlx.cpu: the Linux optimized-BLAS fast path (as the device policy starts it) and float
copies of quantized models."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models.switch_layers import QuantizedSwitchLinear

from gain_mlx import cpu, policy
from gain_mlx.adapter import apply_gains

from conftest import tiny_model

ROOT = Path(__file__).resolve().parents[1]
FAST = cpu.find_fast_blas() if cpu.stock_blas() else None
needs_fast_blas = pytest.mark.skipif(
    FAST is None,
    reason="needs Linux mlx[cpu] with its stock BLAS and an optimized BLAS installed "
    f"({cpu.INSTALL_HINT})",
)


def _env(**extra):
    drop = ("LD_PRELOAD", cpu.ENV_GUARD, cpu.ENV_SWITCH, policy.ENV_POLICY, policy.ENV_DTYPE)
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return {**env, **extra}


# Runs under a preloaded BLAS: an fp32 matmul and a tiny model's logits, to compare here.
WORKER = textwrap.dedent(
    """
    import json, sys
    import mlx.core as mx, numpy as np
    from gain_mlx import cpu
    sys.path.insert(0, sys.argv[2])
    from conftest import tiny_model
    rng = np.random.default_rng(0)
    a = rng.standard_normal((300, 200), dtype=np.float32)
    b = rng.standard_normal((200, 150), dtype=np.float32)
    model = tiny_model("qwen2")
    logits = model(mx.array([[1, 5, 9, 33, 2, 7]]))
    np.savez(sys.argv[1], matmul=np.array(mx.array(a) @ mx.array(b)), logits=np.array(logits))
    print(json.dumps({"blas": cpu.preloaded_blas()}))
    """
)


@needs_fast_blas
def test_preloaded_blas_matches_numpy_and_stock(tmp_path):
    script, out = tmp_path / "worker.py", tmp_path / "out.npz"
    script.write_text(WORKER)
    run = subprocess.run(
        [sys.executable, str(script), str(out), str(ROOT / "tests")],
        env=_env(LD_PRELOAD=FAST[1]), capture_output=True, text=True, check=True,
    )
    assert json.loads(run.stdout.splitlines()[-1])["blas"] == FAST[1]
    got = np.load(out)
    rng = np.random.default_rng(0)
    a = rng.standard_normal((300, 200), dtype=np.float32)
    b = rng.standard_normal((200, 150), dtype=np.float32)
    ref = a.astype(np.float64) @ b.astype(np.float64)
    np.testing.assert_allclose(got["matmul"], ref, rtol=0, atol=1e-4 * np.abs(ref).max())
    # The same tiny model in this process (stock BLAS unless pytest itself was preloaded).
    logits = np.array(tiny_model("qwen2")(mx.array([[1, 5, 9, 33, 2, 7]])))
    np.testing.assert_allclose(got["logits"], logits, rtol=1e-4, atol=1e-4)


CLI = textwrap.dedent(
    """
    import argparse, json, os
    from gain_mlx import cpu, policy

    def main():
        parser = argparse.ArgumentParser()
        cpu.add_fast_blas_argument(parser)
        args = parser.parse_args()
        policy.start(args.fast_blas)
        print(json.dumps({"blas": cpu.preloaded_blas(), "pid": os.getpid(),
                          "guard": os.environ.get(cpu.ENV_GUARD)}))

    if __name__ == "__main__":
        main()
    """
)


def _run_cli(tmp_path, *args, **env):
    script = tmp_path / "cli.py"
    script.write_text(CLI)
    run = subprocess.run(
        [sys.executable, str(script), *args], env=_env(**env), capture_output=True, text=True, check=True
    )
    return json.loads(run.stdout.splitlines()[-1]), run.stderr


@needs_fast_blas
def test_cli_reexecs_once_with_fast_blas(tmp_path):
    out, err = _run_cli(tmp_path)
    assert out["blas"] == FAST[1] and out["guard"] == "1"
    assert err.count(f"MLX CPU matmuls use {FAST[1]}") == 1
    assert err.count("[gain_mlx] policy: cpu (MLX on cpu; float32 compute; MLX CPU matmuls use") == 1


@needs_fast_blas
def test_gpu_policy_never_preloads(tmp_path):
    out, err = _run_cli(tmp_path, **{policy.ENV_POLICY: "gpu"})
    assert out["blas"] is None and out["guard"] is None
    assert err.strip().splitlines() == ["[gain_mlx] policy: gpu (GAIN_MLX_POLICY=gpu; MLX on cpu; "
                                        "float16 compute; plain MLX path)"]


@needs_fast_blas
@pytest.mark.parametrize("args,env", [(["--no-fast-blas"], {}), ([], {cpu.ENV_SWITCH: "0"})])
def test_fast_blas_can_be_turned_off(tmp_path, args, env):
    out, err = _run_cli(tmp_path, *args, **env)
    assert out["blas"] is None and out["guard"] is None
    assert "fast BLAS off" in err


@needs_fast_blas
def test_library_call_never_replaces_the_process(monkeypatch):
    monkeypatch.setenv(policy.ENV_POLICY, "cpu")
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.delenv(cpu.ENV_GUARD, raising=False)
    monkeypatch.delenv(cpu.ENV_SWITCH, raising=False)
    monkeypatch.setattr(os, "execve", lambda *a: pytest.fail("ensure_fast_blas re-executed pytest"))
    policy.start()  # called from a test function, not from __main__


def _quantized(model):
    nn.quantize(model, group_size=32, bits=4)
    return model


@pytest.mark.parametrize("model_type", ["qwen2", "mixtral"])
def test_dequantize_model_matches_quantized_forward(model_type):
    qmodel = _quantized(tiny_model(model_type))
    before = {k: v for k, v in tree_flatten(qmodel.parameters())}
    fmodel = cpu.dequantize_model(qmodel)

    quantized_types = (nn.QuantizedLinear, nn.QuantizedEmbedding, QuantizedSwitchLinear)
    assert not any(isinstance(m, quantized_types) for _, m in fmodel.named_modules())
    assert any(isinstance(m, quantized_types) for _, m in qmodel.named_modules())
    after = dict(tree_flatten(qmodel.parameters()))
    assert before.keys() == after.keys() and all(before[k] is after[k] for k in before)
    assert all(v.dtype == mx.float32 for k, v in tree_flatten(fmodel.parameters()) if "weight" in k)

    tokens = mx.array([[3, 17, 99, 4, 56, 8, 21]])
    np.testing.assert_allclose(np.array(fmodel(tokens)), np.array(qmodel(tokens)), rtol=1e-4, atol=1e-4)


def test_gains_on_dequantized_copy_train_only_gains():
    qmodel = _quantized(tiny_model("qwen2"))
    fmodel = cpu.dequantize_model(qmodel)
    targets = apply_gains(fmodel, variant="gain-ffn")
    trainable = dict(tree_flatten(fmodel.trainable_parameters()))
    assert sorted(trainable) == sorted(f"{t.path}.gain" for t in targets)
    # the quantized original keeps its layers: gains fold into it by the same paths
    assert all(isinstance(dict(qmodel.named_modules())[t.path], nn.QuantizedLinear) for t in targets)


def test_copy_model_shares_weights_not_structure():
    model = tiny_model("qwen2")
    copy = cpu.copy_model(model)
    apply_gains(copy, variant="gain")
    assert not any("gain" in k for k, _ in tree_flatten(model.parameters()))
    assert model.trainable_parameters()  # apply_gains froze the copy only
    w = model.model.layers[0].self_attn.o_proj.weight
    assert copy.model.layers[0].self_attn.o_proj.base.weight is w


def _only_pip_candidates(monkeypatch, tmp_path):
    """Point the system entries of the search at an empty folder (a machine without them)."""
    empty = str(tmp_path / "no-system-blas" / "libblas.so.3")
    pip_only = tuple((n, empty if "(system)" in n else p) for n, p in cpu.CANDIDATES)
    monkeypatch.setattr(cpu, "CANDIDATES", pip_only)


@pytest.mark.skipif(sys.platform != "linux" or os.uname().machine != "x86_64",
                    reason="the pip BLAS (mkl) is a dependency on Linux x86-64 only")
def test_search_finds_pip_blas_without_system_blas(monkeypatch, tmp_path):
    _only_pip_candidates(monkeypatch, tmp_path)
    found = cpu.find_fast_blas()
    assert found is not None, "pip's mkl is a dependency on Linux x86-64: it must be found"
    assert "pip" in found[0] and found[1].startswith(sys.prefix)


def test_no_fast_blas_falls_back_with_one_clear_line(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(cpu, "CANDIDATES", (("none", str(tmp_path / "absent.so")),))
    monkeypatch.setattr(cpu, "stock_blas", lambda: "/stock/libblas.so")
    monkeypatch.delenv(cpu.ENV_GUARD, raising=False)
    monkeypatch.delenv(cpu.ENV_SWITCH, raising=False)
    monkeypatch.setattr(cpu, "preloaded_blas", lambda: None)
    monkeypatch.setenv(policy.ENV_POLICY, "cpu")
    assert cpu.find_fast_blas() is None
    policy.start()  # returns: nothing to preload, the process goes on
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("[gain_mlx] policy: cpu (") and "pip install mkl" in err[0], err
