"""gain_mlx.serve through the real ``openai`` client: mixed-adapter batches equal plain
mlx-lm generation on each fused model, token for token; bad requests get a 4xx JSON
error and the server keeps serving; API key; localhost default; adapters at runtime."""

import json
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

openai = pytest.importorskip("openai")

from serve_fixtures import Running  # noqa: E402
from test_serve import make_adapter  # noqa: E402

SERVER_KW = {"max_tokens": 16}  # the default max_tokens of these tests' requests

CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
PROMPTS = ["The court held that", "A patient with", "In", "The defendant argued that the contract was void because"]


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model_dir):
    """A tiny chat model, three adapters (two variants) and one of another base."""
    from mlx_lm import load

    root = tmp_path_factory.mktemp("serve")
    model_dir = shutil.copytree(tiny_model_dir, root / "model")
    cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    cfg["chat_template"] = CHAT_TEMPLATE
    (model_dir / "tokenizer_config.json").write_text(json.dumps(cfg))
    fn = lambda: load(str(model_dir))[0]
    adapters = {
        "legal": make_adapter(root / "legal", fn, "gain-ffn", 1, tie_kv=True),
        "medical": make_adapter(root / "medical", fn, "gain", 2, tie_kv=True),
        "drama": make_adapter(root / "drama", fn, "gain-ffn", 3),
    }
    from conftest import tiny_model

    other = make_adapter(root / "other", lambda: tiny_model("llama", seed=9, vocab_size=384), "gain-ffn", 4)
    return model_dir, adapters, other


class Reference:
    """Plain mlx-lm generation on the base fused with each adapter (one fused copy each)."""

    def __init__(self, model_dir, adapters):
        self.model_dir, self.adapters, self.models = model_dir, adapters, {}
        self.lock = threading.Lock()

    def model(self, name):
        from mlx_lm import load

        from gain_mlx.adapter import load_adapter, read_adapter, targets_from_config
        from gain_mlx.fuse import fuse_model

        if name not in self.models:
            model, tok = load(str(self.model_dir))
            if name is not None:
                load_adapter(model, self.adapters[name])
                fuse_model(model, targets_from_config(read_adapter(self.adapters[name])[0]))
            self.models[name] = (model, tok)
        return self.models[name]

    def __call__(self, name, ids, max_tokens, chat=False):
        """``(token ids, text)`` of greedy ``mlx_lm.stream_generate`` (EOS not included). The
        text: mlx-lm's streamed text for chat; for legacy completions the tokenizer's decode
        of the tokens, which keeps a leading space (prompt + text reads as the whole)."""
        from mlx_lm import stream_generate

        with self.lock:
            model, tok = self.model(name)
            out = list(stream_generate(model, tok, ids, max_tokens=max_tokens))
        tokens = [r.token for r in out]
        if out and out[-1].finish_reason == "stop":
            tokens = tokens[:-1]
        return tokens, "".join(r.text for r in out) if chat else tok.decode(tokens)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(served):
    model_dir, adapters, _ = served
    s = Running(model_dir, adapters, server_kw=SERVER_KW, max_prompt_tokens=64)
    yield s
    s.close()


@pytest.fixture(scope="module")
def ref(served):
    model_dir, adapters, _ = served
    return Reference(model_dir, adapters)


def tok_ids(tokenizer, tokens):
    return tokenizer.convert_tokens_to_ids(tokens)


def test_models_lists_base_and_adapters(server):
    models = server.client().models.list()
    ids = [m.id for m in models.data]
    assert ids == ["model", "legal", "medical", "drama"]
    assert models.data[1].model_extra["parent"] == "model"
    assert models.data[2].model_extra["adapter"]["variant"] == "gain"
    assert server.client().models.retrieve("drama").id == "drama"
    with pytest.raises(openai.NotFoundError):
        server.client().models.retrieve("nope")


def _one(server, ref, kind, stream, name, prompt, max_tokens):
    """Sends one greedy request; returns (got ids, got text, reference ids, reference text)."""
    client = server.client()
    tok = server.engine.tokenizer
    model = name or "model"
    if kind == "chat":
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": prompt}]
        ids = tok.apply_chat_template(messages, add_generation_prompt=True)
        args = dict(model=model, messages=messages, max_tokens=max_tokens, temperature=0, logprobs=True)
        if stream:
            text, toks = "", []
            for chunk in client.chat.completions.create(**args, stream=True):
                c = chunk.choices[0]
                text += c.delta.content or ""
                toks += [e.token for e in (c.logprobs.content if c.logprobs else [])]
        else:
            r = client.chat.completions.create(**args)
            text, toks = r.choices[0].message.content, [e.token for e in r.choices[0].logprobs.content]
            assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(toks)
    else:
        ids = tok.encode(prompt)
        args = dict(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, logprobs=0)
        if stream:
            text, toks = "", []
            for chunk in client.completions.create(**args, stream=True):
                c = chunk.choices[0]
                text += c.text
                toks += c.logprobs.tokens if c.logprobs else []
        else:
            r = client.completions.create(**args)
            text, toks = r.choices[0].text, r.choices[0].logprobs.tokens
    want_ids, want_text = ref(name, ids, max_tokens, chat=kind == "chat")
    if kind != "chat":  # legacy logprobs give each token's decoded text: they join to the text
        assert "".join(toks) == text and len(toks) == len(want_ids)
        return want_ids if text == want_text else toks, text, want_ids, want_text
    return tok_ids(tok, toks), text, want_ids, want_text


