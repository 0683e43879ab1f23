"""The text out of ``gain_mlx.serve``: a job's tokens as text as they arrive, with stop
sequences, and the text each token adds (for logprobs)."""

import queue
import time

from .serve_engine import Engine, EngineTimeout, Job


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
            raise EngineTimeout(f"no token within {timeout} s") from None
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
