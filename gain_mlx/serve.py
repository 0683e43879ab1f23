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
"""

import argparse
import hmac
import json
import logging
import queue
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Optional

from . import cpu, policy
from .errors import UsageError, UserError, cli

log = logging.getLogger("gain_mlx.serve")

DEFAULT_MAX_TOKENS = 512
DEFAULT_MAX_PROMPT_TOKENS = 32768
MAX_BODY_BYTES = 16 << 20
BASE_ALIASES = ("default_model", "base")


class APIError(Exception):
    """An error answered to the client as ``{"error": {...}}`` in OpenAI's shape."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ---------------------------------------------------------------- engine


class _Rows:
    """A cache entry that carries each sequence's adapter stack row through mlx-lm's
    ``BatchGenerator``: it is merged, extended, filtered and split exactly like the
    sequences' KV caches, so the rows always line up with the batch."""

    def __init__(self, rows):
        self.rows = list(rows)

    @classmethod
    def merge(cls, caches):
        return cls([r for c in caches for r in c.rows])

    def extend(self, other):
        self.rows += other.rows

    def filter(self, keep):
        self.rows = [self.rows[i] for i in keep]

    def extract(self, idx):
        return _Rows([self.rows[idx]])

    def prepare(self, **kwargs):
        pass

    def finalize(self):
        pass

    @property
    def state(self):
        return ()

    @property
    def nbytes(self):
        return 0

    def size(self):
        return 0

    def empty(self):
        return False

    def is_trimmable(self):
        return False


class _RowModel:
    """The model as ``BatchGenerator`` sees it: selects each batch's rows, then runs the
    shared base (the last cache entry is the rows, not a layer's cache)."""

    def __init__(self, model, adapters, stats):
        self.model, self.adapters, self.stats = model, adapters, stats

    def __call__(self, inputs, cache=None, **kwargs):
        rows = cache[-1].rows
        self.adapters.select(rows)
        s = self.stats
        s["forward_passes"] += 1
        s["max_batch"] = max(s["max_batch"], len(rows))
        s["mixed_passes"] += len(set(rows)) > 1
        return self.model(inputs, cache=cache[:-1], **kwargs)


@dataclass
class Params:
    """What one sequence asks for (already validated)."""

    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: Optional[int] = None
    logit_bias: Optional[dict] = None
    repetition_penalty: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: bool = False
    top_logprobs: int = 0
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens tokens whatever comes


@dataclass
class Event:
    """One generated token (``token`` None: only ``error``) sent to the request's thread."""

    token: Optional[int] = None
    logprob: Optional[float] = None
    top: tuple = ()
    finish_reason: Optional[str] = None
    error: Optional[Exception] = None


@dataclass
class Job:
    prompt: list
    adapter: Optional[str]
    params: Params
    events: queue.Queue = field(default_factory=queue.Queue)
    cancelled: bool = False
    uid: Optional[int] = None


