"""Benchmark python -m gain_mlx.export against `cp` of the same GGUF.

Builds a synthetic llama GGUF of about --size-gb (random --qtype blocks with sane scales,
streamed to disk one tensor at a time; --vocab-strings tokenizer strings in its header, as
real GGUFs have) and a KV-tied gain-ffn adapter for it,
then times, in --rounds interleaved rounds (medians reported): `cp` of the file, `cp` +
`sync` of the copy (the export flushes its output before renaming it), and the export (a
fresh process: imports, header parse, copy, patch, flush, error check). Peak RSS is each child's own ru_maxrss.
Files live in --dir and are deleted afterwards (unless --keep).

    python tools/bench_export.py --size-gb 1 --json bench_export.json
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter

from gain_mlx.gguf.quants import CODECS, SCALES, blocks_of

HIDDEN, FFN, HEADS, KV_HEADS, VOCAB = 2048, 8192, 16, 4, 1024


def layer_shapes(i: int):
    """(name, (rows, cols)) of one block's matrices, llama layout (rows = outputs)."""
    kv = HIDDEN // HEADS * KV_HEADS
    return [
        (f"blk.{i}.attn_q.weight", (HIDDEN, HIDDEN)),
        (f"blk.{i}.attn_k.weight", (kv, HIDDEN)),
        (f"blk.{i}.attn_v.weight", (kv, HIDDEN)),
        (f"blk.{i}.attn_output.weight", (HIDDEN, HIDDEN)),
        (f"blk.{i}.ffn_gate.weight", (FFN, HIDDEN)),
        (f"blk.{i}.ffn_up.weight", (FFN, HIDDEN)),
        (f"blk.{i}.ffn_down.weight", (HIDDEN, FFN)),
    ]


def n_layers_for(size_gb: float, qtype) -> int:
    block, size = GGML_QUANT_SIZES[qtype]
    per_layer = sum(r * c for _, (r, c) in layer_shapes(0)) * size / block
    return max(1, int(np.ceil(size_gb * 2**30 / per_layer)))


