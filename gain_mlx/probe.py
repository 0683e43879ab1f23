"""A downstream probe scored by log-likelihood: multiple choice, as lm-evaluation-harness
scores it (each choice's continuation log-probability; the highest wins).

Items are ``{"word", "choices": [...], "answer": i}`` rows (``tools/make_probe.py``
builds them from a dictionary). The context is ``"Word: {word}\\nDefinition:"`` and each
choice is scored as the continuation ``" {choice}"``. Accuracy is length-normalized
(``acc_norm``: log-likelihood per byte of the choice), since definitions differ in length.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import KVCache

from . import cpu, policy
from .errors import UserError, cli
from .loss import token_losses
from .progress import say

DEFAULT_PROBE = ".cache/corpora/probe/definitions.jsonl"
PROBE_HINT = "python tools/make_probe.py"
BATCH = 32  # continuations per forward pass (fewer, longer passes spend longer copying caches and padding)


@dataclass
class Probe:
    contexts: list  # token ids of each question's context
    choices: list  # [question][choice] -> token ids of the continuation
    choice_bytes: np.ndarray  # [question, choice] UTF-8 length of the continuation
    answers: np.ndarray  # [question] index of the right choice


def _context(item) -> str:
    return f"Word: {item['word']}\nDefinition:"


def read_questions(path: Path) -> list:
    """The questions of a probe .jsonl, each checked: ``word`` (text), ``choices`` (2+
    texts) and ``answer`` (an index into them); a ``UserError`` names the file and line."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise UserError(f"probe {path}: not UTF-8 text: make it with {PROBE_HINT}") from None
    items = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"probe {path} line {n}: not JSON ({e.msg}): make it with {PROBE_HINT}") from None
        ok = (isinstance(item, dict) and isinstance(item.get("word"), str) and isinstance(item.get("choices"), list)
              and len(item["choices"]) >= 2 and all(isinstance(c, str) for c in item["choices"])
              and isinstance(item.get("answer"), int) and not isinstance(item["answer"], bool)
              and 0 <= item["answer"] < len(item["choices"]))
        if not ok:
            raise UserError(f"probe {path} line {n}: expected {{\"word\": text, \"choices\": [2+ texts], \"answer\": index}}: "
                            f"make it with {PROBE_HINT}")
        items.append(item)
    if not items:
        raise UserError(f"probe {path} holds no questions: make it with {PROBE_HINT}")
    return items


