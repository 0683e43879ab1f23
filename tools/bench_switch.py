"""Error of switching a deployed GGUF between domains, against folding into the base.

Exports the first adapter into --gguf, then switches the result to the next adapter
(cyclically) --switches times; each switch divides the previous gains out of the scale
fields and folds the new ones in. After each count in --report-at it exports the current
adapter freshly into the original base and compares the two files tensor by tensor
(dequantized): the worst and median relative error ||switched - fresh|| / ||fresh|| over
the tensors the adapters change, and the share of those tensors' bytes that are equal.

    python tools/bench_switch.py --gguf gemma-3-270m-q4_k_m.gguf --adapters legal medical \\
        --switches 100 --report-at 1,10,100
"""

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from gguf import GGUFReader

from gain_mlx.gguf import quants as Q
from gain_mlx.gguf.export import export_gguf


def tensors(path) -> dict:
    return {t.name: t for t in GGUFReader(path).tensors}


def compare(switched, fresh, base) -> dict:
    """Relative errors of the switched file against the fresh export, on changed tensors."""
    got, want, orig = tensors(switched), tensors(fresh), tensors(base)
    errors, equal, total = [], 0, 0
    for name, w in want.items():
        raw_w, raw_o = np.asarray(w.data).view(np.uint8), np.asarray(orig[name].data).view(np.uint8)
        if w.tensor_type == orig[name].tensor_type and np.array_equal(raw_w, raw_o):
            continue  # not touched by the adapters
        g = got[name]
        raw_g = np.asarray(g.data).view(np.uint8)
        equal += int(np.count_nonzero(raw_g == raw_w)) if raw_g.shape == raw_w.shape else 0
        total += raw_w.size
        a = Q.dequantize(np.asarray(g.data), g.tensor_type).astype(np.float64)
        b = Q.dequantize(np.asarray(w.data), w.tensor_type).astype(np.float64)
        errors.append(float(np.linalg.norm(a - b) / (np.linalg.norm(b) + 1e-30)))
    return dict(tensors=len(errors), worst_rel_err=max(errors), median_rel_err=statistics.median(errors),
                bytes_equal=equal / total)


def main(argv=None) -> list:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gguf", required=True, help="the original base GGUF")
    p.add_argument("--adapters", nargs="+", required=True, help="adapter folders, switched to in turn")
    p.add_argument("--switches", type=int, default=100)
    p.add_argument("--report-at", default="1,10,100", help="switch counts to compare at")
    p.add_argument("--dir", default=tempfile.gettempdir())
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args(argv)
    report_at = sorted({int(n) for n in args.report_at.split(",") if int(n) <= args.switches})
    quiet = dict(log=lambda s: None)
    work = Path(tempfile.mkdtemp(prefix="bench_switch.", dir=args.dir))
    rows = []
    try:
        cur = work / "cur.gguf"
        export_gguf(args.gguf, args.adapters[0], cur, **quiet)
        tic = time.perf_counter()
        for n in range(1, args.switches + 1):
            adapter = args.adapters[n % len(args.adapters)]
            nxt = work / "next.gguf"
            export_gguf(cur, adapter, nxt, **quiet)
            nxt.replace(cur)
            if n in report_at:
                fresh = work / "fresh.gguf"
                export_gguf(args.gguf, adapter, fresh, **quiet)
                row = dict(switches=n, adapter=Path(adapter).name, **compare(cur, fresh, args.gguf))
                fresh.unlink()
                rows.append(row)
                print(f"after {n:>4} switches ({row['adapter']}): {row['tensors']} tensors, worst rel. err "
                      f"{row['worst_rel_err']:.1e}, median {row['median_rel_err']:.1e}, "
                      f"bytes equal {100 * row['bytes_equal']:.1f}% ({time.perf_counter() - tic:.0f} s)", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