def test_concurrent_mixed_adapters_equal_fused_generate(server, ref):
    """16 concurrent requests, four models (base + 3 adapters), chat and completions,
    streaming and not: each equals mlx_lm generation on its fused model, token for token."""
    for name in (None, "legal", "medical", "drama"):
        ref.model(name)  # build the fused references before the load starts
    before = dict(server.engine.stats)
    cases = [
        (kind, stream, name, PROMPTS[i % len(PROMPTS)], 6 + (i % 4) * 3)
        for i, (kind, stream, name) in enumerate(
            (k, s, n) for n in (None, "legal", "medical", "drama") for k in ("chat", "text") for s in (False, True)
        )
    ]
    with ThreadPoolExecutor(len(cases)) as pool:
        results = list(pool.map(lambda c: _one(server, ref, *c), cases))
    outputs = {}
    for case, (got, text, want, want_text) in zip(cases, results):
        assert got == want, case
        assert text == want_text, case
        outputs.setdefault(case[2], set()).add(tuple(got))
    stats = server.engine.stats
    assert stats["mixed_passes"] > before["mixed_passes"]  # adapters really shared batches
    assert stats["max_batch"] > 4
    # the adapters change the output: the same (kind, prompt) differs across models
    first = {name: [r[0] for c, r in zip(cases, results) if c[2] == name and c[0] == "text" and not c[1]][0] for name in outputs}
    assert len({tuple(v) for v in first.values()}) > 1


def test_adapters_field_and_stop(server, ref):
    client = server.client()
    path = str(ref.adapters["legal"])
    r = client.completions.create(model="model", prompt=PROMPTS[0], max_tokens=10, temperature=0, extra_body={"adapters": path})
    want_ids, want_text = ref("legal", server.engine.tokenizer.encode(PROMPTS[0]), 10)
    assert r.choices[0].text == want_text
    r = client.completions.create(model="legal", prompt=PROMPTS[0], max_tokens=10, temperature=0, extra_body={"adapters": "legal"})
    assert r.choices[0].text == want_text
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="medical", prompt="x", max_tokens=2, extra_body={"adapters": "legal"})
    # a stop string cuts the text where it starts, streaming or not
    stop = want_text[3:5]
    cut = want_text[: want_text.index(stop)]
    r = client.completions.create(model="legal", prompt=PROMPTS[0], max_tokens=10, temperature=0, stop=[stop])
    assert (r.choices[0].text, r.choices[0].finish_reason) == (cut, "stop")
    chunks = list(client.completions.create(model="legal", prompt=PROMPTS[0], max_tokens=10, temperature=0, stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == cut
    assert chunks[-1].choices[0].finish_reason == "stop"
    # usage in streams on request
    chunks = list(client.chat.completions.create(model="drama", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage.completion_tokens == 3 and chunks[-1].choices == []


BAD = [
    ("unknown adapter", {"model": "nope", "prompt": "x"}, 404, "model_not_found"),
    ("unknown adapter path", {"model": "model", "prompt": "x", "adapters": "/no/such"}, 404, "model_not_found"),
    ("model not a string", {"model": 3, "prompt": "x"}, 400, "invalid_type"),
    ("max_tokens a string", {"model": "model", "prompt": "x", "max_tokens": "5"}, 400, "invalid_type"),
    ("max_tokens a bool", {"model": "model", "prompt": "x", "max_tokens": True}, 400, "invalid_type"),
    ("negative max_tokens", {"model": "model", "prompt": "x", "max_tokens": -3}, 400, "invalid_value"),
    ("zero max_tokens", {"model": "model", "prompt": "x", "max_tokens": 0}, 400, "invalid_value"),
    ("temperature a string", {"model": "model", "prompt": "x", "temperature": "hot"}, 400, "invalid_type"),
    ("top_p over 1", {"model": "model", "prompt": "x", "top_p": 3}, 400, "invalid_value"),
    ("prompt a number", {"model": "model", "prompt": 5}, 400, "invalid_type"),
    ("prompt missing", {"model": "model"}, 400, "missing_required_parameter"),
    ("token id out of vocab", {"model": "model", "prompt": [1, 99999]}, 400, "invalid_value"),
    ("empty prompt", {"model": "model", "prompt": ""}, 400, "invalid_value"),
    ("over-long prompt", {"model": "model", "prompt": "court " * 200}, 400, "context_length_exceeded"),
    ("n=2", {"model": "model", "prompt": "x", "n": 2}, 400, "invalid_value"),
    ("stream a string", {"model": "model", "prompt": "x", "stream": "yes"}, 400, "invalid_type"),
    ("stop a number", {"model": "model", "prompt": "x", "stop": 7}, 400, "invalid_type"),
]


@pytest.mark.parametrize("what,body,status,code", BAD, ids=[b[0] for b in BAD])
def test_bad_completion_requests(server, what, body, status, code):
    got, err = server.raw("POST", "/v1/completions", body)
    assert got == status, err
    assert err["error"]["code"] == code and err["error"]["message"]
    assert set(err["error"]) == {"message", "type", "param", "code"}


def test_bad_requests_keep_server_serving(server, ref):
    client = server.client()
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="legal", messages=[{"role": "user", "content": "x"}], max_tokens=-1)
    assert "max_tokens" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="legal", messages=[{"role": "user", "content": "court " * 200}])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="legal", messages="hello")
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="legal", messages=[{"role": "user", "content": 5}])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="legal", messages=[])
    for data in (b"{not json", b"[1, 2]", b"\xff\xfe", b""):
        status, err = server.raw("POST", "/v1/chat/completions", data=data)
        assert status == 400 and err["error"]["code"] == "invalid_json", data
    status, err = server.raw("GET", "/v1/nothing")
    assert status == 404 and "error" in err
    status, err = server.raw("DELETE", "/v1/completions")
    assert status == 404 and "error" in err
    # still serving, and still right
    r = client.completions.create(model="medical", prompt=PROMPTS[1], max_tokens=5, temperature=0)
    assert r.choices[0].text == ref("medical", server.engine.tokenizer.encode(PROMPTS[1]), 5)[1]
    assert server.raw("GET", "/health")[1]["status"] == "ok"


