"""MLX CPU speed with the stock reference BLAS against a preloaded optimized BLAS.

Each measurement runs in its own process (a BLAS can only be preloaded at start),
alternating stock / fast, and reports the median. Matmul results are checked against
numpy in float64.

    python tools/bench_blas.py                    # fp32 matmul GFLOP/s
    python tools/bench_blas.py --train tiny       # also a GAIN-FFN training step
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from gain_mlx import cpu  # noqa: E402


def matmul_worker(size, repeats):
    """GFLOP/s of an fp32 (size x size) @ (size x size) in mlx, and its error vs numpy."""
    import mlx.core as mx
    import numpy as np

    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((size, size), dtype=np.float32) for _ in range(2))
    ma, mb = mx.array(a), mx.array(b)
    mx.eval(ma @ mb)
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        c = ma @ mb
        mx.eval(c)
        times.append(time.perf_counter() - tic)
    ref = a.astype(np.float64) @ b.astype(np.float64)
    err = float(np.max(np.abs(np.array(c) - ref)) / np.max(np.abs(ref)))
    seconds = statistics.median(times)
    return {"gflops": 2 * size**3 / seconds / 1e9, "rel_err": err, "blas": cpu.preloaded_blas()}


def _env(fast_path):
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", cpu.ENV_GUARD)}
    if fast_path:
        env["LD_PRELOAD"] = fast_path
    return env


def run_matmul(fast_path, size, repeats):
    cmd = [sys.executable, __file__, "--worker", "--size", str(size), "--repeats", str(repeats)]
    out = subprocess.run(cmd, env=_env(fast_path), capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_train(fast_path, preset, tmp):
    cmd = [sys.executable, str(ROOT / "tools" / "bench_train.py"), "--preset", preset]
    cmd += ["--configs", "floor,gain-ffn", "--steps", "3", "--warmup", "1", "--json", tmp]
    cmd += [] if fast_path else ["--no-fast-blas"]
    subprocess.run(cmd, env=_env(fast_path), capture_output=True, text=True, check=True)
    return json.loads(Path(tmp).read_text())["gain-ffn"]["tokens_per_s"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3, help="alternating stock/fast processes")
    p.add_argument("--train", choices=("tiny", "smollm2"), help="also time GAIN-FFN training")
    p.add_argument("--blas", action="append", default=[], metavar="NAME=PATH",
                   help="also measure this library (repeatable); every installed candidate is measured")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(matmul_worker(args.size, args.repeats)))
        return None

    if cpu.stock_blas() is None:
        raise SystemExit("mlx here does not use the stock reference BLAS: nothing to compare")
    candidates = list(cpu.blas_candidates()) + [tuple(b.split("=", 1)) for b in args.blas]
    modes = {"stock": None}
    for name, path in candidates:
        if cpu._exports_cblas(path):
            modes.setdefault(name, path)
        else:
            print(f"{name}: {path} cannot be loaded (a dependency such as libgfortran.so.5 is missing)")
    if len(modes) == 1:
        raise SystemExit(f"no optimized BLAS found: {cpu.INSTALL_HINT}")
    results = {m: {"gflops": [], "rel_err": [], "train_tok_s": []} for m in modes}
    tmp = str(Path(os.environ.get("TMPDIR", "/tmp")) / f"bench_blas_{os.getpid()}.json")
    for _ in range(args.rounds):
        for mode, path in modes.items():
            r = run_matmul(path, args.size, args.repeats)
            if path and r["blas"] != path:
                raise SystemExit(f"preloading {path} did not take effect")
            results[mode]["gflops"].append(r["gflops"])
            results[mode]["rel_err"].append(r["rel_err"])
            if args.train:
                results[mode]["train_tok_s"].append(run_train(path, args.train, tmp))
    Path(tmp).unlink(missing_ok=True)

    print(f"fp32 matmul {args.size}^3, median of {args.rounds} processes x {args.repeats} runs")
    summary = {m: {k: statistics.median(v) if v else None for k, v in r.items()} for m, r in results.items()}
    for mode, s in summary.items():
        line = f"{mode:<32}{s['gflops']:>8.1f} GFLOP/s   max rel err vs numpy {max(results[mode]['rel_err']):.1e}"
        if args.train:
            line += f"   GAIN-FFN train ({args.train}) {s['train_tok_s']:.1f} tok/s"
        print(line)
    for mode, fast in summary.items():
        if mode == "stock":
            continue
        print(f"{mode}: speed-up matmul x{fast['gflops'] / summary['stock']['gflops']:.1f}", end="")
        if args.train:
            print(f", training x{fast['train_tok_s'] / summary['stock']['train_tok_s']:.1f}", end="")
        print()
    return summary


if __name__ == "__main__":
    main()
