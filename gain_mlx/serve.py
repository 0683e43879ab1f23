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
import math
import queue
import select
import socket
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
MAX_PROMPTS = 256  # prompts in one completions request
MAX_LOGIT_BIAS = 1024  # entries in one logit_bias
MAX_SEED = 2**64 - 1  # mx.random.seed's range
DEFAULT_MAX_CONNECTIONS = 256
DEFAULT_MAX_QUEUE = 512  # sequences in flight or waiting
DEFAULT_TIMEOUT = 60.0  # seconds a connection may stay idle or half-sent
LISTEN_BACKLOG = 512
BASE_ALIASES = ("default_model", "base")
RUNTIME_ADAPTERS = ("off", "adapter-dir", "any")


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
    score: bool = False  # echo with logprobs: log-probabilities of the prompt's tokens too
    events: queue.Queue = field(default_factory=queue.Queue)
    cancelled: bool = False
    uid: Optional[int] = None
    prompt_logprobs: Optional[list] = None  # [(logprob, top)] for prompt tokens 1..n-1, set by the worker


class Engine:
    """The model, its adapters and one worker thread that does all MLX work.

    HTTP threads call :meth:`submit`, :meth:`cancel`, :meth:`add_adapter` and
    :meth:`remove_adapter`; the worker admits new sequences into the running batch
    between decode steps, so no request waits for another to finish.
    """

    def __init__(self, model_spec=None, adapters=(), *, decode_concurrency=32, prompt_concurrency=8,
                 prefill_step_size=2048, max_prompt_tokens=None, base_name=None, max_queue=DEFAULT_MAX_QUEUE):
        self.model_spec = model_spec
        self.max_queue = max_queue
        self._queued = 0  # sequences held by requests now (see slots)
        self.restarts = 0
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

    def slots(self, n: int):
        """A context holding ``n`` sequences of the bounded queue; 429 when it is full."""
        engine = self

        class _Slots:
            def __enter__(self):
                with engine._lock:
                    if engine._queued + n > engine.max_queue:
                        raise APIError(429, f"the server holds {engine._queued} sequences (at most {engine.max_queue}): retry later",
                                       type_="server_error", code="queue_full")
                    engine._queued += n

            def __exit__(self, *exc):
                with engine._lock:
                    engine._queued -= n

        return _Slots()

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
        """The supervisor: runs the worker loop, and when it dies fails the requests it held
        at once and starts it again (gives up after 5 deaths within a minute)."""
        deaths = []
        try:
            while not self._stop:
                try:
                    self._loop()
                except BaseException as e:  # never leave a request waiting forever
                    log.exception("generation worker died; restarting it")
                    why = f"{type(e).__name__}: {e}"
                    error = APIError(500, f"the generation worker failed ({why}) and was restarted", type_="server_error")
                    self._fail_all(error)
                    _reset_random_state()
                    kind, payload = getattr(self, "_current", None) or (None, None)
                    self._current = None
                    if kind == "submit":
                        payload.events.put(Event(error=error))
                    elif kind == "add":
                        payload[1].put((False, error))
                    elif kind == "remove":
                        self._pending_removals.append(payload)  # still to do
                    self._generator = None
                    self.restarts += 1
                    now = time.monotonic()
                    deaths = [t for t in deaths if now - t < 60] + [now]
                    if len(deaths) > 5:
                        self.failed = why
                        break
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

        from .loading import load
        from .multi import AdapterSet

        self.model, self.tokenizer = load(self.model_spec, None)
        mx.eval(self.model.parameters())
        self.vocab_size = _vocab_size(self.model, self.tokenizer)  # rows of the logits
        # prompt ids must index both the embedding and the detokenizer's table
        self.token_limit = min(self.vocab_size, len(getattr(self.tokenizer, "_tokenizer", self.tokenizer)))
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
        from .adapter import read_adapter, resolve_adapter

        _check_name(name, self.base_name)
        path = resolve_adapter(spec)
        config, _ = read_adapter(path)
        self.adapters.add(name, path, source=f"adapter '{name}' ({spec})")
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
                self._current = (kind, payload)  # failed by the supervisor if the worker dies here
                self._handle(kind, payload)
                self._current = None
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
                _reset_random_state()
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
            try:
                self._admit(payload)
            except Exception as e:  # this request fails alone
                log.exception("admitting a request failed")
                payload.events.put(Event(error=APIError(500, f"generation failed: {type(e).__name__}: {e}", type_="server_error")))
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
            except Exception as e:  # the set is as it was; the worker goes on
                log.exception("adding an adapter failed")
                reply.put((False, APIError(400, f"adapter '{name}' could not be loaded: {type(e).__name__}: {e}", param="path", code="invalid_adapter")))
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
        if job.score:
            job.prompt_logprobs = self._score(job.prompt, self.adapters.row(job.adapter), p.top_logprobs)
        if p.max_tokens == 0:  # echo only
            job.events.put(Event(finish_reason="length"))
            return
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

    def _score(self, prompt, row, k):
        """``[(logprob, top k)]`` of prompt tokens 1..n-1 under stack row ``row``: one
        forward pass over the prompt, log-softmax at each position."""
        import mlx.core as mx

        if len(prompt) < 2:
            return []
        self.adapters.select([row])
        try:
            logits = self.model(mx.array(prompt)[None])[0, :-1].astype(mx.float32)
        finally:
            self.adapters.select(None)
        lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        chosen = mx.take_along_axis(lp, mx.array(prompt[1:])[:, None], axis=-1)[:, 0]
        if k:
            idx = mx.argpartition(-lp, kth=k - 1, axis=-1)[:, :k]
            vals = mx.take_along_axis(lp, idx, axis=-1)
            order = mx.argsort(-vals, axis=-1)
            idx, vals = mx.take_along_axis(idx, order, axis=-1), mx.take_along_axis(vals, order, axis=-1)
            mx.eval(chosen, idx, vals)
            tops = [tuple(zip(i, v)) for i, v in zip(idx.tolist(), vals.tolist())]
        else:
            tops = [()] * (len(prompt) - 1)
        return list(zip(chosen.tolist(), tops))

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


