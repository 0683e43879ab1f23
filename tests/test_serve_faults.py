"""Fault and load suite of gain_mlx.serve (127.0.0.1 only): fuzzed request bodies,
out-of-range sampling fields, broken adapters added at run time, a dying worker, 64
simultaneous clients, adapters added and removed under load, clients that disconnect,
stall or never finish sending. After every case a good request must still get the same
greedy text (the autouse ``still_right`` check). The counts (cases, requests, failures)
are printed at the end (``-s``) for the README's fault section."""

import http.client
import json
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from gain_mlx import serve, serve_engine, serve_validation
from test_serve import make_adapter

hypothesis = pytest.importorskip("hypothesis", reason="the fuzz cases need hypothesis (in the dev extra)")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

CONTEXT = 96  # the model's max_position_embeddings: max_tokens is capped by it
GOOD = {"model": "legal", "prompt": "The court held that", "max_tokens": 8, "temperature": 0}
COUNTS = {"cases": 0, "requests": 0, "failures": 0}  # failures: 5xx answers or dropped connections


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_dir):
    from mlx_lm import load

    root = tmp_path_factory.mktemp("serve_faults")
    model_dir = shutil.copytree(tiny_model_dir, root / "model")
    cfg = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**cfg, "max_position_embeddings": CONTEXT}))
    fn = lambda: load(str(model_dir))[0]
    adapters = {"legal": make_adapter(root / "dir" / "legal", fn, "gain-ffn", 1),
                "medical": make_adapter(root / "dir" / "medical", fn, "gain", 2, tie_kv=True),
                "spare": make_adapter(root / "spare", fn, "gain-ffn", 3)}
    engine = serve.Engine(str(model_dir), [(n, str(adapters[n])) for n in ("legal", "medical")], max_queue=256)
    server = serve.make_server(engine, port=0, max_tokens=16, timeout=2.0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    s = Client(server.server_address[1], engine, server, adapters, root)
    s.want = s.post("/v1/completions", GOOD)[1]["choices"][0]["text"]
    yield s
    server.shutdown()
    server.server_close()
    engine.close()
    print(f"\nserve fault suite: {COUNTS['cases']} cases, {COUNTS['requests']} requests, {COUNTS['failures']} failures")


class Client:
    def __init__(self, port, engine, server, adapters, root):
        self.port, self.engine, self.server, self.adapters, self.root = port, engine, server, adapters, root

    def post(self, path, body=None, raw=None, method="POST", timeout=60):
        """``(status, parsed JSON or None, headers)``; 5xx and dropped connections count as failures."""
        COUNTS["requests"] += 1
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
            conn.request(method, path, data, {"Content-Type": "application/json"})
            r = conn.getresponse()
            text = r.read()
        except OSError:
            COUNTS["failures"] += 1
            raise
        finally:
            conn.close()
        if r.status >= 500 and r.status != 503:
            COUNTS["failures"] += 1
        try:
            obj = json.loads(text)
        except ValueError:
            obj = None
        return r.status, obj, dict(r.getheaders())

    def text(self, body=GOOD):
        status, obj, _ = self.post("/v1/completions", body)
        assert status == 200, obj
        return obj["choices"][0]["text"]


@pytest.fixture(autouse=True)
def still_right(setup):
    """Every case ends with a good request getting the same greedy text, on a live worker."""
    COUNTS["cases"] += 1
    yield
    assert setup.text() == setup.want
    assert setup.engine.failed is None


@pytest.fixture
def slow_model(monkeypatch):
    """Each forward pass takes >= 20 ms, so that a generation is still running when the test acts."""
    real = serve_engine._RowModel.__call__

    def slow(self, *args, **kwargs):
        time.sleep(0.02)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(serve_engine._RowModel, "__call__", slow)


def _is_error(status, obj):
    return obj is not None and set(obj.get("error", {})) == {"message", "type", "param", "code"}


# ---------------------------------------------------------------- fuzzing

_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([0, 1, -1, 2**63, 2**64, 10**9, 383, 384, 1e308, -0.0, 0.5]),
    st.text(max_size=12), st.sampled_from(["", "legal", "medical", "model", "\x00", "\ud800x", "court", "1"]),
)
_values = st.recursive(_scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=4), max_leaves=8)
_FIELDS = sorted(serve_validation.COMPLETION_FIELDS | serve_validation.CHAT_FIELDS | {"nope", "response_format"})