def test_client_going_away_mid_stream(server):
    """A client that drops a stream frees its sequence; the server keeps serving."""
    body = json.dumps({"model": "legal", "prompt": "The", "max_tokens": 5000, "stream": True}).encode()
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=60)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    assert sock.recv(12) == b"HTTP/1.0 200"
    while b"data:" not in sock.recv(4096):
        pass
    sock.close()
    deadline = time.time() + 60
    while server.engine._jobs and time.time() < deadline:  # noqa: SLF001 - the worker's own table
        time.sleep(0.05)
    assert not server.engine._jobs
    assert server.client().completions.create(model="legal", prompt="The", max_tokens=2).usage.completion_tokens == 2


def test_api_key(served):
    model_dir, adapters, _ = served
    s = Running(model_dir, {"legal": adapters["legal"]}, api_key="s3cret", server_kw=SERVER_KW)
    try:
        with pytest.raises(openai.AuthenticationError) as e:
            s.client("wrong").completions.create(model="legal", prompt="x", max_tokens=2)
        assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
        status, err = s.raw("GET", "/v1/models")
        assert status == 401 and "error" in err
        status, _ = s.raw("POST", "/v1/adapters", {"name": "x", "path": str(adapters["drama"])})
        assert status == 401
        assert s.raw("GET", "/health")[0] == 200  # liveness stays open
        r = s.client("s3cret").completions.create(model="legal", prompt="x", max_tokens=2)
        assert r.usage.completion_tokens == 2
        assert [m.id for m in s.client("s3cret").models.list().data] == ["model", "legal"]
    finally:
        s.close()


