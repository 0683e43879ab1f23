"""Throughput and latency of gain_mlx.serve with 1, 2 and 8 distinct adapters under the
same concurrent load, against the base alone, side by side in one run.

One server process-internal engine (one base in memory); between scenarios adapters are
added and removed through the running server's ``/v1/adapters`` API. Each scenario sends
the same load: ``--clients`` concurrent streaming clients, ``--requests`` requests in
all, request ``i`` for adapter ``i mod k``, ``--max-tokens`` tokens each (``ignore_eos``,
so every scenario generates the same number of tokens). Goal: 8 mixed adapters >= 0.9x
the single-adapter throughput.

``--mlx-lm`` also runs ``mlx_lm.server`` on the same base with two random LoRA adapters
(rank 8 on the same projections), once with one adapter and once alternating the two:
mlx-lm batches only requests for the same adapter and reloads the model on a change.

    python tools/bench_serve.py                       # synthetic 30M-parameter llama, ~1-2 min on 2 cores
    python tools/bench_serve.py --model smollm2-135m --mlx-lm --json bench_serve.json

``--compare DIR`` times another checkout of gain_mlx (e.g. ``git worktree add /tmp/old
d608c3e``) against this one, side by side in one process: each scenario runs on one
server then the other, the order alternating by round, and the table gives the median of
the paired rounds' ratios this/other per scenario.

    python tools/bench_serve.py --compare /tmp/old --rounds 3
"""

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from gain_mlx import cpu, policy  # noqa: E402
SYNTHETIC = dict(
    model_type="llama", hidden_size=512, num_hidden_layers=8, intermediate_size=1408, num_attention_heads=8,
    num_key_value_heads=4, rms_norm_eps=1e-5, tie_word_embeddings=False, max_position_embeddings=4096,
)


def synthetic_model(folder: Path) -> Path:
    """A random llama (~30M parameters) with a byte-level BPE tokenizer trained on the examples."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if (folder / "config.json").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2048, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    texts = [json.loads(line)["text"] for line in (ROOT / "examples/data/train.jsonl").open()]
    tok.train_from_iterator(texts, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>").save_pretrained(str(folder))
    config = dict(SYNTHETIC, vocab_size=tok.get_vocab_size())
    model_class, args_class = _get_classes(config)
    mx.random.seed(0)
    model = model_class(args_class.from_dict(config))
    mx.eval(model.parameters())
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def random_gain_adapters(model_spec, folder: Path, n: int, variant: str) -> list:
    """``n`` gain adapters of random gains U(0.8, 1.2) for the base ``model_spec``."""
    import mlx.core as mx

    from gain_mlx.adapter import adapter_config, apply_gains, save_adapter
    from gain_mlx.layers import GAIN_LAYERS
    from gain_mlx.loading import load_model

    paths = []
    model, _, _ = load_model(model_spec, verbose=False)
    targets = apply_gains(model, variant, tie_kv=True)
    for i in range(n):
        key = mx.random.key(100 + i)
        for _, layer in model.named_modules():
            if isinstance(layer, GAIN_LAYERS):
                key, sub = mx.random.split(key)
                layer.gain = mx.random.uniform(0.8, 1.2, layer.gain.shape, key=sub)
        paths.append(save_adapter(model, folder / f"gain{i}", adapter_config(model, targets, variant, True)))
    return paths


def random_lora_adapters(model_spec, folder: Path, n: int, variant: str) -> list:
    """``n`` mlx-lm LoRA adapters (rank 8, random B) on the projections the gains target."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers

    from gain_mlx.loading import load_model

    keys = ["self_attn.o_proj"] + (["mlp.down_proj"] if variant == "gain-ffn" else [])
    paths = []
    for i in range(n):
        model, _, _ = load_model(model_spec, verbose=False)
        model.freeze()
        params = {"rank": 8, "scale": 20.0, "dropout": 0.0, "keys": keys}
        linear_to_lora_layers(model, len(model.layers), params)
        mx.random.seed(200 + i)
        weights = {k: (mx.random.normal(v.shape) * 0.01 if k.endswith("lora_b") else v)
                   for k, v in tree_flatten(model.trainable_parameters())}
        path = folder / f"lora{i}"
        path.mkdir(parents=True, exist_ok=True)
        mx.save_safetensors(str(path / "adapters.safetensors"), weights)
        (path / "adapter_config.json").write_text(json.dumps(
            {"fine_tune_type": "lora", "num_layers": len(model.layers), "lora_parameters": params}))
        paths.append(path)
    return paths