def load_probe(path, tokenizer, limit=None) -> Probe:
    """The first ``limit`` questions of a probe file, tokenized once."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"probe {path} not found: make it with {PROBE_HINT}")
    items = read_questions(path)[:limit]
    contexts, choices = [], []
    for item in items:
        ctx = tokenizer.encode(_context(item))
        contexts.append(ctx)
        # lm-eval: encode context + continuation together, the continuation is what follows the context
        choices.append([tokenizer.encode(_context(item) + " " + c)[len(ctx):] for c in item["choices"]])
    n_bytes = np.array([[len((" " + c).encode()) for c in item["choices"]] for item in items])
    return Probe(contexts, choices, n_bytes, np.array([item["answer"] for item in items]))


class SharedPrefix(KVCache):
    """One attention layer's keys and values of a batch of prefixes (contexts), computed
    once; :meth:`rows` gives the cache for a batch of continuations of some of them.

    Unlike mlx-lm's ``KVCache`` it keeps exactly the positions computed (no 256-position
    buffers), since each continuation batch copies the rows it needs.
    """

    def __init__(self, keys=None, values=None):
        super().__init__()
        if keys is not None:
            self.keys, self.values, self.offset = keys, values, keys.shape[2]

    def update_and_fetch(self, keys, values):
        if self.keys is not None:
            keys = mx.concatenate([self.keys, keys], axis=2)
            values = mx.concatenate([self.values, values], axis=2)
        self.keys, self.values, self.offset = keys, values, keys.shape[2]
        return keys, values

    def rows(self, index):
        return SharedPrefix(self.keys[index], self.values[index]) if self.keys is not None else SharedPrefix()


def continuation_logprobs(model, pairs) -> list:
    """Sum of log p(continuation | context) for each ``(context, continuation)`` pair.

    Each distinct context runs once, all but its last token, into :class:`SharedPrefix`
    caches (a question's four choices share it); only its keys and values are computed,
    never its logits. Each continuation then runs from the context's last token against
    its rows of the cache, in batches ordered by length so they carry little padding. In
    the definitions probe: 4.4K tokens through the layers and 3.9K through the output
    layer, against 6.6K each when every pair ran whole.
    """
    micro_batches, threads = policy.step_parallelism(BATCH)  # the cores side by side, as in training
    streams = cpu.streams(micro_batches)
    out = [0.0] * len(pairs)
    groups = {}  # contexts of one length run as one batch
    for ctx in dict.fromkeys(tuple(c) for c, _ in pairs):
        groups.setdefault(len(ctx), []).append(ctx)
    for contexts in groups.values():
        row_of = {ctx: row for row, ctx in enumerate(contexts)}
        prefix = [SharedPrefix() for _ in model.layers]
        if len(contexts[0]) > 1:
            model(mx.array([ctx[:-1] for ctx in contexts]), cache=prefix)  # lazy: only keys and values are used
        members = sorted((i for i, (c, _) in enumerate(pairs) if tuple(c) in row_of), key=lambda i: len(pairs[i][1]))

        def forward(inputs, rows):
            return model(inputs, cache=[layer.rows(rows) for layer in prefix])

        for start in range(0, len(members), BATCH):
            chunk = members[start:start + BATCH]
            width = max(len(pairs[i][1]) for i in chunk)
            inputs = np.zeros((len(chunk), width), np.int32)
            targets = np.zeros((len(chunk), width), np.int32)
            mask = np.zeros((len(chunk), width), bool)
            for row, i in enumerate(chunk):
                ctx, cont = pairs[i]
                inputs[row, :len(cont)] = [ctx[-1], *cont[:-1]]
                targets[row, :len(cont)] = cont
                mask[row, :len(cont)] = True
            rows = np.array([row_of[tuple(pairs[i][0])] for i in chunk])
            with cpu.blas_threads(threads):
                losses = token_losses(forward, (inputs, rows), targets, mask, streams)
            for i, value in zip(chunk, -losses.sum(axis=1, dtype=np.float64)):
                out[i] = float(value)
    return out


def score(model, probe: Probe) -> dict:
    """``acc`` (raw), ``acc_norm`` (per byte) and the mean per-byte log-likelihood of the answer."""
    model.eval()
    pairs = [(ctx, cont) for ctx, conts in zip(probe.contexts, probe.choices) for cont in conts]
    ll = np.array(continuation_logprobs(model, pairs)).reshape(probe.choice_bytes.shape)
    norm = ll / probe.choice_bytes
    rows = np.arange(len(probe.answers))
    return {
        "acc": float(np.mean(ll.argmax(1) == probe.answers)),
        "acc_norm": float(np.mean(norm.argmax(1) == probe.answers)),
        "answer_ll_per_byte": float(np.mean(norm[rows, probe.answers])),
        "questions": int(len(probe.answers)),
    }


def build_parser():
    import argparse

    from .cpu import add_fast_blas_argument

    p = argparse.ArgumentParser(prog="python -m gain_mlx.probe",
                                description="Score the definitions probe on a model, with or without an adapter.")
    p.add_argument("--model", help="model (default: the packaged SmolLM2-135M-Instruct); short names of gain_mlx.models work")
    p.add_argument("--adapter-path", help="gain adapter folder to apply (default: none, the base)")
    p.add_argument("--probe", default=DEFAULT_PROBE, help=f"probe .jsonl (default {DEFAULT_PROBE}; {PROBE_HINT})")
    p.add_argument("--questions", type=int, help="score the first N questions (default: all)")
    add_fast_blas_argument(p)
    return p


@cli
def main(argv=None):
    from .loading import load

    args = build_parser().parse_args(argv)
    policy.start(args.fast_blas)
    model, tokenizer = load(args.model, args.adapter_path)
    probe = load_probe(args.probe, tokenizer, args.questions)
    model, note = policy.compute_model(model)
    if note:
        say(f"Scoring {note}")
    result = score(model, probe)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