def test_add_and_remove_adapter_at_runtime(served, ref):
    model_dir, adapters, other = served
    s = Running(model_dir, {"legal": adapters["legal"]}, server_kw=SERVER_KW)
    try:
        client = s.client()
        ids = s.engine.tokenizer.encode(PROMPTS[3])
        status, info = s.raw("POST", "/v1/adapters", {"name": "medical", "path": str(adapters["medical"])})
        assert status == 201 and info["variant"] == "gain"
        assert [m.id for m in client.models.list().data] == ["model", "legal", "medical"]
        r = client.completions.create(model="medical", prompt=PROMPTS[3], max_tokens=8, temperature=0)
        assert r.choices[0].text == ref("medical", ids, 8)[1]
        # refused: another base (fingerprint), no folder, a taken name, bad fields
        status, err = s.raw("POST", "/v1/adapters", {"name": "other", "path": str(other)})
        assert status == 400 and "fingerprint" in err["error"]["message"]
        status, err = s.raw("POST", "/v1/adapters", {"name": "gone", "path": str(other) + "-missing"})
        assert status == 400 and "not found" in err["error"]["message"]
        assert s.raw("POST", "/v1/adapters", {"name": "legal", "path": str(adapters["drama"])})[0] == 409
        assert s.raw("POST", "/v1/adapters", {"name": "model", "path": str(adapters["drama"])})[0] == 409
        assert s.raw("POST", "/v1/adapters", {"name": 5, "path": "x"})[0] == 400
        assert s.raw("POST", "/v1/adapters", {"name": "x"})[0] == 400
        assert [a["id"] for a in s.raw("GET", "/v1/adapters")[1]["data"]] == ["legal", "medical"]
        # removing an adapter while a stream on it runs: the stream finishes, unchanged
        stream = client.completions.create(model="legal", prompt=PROMPTS[3], max_tokens=40, temperature=0, stream=True)
        first = next(iter(stream))
        removed = {}
        t = threading.Thread(target=lambda: removed.update(r=s.raw("DELETE", "/v1/adapters/legal")))
        t.start()
        time.sleep(0.2)
        with pytest.raises(openai.NotFoundError):  # refused at once for new requests
            client.completions.create(model="legal", prompt="x", max_tokens=2)
        text = first.choices[0].text + "".join(c.choices[0].text for c in stream)
        t.join(60)
        assert removed["r"] == (200, {"id": "legal", "object": "adapter", "deleted": True})
        assert text == ref("legal", ids, 40)[1]
        assert [m.id for m in client.models.list().data] == ["model", "medical"]
        assert s.raw("DELETE", "/v1/adapters/legal")[0] == 404
        # medical kept its row: still right; a new adapter reuses the free row
        r = client.completions.create(model="medical", prompt=PROMPTS[3], max_tokens=8, temperature=0)
        assert r.choices[0].text == ref("medical", ids, 8)[1]
        assert s.raw("POST", "/v1/adapters", {"name": "drama", "path": str(adapters["drama"])})[0] == 201
        r = client.completions.create(model="drama", prompt=PROMPTS[3], max_tokens=8, temperature=0)
        assert r.choices[0].text == ref("drama", ids, 8)[1]
        status, body = s.raw("DELETE", "/v1/adapters", {"name": "drama"})
        assert status == 200 and body["deleted"]
    finally:
        s.close()


def test_cli_binds_localhost_by_default(served, tmp_path):
    """The CLI: --adapters and --adapter-dir, a free port, 127.0.0.1 unless --host says otherwise."""
    from gain_mlx import serve

    assert serve.make_parser().parse_args([]).host == "127.0.0.1"
    model_dir, adapters, _ = served
    folder = tmp_path / "adapters"
    for name in ("medical", "drama"):
        shutil.copytree(adapters[name], folder / name)
    cmd = [sys.executable, "-m", "gain_mlx.serve", "--model", str(model_dir), "--port", "0", "--no-fast-blas",
           "--adapters", f"legal={adapters['legal']}", "--adapter-dir", str(folder), "--api-key", "k"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("gain_mlx.serve: http://127.0.0.1:"), line + proc.stderr.read()
        url = line.split()[1]
        assert "adapters: legal, drama, medical" in line
        client = openai.OpenAI(base_url=url, api_key="k", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list().data] == ["model", "legal", "drama", "medical"]
        assert client.completions.create(model="drama", prompt="x", max_tokens=3).usage.completion_tokens == 3
        # runtime loads: only subfolders of --adapter-dir (the default policy)
        def add(path, name="x"):
            req = urllib.request.Request(url + "/adapters", json.dumps({"name": name, "path": path}).encode(), method="POST",
                                         headers={"Authorization": "Bearer k", "Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=60) as r:
                    return r.status
            except urllib.error.HTTPError as e:
                return e.code
        assert add(str(adapters["legal"])) == 403 and add("../" + adapters["legal"].name) == 403
        assert add("drama") == 201 and add(str(folder / "medical"), "y") == 201
    finally:
        proc.terminate()
        proc.wait(30)
    bad = subprocess.run([sys.executable, "-m", "gain_mlx.serve", "--model", str(model_dir), "--no-fast-blas",
                          "--adapters", "legal"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "expected name=PATH" in bad.stderr
    bad = subprocess.run([sys.executable, "-m", "gain_mlx.serve", "--model", str(model_dir), "--no-fast-blas", "--port", "0",
                          "--adapters", f"x={tmp_path / 'none'}"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "not found" in bad.stderr