def random_blocks(rows, cols, qtype, rng, scale: float = 0.01) -> np.ndarray:
    """Raw ``qtype`` bytes of a ``(rows, cols)`` tensor: random quant bits, every float
    scale field ``scale`` (also used by bench_memory and import_errors)."""
    block, size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (rows, cols // block * size), dtype=np.uint8)
    layout = SCALES[qtype]
    put = CODECS[layout.kind][1]
    blocks = blocks_of(raw, qtype)
    for o in layout.offsets:
        put(blocks, o, np.full(blocks.shape[:-1], scale))
    return raw


def write_synthetic(path: Path, size_gb: float, qtype, vocab_strings: int) -> int:
    n_layers = n_layers_for(size_gb, qtype)
    rng = np.random.default_rng(0)
    w = GGUFWriter(str(path), "llama")
    w.add_block_count(n_layers)
    w.add_context_length(4096)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_token_list([f"<tok{i}>" for i in range(vocab_strings)])  # real GGUFs carry 32K-262K of these
    tensors = [("token_embd.weight", (VOCAB, HIDDEN))]
    for i in range(n_layers):
        tensors += layer_shapes(i)
    block, size = GGML_QUANT_SIZES[qtype]
    for name, (rows, cols) in tensors:
        w.add_tensor_info(name, (rows, cols // block * size), np.dtype(np.uint8), rows * cols // block * size, qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for _, (rows, cols) in tensors:
        w.write_tensor_data(random_blocks(rows, cols, qtype, rng))
    w.close()
    return n_layers


def write_adapter(path: Path, n_layers: int) -> None:
    """A KV-tied gain-ffn adapter (gain_config.json + gains.safetensors) for the file."""
    import mlx.core as mx

    from gain_mlx.adapter import CONFIG_FILE, FORMAT_VERSION, GAINS_FILE

    rng = np.random.default_rng(1)
    targets, gains = [], {}
    for i in range(n_layers):
        attn, ffn = f"model.layers.{i}.self_attn.o_proj", f"model.layers.{i}.mlp.down_proj"
        targets.append(dict(path=attn, kind="attn", layer=i, producer=f"model.layers.{i}.self_attn.v_proj",
                            producer_rows="all", tied=True))
        targets.append(dict(path=ffn, kind="ffn", layer=i, producer=f"model.layers.{i}.mlp.up_proj",
                            producer_rows="all", tied=False))
        gains[attn + ".gain"] = mx.array(rng.uniform(0.6, 1.4, (KV_HEADS, HIDDEN // HEADS)).astype(np.float32))
        gains[ffn + ".gain"] = mx.array(rng.uniform(0.6, 1.4, (FFN,)).astype(np.float32))
    path.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(path / GAINS_FILE), gains)
    config = dict(format_version=FORMAT_VERSION, variant="gain-ffn", orientation="input", tie_kv=True,
                  model_type="llama", num_layers=n_layers, hidden_size=HIDDEN, intermediate_size=FFN,
                  targets=targets, fingerprint=None)
    (path / CONFIG_FILE).write_text(json.dumps(config))


def timed(cmd) -> tuple:
    """(wall seconds, peak RSS MiB) of one child process (its own rusage, via wait4)."""
    t = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - t
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        raise SystemExit(f"error: {' '.join(cmd)} exited with {child.returncode}")
    return wall, usage.ru_maxrss / 1024


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-gb", type=float, default=1.0)
    p.add_argument("--qtype", default="Q4_K", choices=[t.name for t in SCALES])
    p.add_argument("--dir", default=tempfile.gettempdir())
    p.add_argument("--json", help="write the figures here")
    p.add_argument("--vocab-strings", type=int, default=128_000,
                   help="tokenizer strings in the header (Llama 3: 128K, Gemma 3: 262K)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; figures are medians")
    p.add_argument("--keep", action="store_true", help="keep the synthetic files")
    args = p.parse_args(argv)
    qtype = GGMLQuantizationType[args.qtype]
    work = Path(tempfile.mkdtemp(prefix="bench_export.", dir=args.dir))
    try:
        base, adapter = work / "base.gguf", work / "adapter"
        t = time.perf_counter()
        n_layers = write_synthetic(base, args.size_gb, qtype, args.vocab_strings)
        write_adapter(adapter, n_layers)
        print(f"synthetic {args.qtype} GGUF: {n_layers} layers, {base.stat().st_size / 2**30:.2f} GiB "
              f"(built in {time.perf_counter() - t:.0f} s)")
        subprocess.run(["sync"], check=True)  # the build's dirty pages must not land inside a timing
        subprocess.run(["cat", str(base)], check=True, stdout=subprocess.DEVNULL)  # warm the page cache
        copy, out = work / "copy.gguf", work / "out.gguf"
        cmds = {
            "cp": ["cp", str(base), str(copy)],
            # the export flushes its output to disk before renaming it; so does this reference
            "cp_sync": ["sh", "-c", f"cp '{base}' '{copy}' && sync '{copy}'"],
            "export": [sys.executable, "-m", "gain_mlx.export", "--gguf", str(base),
                       "--adapter-path", str(adapter), "--out", str(out)],
        }
        walls, rss = {k: [] for k in cmds}, {}
        for r in range(args.rounds):  # interleaved, so every command sees the same disk state
            for name, cmd in cmds.items():
                wall, rss[name] = timed(cmd)
                walls[name].append(wall)
                for f in (copy, out):
                    f.unlink(missing_ok=True)
                subprocess.run(["sync"], check=True)
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in walls.items()))
        cp_s, cp_sync_s, ex_s = (statistics.median(walls[k]) for k in ("cp", "cp_sync", "export"))
        cp_rss, ex_rss = rss["cp"], rss["export"]
        result = {
            "qtype": args.qtype,
            "file_bytes": base.stat().st_size,
            "layers": n_layers,
            "cp_s": round(cp_s, 2),
            "export_s": round(ex_s, 2),
            "ratio": round(ex_s / cp_s, 2),
            "cp_sync_s": round(cp_sync_s, 2),
            "ratio_vs_cp_sync": round(ex_s / cp_sync_s, 2),
            "export_peak_rss_mib": round(ex_rss, 1),
            "cp_peak_rss_mib": round(cp_rss, 1),
        }
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