class Engine:
    """The model, its adapters and one worker thread that does all MLX work.

    HTTP threads call :meth:`submit`, :meth:`cancel`, :meth:`add_adapter` and
    :meth:`remove_adapter`; the worker admits new sequences into the running batch
    between decode steps, so no request waits for another to finish.
    """

    def __init__(self, model_spec=None, adapters=(), *, decode_concurrency=32, prompt_concurrency=8,
                 prefill_step_size=2048, max_prompt_tokens=None, base_name=None):
        self.model_spec = model_spec
        self.decode_concurrency = decode_concurrency
        self.prompt_concurrency = prompt_concurrency
        self.prefill_step_size = prefill_step_size
        self._commands = queue.Queue()
        self._lock = threading.Lock()
        self._info = {}  # adapter name -> public description
        self._removing = set()
        self._stop = False
        self.failed = None
        # The model is loaded on this thread: MLX aborts the process when lazy arrays
        # made on a thread (a model's non-parameter buffers) outlive that thread.
        self._start(list(adapters), max_prompt_tokens, base_name)
        self._thread = threading.Thread(target=self._run, daemon=True, name="gain-serve")
        self._thread.start()

    # -- called from HTTP threads

    def adapter_names(self) -> list:
        with self._lock:
            return [n for n in self._info if n not in self._removing]

    def adapter_info(self, name=None):
        with self._lock:
            if name is not None:
                return dict(self._info[name]) if name in self._info and name not in self._removing else None
            return [dict(v) for k, v in self._info.items() if k not in self._removing]

    def submit(self, job: Job) -> Job:
        if job.adapter is not None and job.adapter not in self.adapter_names():
            raise APIError(404, f"no adapter named '{job.adapter}' is loaded", code="model_not_found", param="model")
        self._command("submit", job)
        return job

    def cancel(self, job: Job):
        job.cancelled = True
        self._command("cancel", job)

    def add_adapter(self, name: str, spec, timeout=120) -> dict:
        return self._call("add", (name, spec), timeout)

    def remove_adapter(self, name: str, timeout=600) -> dict:
        with self._lock:
            if name not in self._info or name in self._removing:
                raise APIError(404, f"no adapter named '{name}' is loaded", code="model_not_found")
            self._removing.add(name)  # new requests for it are refused from now on
        return self._call("remove", name, timeout)

    def close(self):
        import gc

        self._stop = True
        self._commands.put(("wake", None))
        self._thread.join(timeout=30)
        # MLX can abort at interpreter exit when a model outlives its last use: let go now.
        self.model = self.adapters = None
        gc.collect()

    def _command(self, kind, payload):
        if self.failed is not None:
            raise APIError(503, f"the generation worker stopped: {self.failed}", type_="server_error")
        self._commands.put((kind, payload))

    def _call(self, kind, payload, timeout):
        reply = queue.Queue()
        self._command(kind, (payload, reply))
        try:
            ok, value = reply.get(timeout=timeout)
        except queue.Empty:
            raise APIError(504, f"{kind} did not finish within {timeout} s", type_="server_error") from None
        if not ok:
            raise value
        return value

    # -- the worker thread

    def _run(self):
        try:
            self._loop()
        except BaseException as e:  # never leave a request waiting forever
            log.exception("generation worker died")
            self.failed = f"{type(e).__name__}: {e}"
            self._fail_all(APIError(500, f"the generation worker stopped: {self.failed}", type_="server_error"))
        finally:
            # Lazy arrays made on this thread's stream must die on this thread: MLX
            # aborts the process if they outlive it.
            import gc

            self._generator = None
            self.failed = self.failed or "the server is shutting down"
            self._fail_all(APIError(503, "the server is shutting down", type_="server_error"))
            gc.collect()

    def _start(self, adapters, max_prompt_tokens, base_name):
        import mlx.core as mx
        from mlx_lm.models.cache import make_prompt_cache

        from .generate import load
        from .multi import AdapterSet

        self.model, self.tokenizer = load(self.model_spec, None)
        mx.eval(self.model.parameters())
        self.adapters = AdapterSet(self.model)
        self.base_name = base_name or _base_name(self.model_spec)
        self.context_length = _context_length(self.model)
        self.max_prompt_tokens = max_prompt_tokens or self.context_length or DEFAULT_MAX_PROMPT_TOKENS
        caches = make_prompt_cache(self.model)
        if not all(hasattr(c, "merge") for c in caches):
            kinds = sorted({type(c).__name__ for c in caches if not hasattr(c, "merge")})
            raise UserError(f"this model's cache ({', '.join(kinds)}) cannot be batched by mlx-lm: gain_mlx.serve needs a batchable architecture")
        for name, spec in adapters:
            self._add(name, spec)
        self._stream = None  # the worker thread's own default stream
        self._jobs = {}  # uid -> Job
        self._active = {}  # adapter name -> sequences in flight
        self._samplers = {}
        # forward passes, the largest batch, and passes that mixed several adapters
        self.stats = {"forward_passes": 0, "max_batch": 0, "mixed_passes": 0}
        self._pending_removals = []  # (name, reply)
        self._generator = None

    def _new_generator(self):
        from mlx_lm.generate import BatchGenerator

        return BatchGenerator(
            _RowModel(self.model, self.adapters, self.stats),
            stop_tokens=[[t] for t in sorted(self.tokenizer.eos_token_ids)],
            completion_batch_size=self.decode_concurrency,
            prefill_batch_size=self.prompt_concurrency,
            prefill_step_size=self.prefill_step_size,
            stream=self._stream,
        )

    def _add(self, name, spec):
        from .adapter import read_adapter
        from .hub import resolve_adapter

        _check_name(name, self.base_name)
        path = resolve_adapter(spec)
        self.adapters.add(name, path, source=f"adapter '{name}' ({spec})")
        config, _ = read_adapter(path)
        info = {
            "id": name,
            "object": "adapter",
            "path": str(spec),
            "resolved_path": str(Path(path).resolve()),
            "variant": config.get("variant"),
            "tie_kv": config.get("tie_kv"),
            "targets": len(config.get("targets", [])),
            "row": self.adapters.row(name),
            "created": int(time.time()),
        }
        with self._lock:
            self._info[name] = info
        return dict(info)

    def _loop(self):
        import mlx.core as mx

        self._stream = mx.default_stream(mx.default_device())
        self._generator = self._new_generator()
        while not self._stop:
            self._do_removals()
            try:  # wait for work only when nothing is in flight
                kind, payload = self._commands.get_nowait() if self._jobs else self._commands.get()
            except queue.Empty:
                kind = None
            while kind is not None:
                self._handle(kind, payload)
                try:
                    kind, payload = self._commands.get_nowait()
                except queue.Empty:
                    kind = None
            self._do_removals()
            if not self._jobs:
                continue
            try:
                with mx.stream(self._stream):
                    _, responses = self._generator.next()
            except Exception as e:  # one bad batch fails its requests, not the server
                log.exception("generation step failed")
                self._fail_all(APIError(500, f"generation failed: {type(e).__name__}: {e}", type_="server_error"))
                self._generator = self._new_generator()
                continue
            for r in responses:
                job = self._jobs.get(r.uid)
                if job is None:
                    continue
                p = job.params
                ev = Event(token=r.token, finish_reason=r.finish_reason)
                if p.logprobs:
                    ev.logprob = r.logprobs[r.token].item()
                    if p.top_logprobs > 0:
                        ev.top = _top_logprobs(r.logprobs, p.top_logprobs)
                job.events.put(ev)
                if r.finish_reason is not None:
                    self._finish(r.uid)

    def _handle(self, kind, payload):
        if kind == "submit":
            self._admit(payload)
        elif kind == "cancel":
            job = payload
            if job.uid is not None and job.uid in self._jobs:
                self._generator.remove([job.uid])
                self._finish(job.uid)
        elif kind == "add":
            (name, spec), reply = payload
            try:
                reply.put((True, self._add(name, spec)))
            except APIError as e:
                reply.put((False, e))
            except (UserError, ValueError, OSError) as e:
                code = 409 if "already loaded" in str(e) else 400
                reply.put((False, APIError(code, str(e), param="path" if code == 400 else "name", code="invalid_adapter")))
        elif kind == "remove":
            self._pending_removals.append(payload)

    def _admit(self, job: Job):
        from mlx_lm.models.cache import make_prompt_cache

        if job.cancelled:
            return
        with self._lock:
            known = job.adapter is None or (job.adapter in self._info and job.adapter not in self._removing)
        if not known:
            job.events.put(Event(error=APIError(404, f"no adapter named '{job.adapter}' is loaded", code="model_not_found", param="model")))
            return
        import mlx.core as mx

        p = job.params
        if p.seed is not None:
            mx.random.seed(p.seed)
        cache = make_prompt_cache(self.model) + [_Rows([self.adapters.row(job.adapter)])]
        from mlx_lm.generate import StopSequences

        (uid,) = self._generator.insert(
            [job.prompt],
            max_tokens=[p.max_tokens],
            caches=[cache],
            samplers=[self._sampler(p)],
            logits_processors=[_logits_processors(p)],
            stop_sequences=[StopSequences()] if p.ignore_eos else None,
        )
        job.uid = uid
        self._jobs[uid] = job
        self._active[job.adapter] = self._active.get(job.adapter, 0) + 1

    def _finish(self, uid):
        job = self._jobs.pop(uid)
        self._active[job.adapter] -= 1

    def _do_removals(self):
        still = []
        for name, reply in self._pending_removals:
            if self._active.get(name, 0) > 0:
                still.append((name, reply))  # its requests in flight finish first
                continue
            try:
                self.adapters.remove(name)
                with self._lock:
                    self._info.pop(name, None)
                    self._removing.discard(name)
                reply.put((True, {"id": name, "object": "adapter", "deleted": True}))
            except Exception as e:
                with self._lock:
                    self._removing.discard(name)
                reply.put((False, APIError(500, str(e), type_="server_error")))
        self._pending_removals = still

    def _sampler(self, p: Params):
        from mlx_lm.sample_utils import make_sampler

        key = (p.temperature, p.top_p, p.top_k, p.min_p)
        if key not in self._samplers:  # one object per setting: BatchGenerator samples those in one call
            self._samplers[key] = make_sampler(p.temperature, top_p=p.top_p, top_k=p.top_k, min_p=p.min_p)
        return self._samplers[key]

    def _fail_all(self, error):
        for uid, job in list(getattr(self, "_jobs", {}).items()):
            job.events.put(Event(error=error))
        if hasattr(self, "_jobs"):
            self._jobs.clear()
            self._active.clear()


