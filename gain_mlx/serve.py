"""python -m gain_mlx.serve: an OpenAI-compatible server for many gain adapters on one base.

One base model stays in memory, untouched; each adapter is a stack row of gains
(``gain_mlx.multi``). Requests name their adapter in ``model`` (or mlx_lm.server's
``adapters`` field) and requests for different adapters share one batched forward pass,
each sequence scaled by its own gains (continuous batching by mlx-lm's
``BatchGenerator``). Adapters are added and removed while it runs
(``POST /v1/adapters``, ``DELETE /v1/adapters/NAME``), each checked against the base's
fingerprint when loaded.

Endpoints: ``GET /v1/models``, ``GET /v1/models/ID``, ``POST /v1/completions``,
``POST /v1/chat/completions`` (``"stream": true`` for server-sent events),
``GET|POST /v1/adapters``, ``DELETE /v1/adapters/NAME``, ``GET /health``.

This module is the HTTP side and the CLI: the engine is ``serve_engine``, the request
validation ``serve_validation``, the text out ``serve_text``; engine errors become HTTP
statuses in one table, ``ENGINE_STATUS``.
"""

import argparse
import hmac
import json
import logging
import math
import select
import socket
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Optional

from . import cpu, policy
from .errors import UsageError, UserError, cli
from .serve_engine import (
    BASE_ALIASES,
    DEFAULT_MAX_QUEUE,
    DEFAULT_MAX_TOKENS,
    AdapterNameTaken,
    BadAdapter,
    BadAdapterName,
    Engine,
    EngineError,
    EngineTimeout,
    GenerationFailed,
    QueueFull,
    UnknownAdapter,
    WorkerStopped,
    check_name,
)
from .serve_validation import MISSING, APIError, get_field, parse_body, parse_request
from .serve_text import detokenizer, run_job, token_texts

log = logging.getLogger("gain_mlx.serve")

MAX_BODY_BYTES = 16 << 20
DEFAULT_MAX_CONNECTIONS = 256
DEFAULT_TIMEOUT = 60.0  # seconds a connection may stay idle or half-sent
LISTEN_BACKLOG = 512
RUNTIME_ADAPTERS = ("off", "adapter-dir", "any")


# engine error -> (HTTP status, OpenAI error type, error code): the one place where
# the engine's failures become HTTP answers
ENGINE_STATUS = {
    QueueFull: (429, "server_error", "queue_full"),
    UnknownAdapter: (404, "invalid_request_error", "model_not_found"),
    BadAdapter: (400, "invalid_request_error", "invalid_adapter"),
    BadAdapterName: (400, "invalid_request_error", "invalid_adapter"),
    AdapterNameTaken: (409, "invalid_request_error", "invalid_adapter"),
    WorkerStopped: (503, "server_error", None),
    EngineTimeout: (504, "server_error", None),
    GenerationFailed: (500, "server_error", None),
}


def api_error(e) -> APIError:
    """The HTTP answer to an :class:`APIError` (itself) or an engine error."""
    if isinstance(e, APIError):
        return e
    status, type_, code = ENGINE_STATUS[type(e)]
    return APIError(status, str(e), type_=type_, param=e.param, code=code)


# ---------------------------------------------------------------- HTTP


