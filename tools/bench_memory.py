"""Peak memory of training from a quantized GGUF at real model sizes, against the file's size.

Builds synthetic GGUFs with the shapes of Llama-3.2-1B, Llama-3.2-3B and Llama-3.1-8B and
llama.cpp's Q4_K_M type mix (Q4_K; Q6_K for the output layer, or the tied embedding,
and for attn_v / ffn_down in the layers llama.cpp gives more bits), random blocks with
sane scales. Then, each phase in a fresh process (peak RSS from its own rusage, MLX's
peak from ``mx.get_peak_memory``):

- ``convert``: the GGUF -> MLX folder (``quantized-float32``: the GPU policy's form with
  float32 compute, the compute this CPU can run; ``float32``: today's float copy);
- ``train``: one gain-ffn training step through ``gain_mlx.trainer.train_gains`` (batch 1,
  ``--seq`` tokens, gradient checkpointing, Adam), saving the adapter;
- ``fuse``: ``gain_mlx.fuse.fuse`` of that adapter into the MLX folder;
- ``export``: ``gain_mlx.gguf.export`` of that adapter into a copy of the GGUF.

Phases run under ``GAIN_MLX_POLICY=gpu`` with ``GAIN_MLX_DTYPE=float32``. The float32
path runs only where the float copy fits (``--float-max-gb``). The fp16 column (a GPU's
default compute) is computed from the tensors: the ``quantized-float16`` folder's size
plus half of the float32 step's memory above its own folder's size (activations, gains,
optimizer state in half precision). Rows go to ``--json`` as each phase finishes.

    python tools/bench_memory.py --models llama-3.2-1b --json docs/bench_memory.json
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q, GGUFWriter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_export import random_blocks  # noqa: E402

SHAPES = {  # layers, hidden, ffn, heads, kv heads, vocab, tied embeddings, rope theta
    "llama-3.2-1b": dict(layers=16, hidden=2048, ffn=8192, heads=32, kv=8, vocab=128256, tied=True),
    "llama-3.2-3b": dict(layers=28, hidden=3072, ffn=8192, heads=24, kv=8, vocab=128256, tied=True),
    "llama-3.1-8b": dict(layers=32, hidden=4096, ffn=14336, heads=32, kv=8, vocab=128256, tied=False),
}
SCALE = {Q.Q4_K: 2e-5, Q.Q6_K: 1e-5}  # value of every float scale field: weights ~1e-2
GB = 1e9


def more_bits(i: int, n: int) -> bool:
    """llama.cpp's ``use_more_bits``: the layers whose attn_v / ffn_down Q4_K_M keeps in Q6_K."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def tensors_of(s: dict):
    """(gguf name, (rows, cols), ggml type) of every matrix, Q4_K_M's choice of types."""
    n, h, kv = s["layers"], s["hidden"], s["hidden"] // s["heads"] * s["kv"]
    out = [("token_embd.weight", (s["vocab"], h), Q.Q6_K if s["tied"] else Q.Q4_K)]
    for i in range(n):
        heavy = Q.Q6_K if more_bits(i, n) else Q.Q4_K
        out += [
            (f"blk.{i}.attn_q.weight", (h, h), Q.Q4_K),
            (f"blk.{i}.attn_k.weight", (kv, h), Q.Q4_K),
            (f"blk.{i}.attn_v.weight", (kv, h), heavy),
            (f"blk.{i}.attn_output.weight", (h, h), Q.Q4_K),
            (f"blk.{i}.ffn_gate.weight", (s["ffn"], h), Q.Q4_K),
            (f"blk.{i}.ffn_up.weight", (s["ffn"], h), Q.Q4_K),
            (f"blk.{i}.ffn_down.weight", (h, s["ffn"]), heavy),
        ]
    if not s["tied"]:
        out.append(("output.weight", (s["vocab"], h), Q.Q6_K))
    return out


