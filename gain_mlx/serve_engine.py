"""The generation engine of ``gain_mlx.serve``: one base model, many adapters as stack
rows of gains (``gain_mlx.multi``), continuous batching by mlx-lm's ``BatchGenerator``
on one worker thread that a supervisor restarts when it dies.

The engine knows nothing of HTTP: its failures are :class:`EngineError` kinds, which
the server maps to HTTP statuses in one table (``serve.ENGINE_STATUS``).
"""

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .errors import UserError

log = logging.getLogger("gain_mlx.serve")

DEFAULT_MAX_TOKENS = 512
DEFAULT_MAX_PROMPT_TOKENS = 32768
DEFAULT_MAX_QUEUE = 512  # sequences in flight or waiting
BASE_ALIASES = ("default_model", "base")


class EngineError(Exception):
    """A failure the engine reports to its caller; ``param``: the request field at fault."""

    def __init__(self, message: str, param=None):
        super().__init__(message)
        self.param = param


class QueueFull(EngineError):
    """Too many sequences in flight or waiting."""


class UnknownAdapter(EngineError):
    """No adapter of that name is loaded."""


class BadAdapter(EngineError):
    """An adapter that cannot be loaded on this base."""


class BadAdapterName(EngineError):
    """An adapter name outside the allowed characters."""


class AdapterNameTaken(EngineError):
    """An adapter name already loaded, or the base's name."""


class WorkerStopped(EngineError):
    """The generation worker gave up or the server is shutting down."""


class EngineTimeout(EngineError):
    """A command to the worker did not finish in time."""


class GenerationFailed(EngineError):
    """A generation step (or the worker) failed; the server keeps serving."""


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
                        raise QueueFull(f"the server holds {engine._queued} sequences (at most {engine.max_queue}): retry later")
                    engine._queued += n

            def __exit__(self, *exc):
                with engine._lock:
                    engine._queued -= n

        return _Slots()

    def submit(self, job: Job) -> Job:
        if job.adapter is not None and job.adapter not in self.adapter_names():
            raise UnknownAdapter(f"no adapter named '{job.adapter}' is loaded", param="model")
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
                raise UnknownAdapter(f"no adapter named '{name}' is loaded")
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
            raise WorkerStopped(f"the generation worker stopped: {self.failed}")
        self._commands.put((kind, payload))

    def _call(self, kind, payload, timeout):
        reply = queue.Queue()
        self._command(kind, (payload, reply))
        try:
            ok, value = reply.get(timeout=timeout)
        except queue.Empty:
            raise EngineTimeout(f"{kind} did not finish within {timeout} s") from None
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
                    error = GenerationFailed(f"the generation worker failed ({why}) and was restarted")
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
            self._fail_all(WorkerStopped("the server is shutting down"))
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

        check_name(name, self.base_name)
        if name in self.adapters.adapters:
            raise AdapterNameTaken(f"adapter name '{name}' is empty or already loaded: choose another name", param="name")
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
                self._fail_all(GenerationFailed(f"generation failed: {type(e).__name__}: {e}"))
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
                payload.events.put(Event(error=GenerationFailed(f"generation failed: {type(e).__name__}: {e}")))
        elif kind == "cancel":
            job = payload
            if job.uid is not None and job.uid in self._jobs:
                self._generator.remove([job.uid])
                self._finish(job.uid)
        elif kind == "add":
            (name, spec), reply = payload
            try:
                reply.put((True, self._add(name, spec)))
            except EngineError as e:
                reply.put((False, e))
            except (UserError, ValueError, OSError) as e:
                reply.put((False, BadAdapter(str(e), param="path")))
            except Exception as e:  # the set is as it was; the worker goes on
                log.exception("adding an adapter failed")
                reply.put((False, BadAdapter(f"adapter '{name}' could not be loaded: {type(e).__name__}: {e}", param="path")))
        elif kind == "remove":
            self._pending_removals.append(payload)

    def _admit(self, job: Job):
        from mlx_lm.models.cache import make_prompt_cache

        if job.cancelled:
            return
        with self._lock:
            known = job.adapter is None or (job.adapter in self._info and job.adapter not in self._removing)
        if not known:
            job.events.put(Event(error=UnknownAdapter(f"no adapter named '{job.adapter}' is loaded", param="model")))
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
        forward pass over the prompt, log-softmax at each position. Positions go in chunks
        through a KV cache so that their float32 logits stay within the policy's budget
        (a 2048-token prompt of a 262K vocabulary would otherwise hold 2 GB of them)."""
        import mlx.core as mx
        from mlx_lm.models.cache import make_prompt_cache

        from . import policy

        if len(prompt) < 2:
            return []
        inputs = prompt[:-1]
        step = policy.logit_chunk(1, self.vocab_size)
        cache = make_prompt_cache(self.model) if step < len(inputs) else None
        scores = []
        self.adapters.select([row])
        try:
            for start in range(0, len(inputs), step):
                logits = self.model(mx.array(inputs[start:start + step])[None], cache=cache)[0]
                scores += _position_scores(logits.astype(mx.float32), prompt[start + 1:start + 1 + step], k)
        finally:
            self.adapters.select(None)
        return scores

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
                reply.put((False, GenerationFailed(str(e))))
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


def _position_scores(logits, targets, k) -> list:
    """``[(logprob of the target, top k (token, logprob) best first)]`` per position."""
    import mlx.core as mx

    lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    chosen = mx.take_along_axis(lp, mx.array(targets)[:, None], axis=-1)[:, 0]
    if not k:
        return list(zip(chosen.tolist(), [()] * len(targets)))
    idx = mx.argpartition(-lp, kth=k - 1, axis=-1)[:, :k]
    vals = mx.take_along_axis(lp, idx, axis=-1)
    order = mx.argsort(-vals, axis=-1)
    idx, vals = mx.take_along_axis(idx, order, axis=-1), mx.take_along_axis(vals, order, axis=-1)
    mx.eval(chosen, idx, vals)
    return list(zip(chosen.tolist(), [tuple(zip(i, v)) for i, v in zip(idx.tolist(), vals.tolist())]))


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


def check_name(name, base_name):
    if not isinstance(name, str) or not name or len(name) > 128 or not all(c.isalnum() or c in "._-:/@" for c in name):
        raise BadAdapterName(f"adapter name {name!r}: use 1-128 letters, digits or ._-:/@", param="name")
    if name == base_name or name in BASE_ALIASES:
        raise AdapterNameTaken(f"adapter name '{name}' is the base model's name: choose another", param="name")
