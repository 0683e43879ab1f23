"""Offline lm-eval fixtures: small task YAMLs with local data, a tiny base with two gain
adapters, and an independent reference computed with plain mlx-lm on fused models.

Shared by the in-process tests (test_evaluate.py) and the HTTP tests (serve). Use::

    from lmeval_fixtures import lmeval_env, requires_lmeval  # noqa: F401 (pytest fixture)

    @requires_lmeval
    def test_x(lmeval_env):
        env = lmeval_env
        env.model_dir, env.adapters      # base folder, {"a": folder, "b": folder}
        env.include_path, env.tasks      # YAML folder for --include-path, [mc, ppl, gen]
        env.reference["a"]["gainmlx_mc"]["acc"]           # what lm-eval must report
        env.reference["base"]["gainmlx_ppl"]["word_perplexity"]
        env.reference["b"]["gainmlx_gen"]["generations"]  # greedy, cut at `until`
        env.fused("a")                   # (model, tokenizer): the base fused with adapter a
        position_logprobs(env.fused("a")[0], ids)  # (len(ids), vocab) log-softmax

Conventions the reference follows (lm-eval's, for a tokenizer that adds no BOS):
loglikelihood of (context, " " + choice) sums the continuation tokens, where the
continuation tokens are ``encode(context + cont)[len(encode(context)):]``; rolling
loglikelihood predicts every token of the text, the first from the prefix token (BOS,
else EOS); word/byte perplexity are ``exp(-sum ll / sum words (bytes))`` over the docs;
a generation is ``tokenizer.decode`` of the greedy tokens (EOS left out, leading space
kept), cut at the first ``until`` string.
"""

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

MC, PPL, GEN = "gainmlx_mc", "gainmlx_ppl", "gainmlx_gen"
TASKS = [MC, PPL, GEN]
ADAPTERS = {"a": ("gain-ffn", 11, True), "b": ("gain", 12, False)}  # name -> variant, seed, tie_kv
GAIN_RANGE = (0.3, 1.9)  # far from 1, so each adapter changes the scores
GEN_UNTIL = ["\n", "."]
GEN_MAX_TOKENS = 8

# Answers of docs 4 and 11 are set where the random tiny models disagree, so base, a and b
# score 7, 5 and 6 of 12 (a check that the adapters reach the scores).
MC_DOCS = [
    ("Permission is granted to anyone to use this", ["software", "license", "copyright", "notice"], 0),
    ("The above copyright notice shall be included in all", ["copies", "warranty", "purpose", "author"], 0),
    ("THE SOFTWARE IS PROVIDED AS IS, WITHOUT", ["WARRANTY", "PERMISSION", "SOFTWARE", "NOTICE"], 0),
    ("Redistribution and use in source and binary forms, with or without", ["modification", "warranty", "the", "copies"], 0),
    ("This program is free software; you can redistribute it and/or", ["modify it", "use it", "copy it", "sell it"], 1),
    ("IN NO EVENT SHALL THE AUTHORS BE LIABLE FOR ANY", ["CLAIM", "SOFTWARE", "NOTICE", "PURPOSE"], 0),
    ("All rights", ["reserved", "granted", "distributed", "included"], 0),
    ("You may not use this file except in compliance with the", ["License", "Software", "copyright", "author"], 0),
    ("The name of the author may not be used to endorse or promote", ["products", "software", "notice", "copies"], 0),
    ("Licensed under the Apache License,", ["Version 2.0", "Section 4", "the terms", "all rights"], 0),
    ("Neither the name of the copyright holder nor the names of its", ["contributors", "licenses", "users", "files"], 1),
    ("distributed in the hope that it will be", ["useful", "free", "sold", "licensed"], 1),
]

PPL_DOCS = [
    "Permission is hereby granted, free of charge, to any person obtaining a copy of this software.",
    "The above copyright notice and this permission notice shall be included in all copies.",
    "THE SOFTWARE IS PROVIDED AS IS, WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED.",
    "Redistributions of source code must retain the above copyright notice, this list of conditions.",
    "You should have received a copy of the GNU General Public License along with this program.",
]

GEN_DOCS = [
    ("Copyright (c) 2004 by", "the author"),
    ("Permission is granted to", "anyone"),
    ("THE SOFTWARE IS PROVIDED", "AS IS"),
    ("Licensed under the", "Apache License"),
    ("This library is free software", "; you can"),
]

_YAML = {
    MC: """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
output_type: multiple_choice
doc_to_text: question
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""",
    PPL: """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: text
metric_list:
  - metric: word_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: byte_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: bits_per_byte
    aggregation: bits_per_byte
    higher_is_better: false
""",
    GEN: """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
output_type: generate_until
doc_to_text: prompt
doc_to_target: target
generation_kwargs:
  until: {until}
  max_gen_toks: {max_tokens}
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
""",
}


def lmeval_installed() -> bool:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        return False
    return True


requires_lmeval = pytest.mark.skipif(
    not lmeval_installed(), reason="lm-eval is not installed (pip install 'gain-mlx[eval]'; CI installs it)"
)


