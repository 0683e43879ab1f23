"""Cost of evaluating a base and N gain adapters in one run (one model, mixed batches)
against N + 1 separate runs (one model each), side by side in one process.

Tasks are written offline from examples/data (license texts): a multiple-choice task
(which of 4 continuations follows a passage), rolling perplexity of whole documents, and
greedy generation of ``--gen-tokens`` tokens. Adapters are random gain-ffn gains
(U(0.8, 1.2)) saved to a temporary folder. Each side includes loading the model and
lm-eval's task index, as a separate ``python -m gain_mlx.evaluate`` call would (process
start and imports are not counted). Wall and process CPU time (all threads) are reported:
on a shared machine CPU time is the steadier figure. The scores of both sides are compared.

    python tools/bench_evaluate.py                                  # SmolLM2-135M GGUF, 3 adapters, --limit 16
    python tools/bench_evaluate.py --adapters 7 --limit 32 --json bench_evaluate.json
"""

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from gain_mlx import cpu  # noqa: E402

TASKS = ["bench_mc", "bench_ppl", "bench_gen"]
_DATA = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
"""
_YAML = {
    "bench_mc": "output_type: multiple_choice\ndoc_to_text: context\ndoc_to_choice: choices\ndoc_to_target: answer\n"
                "metric_list:\n  - metric: acc\n  - metric: acc_norm\n",
    "bench_ppl": "output_type: loglikelihood_rolling\ndoc_to_text: \"\"\ndoc_to_target: text\n"
                 "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n",
    "bench_gen": "output_type: generate_until\ndoc_to_text: prompt\ndoc_to_target: target\n"
                 "generation_kwargs:\n  until: [\"\\n\\n\"]\n  max_gen_toks: {gen_tokens}\n  do_sample: false\n"
                 "metric_list:\n  - metric: exact_match\n",
}


def _cut(text, n):
    """The first ``n`` characters of ``text``, ended at a space."""
    return text[:n].rsplit(" ", 1)[0]


def write_tasks(folder: Path, gen_tokens: int) -> Path:
    texts = [json.loads(line)["text"] for line in (ROOT / "examples/data/valid.jsonl").open()]
    texts += [json.loads(line)["text"] for line in (ROOT / "examples/data/test.jsonl").open()]
    texts = [" ".join(t.split()) for t in texts if len(t) > 400]
    rows = {"bench_mc": [], "bench_ppl": [], "bench_gen": []}
    for i, t in enumerate(texts):
        ctx = _cut(t, 240)
        conts = [_cut(texts[(i + k * 7) % len(texts)][len(_cut(texts[(i + k * 7) % len(texts)], 240)):], 80)
                 for k in range(4)]
        answer = i % 4
        conts[0], conts[answer] = conts[answer], conts[0]
        rows["bench_mc"].append({"context": ctx, "choices": conts, "answer": answer})
        rows["bench_ppl"].append({"text": t})
        rows["bench_gen"].append({"prompt": _cut(t, 160), "target": _cut(t[len(_cut(t, 160)):], 60)})
    folder.mkdir(parents=True, exist_ok=True)
    for task, docs in rows.items():
        data = folder / f"{task}.jsonl"
        data.write_text("".join(json.dumps(d) + "\n" for d in docs))
        head = _DATA.format(task=task, data=json.dumps(str(data)), cache=json.dumps(str(folder / "hf_cache")))
        (folder / f"{task}.yaml").write_text(head + _YAML[task].format(gen_tokens=gen_tokens))
    return folder


def make_adapters(model_spec, folder: Path, n: int) -> list:
    import mlx.core as mx
    import numpy as np

    from gain_mlx.adapter import adapter_config, apply_gains, save_adapter
    from gain_mlx.loading import load

    out = []
    for i in range(n):
        model, _ = load(model_spec, None)
        targets = apply_gains(model, "gain-ffn", tie_kv=True)
        rng = np.random.default_rng(i)
        for _, layer in model.named_modules():
            if hasattr(layer, "gain"):
                layer.gain = mx.array(rng.uniform(0.8, 1.2, layer.gain.shape).astype(np.float32))
        out.append((f"a{i}", str(save_adapter(model, folder / f"a{i}", adapter_config(model, targets, "gain-ffn", True)))))
    return out


def scores(models: dict) -> dict:
    from gain_mlx.evaluate import _metrics

    return {n: {t: _metrics(r) for t, r in m["results"].items()} for n, m in models.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="base model (default: the packaged SmolLM2-135M GGUF)")
    p.add_argument("--adapters", type=int, default=3, help="N, the number of adapters")
    p.add_argument("--limit", type=int, default=16, help="documents per task")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--gen-tokens", type=int, default=32)
    p.add_argument("--separate-first", action="store_true", help="time the N + 1 runs before the one run")
    p.add_argument("--json", help="write the figures here")
    cpu.add_fast_blas_argument(p)
    args = p.parse_args()
    cpu.ensure_fast_blas(args.fast_blas)
    from gain_mlx.evaluate import evaluate, table

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        include = write_tasks(tmp / "tasks", args.gen_tokens)
        adapters = make_adapters(args.model, tmp, args.adapters)
        common = dict(include_path=include, limit=args.limit, batch_size=args.batch_size)
        evaluate(args.model, [], TASKS, **{**common, "limit": 1})  # warm-up: conversion cache, file cache

        def one_run():
            return evaluate(args.model, adapters, TASKS, **common)

        def separate_runs():
            models, passes, setup = {}, 0, 0.0
            for adapter in [None] + adapters:
                r = evaluate(args.model, [adapter] if adapter else [], TASKS, include_base=adapter is None, **common)
                models.update(r["models"])
                passes += r["stats"]["forward_passes"]
                setup += r["setup_seconds"]
            return {"models": models, "forward_passes": passes, "setup_seconds": setup}

        timed = {}
        for side in (["separate", "one"] if args.separate_first else ["one", "separate"]):
            w0, c0 = time.perf_counter(), time.process_time()
            result = one_run() if side == "one" else separate_runs()
            timed[side] = (result, time.perf_counter() - w0, time.process_time() - c0)
        (one, t_one, c_one), (sep, t_sep, c_sep) = timed["one"], timed["separate"]
        separate, passes, setup_sep = sep["models"], sep["forward_passes"], sep["setup_seconds"]

    a, b = scores(one["models"]), scores(separate)
    worst = max(abs(a[n][t][m] - b[n][t][m]) / max(abs(b[n][t][m]), 1e-12) for n in a for t in a[n] for m in a[n][t])
    print(table(one["models"]), end="")
    figures = {
        "model": args.model, "adapters": args.adapters, "limit": args.limit, "batch_size": args.batch_size,
        "gen_tokens": args.gen_tokens, "one_run_s": round(t_one, 2), "separate_runs_s": round(t_sep, 2),
        "ratio_separate_over_one": round(t_sep / t_one, 3), "order": "separate first" if args.separate_first else "one first",
        "one_run_cpu_s": round(c_one, 2), "separate_runs_cpu_s": round(c_sep, 2), "cpu_ratio": round(c_sep / c_one, 3),
        "one_run_setup_s": round(one["setup_seconds"], 2), "separate_setup_s": round(setup_sep, 2),
        "ratio_without_setup": round((t_sep - setup_sep) / (t_one - one["setup_seconds"]), 3),
        "one_run_forward_passes": one["stats"]["forward_passes"],
        "one_run_mixed_passes": one["stats"]["mixed_passes"], "separate_forward_passes": passes,
        "max_relative_score_difference": worst,
    }
    print(json.dumps(figures, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    if not math.isfinite(worst) or worst > 1e-3:
        sys.exit("the one-run scores differ from the separate runs'")


if __name__ == "__main__":
    main()