class Handler(BaseHTTPRequestHandler):
    server_version = "gain_mlx.serve"
    engine: Engine = None
    api_key: Optional[str] = None
    default_max_tokens = DEFAULT_MAX_TOKENS
    timeout = DEFAULT_TIMEOUT  # idle, half-open and slow connections are closed after this
    runtime_adapters = "any"  # what POST /v1/adapters may load: see RUNTIME_ADAPTERS
    adapter_root: Optional[Path] = None

    def log_message(self, fmt, *args):
        log.info("%s - %s", self.address_string(), fmt % args)

    # -- plumbing

    def _send_json(self, status, obj, headers=()):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _send_error(self, e):
        e = api_error(e)
        headers = [("WWW-Authenticate", "Bearer")] if e.status == 401 else []
        if e.status in (429, 503):
            headers.append(("Retry-After", "1"))
        self._send_json(e.status, e.body(), headers)

    def _client_gone(self) -> bool:
        """True once the client closed its end (checked without reading its data)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def _dispatch(self, method):
        try:
            path = self.path.split("?", 1)[0].rstrip("/") or "/"
            if path == "/health":
                e = self.engine
                return self._send_json(200 if e.failed is None else 503,
                                       {"status": "ok" if e.failed is None else "failed", "restarts": e.restarts, **e.stats})
            self._check_key()
            route = self._route(method, path)
            if route is None:
                raise APIError(404, f"no route {method} {path}", code="not_found")
            route()
        except (APIError, EngineError) as e:
            self._send_error(e)
        except TimeoutError:  # a half-sent request: say so if the client still listens
            self.close_connection = True
            try:
                self._send_error(APIError(408, f"the request was not received within {self.timeout:g} s", code="request_timeout"))
            except OSError:
                pass
        except ConnectionError:  # the client went away (its generation was cancelled)
            self.close_connection = True
        except Exception as e:  # a bug answers 500 and the server keeps serving
            log.exception("request failed")
            try:
                self._send_error(APIError(500, f"{type(e).__name__}: {e}", type_="server_error"))
            except OSError:
                pass

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def do_DELETE(self):
        self._dispatch("DELETE")

    def _route(self, method, path):
        if path in ("/v1/models", "/models") and method == "GET":
            return self._models
        if path.startswith(("/v1/models/", "/models/")) and method == "GET":
            return lambda: self._model(path.split("/models/", 1)[1])
        if path in ("/v1/completions", "/completions") and method == "POST":
            return lambda: self._completion(chat=False)
        if path in ("/v1/chat/completions", "/chat/completions") and method == "POST":
            return lambda: self._completion(chat=True)
        if path == "/v1/adapters":
            return {"GET": self._list_adapters, "POST": self._add_adapter, "DELETE": self._remove_adapter}.get(method)
        if path.startswith("/v1/adapters/") and method == "DELETE":
            return lambda: self._remove_adapter(path.split("/v1/adapters/", 1)[1])
        if path.startswith("/v1/adapters/") and method == "GET":
            return lambda: self._get_adapter(path.split("/v1/adapters/", 1)[1])
        return None

    def _check_key(self):
        if not self.api_key:
            return
        auth = self.headers.get("Authorization", "")
        token = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(token.encode("utf-8", "replace"), self.api_key.encode()):
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")

    def _body(self) -> dict:
        length = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            raise APIError(411, "send a Content-Length, not a chunked body", code="length_required")
        if length is None:
            raise APIError(411, "a Content-Length header is required", code="length_required")
        try:
            length = int(length)
        except ValueError:
            raise APIError(400, "invalid Content-Length header", code="invalid_request") from None
        if length < 0 or length > MAX_BODY_BYTES:
            raise APIError(413, f"request body over {MAX_BODY_BYTES} bytes", code="request_too_large")
        raw = self.rfile.read(length)
        if len(raw) < length:
            raise ConnectionResetError("the client closed before sending its body")
        return parse_body(raw)

    # -- models and adapters

    def _model_obj(self, name, info=None):
        e = self.engine
        obj = {"id": name, "object": "model", "created": (info or {}).get("created", 0), "owned_by": "gain_mlx"}
        if info is not None:
            obj.update(parent=e.base_name, root=e.base_name, adapter={k: info[k] for k in ("variant", "tie_kv", "targets", "path")})
        return obj

    def _models(self):
        e = self.engine
        data = [self._model_obj(e.base_name)] + [self._model_obj(i["id"], i) for i in e.adapter_info()]
        self._send_json(200, {"object": "list", "data": data})

    def _model(self, name):
        e = self.engine
        if name == e.base_name or name in BASE_ALIASES:
            return self._send_json(200, self._model_obj(e.base_name))
        info = e.adapter_info(name)
        if info is None:
            raise APIError(404, f"the model '{name}' does not exist: GET /v1/models lists them", code="model_not_found")
        self._send_json(200, self._model_obj(name, info))

    def _list_adapters(self):
        self._send_json(200, {"object": "list", "data": self.engine.adapter_info()})

    def _get_adapter(self, name):
        info = self.engine.adapter_info(name)
        if info is None:
            raise APIError(404, f"no adapter named '{name}' is loaded", code="model_not_found")
        self._send_json(200, info)

    def _add_adapter(self):
        body = self._body()
        name = get_field(body, "name", str)
        path = get_field(body, "path", str)
        for key in body:
            if key not in ("name", "path"):
                raise APIError(400, f"'{key}' is not supported by this server", param=key, code="unsupported_parameter")
        check_name(name, self.engine.base_name)
        self._send_json(201, self.engine.add_adapter(name, self._allowed_adapter_path(path)))

    def _allowed_adapter_path(self, path: str) -> str:
        """The folder ``path`` may name under the server's ``runtime_adapters`` policy."""
        if not path or "\x00" in path or len(path) > 4096:
            raise APIError(400, "'path' must be a non-empty folder path without NUL bytes", param="path", code="invalid_value")
        if self.runtime_adapters == "any":
            return path
        if self.runtime_adapters == "off" or self.adapter_root is None:
            raise APIError(403, "loading adapters at run time is off on this server (start it with --adapter-dir, or --runtime-adapters any)",
                           param="path", code="runtime_adapters_off")
        root = self.adapter_root.resolve()
        target = (root / path).resolve()
        if target == root or root not in target.parents:
            raise APIError(403, "this server loads adapters only from folders below its --adapter-dir: give a subfolder's name",
                           param="path", code="path_not_allowed")
        return str(target)

    def _remove_adapter(self, name=None):
        if name is None:
            name = get_field(self._body(), "name", str)
        self._send_json(200, self.engine.remove_adapter(name))

    # -- completions

    def _completion(self, chat):
        e = self.engine
        body = self._body()
        r = parse_request(body, e, chat, self.default_max_tokens)
        jobs, adapter, stop, params = r.jobs, r.adapter, r.stop, r.params
        with e.slots(len(jobs)):
            name = body.get("model") or (adapter or e.base_name)
            meta = dict(
                id=("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24],
                created=int(time.time()),
                model=name,
                system_fingerprint=f"gain_mlx-{adapter or 'base'}",
            )
            try:
                for job in jobs:
                    e.submit(job)
                if r.stream:
                    self._stream(jobs[0], stop, chat, meta, len(jobs[0].prompt), r.include_usage, params)
                elif chat:
                    self._whole_chat(jobs[0], stop, meta, params)
                else:
                    self._whole_text(jobs, stop, meta, params, r.echo)
            finally:
                for job in jobs:
                    if not job.cancelled:
                        e.cancel(job)  # a no-op once finished; stops the job when the client went away

    def _chat_entries(self, tok, lp, top):
        t = self.engine.tokenizer
        s = t.convert_ids_to_tokens(tok)
        return [{"token": s, "id": tok, "logprob": lp, "bytes": list(s.encode()),
                 "top_logprobs": [{"token": t.convert_ids_to_tokens(i), "id": i, "logprob": v} for i, v in top]}]

    def _top_dict(self, top):
        """``{decoded text: logprob}``, best first; tokens that decode alike keep the best."""
        out = {}
        for i, v in top:
            out.setdefault(self.engine.tokenizer.decode([i]), v)
        return out

    def _whole_chat(self, job, stop, meta, params):
        text, entries, n, finish = [], [], 0, None
        for chunk, tok, lp, top, finish in run_job(self.engine, job, stop, gone=self._client_gone):
            text.append(chunk)
            n += tok is not None
            if params.logprobs and tok is not None:
                entries += self._chat_entries(tok, lp, top)
        n_prompt = len(job.prompt)
        usage = {"prompt_tokens": n_prompt, "completion_tokens": n, "total_tokens": n_prompt + n}
        choice = {"index": 0, "message": {"role": "assistant", "content": "".join(text)}, "finish_reason": finish,
                  "logprobs": {"content": entries} if params.logprobs else None}
        self._send_json(200, {**meta, "object": "chat.completion", "choices": [choice], "usage": usage})

    def _whole_text(self, jobs, stop, meta, params, echo):
        """Legacy completions: one choice per prompt, in prompt order; with ``echo`` each
        choice starts with its prompt (and its tokens' logprobs, the first null)."""
        tokenizer = self.engine.tokenizer
        choices, n_prompt, n_out = [], 0, 0
        for index, job in enumerate(jobs):
            text, toks, lps, tops, finish = [], [], [], [], None
            for chunk, tok, lp, top, finish in run_job(self.engine, job, stop, gone=self._client_gone, keep_eos=echo,
                                                       keep_space=True):
                text.append(chunk)
                if tok is not None:
                    toks.append(tok)
                    lps.append(lp)
                    tops.append(self._top_dict(top) if params.logprobs else None)
            text = "".join(text)
            n_prompt += len(job.prompt)
            n_out += len(toks)
            logprobs = None
            if echo:
                pieces = token_texts(tokenizer, job.prompt + toks)
                text = "".join(pieces[: len(job.prompt)]) + text
                if params.logprobs:
                    scored = job.prompt_logprobs or []
                    lps = [None] + [lp for lp, _ in scored] + lps
                    tops = [None] + [self._top_dict(t) for _, t in scored] + tops
            elif params.logprobs:
                pieces = token_texts(tokenizer, toks, keep_space=True)
            if params.logprobs:
                offsets = [0]
                for piece in pieces[:-1]:
                    offsets.append(offsets[-1] + len(piece))
                logprobs = {"tokens": pieces, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets[: len(pieces)]}
            choices.append({"index": index, "text": text, "finish_reason": finish, "logprobs": logprobs})
        usage = {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out}
        self._send_json(200, {**meta, "object": "text_completion", "choices": choices, "usage": usage})

    def _stream(self, job, stop, chat, meta, n_prompt, include_usage, params):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        obj_type = "chat.completion.chunk" if chat else "text_completion"

        def send(choices, usage=MISSING):
            obj = {**meta, "object": obj_type, "choices": choices}
            if include_usage:
                obj["usage"] = None if usage is MISSING else usage
            self.wfile.write(b"data: " + json.dumps(obj).encode() + b"\n\n")
            self.wfile.flush()

        if chat:
            send([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}])
        n, offset, detok = 0, 0, detokenizer(self.engine.tokenizer, keep_space=not chat)
        try:
            for chunk, tok, lp, top, finish in run_job(self.engine, job, stop, gone=self._client_gone,
                                                       keep_space=not chat):
                n += tok is not None
                logprobs = None
                if params.logprobs and chat:
                    logprobs = {"content": self._chat_entries(tok, lp, top) if tok is not None else []}
                elif params.logprobs:
                    pieces = []
                    if tok is not None:
                        detok.add_token(tok)
                        pieces = [detok.last_segment]
                    if finish is not None:
                        detok.finalize()
                        pieces = pieces or ([""] if detok.last_segment else [])
                        if pieces:
                            pieces[-1] += detok.last_segment
                    logprobs = {"tokens": pieces, "token_logprobs": [lp] if pieces else [],
                                "top_logprobs": [self._top_dict(top)] if pieces else [], "text_offset": [offset] if pieces else []}
                    offset += sum(map(len, pieces))
                if not chunk and not (logprobs and (logprobs.get("tokens") or logprobs.get("content"))) and finish is None:
                    continue
                if chat:
                    delta = {"content": chunk} if chunk else {}
                    choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
                else:
                    choice = {"index": 0, "text": chunk, "logprobs": logprobs, "finish_reason": finish}
                send([choice])
        except (APIError, EngineError) as e:  # headers are out: the error goes in the stream
            self.wfile.write(b"data: " + json.dumps(api_error(e).body()).encode() + b"\n\n")
        if include_usage:
            send([], {"prompt_tokens": n_prompt, "completion_tokens": n, "total_tokens": n_prompt + n})
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()