@st.composite
def bodies(draw):
    body = {"model": draw(st.sampled_from(["legal", "medical", "model", "nope"])), "max_tokens": draw(st.integers(0, 6))}
    for name in draw(st.lists(st.sampled_from(_FIELDS), max_size=5, unique=True)):
        body[name] = draw(_values)
    if draw(st.booleans()):
        body["prompt"] = draw(st.one_of(st.text(max_size=20), st.lists(st.integers(-5, 400), max_size=6),
                                        st.lists(st.lists(st.integers(0, 383), min_size=1, max_size=4), max_size=3)))
    if draw(st.booleans()):
        body["messages"] = [{"role": "user", "content": draw(st.text(max_size=20))}]
    return body


@settings(max_examples=120, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(body=bodies(), chat=st.booleans())
def test_fuzzed_bodies_get_4xx_or_200(setup, body, chat):
    """No body makes a 5xx or drops the connection: a JSON error in OpenAI's shape, or a completion."""
    status, obj, _ = setup.post("/v1/chat/completions" if chat else "/v1/completions", raw=json.dumps(body).encode())
    assert status in (200, 400, 404), (status, obj, body)
    assert status == 200 or _is_error(status, obj), obj


# ---------------------------------------------------------------- fields the generator must never see

BAD = [
    ("seed too large", {"seed": 2**64}, "seed"),
    ("seed negative", {"seed": -1}, "seed"),
    ("logit_bias beyond the vocabulary", {"logit_bias": {"99999": 5}}, "logit_bias"),
    ("logit_bias negative id", {"logit_bias": {"-1": 5}}, "logit_bias"),
    ("logit_bias not an id", {"logit_bias": {"1e3": 5}}, "logit_bias"),
    ("logit_bias huge value", {"logit_bias": {"3": 1e300}}, "logit_bias"),
    ("top_k beyond the vocabulary", {"top_k": 10**6}, "top_k"),
    ("top_k negative", {"top_k": -2}, "top_k"),
    ("temperature over 2", {"temperature": 3}, "temperature"),
    ("repetition_penalty huge", {"repetition_penalty": 1e30}, "repetition_penalty"),
    ("unknown field", {"frobnicate": True}, "frobnicate"),
    ("best_of", {"best_of": 2}, "best_of"),
    ("suffix", {"suffix": "end"}, "suffix"),
    ("stream_options unknown", {"stream_options": {"x": 1}}, "stream_options"),
    ("echo with stream", {"echo": True, "stream": True}, "stream"),
    ("max_tokens 0 without echo", {"max_tokens": 0}, "max_tokens"),
    ("prompt ids beyond the vocabulary", {"prompt": [[1, 2], [3, 500]]}, "prompt"),
    ("too many prompts", {"prompt": ["x"] * 300}, "prompt"),
]


@pytest.mark.parametrize("what,extra,param", BAD, ids=[b[0] for b in BAD])
def test_out_of_range_fields_are_400(setup, what, extra, param):
    status, obj, _ = setup.post("/v1/completions", {**GOOD, **extra})
    assert status == 400 and obj["error"]["param"] == param, obj


RAW = [
    ("NaN temperature", b'{"model": "legal", "prompt": "x", "temperature": NaN}'),
    ("Infinity top_p", b'{"model": "legal", "prompt": "x", "top_p": Infinity}'),
    ("-Infinity min_p", b'{"model": "legal", "prompt": "x", "min_p": -Infinity}'),
    ("temperature 1e400 (inf)", b'{"model": "legal", "prompt": "x", "temperature": 1e400}'),
    ("deeply nested", b'{"prompt": ' + b"[" * 100000 + b"]" * 100000 + b"}"),
    ("lone surrogate in prompt", b'{"model": "legal", "prompt": "a\\ud800b"}'),
    ("lone surrogate in a message", b'{"model": "legal", "messages": [{"role": "user", "content": "\\udfff"}]}'),
    ("NUL in adapters", b'{"model": "legal", "prompt": "x", "adapters": "a\\u0000b"}'),
]


@pytest.mark.parametrize("what,raw", RAW, ids=[r[0] for r in RAW])
def test_hostile_json_is_4xx(setup, what, raw):
    path = "/v1/chat/completions" if b"messages" in raw else "/v1/completions"
    status, obj, _ = setup.post(path, raw=raw)
    assert 400 <= status < 500 and _is_error(status, obj), (status, obj)


def test_unusable_top_k_does_not_fail_another_request(setup):
    """A bad request next to a running one: the running one finishes, right."""
    long = {**GOOD, "max_tokens": 40}
    want = setup.text(long)
    with ThreadPoolExecutor(2) as pool:
        running = pool.submit(setup.text, long)
        time.sleep(0.05)
        assert setup.post("/v1/completions", {**GOOD, "top_k": 10**9})[0] == 400
        assert running.result() == want


def test_failed_sampling_step_leaves_sampling_working(setup, monkeypatch):
    """A sampler that raises inside mlx-lm's compiled sampling (as top_k == vocabulary did)
    fails its batch; later sampled requests still work and give the same seeded text."""
    from mlx_lm.sample_utils import make_sampler

    sampled = {**GOOD, "temperature": 1.0, "seed": 7}
    want = setup.text(sampled)
    real = setup.engine._sampler
    monkeypatch.setattr(setup.engine, "_sampler", lambda p: make_sampler(1.0, top_k=setup.engine.vocab_size) if p.seed == 8 else real(p))
    status, obj, _ = setup.post("/v1/completions", {**sampled, "seed": 8})
    COUNTS["failures"] -= status == 500  # the injected fault
    assert status == 500 and "generation failed" in obj["error"]["message"]
    assert setup.post("/v1/completions", {**GOOD, "temperature": 1.0})[0] == 200  # no seed: the state left behind
    assert setup.text(sampled) == want
    assert setup.post("/v1/completions", {**sampled, "top_k": setup.engine.vocab_size})[0] == 200  # = no top-k


def test_max_tokens_capped_by_context(setup):
    status, obj, _ = setup.post("/v1/completions", {**GOOD, "max_tokens": 10**12, "ignore_eos": True})
    assert status == 200, obj
    u = obj["usage"]
    assert u["prompt_tokens"] + u["completion_tokens"] == CONTEXT and obj["choices"][0]["finish_reason"] == "length"
    status, obj, _ = setup.post("/v1/completions", {**GOOD, "prompt": list(range(1, CONTEXT + 1))})
    assert status == 400 and obj["error"]["code"] == "context_length_exceeded"


# ---------------------------------------------------------------- adapters at run time


def _broken(root, name, how):
    import numpy as np
    from safetensors.numpy import load_file, save_file

    from gain_mlx.adapter import CONFIG_FILE, GAINS_FILE

    path = shutil.copytree(root / "spare", root / "broken" / name)
    cfg = json.loads((path / CONFIG_FILE).read_text())
    if how == "no model_type":
        del cfg["model_type"]
    elif how == "targets not a list of objects":
        cfg["targets"] = [1, 2]
    elif how == "unknown layer":
        cfg["targets"][0]["path"] = "model.layers.99.mlp.down_proj"
    elif how in ("gain of the wrong shape", "NaN gain"):
        gains = load_file(str(path / GAINS_FILE))
        key = sorted(gains)[0]
        gains[key] = np.ones(7, np.float32) if how == "gain of the wrong shape" else np.full_like(gains[key], np.nan)
        save_file(gains, str(path / GAINS_FILE))
    elif how == "config not JSON":
        (path / CONFIG_FILE).write_text("{")
        return path
    (path / CONFIG_FILE).write_text(json.dumps(cfg))
    return path


BROKEN = ["no model_type", "targets not a list of objects", "unknown layer", "gain of the wrong shape", "NaN gain", "config not JSON"]


@pytest.mark.parametrize("how", BROKEN)
def test_broken_adapter_add_leaves_the_set_as_it_was(setup, how):
    before = {n: setup.text({**GOOD, "model": n}) for n in ("legal", "medical", "model")}
    path = _broken(setup.root, how.replace(" ", "_"), how)
    status, obj, _ = setup.post("/v1/adapters", {"name": "broken", "path": str(path)})
    assert status == 400 and obj["error"]["code"] == "invalid_adapter", obj
    assert [a["id"] for a in setup.post("/v1/adapters", method="GET")[1]["data"]] == ["legal", "medical"]
    assert {n: setup.text({**GOOD, "model": n}) for n in before} == before
    # a later add still works, and is removed again
    assert setup.post("/v1/adapters", {"name": "spare", "path": str(setup.adapters["spare"])})[0] == 201
    assert setup.post("/v1/adapters/spare", method="DELETE")[0] == 200


def test_adapter_names_and_paths(setup):
    for body in ({"name": "a\x00b", "path": str(setup.adapters["spare"])}, {"name": "ok", "path": "a\x00b"},
                 {"name": "ok", "path": str(setup.adapters["spare"]), "extra": 1}, {"name": "x" * 500, "path": "p"}):
        status, obj, _ = setup.post("/v1/adapters", body)
        assert status == 400, (body, obj)


def test_runtime_adapter_policy(setup):
    """--adapter-dir confines POST /v1/adapters to its subfolders; 'off' refuses every load."""
    handler = setup.server.RequestHandlerClass
    try:
        handler.runtime_adapters, handler.adapter_root = "adapter-dir", setup.root / "dir"
        for path in (str(setup.adapters["spare"]), "../spare", "/etc", str(setup.root / "dir")):
            status, obj, _ = setup.post("/v1/adapters", {"name": "x", "path": path})
            assert status == 403 and obj["error"]["code"] == "path_not_allowed", (path, obj)
        handler.runtime_adapters = "off"
        assert setup.post("/v1/adapters", {"name": "x", "path": "legal"})[1]["error"]["code"] == "runtime_adapters_off"
        handler.runtime_adapters = "adapter-dir"
        status, obj, _ = setup.post("/v1/adapters", {"name": "legal2", "path": "legal"})  # a subfolder's name
        assert status == 201, obj
        assert setup.text({**GOOD, "model": "legal2"}) == setup.want
        assert setup.post("/v1/adapters/legal2", method="DELETE")[0] == 200
    finally:
        handler.runtime_adapters, handler.adapter_root = "any", None


def test_worker_death_fails_held_requests_and_restarts(setup, monkeypatch, slow_model):
    """A worker that dies mid-generation: its request gets a 500 within seconds (not a
    10-minute wait), the supervisor restarts it, and the next request is right."""
    engine = setup.engine
    real = engine._handle
    died = threading.Event()

    def dying(kind, payload):
        if kind == "submit" and not died.is_set() and engine._jobs:
            died.set()
            raise SystemExit("injected worker death")
        return real(kind, payload)

    monkeypatch.setattr(engine, "_handle", dying)
    restarts = engine.restarts
    with ThreadPoolExecutor(2) as pool:
        held = pool.submit(setup.post, "/v1/completions", {**GOOD, "max_tokens": 80, "ignore_eos": True})
        while not engine._jobs:
            time.sleep(0.01)
        t0 = time.monotonic()
        second = setup.post("/v1/completions", GOOD)
        status, obj, _ = held.result(timeout=30)
    COUNTS["failures"] -= 2  # the two injected 500s are the expected outcome
    assert time.monotonic() - t0 < 10
    for status, obj in ((status, obj), second[:2]):  # the held request and the one being admitted
        assert status == 500 and "restarted" in obj["error"]["message"], obj
    assert engine.restarts == restarts + 1
    assert setup.post("/health", method="GET")[1]["restarts"] == engine.restarts


# ---------------------------------------------------------------- load


def test_64_simultaneous_clients(setup):
    """64 clients connect at once (backlog >= 128): every one is answered, right."""
    assert setup.server.request_queue_size >= 128
    want = {n: setup.text({**GOOD, "model": n}) for n in ("legal", "medical", "model")}
    names = ["legal", "medical", "model"] * 22
    with ThreadPoolExecutor(len(names)) as pool:
        got = list(pool.map(lambda n: setup.text({**GOOD, "model": n}), names[:64]))
    assert got == [want[n] for n in names[:64]]


def test_adapters_added_and_removed_under_load(setup):
    want = {n: setup.text({**GOOD, "model": n}) for n in ("legal", "medical")}
    assert setup.post("/v1/adapters", {"name": "spare", "path": str(setup.adapters["spare"])})[0] == 201
    spare = setup.text({**GOOD, "model": "spare"})
    assert setup.post("/v1/adapters/spare", method="DELETE")[0] == 200
    stop = threading.Event()
    churn = {"adds": 0}

    def churner():
        while not stop.is_set():
            assert setup.post("/v1/adapters", {"name": "spare", "path": str(setup.adapters["spare"])})[0] == 201
            churn["adds"] += 1
            assert setup.post("/v1/adapters/spare", method="DELETE")[0] == 200

    def client(i):
        name = ("legal", "medical", "spare")[i % 3]
        status, obj, _ = setup.post("/v1/completions", {**GOOD, "model": name})
        if name == "spare":
            assert status in (200, 404), obj
            return None if status == 404 else obj["choices"][0]["text"]
        assert status == 200, obj
        return obj["choices"][0]["text"] == want[name]

    t = threading.Thread(target=churner)
    t.start()
    try:
        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(client, range(96)))
    finally:
        stop.set()
        t.join(60)
    assert churn["adds"] >= 1
    assert all(r for i, r in enumerate(results) if i % 3 != 2)
    assert {r for i, r in enumerate(results) if i % 3 == 2 and r is not None} <= {spare}