def _reset_random_state():
    """A fresh random state: an exception inside mlx-lm's compiled sampling leaves
    ``mx.random.state`` a traced placeholder, and every later sampled request would fail."""
    import os

    import mlx.core as mx

    mx.random.seed(int.from_bytes(os.urandom(8), "little"))


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


def _vocab_size(model, tokenizer):
    args = getattr(model, "args", None)
    value = getattr(args, "vocab_size", None)
    return value if isinstance(value, int) and value > 0 else len(getattr(tokenizer, "_tokenizer", tokenizer))


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
    if isinstance(value, float) and not math.isfinite(value):
        raise APIError(400, f"'{name}' must be a finite number, got {value}", param=name, code="invalid_value")
    if lo is not None and value < lo:
        raise APIError(400, f"'{name}' must be >= {lo}, got {value}", param=name, code="invalid_value")
    if hi is not None and value > hi:
        raise APIError(400, f"'{name}' must be <= {hi}, got {value}", param=name, code="invalid_value")
    return value


# The fields each endpoint implements; any other field is refused by name, never ignored.
_COMMON_FIELDS = {
    "model", "adapters", "max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "logit_bias",
    "repetition_penalty", "presence_penalty", "frequency_penalty", "logprobs", "stop", "stream",
    "stream_options", "n", "user", "ignore_eos",
}
COMPLETION_FIELDS = _COMMON_FIELDS | {"prompt", "echo", "best_of", "suffix"}
CHAT_FIELDS = _COMMON_FIELDS | {"messages", "max_completion_tokens", "top_logprobs"}


def check_fields(body: dict, known) -> None:
    """Refuse fields this server does not implement (and no-op values of OpenAI's)."""
    for name in body:
        if name not in known:
            raise APIError(400, f"'{name}' is not supported by this server", param=name, code="unsupported_parameter")
    if _get(body, "best_of", int, 1) != 1:
        raise APIError(400, "'best_of' is not supported by this server (only 1)", param="best_of", code="unsupported_parameter")
    if _get(body, "suffix", str, ""):
        raise APIError(400, "'suffix' is not supported by this server", param="suffix", code="unsupported_parameter")
    _get(body, "user", str, None)
    opts = _get(body, "stream_options", dict, {})
    for k in opts:
        if k != "include_usage":
            raise APIError(400, f"'stream_options.{k}' is not supported by this server", param="stream_options", code="unsupported_parameter")
    _get(opts, "include_usage", bool, False)