_BUSY = b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\nConnection: close\r\n"


class Server(ThreadingHTTPServer):
    """One thread per connection, at most ``max_connections`` at once: beyond them a
    connection is answered 503 with ``Retry-After`` at once and closed."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = LISTEN_BACKLOG  # the listen backlog
    max_connections = DEFAULT_MAX_CONNECTIONS

    def __init__(self, *args, **kwargs):
        self._connections = 0
        self._count_lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def process_request(self, request, client_address):
        with self._count_lock:
            busy = self._connections >= self.max_connections
            self._connections += not busy
        if not busy:
            return super().process_request(request, client_address)
        body = json.dumps(APIError(503, f"the server has {self.max_connections} connections open: retry later",
                                   type_="server_error", code="too_many_connections").body()).encode()
        try:
            request.settimeout(0.05)
            request.sendall(_BUSY + b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            request.shutdown(socket.SHUT_WR)
            request.recv(65536)  # let the request's bytes arrive so that closing does not reset
        except OSError:
            pass
        self.shutdown_request(request)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._count_lock:
                self._connections -= 1


def make_server(engine: Engine, host="127.0.0.1", port=8080, api_key=None, max_tokens=DEFAULT_MAX_TOKENS, *,
                timeout=DEFAULT_TIMEOUT, max_connections=DEFAULT_MAX_CONNECTIONS, runtime_adapters="any",
                adapter_root=None) -> Server:
    """An HTTP server (not yet serving) for ``engine``: call ``serve_forever()``.

    ``runtime_adapters`` says what ``POST /v1/adapters`` may load: ``"off"`` nothing,
    ``"adapter-dir"`` only folders below ``adapter_root``, ``"any"`` any folder or Hub id."""
    if api_key is not None and not api_key:
        raise ValueError("an empty API key would let everyone in")
    if runtime_adapters not in RUNTIME_ADAPTERS:
        raise ValueError(f"runtime_adapters must be one of {RUNTIME_ADAPTERS}")
    handler = type("BoundHandler", (Handler,), {
        "engine": engine, "api_key": api_key, "default_max_tokens": max_tokens, "timeout": timeout,
        "runtime_adapters": runtime_adapters, "adapter_root": Path(adapter_root) if adapter_root else None,
    })
    server = Server((host, port), handler, bind_and_activate=False)
    server.max_connections = max_connections
    try:
        server.server_bind()
        server.server_activate()
    except BaseException:
        server.server_close()
        raise
    return server


# ---------------------------------------------------------------- CLI


def _loopback(host: str) -> bool:
    import ipaddress

    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_adapters(values) -> list:
    """``name=PATH[,name=PATH...]`` (repeatable) -> ``[(name, path)]``."""
    out = []
    for value in values or []:
        for item in value.split(","):
            item = item.strip()
            if not item:
                continue
            name, sep, path = item.partition("=")
            if not sep or not name or not path:
                raise UsageError(f"--adapters {item!r}: expected name=PATH (PATH a folder or Hub repo id)")
            out.append((name.strip(), path.strip()))
    return out


def adapters_in_dir(folder) -> list:
    """``[(subfolder name, subfolder)]`` for each adapter folder directly in ``folder``."""
    from .adapter import CONFIG_FILE

    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"--adapter-dir {folder}: not a folder")
    found = [(p.name, str(p)) for p in sorted(folder.iterdir()) if (p / CONFIG_FILE).is_file()]
    if not found:
        raise UserError(f"--adapter-dir {folder}: no subfolder holds a {CONFIG_FILE}")
    return found


def make_parser():
    p = argparse.ArgumentParser(prog="python -m gain_mlx.serve", description=__doc__.splitlines()[0])
    p.add_argument("--model", help="base model (folder, repo or .gguf; default: packaged SmolLM2)")
    p.add_argument("--adapters", action="append", metavar="NAME=PATH[,NAME=PATH...]",
                   help="adapters to serve, each a folder or Hub repo id (repeatable)")
    p.add_argument("--adapter-dir", help="serve every adapter folder in this folder, named by its subfolder")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8080, help="port (0: a free one; default 8080)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every request (except /health)")
    p.add_argument("--runtime-adapters", choices=RUNTIME_ADAPTERS, default="adapter-dir",
                   help="what POST /v1/adapters may load: nothing, only folders below --adapter-dir (the default; "
                        "off without it), or any folder or Hub repo id")
    p.add_argument("--served-model-name", help="the base model's id in /v1/models (default: from --model)")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, help="default max_tokens of a request")
    p.add_argument("--max-prompt-tokens", type=int, default=None,
                   help="longest prompt accepted (default: the model's context length, else 32768)")
    p.add_argument("--decode-concurrency", type=int, default=32, help="sequences decoded in one batch")
    p.add_argument("--prompt-concurrency", type=int, default=8, help="prompts prefilled in one batch")
    p.add_argument("--prefill-step-size", type=int, default=2048)
    p.add_argument("--max-connections", type=int, default=DEFAULT_MAX_CONNECTIONS,
                   help="connections served at once; beyond them 503 with Retry-After")
    p.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE,
                   help="sequences in flight or waiting; beyond them 429 with Retry-After")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                   help="seconds an idle or half-sent connection is kept (default 60)")
    p.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    cpu.add_fast_blas_argument(p)
    return p


@cli
def main(argv=None):
    args = make_parser().parse_args(argv)
    for flag in ("max_tokens", "decode_concurrency", "prompt_concurrency", "prefill_step_size", "max_connections", "max_queue"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be >= 1")
    if not (math.isfinite(args.timeout) and args.timeout > 0):
        raise UsageError("--timeout must be a number of seconds > 0")
    if args.api_key is not None and not args.api_key.strip():
        raise UsageError("--api-key is empty: it would let everyone in; give a key, or leave the flag out on 127.0.0.1")
    if args.max_prompt_tokens is not None and args.max_prompt_tokens < 1:
        raise UsageError("--max-prompt-tokens must be >= 1")
    if not 0 <= args.port <= 65535:
        raise UsageError("--port must be in 0-65535")
    adapters = parse_adapters(args.adapters) + (adapters_in_dir(args.adapter_dir) if args.adapter_dir else [])
    if len({n for n, _ in adapters}) != len(adapters):
        raise UsageError("two adapters have the same name: name each one differently")
    policy.start(args.fast_blas)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(message)s")
    try:
        engine = Engine(
            args.model, adapters, decode_concurrency=args.decode_concurrency, prompt_concurrency=args.prompt_concurrency,
            prefill_step_size=args.prefill_step_size, max_prompt_tokens=args.max_prompt_tokens,
            base_name=args.served_model_name, max_queue=args.max_queue,
        )
    except EngineError as e:  # a bad --adapters name
        raise UserError(str(e)) from None
    try:
        server = make_server(engine, args.host, args.port, args.api_key, args.max_tokens, timeout=args.timeout,
                             max_connections=args.max_connections, runtime_adapters=args.runtime_adapters,
                             adapter_root=args.adapter_dir)
    except OSError as e:
        raise UserError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    host, port = server.server_address[:2]
    names = ", ".join(engine.adapter_names()) or "none"
    print(f"gain_mlx.serve: http://{host}:{port}/v1  base {engine.base_name}, adapters: {names}", flush=True)
    if not _loopback(args.host) and not args.api_key:
        print(f"warning: listening on {args.host}, beyond this machine, without --api-key: anyone who reaches it can use it",
              file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        engine.close()


if __name__ == "__main__":
    main()