def write_tasks(folder) -> Path:
    """Write the three task YAMLs and their jsonl data into ``folder`` (for ``--include-path``)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = {
        MC: [{"question": q, "choices": c, "answer": a} for q, c, a in MC_DOCS],
        PPL: [{"text": t} for t in PPL_DOCS],
        GEN: [{"prompt": p, "target": t} for p, t in GEN_DOCS],
    }
    for task, docs in rows.items():
        data = folder / f"{task}.jsonl"
        data.write_text("".join(json.dumps(d) + "\n" for d in docs))
        text = _YAML[task].format(task=task, data=json.dumps(str(data)), cache=json.dumps(str(folder / "hf_cache")),
                                  until=json.dumps(GEN_UNTIL), max_tokens=GEN_MAX_TOKENS)
        (folder / f"{task}.yaml").write_text(text)
    return folder


def make_gain_adapter(model_dir, path, variant: str, seed: int, tie_kv: bool) -> Path:
    """Save an adapter for the model in ``model_dir`` with gains drawn from ``GAIN_RANGE``."""
    from mlx_lm import load

    from gain_mlx.adapter import adapter_config, apply_gains, save_adapter

    model, _ = load(str(model_dir))
    targets = apply_gains(model, variant, tie_kv)
    rng = np.random.default_rng(seed)
    for _, layer in model.named_modules():
        if hasattr(layer, "gain"):
            layer.gain = mx.array(rng.uniform(*GAIN_RANGE, layer.gain.shape).astype(np.float32))
    return save_adapter(model, path, adapter_config(model, targets, variant, tie_kv))


def fused_model(model_dir, adapter=None):
    """``(model, tokenizer)``: plain ``mlx_lm.load`` of the base, with ``adapter`` fused in."""
    from mlx_lm import load

    from gain_mlx.adapter import load_adapter, read_adapter, targets_from_config
    from gain_mlx.fuse import fuse_model

    model, tok = load(str(model_dir))
    if adapter is not None:
        load_adapter(model, adapter)
        fuse_model(model, targets_from_config(read_adapter(adapter)[0]))
    return model, tok


def position_logprobs(model, ids) -> np.ndarray:
    """``(len(ids), vocab)`` float32 log-softmax of ``model`` at each position of ``ids``
    (row i predicts token i + 1)."""
    logits = model(mx.array(ids)[None]).astype(mx.float32)
    return np.array(nn.log_softmax(logits[0], axis=-1))


def _continuation_logprob(model, tok, context: str, continuation: str) -> float:
    ctx = tok.encode(context, add_special_tokens=False)
    whole = tok.encode(context + continuation, add_special_tokens=False)
    lp = position_logprobs(model, whole)
    return float(sum(lp[i - 1, whole[i]] for i in range(len(ctx), len(whole))))


def _prefix_token(tok) -> int:
    return tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id


def _greedy(model, tok, prompt: str) -> str:
    from mlx_lm import stream_generate

    ids = tok.encode(prompt, add_special_tokens=False)
    out = list(stream_generate(model, tok, ids, max_tokens=GEN_MAX_TOKENS))
    tokens = [r.token for r in out[: -1 if out and out[-1].finish_reason == "stop" else None]]
    text = tok.decode(tokens)  # all at once, as lm-eval's HFLM (mlx-lm's streaming text drops a leading space)
    cut = min([i for i in (text.find(u) for u in GEN_UNTIL) if i >= 0], default=len(text))
    return text[:cut]


def reference_scores(model, tok) -> dict:
    """``{task: {metric: value}}`` for one (fused) model, computed without lm-eval."""
    lls = [[_continuation_logprob(model, tok, q, " " + c) for c in choices] for q, choices, _ in MC_DOCS]
    acc = float(np.mean([int(np.argmax(l)) == a for l, (_, _, a) in zip(lls, MC_DOCS)]))

    total, words, nbytes = 0.0, 0, 0
    for text in PPL_DOCS:
        ids = [_prefix_token(tok)] + tok.encode(text, add_special_tokens=False)
        lp = position_logprobs(model, ids)
        total += float(sum(lp[i - 1, ids[i]] for i in range(1, len(ids))))
        words += len(re.split(r"\s+", text))
        nbytes += len(text.encode("utf-8"))

    gens = [_greedy(model, tok, p) for p, _ in GEN_DOCS]
    return {
        MC: {"acc": acc, "loglikelihoods": lls},
        PPL: {"word_perplexity": math.exp(-total / words), "byte_perplexity": math.exp(-total / nbytes),
              "bits_per_byte": -total / nbytes / math.log(2), "loglikelihood": total},
        GEN: {"generations": gens,
              "exact_match": float(np.mean([g.strip() == t.strip() for g, (_, t) in zip(gens, GEN_DOCS)]))},
    }


@dataclass
class LMEvalEnv:
    model_dir: Path
    adapters: dict  # name -> adapter folder
    include_path: Path
    tasks: list = field(default_factory=lambda: list(TASKS))
    reference: dict = field(default_factory=dict)  # "base" / adapter name -> reference_scores
    _fused: dict = field(default_factory=dict)

    def fused(self, name="base"):
        """``(model, tokenizer)``: the base fused with adapter ``name`` ("base": none), cached."""
        if name not in self._fused:
            self._fused[name] = fused_model(self.model_dir, None if name == "base" else self.adapters[name])
        return self._fused[name]


def build_env(root, model_dir) -> LMEvalEnv:
    """Tasks, two adapters for ``model_dir`` and the reference for base + each adapter."""
    root = Path(root)
    adapters = {n: make_gain_adapter(model_dir, root / n, *spec) for n, spec in ADAPTERS.items()}
    env = LMEvalEnv(Path(model_dir), adapters, write_tasks(root / "tasks"))
    for name in ["base", *adapters]:
        env.reference[name] = reference_scores(*env.fused(name))
    return env


@pytest.fixture(scope="session")
def lmeval_env(tmp_path_factory, tiny_model_dir):
    """``LMEvalEnv`` on the tiny llama of conftest's ``tiny_model_dir`` (see module docstring)."""
    return build_env(tmp_path_factory.mktemp("lmeval"), tiny_model_dir)