def one_request(port, body, api_path="/v1/completions"):
    """Streams one request: ``(tokens, seconds to first token, seconds in all)``."""
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("POST", api_path, json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:300]}")
    first, chunks, tokens = None, 0, None
    for line in resp:
        if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
            continue
        obj = json.loads(line[6:])
        if obj.get("usage"):
            tokens = obj["usage"]["completion_tokens"]
            continue
        if obj["choices"] and obj["choices"][0].get("text") is not None:
            first = first or time.perf_counter() - t0
            chunks += 1
    conn.close()
    return chunks if tokens is None else tokens, first, time.perf_counter() - t0


def run_load(port, models, args, extra=None):
    """The load: ``args.requests`` requests by ``args.clients`` clients, request i for models[i % k]."""
    prompts = [json.loads(line)["text"][: args.prompt_chars] for line in (ROOT / "examples/data/valid.jsonl").open()]
    bodies = [dict(model=models[i % len(models)], prompt=prompts[i % len(prompts)], max_tokens=args.max_tokens,
                   temperature=0, stream=True, stream_options={"include_usage": True}, **(extra(i) if extra else {}))
              for i in range(args.requests)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(args.clients) as pool:
        results = list(pool.map(lambda b: one_request(port, b), bodies))
    wall = time.perf_counter() - t0
    tokens = sum(r[0] for r in results)
    lat = sorted(r[2] for r in results)
    ttft = sorted(r[1] for r in results)
    return {
        "tokens": tokens, "seconds": wall, "tok_s": tokens / wall,
        "latency_p50": statistics.median(lat), "latency_p95": lat[int(0.95 * (len(lat) - 1))],
        "ttft_p50": statistics.median(ttft),
    }


def api(port, method, path, body=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request(method, path, json.dumps(body) if body is not None else None, {"Content-Type": "application/json"})
    r = conn.getresponse()
    data = json.loads(r.read())
    if r.status >= 300:
        raise RuntimeError(f"{method} {path}: HTTP {r.status} {data}")
    return data


class GainServer:
    """A running gain_mlx.serve of ``serve`` (this checkout's module, or another's), whose
    adapters ``a0..a{k-1}`` are added and removed to set up each scenario."""

    def __init__(self, serve, args, adapters):
        self.engine = serve.Engine(args.model, [], decode_concurrency=max(32, args.clients))
        self.server = serve.make_server(self.engine, port=0)
        self.port = self.server.server_address[1]
        self.args, self.adapters, self.loaded = args, adapters, 0
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        warm = argparse.Namespace(**dict(vars(args), requests=args.clients, max_tokens=8))
        run_load(self.port, [self.engine.base_name], warm, lambda i: {"ignore_eos": True})

    def run(self, k):
        """The load on the base (k = 0) or on k distinct adapters."""
        port = self.port
        while self.loaded < k:
            api(port, "POST", "/v1/adapters", {"name": f"a{self.loaded}", "path": str(self.adapters[self.loaded])})
            self.loaded += 1
        while k == 0 and self.loaded > 0:
            self.loaded -= 1
            api(port, "DELETE", f"/v1/adapters/a{self.loaded}")
        models = [self.engine.base_name] if k == 0 else [f"a{i}" for i in range(k)]
        before = dict(self.engine.stats)
        r = run_load(port, models, self.args, lambda i: {"ignore_eos": True})
        r["mixed_passes"] = self.engine.stats["mixed_passes"] - before["mixed_passes"]
        r["max_batch"] = self.engine.stats["max_batch"]
        return r

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self.engine.close()


def scenarios(args):
    return [("base alone (no adapter loaded)", 0)] + [(f"{k} distinct adapter{'s' * (k > 1)}", k) for k in args.adapters]


def bench_gain(args, adapters):
    from gain_mlx import serve

    g = GainServer(serve, args, adapters)
    rows = []
    try:
        for _ in range(args.rounds):
            for label, k in scenarios(args):
                rows.append((label, g.run(k)))
                print(f"  {label}: {rows[-1][1]['tok_s']:.1f} tok/s", file=sys.stderr, flush=True)
    finally:
        g.close()
    return rows


def bench_mlx_lm(args, loras, eos_id):
    port = _free_port()
    from gain_mlx.loading import resolve_model

    cmd = [sys.executable, "-m", "mlx_lm.server", "--model", resolve_model(args.model, verbose=False), "--port", str(port),
           "--decode-concurrency", str(max(32, args.clients))]
    env = dict(os.environ)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    rows = []
    try:
        deadline = time.time() + 120
        while True:
            try:
                api(port, "GET", "/health")
                break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    raise RuntimeError("mlx_lm.server did not start: " + proc.stderr.read().decode()[-2000:])
                time.sleep(0.5)
        bias = {"logit_bias": {str(eos_id): -1e9}} if eos_id is not None else {}
        warm = argparse.Namespace(**dict(vars(args), requests=2, max_tokens=4))
        run_load(port, ["default_model"], warm, lambda i: {"adapters": str(loras[0]), **bias})
        for _ in range(args.rounds):
            for label, paths in (("mlx_lm.server, 1 LoRA adapter", loras[:1]), ("mlx_lm.server, 2 LoRA adapters alternating", loras[:2])):
                r = run_load(port, ["default_model"], args, lambda i: {"adapters": str(paths[i % len(paths)]), **bias})
                rows.append((label, r))
                print(f"  {label}: {r['tok_s']:.1f} tok/s", file=sys.stderr, flush=True)
    finally:
        proc.terminate()
        proc.wait(30)
    return rows


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def best(rows):
    """Per label, the round with the highest throughput (other load on the machine only slows)."""
    out = {}
    for label, r in rows:
        if label not in out or r["tok_s"] > out[label]["tok_s"]:
            out[label] = r
    return out


def other_serve(folder):
    """``gain_mlx.serve`` of another checkout, imported beside this one as ``gain_mlx_other``."""
    import importlib
    import importlib.util

    pkg = Path(folder) / "gain_mlx"
    spec = importlib.util.spec_from_file_location("gain_mlx_other", pkg / "__init__.py", submodule_search_locations=[str(pkg)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["gain_mlx_other"] = module
    spec.loader.exec_module(module)
    return importlib.import_module("gain_mlx_other.serve")


def compare(args, adapters):
    """This checkout's server against ``args.compare``'s, both running in this process on the
    same model and adapters: each scenario is run on one then the other (the order
    alternating), so both see the same machine load; the ratio per scenario is the median
    of the paired rounds' ratios."""
    from gain_mlx import serve

    servers = {"other": GainServer(other_serve(args.compare), args, adapters), "this": GainServer(serve, args, adapters)}
    rows, ratios = {"other": [], "this": []}, {}
    try:
        for i in range(args.rounds):
            for label, k in scenarios(args):
                got = {}
                for who in ("other", "this")[:: 1 if i % 2 == 0 else -1]:
                    got[who] = servers[who].run(k)
                    rows[who].append((label, got[who]))
                ratios.setdefault(label, []).append(got["this"]["tok_s"] / got["other"]["tok_s"])
                print(f"  {label}: other {got['other']['tok_s']:.1f}, this {got['this']['tok_s']:.1f} tok/s", file=sys.stderr, flush=True)
    finally:
        for g in servers.values():
            g.close()
    other, this = best(rows["other"]), best(rows["this"])
    print(f"\n| scenario ({args.clients} clients, {args.requests} requests x {args.max_tokens} tokens, {args.rounds} rounds) "
          f"| {args.compare} best tok/s | this checkout best tok/s | this / other, median of paired rounds |")
    print("|---|---|---|---|")
    for label in this:
        print(f"| {label} | {other[label]['tok_s']:.1f} | {this[label]['tok_s']:.1f} | {statistics.median(ratios[label]):.3f} |")
    every = [r for v in ratios.values() for r in v]
    print(f"\nall {len(every)} paired rounds: median this / other {statistics.median(every):.3f}")
    return {"other": other, "this": this, "ratios": ratios}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="base model (default: a synthetic 30M-parameter llama built once)")
    p.add_argument("--variant", default="gain-ffn", choices=["gain", "gain-ffn"])
    p.add_argument("--clients", type=int, default=8, help="concurrent clients")
    p.add_argument("--requests", type=int, default=16, help="requests per scenario")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--prompt-chars", type=int, default=120)
    p.add_argument("--adapters", type=int, nargs="+", default=[1, 2, 8], help="distinct adapters per scenario")
    p.add_argument("--rounds", type=int, default=3, help="rounds of all scenarios; the best round is reported")
    p.add_argument("--mlx-lm", action="store_true", help="also time mlx_lm.server with two LoRA adapters")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--work", help="folder for the synthetic model and adapters (default: a temporary one)")
    p.add_argument("--compare", metavar="DIR", help="time the gain_mlx checkout DIR against this one, rounds interleaved")
    cpu.add_fast_blas_argument(p)
    args = p.parse_args(argv)
    policy.start(args.fast_blas)
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_serve-"))
    if args.model is None:
        args.model = str(synthetic_model(work / "synthetic"))
    t0 = time.time()
    adapters = random_gain_adapters(args.model, work, max(args.adapters), args.variant)
    if args.compare:
        return compare(args, adapters)
    print(f"bench_serve: {args.model}, {args.clients} clients, {args.requests} requests x {args.max_tokens} tokens", file=sys.stderr)
    rows = bench_gain(args, adapters)
    if args.mlx_lm:
        from gain_mlx.loading import load_model

        _, tok, _ = load_model(args.model, verbose=False)
        eos = sorted(tok.eos_token_ids)[0] if tok.eos_token_ids else None
        rows += bench_mlx_lm(args, random_lora_adapters(args.model, work, 2, args.variant), eos)
    table = best(rows)
    single = next((r["tok_s"] for label, r in table.items() if label.startswith("1 distinct")), None)
    print(f"\n| server, load: {args.clients} concurrent clients, {args.requests} requests x {args.max_tokens} tokens "
          "| tok/s | vs 1 adapter | latency p50 / p95 (s) | first token p50 (s) |")
    print("|---|---|---|---|---|")
    for label, r in table.items():
        ratio = f"{r['tok_s'] / single:.2f}x" if single else "-"
        print(f"| {label} | {r['tok_s']:.1f} | {ratio} | {r['latency_p50']:.2f} / {r['latency_p95']:.2f} | {r['ttft_p50']:.2f} |")
    eight = next((r["tok_s"] for label, r in table.items() if label.startswith("8 distinct")), None)
    if single and eight:
        verdict = "met" if eight >= 0.9 * single else "NOT met"
        print(f"\ngoal 8 mixed >= 0.9x single adapter: {eight / single:.2f}x ({verdict}); {time.time() - t0:.0f} s in all")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": {k: v for k, v in vars(args).items()}, "results": table}, indent=2) + "\n")
    return table


if __name__ == "__main__":
    main()