def parse_params(body: dict, default_max_tokens: int, chat: bool, vocab_size: int = None) -> Params:
    """A request's sampling fields, each checked for type, range and finiteness
    (``max_tokens`` 0 passes here: only an echo may use it)."""
    max_tokens = _get(body, "max_completion_tokens", int, None, lo=1) if chat else None
    if max_tokens is None:
        max_tokens = _get(body, "max_tokens", int, default_max_tokens, lo=0 if not chat else 1)
    n = _get(body, "n", int, 1)
    if n != 1:
        raise APIError(400, "only n=1 is supported: send one request per completion", param="n", code="invalid_value")
    p = Params(
        max_tokens=max_tokens,
        temperature=float(_get(body, "temperature", (int, float), 0.0, lo=0, hi=2)),
        top_p=float(_get(body, "top_p", (int, float), 1.0, lo=0, hi=1)),
        top_k=_get(body, "top_k", int, 0, lo=0, hi=vocab_size) % (vocab_size or 2**62),  # the whole vocabulary: no top-k
        min_p=float(_get(body, "min_p", (int, float), 0.0, lo=0, hi=1)),
        seed=_get(body, "seed", int, None, lo=0, hi=MAX_SEED),
        repetition_penalty=float(_get(body, "repetition_penalty", (int, float), 0.0, lo=0, hi=10)),
        presence_penalty=float(_get(body, "presence_penalty", (int, float), 0.0, lo=-2, hi=2)),
        frequency_penalty=float(_get(body, "frequency_penalty", (int, float), 0.0, lo=-2, hi=2)),
        ignore_eos=_get(body, "ignore_eos", bool, False),
    )
    bias = _get(body, "logit_bias", dict, None)
    if bias:
        p.logit_bias = parse_logit_bias(bias, vocab_size)
    if chat:
        p.logprobs = _get(body, "logprobs", bool, False)
        p.top_logprobs = _get(body, "top_logprobs", int, 0, lo=0, hi=20)
    else:
        k = _get(body, "logprobs", int, None, lo=0, hi=20)
        p.logprobs, p.top_logprobs = k is not None, k or 0
    return p


def parse_logit_bias(bias: dict, vocab_size: int = None) -> dict:
    """``{"token id": bias}`` -> ``{id: bias}``: ids within the vocabulary, biases in [-100, 100]."""
    if len(bias) > MAX_LOGIT_BIAS:
        raise APIError(400, f"'logit_bias' has {len(bias)} entries (at most {MAX_LOGIT_BIAS})", param="logit_bias", code="invalid_value")
    out = {}
    for k, v in bias.items():
        if not (k.isascii() and k.isdigit()) or (vocab_size is not None and int(k) >= vocab_size):
            raise APIError(400, f"'logit_bias' key {k[:40]!r} is not a token id in [0, {vocab_size})", param="logit_bias", code="invalid_value")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not -100 <= v <= 100:
            raise APIError(400, f"'logit_bias' values must be numbers in [-100, 100], got {json.dumps(v)[:40]}", param="logit_bias", code="invalid_value")
        out[int(k)] = float(v)
    return out


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


def _is_ids(x) -> bool:
    return isinstance(x, list) and bool(x) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)


