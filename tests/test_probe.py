"""The definitions probe: its builder's parsing, and scoring against a one-sequence-at-a-time reference."""

import json
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm import load

from gain_mlx.experiments import probe as P
from gain_mlx.errors import UserError

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import make_probe  # noqa: E402

GCIDE = r"""Dragnet \Drag"net`\, n. [Cf. AS. dr[ae]gnet.]
   A net to be drawn along the bottom of a body of water, as in
   fishing.

Dragoman \Drag"o*man\, n.; pl. {Dragomans}. [From F. dragoman.]
   An interpreter; -- so called in the Levant.

dragon \drag"on\ (dr[a^]g"[u^]n), n. [F. dragon.]
   1. (Myth.) A fabulous animal.

Gallop \Gal"lop\, v. i. [F. galoper.]
   To move or run in a series of leaps, as a horse.

Quickly \Quick"ly\, adv.
   Speedily; with haste or celerity.
"""


def test_entries_keep_one_sense_plain_definitions():
    got = list(make_probe.entries(GCIDE))
    assert got == [
        ("dragnet", "noun", "A net to be drawn along the bottom of a body of water, as in fishing."),
        ("gallop", "verb", "To move or run in a series of leaps, as a horse."),
    ]  # Dragoman: plural note first; dragon: numbered senses; quickly: definition too short


def _write_probe(path, n=6):
    rng = np.random.default_rng(0)
    words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot"]
    defs = ["A thing that moves.", "Some kind of animal here.", "To run quickly away from home.",
            "Very large and old.", "The sound of a bell at night."]
    rows = []
    for word in words[:n]:
        choices = list(rng.choice(defs, 4, replace=False))
        rows.append({"word": word, "pos": "noun", "choices": choices, "answer": int(rng.integers(4))})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def _reference_ll(model, tokenizer, context, continuation):
    ctx = tokenizer.encode(context)
    seq = tokenizer.encode(context + continuation)
    logp = nn.log_softmax(model(mx.array([seq[:-1]]))[0].astype(mx.float32), axis=-1)
    return sum(logp[i - 1, seq[i]].item() for i in range(len(ctx), len(seq)))


def test_score_matches_one_sequence_at_a_time(tmp_path, tiny_model_dir, monkeypatch):
    rows = _write_probe(tmp_path / "probe.jsonl")
    model, tokenizer = load(str(tiny_model_dir))
    monkeypatch.setattr(P, "BATCH", 5)  # batches that split questions and pad unequal lengths
    probe = P.load_probe(tmp_path / "probe.jsonl", tokenizer)
    got = P.score(model, probe)
    ll = np.array([[_reference_ll(model, tokenizer, f"Word: {r['word']}\nDefinition:", " " + c) for c in r["choices"]]
                   for r in rows])
    norm = ll / np.array([[len((" " + c).encode()) for c in r["choices"]] for r in rows])
    answers = np.array([r["answer"] for r in rows])
    assert got["questions"] == len(rows)
    assert got["acc"] == pytest.approx(np.mean(ll.argmax(1) == answers))
    assert got["acc_norm"] == pytest.approx(np.mean(norm.argmax(1) == answers))
    assert got["answer_ll_per_byte"] == pytest.approx(np.mean(norm[np.arange(len(rows)), answers]), rel=1e-4)


def test_continuation_logprobs_keep_input_order(tiny_model_dir, monkeypatch):
    """Pairs are batched by length; each result still belongs to its own pair."""
    model, tokenizer = load(str(tiny_model_dir))
    monkeypatch.setattr(P, "BATCH", 4)  # the last batch holds one pair: fewer rows than CPU streams
    texts = [("Word: a\nDefinition:", " A very long definition of many words, longer than the rest."),
             ("Word: bb\nDefinition:", " Short."), ("Word: c\nDefinition:", " Of middling length here."),
             ("Word: dd\nDefinition:", " Tiny."), ("Word: e\nDefinition:", " Another quite long one, with clauses.")]
    pairs = [(tokenizer.encode(c), tokenizer.encode(c + x)[len(tokenizer.encode(c)):]) for c, x in texts]
    got = P.continuation_logprobs(model, pairs)
    want = [_reference_ll(model, tokenizer, c, x) for c, x in texts]
    assert got == pytest.approx(want, rel=1e-4)
    assert len(set(map(len, (c + x for c, x in pairs)))) > 2, "pairs of unequal lengths"


def test_missing_probe_names_the_builder(tmp_path):
    with pytest.raises(UserError, match="python tools/make_probe.py"):
        P.load_probe(tmp_path / "nope.jsonl", tokenizer=None)


def test_cli_prints_the_scores(tmp_path, tiny_model_dir):
    import subprocess

    _write_probe(tmp_path / "probe.jsonl")
    r = subprocess.run([sys.executable, "-m", "gain_mlx.probe", "--model", str(tiny_model_dir), "--probe",
                        str(tmp_path / "probe.jsonl"), "--questions", "3"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    model, tokenizer = load(str(tiny_model_dir))
    assert json.loads(r.stdout) == pytest.approx(P.score(model, P.load_probe(tmp_path / "probe.jsonl", tokenizer, 3)))
    r = subprocess.run([sys.executable, "-m", "gain_mlx.probe", "--model", str(tiny_model_dir), "--probe",
                        str(tmp_path / "none.jsonl")], capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith("error: probe ")


def test_shared_contexts_match_whole_sequences(tiny_model_dir, monkeypatch):
    """Contexts computed once into SharedPrefix caches give each pair's whole-sequence log-likelihood:
    choices of one context split across batches and CPU streams, contexts of equal length batched
    together, and a one-token context (no prefix to cache)."""
    model, tokenizer = load(str(tiny_model_dir))
    monkeypatch.setattr(P, "BATCH", 3)
    contexts = ["Word: a\nDefinition:", "Word: b\nDefinition:", "Word: cc dd\nDefinition:"]
    endings = [" One.", " Two words.", " A third, longer ending here.", " Four."]
    texts = [(c, e) for c in contexts for e in endings]
    pairs = [(tokenizer.encode(c), tokenizer.encode(c + e)[len(tokenizer.encode(c)):]) for c, e in texts]
    pairs.append((pairs[0][0][-1:], pairs[0][1]))  # a context of one token
    assert len(pairs[0][0]) == len(pairs[4][0]) != len(pairs[8][0]), "two contexts of one length, one of another"
    got = P.continuation_logprobs(model, pairs)
    logp = [nn.log_softmax(model(mx.array([c + x])[:, :-1])[0].astype(mx.float32), axis=-1) for c, x in pairs]
    want = [sum(lp[len(c) - 1 + k, t].item() for k, t in enumerate(x)) for lp, (c, x) in zip(logp, pairs)]
    assert got == pytest.approx(want, rel=1e-4)