def _open(setup, data=b""):
    s = socket.create_connection(("127.0.0.1", setup.port), timeout=10)
    if data:
        s.sendall(data)
    return s


def _request(body):
    data = json.dumps(body).encode()
    return b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data)


def _wait(cond, seconds=15):
    deadline = time.time() + seconds
    while not cond() and time.time() < deadline:
        time.sleep(0.02)
    return cond()


def test_non_streaming_client_going_away_cancels_its_generation(setup, slow_model):
    COUNTS["requests"] += 1
    s = _open(setup, _request({**GOOD, "max_tokens": 10**6, "ignore_eos": True}))  # ~90 tokens, >= 1.8 s
    assert _wait(lambda: setup.engine._jobs, 10)
    passes = setup.engine.stats["forward_passes"]
    s.close()
    assert _wait(lambda: not setup.engine._jobs, 1), "the generation ran on after its client left"
    assert setup.engine.stats["forward_passes"] - passes < 40


def test_half_open_and_slow_clients(setup):
    """Connections that send nothing, half a header or half a body are closed after the
    timeout (2 s here); a slow but steady client is served."""
    COUNTS["requests"] += 4
    idle = _open(setup)
    half_header = _open(setup, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
    half_body = _open(setup, _request(GOOD)[:-5])
    for s in (idle, half_header, half_body):
        s.settimeout(10)
        t0 = time.monotonic()
        data = s.recv(65536)
        assert time.monotonic() - t0 < 8
        assert data == b"" or b" 408 " in data.split(b"\r\n")[0], data[:80]
        s.close()
    slow = _open(setup)
    for i in range(0, len(req := _request(GOOD)), 40):
        slow.sendall(req[i: i + 40])
        time.sleep(0.05)
    data = b""
    while chunk := slow.recv(65536):
        data += chunk
    assert b" 200 " in data.split(b"\r\n")[0] and setup.want in json.loads(data.split(b"\r\n\r\n", 1)[1])["choices"][0]["text"]
    assert _wait(lambda: setup.server._connections == 0, 5)


def test_connection_and_queue_bounds(setup):
    """Beyond max_connections a connection gets 503 with Retry-After at once; beyond the
    queue a request gets 429 with Retry-After."""
    server, engine = setup.server, setup.engine
    server.max_connections = 3
    held = [_open(setup) for _ in range(3)]
    try:
        assert _wait(lambda: server._connections == 3, 5)
        status, obj, headers = setup.post("/v1/completions", GOOD)
        assert status == 503 and headers.get("Retry-After") and obj["error"]["code"] == "too_many_connections"
    finally:
        for s in held:
            s.close()
        server.max_connections = serve.DEFAULT_MAX_CONNECTIONS
    assert _wait(lambda: server._connections == 0, 5)
    engine.max_queue = 2
    try:
        status, obj, headers = setup.post("/v1/completions", {**GOOD, "prompt": ["a", "b", "c"]})
        assert status == 429 and headers.get("Retry-After") and obj["error"]["code"] == "queue_full"
    finally:
        engine.max_queue = 256


# ---------------------------------------------------------------- configuration


def test_empty_api_key_refused_and_loopback(setup, capsys):
    with pytest.raises(SystemExit) as e:
        serve.main(["--api-key", "", "--port", "0"])
    assert e.value.code == 2 and "--api-key" in capsys.readouterr().err
    assert serve._loopback("127.0.0.1") and serve._loopback("::1") and serve._loopback("localhost")
    assert not serve._loopback("0.0.0.0") and not serve._loopback("192.168.1.4") and not serve._loopback("example.org")
    with pytest.raises(ValueError):
        serve.make_server(setup.engine, port=0, api_key="")