def text_prompts(tokenizer, prompt, token_limit=None) -> list:
    """Token ids of each completions prompt, as OpenAI's legacy API takes them: a string,
    an array of strings, an array of token ids, or an array of arrays of token ids.
    Strings are encoded as mlx_lm.generate does; token ids are used as given."""
    if isinstance(prompt, str) or _is_ids(prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and (all(isinstance(p, str) for p in prompt) or all(_is_ids(p) for p in prompt)):
        prompts = prompt
    else:
        raise APIError(400, "'prompt' must be a string, an array of strings, an array of token ids or an array of arrays of token ids",
                       param="prompt", code="invalid_type" if not isinstance(prompt, list) or prompt else "invalid_value")
    if len(prompts) > MAX_PROMPTS:
        raise APIError(400, f"'prompt' holds {len(prompts)} prompts (at most {MAX_PROMPTS} in one request)", param="prompt", code="invalid_value")
    limit = token_limit or getattr(tokenizer, "vocab_size", None) or len(tokenizer)
    out = []
    for p in prompts:
        if isinstance(p, str):
            bos = getattr(tokenizer, "bos_token", None)
            out.append(list(tokenizer.encode(p, add_special_tokens=bos is None or not p.startswith(bos))))
        elif any(t < 0 or t >= limit for t in p):
            raise APIError(400, f"'prompt' token ids must be in [0, {limit})", param="prompt", code="invalid_value")
        else:
            out.append(list(p))
    return out


def detokenizer(tokenizer, keep_space: bool = False):
    """A fresh streaming detokenizer. mlx-lm's drop the space a text starts with;
    ``keep_space`` keeps it, as legacy completions need: prompt + text reads as the
    decoded whole (what lm-eval and other harnesses compare)."""
    detok = tokenizer.detokenizer
    if keep_space:
        if hasattr(detok, "trim_space"):  # SPM's switch
            detok.trim_space = False
        if hasattr(detok, "_maybe_trim_space"):  # BPE's has none: its trimming step, on this copy only
            detok._maybe_trim_space = lambda text: text
    return detok


def token_texts(tokenizer, ids, keep_space: bool = False) -> list:
    """The text each token adds to the decoded text (so that they join to it exactly)."""
    detok = detokenizer(tokenizer, keep_space)
    out = []
    for t in ids:
        detok.add_token(t)
        out.append(detok.last_segment)
    detok.finalize()
    if out:
        out[-1] += detok.last_segment
    return out


# ---------------------------------------------------------------- text out


class TextStream:
    """Detokenizes a job's tokens and applies the request's stop strings."""

    def __init__(self, tokenizer, stop, keep_space: bool = False):
        self.detok = detokenizer(tokenizer, keep_space)
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


class ClientGone(ConnectionError):
    """The client closed its connection: its generation is cancelled."""


def run_job(engine: Engine, job: Job, stop: list, timeout: float = 600, gone=None, keep_eos=False,
            keep_space=False):
    """Yields ``(text, token, logprob, top, finish_reason)`` as the job's tokens arrive.
    ``gone()`` is polled a few times a second: when true the job is cancelled. The
    end-of-sequence token is yielded (with no text) only when ``keep_eos``; ``keep_space``:
    see :func:`detokenizer`."""
    text = TextStream(engine.tokenizer, stop, keep_space)
    eos = engine.tokenizer.eos_token_ids
    deadline = time.monotonic() + timeout
    next_check = 0.0
    while True:
        now = time.monotonic()
        if gone is not None and now >= next_check:
            next_check = now + 0.2
            if gone():
                engine.cancel(job)
                raise ClientGone("the client went away")
        try:
            ev = job.events.get(timeout=0.2 if gone is not None else max(deadline - now, 0))
        except queue.Empty:
            if time.monotonic() < deadline:
                continue
            engine.cancel(job)
            raise APIError(504, f"no token within {timeout} s", type_="server_error") from None
        deadline = time.monotonic() + timeout
        if ev.error is not None:
            raise ev.error
        is_eos = ev.finish_reason == "stop" and ev.token in eos
        chunk, stopped = text.push(None if is_eos else ev.token, ev.finish_reason is not None)
        if stopped:
            engine.cancel(job)
            yield chunk, ev.token, ev.logprob, ev.top, "stop"
            return
        if is_eos:
            yield (chunk, ev.token, ev.logprob, ev.top, "stop") if keep_eos else (chunk, None, None, (), "stop")
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

    def _send_error(self, e: APIError):
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
        except APIError as e:
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
        name = _get(body, "name", str)
        path = _get(body, "path", str)
        for key in body:
            if key not in ("name", "path"):
                raise APIError(400, f"'{key}' is not supported by this server", param=key, code="unsupported_parameter")
        _check_name(name, self.engine.base_name)
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
        try:
            resolved = str(Path(adapters).resolve()) if adapters not in names else None
        except (ValueError, OSError):
            resolved = None
        name = adapters if adapters in names else by_path.get(adapters) or by_path.get(resolved)
        if name is None:
            raise APIError(404, f"adapter '{adapters[:200]}' is not loaded: load it with POST /v1/adapters", param="adapters", code="model_not_found")
        if by_model is not None and by_model != name:
            raise APIError(400, f"'model' names adapter '{by_model}' but 'adapters' names '{name}'", param="adapters", code="invalid_value")
        return name

    def _completion(self, chat):
        e = self.engine
        body = self._body()
        check_fields(body, CHAT_FIELDS if chat else COMPLETION_FIELDS)
        stream = _get(body, "stream", bool, False)
        include_usage = stream and bool((_get(body, "stream_options", dict, {}) or {}).get("include_usage"))
        adapter = self._adapter_for(body)
        params = parse_params(body, self.default_max_tokens, chat, e.vocab_size)
        stop = parse_stop(body)
        echo = not chat and _get(body, "echo", bool, False)
        if chat:
            prompts = [chat_prompt(e.tokenizer, parse_messages(body))]
        else:
            prompts = text_prompts(e.tokenizer, _get(body, "prompt", (str, list)), e.token_limit)
        field_ = "messages" if chat else "prompt"
        if params.max_tokens == 0 and not echo:
            raise APIError(400, "'max_tokens' must be >= 1 (0 only with 'echo')", param="max_tokens", code="invalid_value")
        if stream and (echo or len(prompts) > 1):
            raise APIError(400, "'stream' takes one prompt without 'echo'", param="stream", code="invalid_value")
        jobs = []
        for ids in prompts:
            if not ids:
                raise APIError(400, "the prompt is empty", param=field_, code="invalid_value")
            if len(ids) > e.max_prompt_tokens:
                raise APIError(400, f"this model's maximum prompt length is {e.max_prompt_tokens} tokens, the prompt has {len(ids)}",
                               param=field_, code="context_length_exceeded")
            p = params
            # a model that does not say: a bound all the same
            context = e.context_length or max(DEFAULT_MAX_PROMPT_TOKENS, e.max_prompt_tokens + DEFAULT_MAX_TOKENS)
            room = context - len(ids)
            if p.max_tokens > room:  # capped by the context
                if room < 1 and not echo:
                    raise APIError(400, f"the prompt fills this model's context of {context} tokens: no room to generate",
                                   param=field_, code="context_length_exceeded")
                p = Params(**{**vars(params), "max_tokens": max(room, 0)})
            jobs.append(Job(prompt=ids, adapter=adapter, params=p, score=echo and p.logprobs))
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
                if stream:
                    self._stream(jobs[0], stop, chat, meta, len(jobs[0].prompt), include_usage, params)
                elif chat:
                    self._whole_chat(jobs[0], stop, meta, params)
                else:
                    self._whole_text(jobs, stop, meta, params, echo)
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

        def send(choices, usage=_MISSING):
            obj = {**meta, "object": obj_type, "choices": choices}
            if include_usage:
                obj["usage"] = None if usage is _MISSING else usage
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
        except APIError as e:  # headers are out: the error goes in the stream
            self.wfile.write(b"data: " + json.dumps(e.body()).encode() + b"\n\n")
        if include_usage:
            send([], {"prompt_tokens": n_prompt, "completion_tokens": n, "total_tokens": n_prompt + n})
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()


def parse_body(raw: bytes) -> dict:
    """A request body as a JSON object: strict JSON (no NaN or Infinity), nesting within
    Python's limits, text that is valid Unicode (no lone surrogates)."""

    def no_constant(name):
        raise ValueError(f"{name} is not JSON")

    try:
        body = json.loads(raw.decode("utf-8"), parse_constant=no_constant)
        json.dumps(body, ensure_ascii=False).encode("utf-8")  # lone surrogates fail here
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError) as e:
        raise APIError(400, f"request body is not valid JSON: {e}"[:300], code="invalid_json") from None
    except UnicodeEncodeError:
        raise APIError(400, "request body holds text that is not valid Unicode (a lone surrogate)", code="invalid_json") from None
    except RecursionError:
        raise APIError(400, "request body is nested too deeply", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "request body must be a JSON object", code="invalid_json")
    return body


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
    except APIError as e:
        raise UserError(e.message) from None
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
