"""lm-evaluation-harness over HTTP: ``local-completions`` with its defaults (token-id
prompts, several prompts per request with ``--batch_size 4``) against a running
gain_mlx.serve holding a base and two adapters. Scores equal the plain mlx-lm reference
on the fused models (lmeval_fixtures), and echoed logprobs equal the fused model's
log-softmax at each prompt position."""

import math

import numpy as np
import pytest

from lmeval_fixtures import GEN, MC, PPL, lmeval_env, position_logprobs, requires_lmeval  # noqa: F401
from serve_fixtures import Running


def _api_packages_missing():
    from importlib.util import find_spec

    return [p for p in ("aiohttp", "tenacity", "requests") if find_spec(p) is None]


requires_lmeval_api = pytest.mark.skipif(
    bool(_api_packages_missing()), reason=f"lm-eval's API models need {_api_packages_missing()} (pip install 'lm-eval[api]')"
)


def complete(served, body):
    """``(status, parsed JSON)`` of a legacy completions request."""
    return served.raw("POST", "/v1/completions", body)


@pytest.fixture(scope="module")
def served(lmeval_env):
    s = Running(lmeval_env.model_dir, lmeval_env.adapters)
    yield s
    s.close()


def _evaluate(served, env, model):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    return simple_evaluate(
        model="local-completions",
        model_args={"model": model, "base_url": served.url + "/v1/completions", "tokenizer": str(env.model_dir)},
        tasks=env.tasks,
        task_manager=TaskManager(include_path=str(env.include_path)),
        batch_size=4,
        log_samples=True,
    )


@requires_lmeval
@requires_lmeval_api
@pytest.mark.parametrize("model", ["base", "a", "b"])
def test_lmeval_local_completions_equals_reference(served, lmeval_env, model, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ref = lmeval_env.reference[model]
    out = _evaluate(served, lmeval_env, model)
    res = out["results"]
    print(f"HTTP {model}: acc {res[MC]['acc,none']:.4f} (reference {ref[MC]['acc']:.4f}), word ppl "
          f"{res[PPL]['word_perplexity,none']:.6g} ({ref[PPL]['word_perplexity']:.6g}), byte ppl "
          f"{res[PPL]['byte_perplexity,none']:.6g} ({ref[PPL]['byte_perplexity']:.6g})")
    assert res[MC]["acc,none"] == ref[MC]["acc"]
    for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert math.isclose(res[PPL][f"{metric},none"], ref[PPL][metric], rel_tol=1e-4), metric
    gens = [s["filtered_resps"][0] for s in sorted(out["samples"][GEN], key=lambda s: s["doc_id"])]
    assert gens == ref[GEN]["generations"]
    assert res[GEN]["exact_match,none"] == ref[GEN]["exact_match"]


@requires_lmeval
def test_lmeval_sees_adapters_change_scores(lmeval_env):
    """A check on the fixture itself: the reference differs between the three models."""
    accs = {m: lmeval_env.reference[m][MC]["acc"] for m in ("base", "a", "b")}
    assert len(set(accs.values())) == 3, accs


@pytest.mark.parametrize("chunk", [None, 2], ids=["whole", "chunked"])
@pytest.mark.parametrize("name", ["base", "a", "b"])
def test_echo_logprobs_equal_fused_log_softmax(served, lmeval_env, name, chunk, monkeypatch):
    """Several token-id prompts of different lengths in one request (as lm-eval batches
    them): one choice per prompt, in order, each echoing its prompt with a logprob for
    every token (the first null) and then the generated token's. ``chunked``: a logits
    budget of 2 positions, so prompts are scored in chunks through a KV cache."""
    from gain_mlx import policy

    if chunk:
        monkeypatch.setattr(policy, "LOGITS_BYTES", 4 * served.engine.vocab_size * chunk)
    model, tok = lmeval_env.fused(name)
    prompts = [tok.encode(t) for t in ("Permission is granted to anyone", "All rights", "The above copyright notice shall")]
    status, r = complete(served, {"model": name, "prompt": prompts, "echo": True, "max_tokens": 1, "logprobs": 2,
                             "temperature": 0, "seed": 1234})
    assert status == 200, r
    assert [c["index"] for c in r["choices"]] == [0, 1, 2]
    for ids, choice in zip(prompts, r["choices"]):
        lp = position_logprobs(model, ids)
        got = choice["logprobs"]
        assert got["token_logprobs"][0] is None and got["top_logprobs"][0] is None
        assert len(got["token_logprobs"]) == len(ids) + 1
        np.testing.assert_allclose(got["token_logprobs"][1: len(ids)], [lp[i - 1, ids[i]] for i in range(1, len(ids))], atol=2e-5)
        for i in range(1, len(ids)):  # top 2 of each position, as decoded text
            best = np.argsort(-lp[i - 1])[:2]
            top = got["top_logprobs"][i]  # tokens that decode alike share a key: the best is kept
            assert max(top.values()) == pytest.approx(float(lp[i - 1, best[0]]), abs=2e-5)
            assert all(min(abs(v - lp[i - 1, best])) < 2e-5 for v in top.values()) and 1 <= len(top) <= 2
        greedy = int(np.argmax(lp[-1]))
        assert got["token_logprobs"][-1] == pytest.approx(float(lp[-1, greedy]), abs=2e-5)
        assert "".join(got["tokens"][: len(ids)]) == tok.decode(ids) == choice["text"][: len(tok.decode(ids))]
        assert got["text_offset"] == [sum(len(t) for t in got["tokens"][:i]) for i in range(len(got["tokens"]))]


def test_echo_max_tokens_zero_and_eos(served, lmeval_env):
    model, tok = lmeval_env.fused("a")
    ids = tok.encode("Licensed under the Apache License")
    status, r = complete(served, {"model": "a", "prompt": ids, "echo": True, "max_tokens": 0, "logprobs": 0})
    assert status == 200, r
    c = r["choices"][0]
    assert c["text"] == tok.decode(ids) and len(c["logprobs"]["token_logprobs"]) == len(ids)
    assert r["usage"]["completion_tokens"] == 0
    # the generated token is end-of-sequence: its logprob is still there (lm-eval reads [ctxlen:-1])
    eos = tok.eos_token_id
    status, r = complete(served, {"model": "a", "prompt": [ids], "echo": True, "max_tokens": 1, "logprobs": 1,
                             "logit_bias": {str(eos): 100}})
    assert status == 200, r
    c = r["choices"][0]
    assert len(c["logprobs"]["token_logprobs"]) == len(ids) + 1 and c["finish_reason"] == "stop"
    assert c["text"] == tok.decode(ids)
    # strings, several of them, and their order
    status, r = complete(served, {"model": "b", "prompt": ["All rights", "Permission is"], "max_tokens": 2, "temperature": 0})
    assert status == 200 and [c["index"] for c in r["choices"]] == [0, 1]
    for field, value in (("best_of", 3), ("suffix", "x"), ("frobnicate", 1)):
        status, r = complete(served, {"model": "b", "prompt": "x", field: value})
        assert status == 400 and r["error"]["param"] == field and field in r["error"]["message"], r
    assert complete(served, {"model": "b", "prompt": "x", "max_tokens": 0})[0] == 400  # 0 only with echo
