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

import numpy as np

from . import cpu
from .errors import UserError, cli
from .loss import token_losses

DEFAULT_PROBE = ".cache/corpora/probe/definitions.jsonl"
PROBE_HINT = "python tools/make_probe.py"
BATCH = 16  # sequences per forward pass


@dataclass
class Probe:
    contexts: list  # token ids of each question's context
    choices: list  # [question][choice] -> token ids of the continuation
    choice_bytes: np.ndarray  # [question, choice] UTF-8 length of the continuation
    answers: np.ndarray  # [question] index of the right choice


def _context(item) -> str:
    return f"Word: {item['word']}\nDefinition:"


def load_probe(path, tokenizer, limit=None) -> Probe:
    """The first ``limit`` questions of a probe file, tokenized once."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"probe {path} not found: make it with {PROBE_HINT}")
    items = [json.loads(line) for line in path.read_text().splitlines() if line.strip()][:limit]
    contexts, choices = [], []
    for item in items:
        ctx = tokenizer.encode(_context(item))
        contexts.append(ctx)
        # lm-eval: encode context + continuation together, the continuation is what follows the context
        choices.append([tokenizer.encode(_context(item) + " " + c)[len(ctx):] for c in item["choices"]])
    n_bytes = np.array([[len((" " + c).encode()) for c in item["choices"]] for item in items])
    return Probe(contexts, choices, n_bytes, np.array([item["answer"] for item in items]))


def continuation_logprobs(model, pairs) -> list:
    """Sum of log p(continuation | context) for each ``(context, continuation)`` pair.

    Pairs are batched in order of length, so a batch carries little padding (in the
    definitions probe, 6.6K tokens computed instead of 9.4K in file order).
    """
    micro_batches, threads = cpu.step_parallelism(BATCH)  # the cores side by side, as in training
    streams = cpu.streams(micro_batches)

    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
    out = [0.0] * len(pairs)
    for start in range(0, len(order), BATCH):
        chunk = order[start:start + BATCH]
        seqs = [pairs[i][0] + pairs[i][1] for i in chunk]
        width = max(map(len, seqs)) - 1
        inputs = np.zeros((len(seqs), width), np.int32)
        targets = np.zeros((len(seqs), width), np.int32)
        mask = np.zeros((len(seqs), width), np.float32)
        for row, (i, seq) in enumerate(zip(chunk, seqs)):
            inputs[row, :len(seq) - 1] = seq[:-1]
            targets[row, :len(seq) - 1] = seq[1:]
            mask[row, len(pairs[i][0]) - 1:len(seq) - 1] = 1.0
        with cpu.blas_threads(threads):
            sums = (-token_losses(model, inputs, targets, mask, streams).sum(axis=1, dtype=np.float64)).tolist()
        for i, value in zip(chunk, sums):
            out[i] = value
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
    from .cpu import dequantize_model, ensure_fast_blas
    from .generate import load

    args = build_parser().parse_args(argv)
    ensure_fast_blas(args.fast_blas)
    model, tokenizer = load(args.model, args.adapter_path)
    probe = load_probe(args.probe, tokenizer, args.questions)
    result = score(dequantize_model(model), probe)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