def write_synthetic(path: Path, s: dict) -> None:
    """A llama GGUF of shape ``s``, written one tensor at a time."""
    w = GGUFWriter(str(path), "llama")
    w.add_block_count(s["layers"])
    w.add_context_length(131072)
    w.add_embedding_length(s["hidden"])
    w.add_feed_forward_length(s["ffn"])
    w.add_head_count(s["heads"])
    w.add_head_count_kv(s["kv"])
    w.add_rope_freq_base(500000.0)
    w.add_layer_norm_rms_eps(1e-5)
    matrices = tensors_of(s)
    norms = [(f"blk.{i}.{k}.weight", s["hidden"]) for i in range(s["layers"]) for k in ("attn_norm", "ffn_norm")]
    norms.append(("output_norm.weight", s["hidden"]))
    for name, (rows, cols), qtype in matrices:
        block, size = GGML_QUANT_SIZES[qtype]
        nbytes = rows * cols // block * size
        w.add_tensor_info(name, (rows, cols // block * size), np.dtype(np.uint8), nbytes, qtype)
    for name, n in norms:
        w.add_tensor_info(name, (n,), np.dtype(np.float32), n * 4, Q.F32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(0)
    for _, (rows, cols), qtype in matrices:
        w.write_tensor_data(random_blocks(rows, cols, qtype, rng, SCALE[qtype]))
    for _, n in norms:
        w.write_tensor_data(np.ones(n, np.float32))
    w.close()


def write_tokenizer(folder: Path) -> None:
    """A small word-level tokenizer, so that mlx_lm.load (and fuse) accept the folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(253)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


# --- phases (each runs in its own process) ---------------------------------------------

def phase_convert(gguf: str, form: str, out: str) -> dict:
    from gain_mlx.gguf.convert import open_gguf, write_model

    out = Path(out)
    out.mkdir(parents=True)
    write_model(open_gguf(gguf), out, form)
    write_tokenizer(out)
    return {"folder_bytes": folder_bytes(out)}


def phase_train(folder: str, adapter: str, seq: int) -> dict:
    import mlx.core as mx
    import mlx.optimizers as optim
    from mlx_lm.tuner.trainer import TrainingArgs
    from mlx_lm.utils import load_model

    from gain_mlx.adapter import adapter_config, apply_gains, save_adapter
    from gain_mlx.trainer import train_gains

    model, _ = load_model(Path(folder))
    targets = apply_gains(model, variant="gain-ffn", tie_kv=True)
    rng = np.random.default_rng(0)
    data = [(rng.integers(3, 256, seq).tolist(), 0) for _ in range(2)]
    args = TrainingArgs(batch_size=1, iters=1, max_seq_length=seq, grad_checkpoint=True,
                        steps_per_report=1, steps_per_eval=10**9, steps_per_save=10**9)
    t = time.perf_counter()
    metrics = train_gains(model, optim.Adam(learning_rate=1e-3), data, None, args, log=lambda *a: None)
    seconds = time.perf_counter() - t
    save_adapter(model, Path(adapter), adapter_config(model, targets, "gain-ffn", True))
    return {"step_s": round(seconds, 1), "loss": metrics.get("train_loss"),
            "mlx_peak_bytes": mx.get_peak_memory()}


def phase_train_cli(folder: str, adapter: str, seq: int) -> dict:
    """The same step through ``python -m gain_mlx.train`` (data, validation at step 0 and
    at the end, checkpoint): what a user runs."""
    from gain_mlx.train import main as train_main

    data = Path(adapter).parent / "data"
    data.mkdir(exist_ok=True)
    line = json.dumps({"text": " ".join(f"w{i % 250}" for i in range(seq * 2))})
    for split in ("train", "valid"):
        (data / f"{split}.jsonl").write_text((line + "\n") * 2)
    train_main(["--model", folder, "--data", str(data), "--adapter-path", adapter, "--iters", "1",
                "--batch-size", "1", "--max-seq-length", str(seq), "--grad-checkpoint", "--val-batches", "1",
                "--retain-data", "none"])
    return {}


def phase_fuse(folder: str, adapter: str, out: str) -> dict:
    import mlx.core as mx

    from gain_mlx.fuse import fuse

    fuse(folder, adapter, out, verbose=False)
    return {"mlx_peak_bytes": mx.get_peak_memory()}


def phase_export(gguf: str, adapter: str, out: str) -> dict:
    from gain_mlx.gguf.export import export_gguf

    export_gguf(gguf, adapter, out, log=lambda line: None)
    return {}


PHASES = {"convert": phase_convert, "train": phase_train, "train-cli": phase_train_cli, "fuse": phase_fuse,
          "export": phase_export}


def run_phase(name: str, *args) -> dict:
    """Run one phase in a child; its result, wall time and peak RSS (rusage via wait4)."""
    env = {**os.environ, "GAIN_MLX_POLICY": "gpu", "GAIN_MLX_DTYPE": "float32"}
    cmd = [sys.executable, __file__, "--child", name, *map(str, args)]
    t = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True)
    out = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"error: phase {name} failed ({' '.join(cmd)})")
    result = json.loads(out.strip().splitlines()[-1])
    return {**result, "wall_s": round(time.perf_counter() - t, 1), "rss_bytes": usage.ru_maxrss * 1024}


def bench_model(name: str, work: Path, seq: int, float_max_gb: float, record, cli: bool = False) -> None:
    s = SHAPES[name]
    gguf = work / f"{name}.Q4_K_M.gguf"
    t = time.perf_counter()
    write_synthetic(gguf, s)
    file_bytes = gguf.stat().st_size
    params = sum(r * c for _, (r, c), _ in tensors_of(s))
    print(f"{name}: synthetic Q4_K_M GGUF {file_bytes / GB:.2f} GB, {params / 1e9:.2f}B parameters "
          f"in matrices (built in {time.perf_counter() - t:.0f} s)", flush=True)
    base = {"model": name, "file_bytes": file_bytes, "params": params, "seq": seq}

    def row(path, phase, result):
        r = {**base, "path": path, "phase": phase, **result,
             "rss_x_file": round(result["rss_bytes"] / file_bytes, 2)}
        if "mlx_peak_bytes" in result:
            r["mlx_peak_x_file"] = round(result["mlx_peak_bytes"] / file_bytes, 2)
        print("  " + ", ".join(f"{k}={v}" for k, v in r.items() if k not in base), flush=True)
        record(r)
        return r

    q32, q16, adapter = work / "q32", work / "q16", work / "adapter"
    row("quantized-float32", "convert", run_phase("convert", gguf, "quantized-float32", q32))
    step = row("quantized-float32", "train", run_phase("train", q32, adapter, seq))
    if cli:
        row("quantized-float32", "train (CLI)", run_phase("train-cli", q32, work / "adapter-cli", seq))
    row("quantized-float32", "fuse", run_phase("fuse", q32, adapter, work / "fused"))
    shutil.rmtree(work / "fused")
    row("quantized-float32", "export", run_phase("export", gguf, adapter, work / "out.gguf"))
    (work / "out.gguf").unlink()
    conv16 = row("quantized-float16", "convert", run_phase("convert", gguf, "quantized-float16", q16))
    above = step["rss_bytes"] - folder_bytes(q32)
    estimate = conv16["folder_bytes"] + above / 2
    record({**base, "path": "quantized-float16", "phase": "train (computed)", "bytes": int(estimate),
            "x_file": round(estimate / file_bytes, 2)})
    print(f"  fp16 compute, computed: {estimate / GB:.2f} GB = {estimate / file_bytes:.2f}x the file", flush=True)
    for folder in (q32, q16, adapter):
        shutil.rmtree(folder)
    float_bytes = params * 4
    if float_bytes / GB <= float_max_gb:
        f32 = work / "f32"
        row("float32", "convert", run_phase("convert", gguf, "float32", f32))
        row("float32", "train", run_phase("train", f32, adapter, seq))
        shutil.rmtree(f32)
        shutil.rmtree(adapter)
    else:
        print(f"  float32 path: not run (a float copy is {float_bytes / GB:.1f} GB > --float-max-gb "
              f"{float_max_gb})", flush=True)
        record({**base, "path": "float32", "phase": "train", "skipped": f"float copy {float_bytes / GB:.1f} GB"})
    gguf.unlink()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(SHAPES), help=f"comma-separated, of {', '.join(SHAPES)}")
    p.add_argument("--seq", type=int, default=16, help="tokens in the training step's one sequence")
    p.add_argument("--float-max-gb", type=float, default=14.0,
                   help="run the float32 path where the float copy is at most this large")
    p.add_argument("--dir", default=tempfile.gettempdir(), help="where the synthetic files go")
    p.add_argument("--cli", action="store_true", help="also run the step through python -m gain_mlx.train")
    p.add_argument("--json", help="append each row here (JSON list)")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        name, *rest = args.child
        result = PHASES[name](*(int(a) if a.isdigit() else a for a in rest))
        print("\n" + json.dumps(result))
        return
    rows = json.loads(Path(args.json).read_text()) if args.json and Path(args.json).exists() else []

    def record(r):
        rows.append(r)
        if args.json:
            tmp = Path(args.json).with_suffix(".tmp")
            tmp.write_text(json.dumps(rows, indent=1) + "\n")
            tmp.replace(args.json)

    for name in args.models.split(","):
        work = Path(tempfile.mkdtemp(prefix=f"bench_memory.{name}.", dir=args.dir))
        try:
            bench_model(name, work, args.seq, args.float_max_gb, record, args.cli)
        finally:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