def _logits_processors(p: Params):
    from mlx_lm.sample_utils import make_logits_processors

    return make_logits_processors(
        p.logit_bias,
        p.repetition_penalty or None,
        presence_penalty=p.presence_penalty or None,
        frequency_penalty=p.frequency_penalty or None,
    )


def _top_logprobs(logprobs, n):
    import mlx.core as mx

    idx = mx.argpartition(-logprobs, kth=n - 1)[:n]
    vals = logprobs[idx]
    order = mx.argsort(-vals)
    return tuple(zip(idx[order].tolist(), vals[order].tolist()))


def _context_length(model):
    args = getattr(model, "args", None)
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len"):
        value = getattr(args, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _base_name(spec):
    if spec is None:
        return "SmolLM2-135M-Instruct"
    path = Path(str(spec))
    if path.exists():
        return path.stem if path.suffix == ".gguf" else path.name
    return str(spec)


def _check_name(name, base_name):
    if not isinstance(name, str) or not name or len(name) > 128 or not all(c.isalnum() or c in "._-:/@" for c in name):
        raise APIError(400, f"adapter name {name!r}: use 1-128 letters, digits or ._-:/@", param="name", code="invalid_adapter")
    if name == base_name or name in BASE_ALIASES:
        raise APIError(409, f"adapter name '{name}' is the base model's name: choose another", param="name", code="invalid_adapter")


# ---------------------------------------------------------------- request parsing

_MISSING = object()


def _get(body, name, types, default=_MISSING, lo=None, hi=None, nullable=True):
    """``body[name]`` checked: of ``types`` (bool is not a number), within ``[lo, hi]``."""
    value = body.get(name, _MISSING)
    if value is _MISSING or (value is None and nullable):
        if default is _MISSING:
            raise APIError(400, f"'{name}' is required", param=name, code="missing_required_parameter")
        return default
    types = types if isinstance(types, tuple) else (types,)
    if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
        names = " or ".join({int: "integer", float: "number", str: "string", bool: "boolean", list: "array", dict: "object"}[t] for t in types)
        raise APIError(400, f"'{name}' must be {'an' if names[0] in 'aeiou' else 'a'} {names}, got {json.dumps(value)[:60]}", param=name, code="invalid_type")
    if lo is not None and value < lo:
        raise APIError(400, f"'{name}' must be >= {lo}, got {value}", param=name, code="invalid_value")
    if hi is not None and value > hi:
        raise APIError(400, f"'{name}' must be <= {hi}, got {value}", param=name, code="invalid_value")
    return value


def parse_params(body: dict, default_max_tokens: int, chat: bool) -> Params:
    max_tokens = _get(body, "max_completion_tokens", int, None, lo=1) if chat else None
    if max_tokens is None:
        max_tokens = _get(body, "max_tokens", int, default_max_tokens, lo=1)
    n = _get(body, "n", int, 1)
    if n != 1:
        raise APIError(400, "only n=1 is supported: send one request per completion", param="n", code="invalid_value")
    p = Params(
        max_tokens=max_tokens,
        temperature=float(_get(body, "temperature", (int, float), 0.0, lo=0, hi=2)),
        top_p=float(_get(body, "top_p", (int, float), 1.0, lo=0, hi=1)),
        top_k=_get(body, "top_k", int, 0, lo=0),
        min_p=float(_get(body, "min_p", (int, float), 0.0, lo=0, hi=1)),
        seed=_get(body, "seed", int, None),
        repetition_penalty=float(_get(body, "repetition_penalty", (int, float), 0.0, lo=0)),
        presence_penalty=float(_get(body, "presence_penalty", (int, float), 0.0, lo=-2, hi=2)),
        frequency_penalty=float(_get(body, "frequency_penalty", (int, float), 0.0, lo=-2, hi=2)),
        ignore_eos=_get(body, "ignore_eos", bool, False),
    )
    bias = _get(body, "logit_bias", dict, None)
    if bias:
        try:
            p.logit_bias = {int(k): float(v) for k, v in bias.items()}
        except (TypeError, ValueError):
            raise APIError(400, "'logit_bias' must map token ids to numbers", param="logit_bias", code="invalid_value") from None
    if chat:
        p.logprobs = _get(body, "logprobs", bool, False)
        p.top_logprobs = _get(body, "top_logprobs", int, 0, lo=0, hi=20)
    else:
        k = _get(body, "logprobs", int, None, lo=0, hi=20)
        p.logprobs, p.top_logprobs = k is not None, k or 0
    return p


def parse_stop(body) -> list:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
        raise APIError(400, "'stop' must be a string or an array of up to 4 non-empty strings", param="stop", code="invalid_type")
    return stop


def parse_messages(body) -> list:
    messages = _get(body, "messages", list)
    if not messages:
        raise APIError(400, "'messages' must be a non-empty array", param="messages", code="invalid_value")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise APIError(400, f"messages[{i}] must be an object with a string 'role'", param=f"messages[{i}]", code="invalid_type")
        content = m.get("content", "")
        if content is None:
            content = ""
        if isinstance(content, list):
            parts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise APIError(400, f"messages[{i}].content: only text parts are supported", param=f"messages[{i}].content", code="invalid_value")
                parts.append(part["text"])
            content = "".join(parts)
        if not isinstance(content, str):
            raise APIError(400, f"messages[{i}].content must be a string or an array of text parts", param=f"messages[{i}].content", code="invalid_type")
        out.append({**{k: v for k, v in m.items() if k not in ("content",)}, "content": content})
    return out


def chat_prompt(tokenizer, messages) -> list:
    """Token ids of a chat: the tokenizer's chat template, else mlx_lm.server's plain format."""
    if getattr(tokenizer, "has_chat_template", False) or getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return list(ids["input_ids"] if isinstance(ids, dict) else ids)
    from mlx_lm.server import convert_chat

    return tokenizer.encode(convert_chat(messages))


def text_prompt(tokenizer, prompt) -> list:
    """Token ids of a completions prompt (a string or token ids), as mlx_lm.generate encodes it."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        bos = getattr(tokenizer, "bos_token", None)
        return tokenizer.encode(prompt, add_special_tokens=bos is None or not prompt.startswith(bos))
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        vocab = getattr(tokenizer, "vocab_size", None) or len(tokenizer)
        if any(t < 0 or t >= vocab for t in prompt):
            raise APIError(400, f"'prompt' token ids must be in [0, {vocab})", param="prompt", code="invalid_value")
        return list(prompt)
    raise APIError(400, "'prompt' must be a string, an array of one string or an array of token ids", param="prompt", code="invalid_type")


# ---------------------------------------------------------------- text out


class TextStream:
    """Detokenizes a job's tokens and applies the request's stop strings."""

    def __init__(self, tokenizer, stop):
        self.detok = tokenizer.detokenizer
        self.stop = stop
        self.held = ""

    def push(self, token, final):
        """Text that can be sent now, and whether a stop string ended the text."""
        if token is not None:
            self.detok.add_token(token)
        if final:
            self.detok.finalize()
        self.held += self.detok.last_segment
        for s in self.stop:
            i = self.held.find(s)
            if i >= 0:
                out, self.held = self.held[:i], ""
                return out, True
        if final:
            out, self.held = self.held, ""
            return out, False
        keep = max((k for s in self.stop for k in range(len(s) - 1, 0, -1) if self.held.endswith(s[:k])), default=0)
        out = self.held[: len(self.held) - keep]
        self.held = self.held[len(out):]
        return out, False


def run_job(engine: Engine, job: Job, stop: list, timeout: float = 600):
    """Yields ``(text, token, logprob, top, finish_reason)`` as the job's tokens arrive."""
    text = TextStream(engine.tokenizer, stop)
    eos = engine.tokenizer.eos_token_ids
    while True:
        try:
            ev = job.events.get(timeout=timeout)
        except queue.Empty:
            engine.cancel(job)
            raise APIError(504, f"no token within {timeout} s", type_="server_error") from None
        if ev.error is not None:
            raise ev.error
        is_eos = ev.finish_reason == "stop" and ev.token in eos
        chunk, stopped = text.push(None if is_eos else ev.token, ev.finish_reason is not None)
        if stopped:
            engine.cancel(job)
            yield chunk, ev.token, ev.logprob, ev.top, "stop"
            return
        if is_eos:
            yield chunk, None, None, (), "stop"
            return
        yield chunk, ev.token, ev.logprob, ev.top, ev.finish_reason
        if ev.finish_reason is not None:
            return


# ---------------------------------------------------------------- HTTP


class Handler(BaseHTTPRequestHandler):
    server_version = "gain_mlx.serve"
    engine: Engine = None
    api_key: Optional[str] = None
    default_max_tokens = DEFAULT_MAX_TOKENS

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

    def _send_error(self, e: APIError):
        headers = [("WWW-Authenticate", "Bearer")] if e.status == 401 else []
        self._send_json(e.status, e.body(), headers)

    def _dispatch(self, method):
        try:
            path = self.path.split("?", 1)[0].rstrip("/") or "/"
            if path == "/health":
                e = self.engine
                return self._send_json(200 if e.failed is None else 503, {"status": "ok" if e.failed is None else "failed", **e.stats})
            self._check_key()
            route = self._route(method, path)
            if route is None:
                raise APIError(404, f"no route {method} {path}", code="not_found")
            route()
        except APIError as e:
            self._send_error(e)
        except (BrokenPipeError, ConnectionResetError):
            pass
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
        if not hmac.compare_digest(token.encode(), self.api_key.encode()):
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
        try:
            body = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise APIError(400, f"request body is not valid JSON: {e}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise APIError(400, "request body must be a JSON object", code="invalid_json")
        return body

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
        name = _get(body, "name", str)
        path = _get(body, "path", str)
        _check_name(name, self.engine.base_name)
        self._send_json(201, self.engine.add_adapter(name, path))

    def _remove_adapter(self, name=None):
        if name is None:
            name = _get(self._body(), "name", str)
        self._send_json(200, self.engine.remove_adapter(name))

    # -- completions

    def _adapter_for(self, body):
        e = self.engine
        model = _get(body, "model", str, None)
        adapters = _get(body, "adapters", str, None)
        by_model = None
        if model is not None and model != e.base_name and model not in BASE_ALIASES and model != str(e.model_spec):
            if model not in e.adapter_names():
                raise APIError(404, f"the model '{model}' does not exist: GET /v1/models lists the base and its adapters", param="model", code="model_not_found")
            by_model = model
        if adapters is None:
            return by_model
        names = e.adapter_names()
        by_path = {i["path"]: i["id"] for i in e.adapter_info()} | {i["resolved_path"]: i["id"] for i in e.adapter_info()}
        resolved = str(Path(adapters).resolve()) if adapters not in names else None
        name = adapters if adapters in names else by_path.get(adapters) or by_path.get(resolved)
        if name is None:
            raise APIError(404, f"adapter '{adapters}' is not loaded: load it with POST /v1/adapters", param="adapters", code="model_not_found")
        if by_model is not None and by_model != name:
            raise APIError(400, f"'model' names adapter '{by_model}' but 'adapters' names '{name}'", param="adapters", code="invalid_value")
        return name

    def _completion(self, chat):
        e = self.engine
        body = self._body()
        stream = _get(body, "stream", bool, False)
        opts = _get(body, "stream_options", dict, {}) or {}
        include_usage = stream and bool(opts.get("include_usage"))
        adapter = self._adapter_for(body)
        params = parse_params(body, self.default_max_tokens, chat)
        stop = parse_stop(body)
        if chat:
            prompt = chat_prompt(e.tokenizer, parse_messages(body))
        else:
            prompt = text_prompt(e.tokenizer, body.get("prompt", _MISSING) if "prompt" in body else _get(body, "prompt", str))
        if not prompt:
            raise APIError(400, "the prompt is empty", param="prompt" if not chat else "messages", code="invalid_value")
        if len(prompt) > e.max_prompt_tokens:
            raise APIError(
                400,
                f"this model's maximum prompt length is {e.max_prompt_tokens} tokens, the prompt has {len(prompt)}",
                param="messages" if chat else "prompt",
                code="context_length_exceeded",
            )
        job = e.submit(Job(prompt=prompt, adapter=adapter, params=params))
        name = body.get("model") or (adapter or e.base_name)
        meta = dict(
            id=("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24],
            created=int(time.time()),
            model=name,
            system_fingerprint=f"gain_mlx-{adapter or 'base'}",
        )
        try:
            if stream:
                self._stream(job, stop, chat, meta, len(prompt), include_usage, params)
            else:
                self._whole(job, stop, chat, meta, len(prompt), params)
        finally:
            if not job.cancelled:
                e.cancel(job)  # a no-op once finished; stops the job when the client went away

    def _logprob_entries(self, tok, lp, top, chat):
        if tok is None:
            return []
        t = self.engine.tokenizer
        s = t.convert_ids_to_tokens(tok)
        if chat:
            return [{"token": s, "id": tok, "logprob": lp, "bytes": list(s.encode()),
                     "top_logprobs": [{"token": t.convert_ids_to_tokens(i), "id": i, "logprob": v} for i, v in top]}]
        return [(s, lp, {t.convert_ids_to_tokens(i): v for i, v in top})]

    def _whole(self, job, stop, chat, meta, n_prompt, params):
        text, entries, n, finish = [], [], 0, None
        for chunk, tok, lp, top, finish in run_job(self.engine, job, stop):
            text.append(chunk)
            n += tok is not None
            if params.logprobs:
                entries += self._logprob_entries(tok, lp, top, chat)
        text = "".join(text)
        usage = {"prompt_tokens": n_prompt, "completion_tokens": n, "total_tokens": n_prompt + n}
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                      "logprobs": {"content": entries} if params.logprobs else None}
            obj = {**meta, "object": "chat.completion", "choices": [choice], "usage": usage}
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": _legacy_logprobs(entries) if params.logprobs else None}
            obj = {**meta, "object": "text_completion", "choices": [choice], "usage": usage}
        self._send_json(200, obj)

    def _stream(self, job, stop, chat, meta, n_prompt, include_usage, params):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        obj_type = "chat.completion.chunk" if chat else "text_completion"

        def send(choices, usage=_MISSING):
            obj = {**meta, "object": obj_type, "choices": choices}
            if include_usage:
                obj["usage"] = None if usage is _MISSING else usage
            self.wfile.write(b"data: " + json.dumps(obj).encode() + b"\n\n")
            self.wfile.flush()

        if chat:
            send([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}])
        n = 0
        try:
            for chunk, tok, lp, top, finish in run_job(self.engine, job, stop):
                n += tok is not None
                entries = self._logprob_entries(tok, lp, top, chat) if params.logprobs else []
                if not chunk and not entries and finish is None:
                    continue
                if chat:
                    delta = {"content": chunk} if chunk else {}
                    choice = {"index": 0, "delta": delta, "logprobs": {"content": entries} if params.logprobs else None, "finish_reason": finish}
                else:
                    choice = {"index": 0, "text": chunk, "logprobs": _legacy_logprobs(entries) if params.logprobs else None, "finish_reason": finish}
                send([choice])
        except APIError as e:  # headers are out: the error goes in the stream
            self.wfile.write(b"data: " + json.dumps(e.body()).encode() + b"\n\n")
        if include_usage:
            send([], {"prompt_tokens": n_prompt, "completion_tokens": n, "total_tokens": n_prompt + n})
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()


def _legacy_logprobs(entries):
    return {
        "tokens": [s for s, _, _ in entries],
        "token_logprobs": [lp for _, lp, _ in entries],
        "top_logprobs": [top for _, _, top in entries],
        "text_offset": [],
    }


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


def make_server(engine: Engine, host="127.0.0.1", port=8080, api_key=None, max_tokens=DEFAULT_MAX_TOKENS) -> Server:
    """An HTTP server (not yet serving) for ``engine``: call ``serve_forever()``."""
    handler = type("BoundHandler", (Handler,), {"engine": engine, "api_key": api_key, "default_max_tokens": max_tokens})
    return Server((host, port), handler)


# ---------------------------------------------------------------- CLI


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
    p.add_argument("--served-model-name", help="the base model's id in /v1/models (default: from --model)")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, help="default max_tokens of a request")
    p.add_argument("--max-prompt-tokens", type=int, default=None,
                   help="longest prompt accepted (default: the model's context length, else 32768)")
    p.add_argument("--decode-concurrency", type=int, default=32, help="sequences decoded in one batch")
    p.add_argument("--prompt-concurrency", type=int, default=8, help="prompts prefilled in one batch")
    p.add_argument("--prefill-step-size", type=int, default=2048)
    p.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    cpu.add_fast_blas_argument(p)
    return p


@cli
def main(argv=None):
    args = make_parser().parse_args(argv)
    for flag in ("max_tokens", "decode_concurrency", "prompt_concurrency", "prefill_step_size"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be >= 1")
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
            base_name=args.served_model_name,
        )
    except APIError as e:
        raise UserError(e.message) from None
    try:
        server = make_server(engine, args.host, args.port, args.api_key, args.max_tokens)
    except OSError as e:
        raise UserError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    host, port = server.server_address[:2]
    names = ", ".join(engine.adapter_names()) or "none"
    print(f"gain_mlx.serve: http://{host}:{port}/v1  base {engine.base_name}, adapters: {names}", flush=True)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print("warning: listening beyond this machine without --api-key", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        engine.close()


if __name__ == "__main__":
    main()
