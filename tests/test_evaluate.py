"""python -m gain_mlx.evaluate: lm-eval in-process on a base and two adapters in one run
equals plain mlx-lm on each fused model (lmeval_fixtures' reference): accuracy exactly,
perplexity to 1e-4 relative, greedy generations token for token."""

import json
import math
import sys

import pytest

from lmeval_fixtures import GEN, MC, PPL, lmeval_env, requires_lmeval  # noqa: F401 (fixture)


def _check(models: dict, reference: dict):
    assert list(models) == ["base", "a", "b"]
    for name, out in models.items():
        res, ref = out["results"], reference[name]
        print(f"in-process {name}: acc {res[MC]['acc,none']:.4f} (reference {ref[MC]['acc']:.4f}), word ppl "
              f"{res[PPL]['word_perplexity,none']:.6g} ({ref[PPL]['word_perplexity']:.6g}), byte ppl "
              f"{res[PPL]['byte_perplexity,none']:.6g} ({ref[PPL]['byte_perplexity']:.6g})")
        assert res[MC]["acc,none"] == ref[MC]["acc"], name
        for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
            assert math.isclose(res[PPL][f"{metric},none"], ref[PPL][metric], rel_tol=1e-4), (name, metric)
        assert res[GEN]["exact_match,none"] == ref[GEN]["exact_match"], name
        gens = [s["filtered_resps"][0] for s in sorted(out["samples"][GEN], key=lambda s: s["doc_id"])]
        assert gens == ref[GEN]["generations"], name


@requires_lmeval
def test_fixture_models_differ(lmeval_env):
    """The adapters move every score: a test that mixed up adapters would fail."""
    ref = lmeval_env.reference
    assert len({ref[n][MC]["acc"] for n in ref}) == 3
    assert len({round(ref[n][PPL]["word_perplexity"], 3) for n in ref}) == 3
    assert len({tuple(ref[n][GEN]["generations"]) for n in ref}) == 3


@requires_lmeval
def test_in_process_equals_reference(lmeval_env, monkeypatch):
    from gain_mlx import lmeval
    from gain_mlx.evaluate import evaluate

    monkeypatch.setattr(lmeval, "CHUNK_ELEMENTS", 1)  # 16 positions a forward pass: longer documents go in chunks
    env = lmeval_env
    out = evaluate(env.model_dir, list(env.adapters.items()), env.tasks, include_path=env.include_path,
                   batch_size=3, log_samples=True)
    _check(out["models"], env.reference)
    assert out["stats"]["mixed_passes"] > 0 and out["stats"]["max_batch"] == 3


@requires_lmeval
def test_cli_batch_size_4_writes_json_and_table(lmeval_env, tmp_path, capsys):
    from gain_mlx.evaluate import main

    env = lmeval_env
    adapters = ",".join(f"{n}={p}" for n, p in env.adapters.items())
    main(["--model", str(env.model_dir), "--adapters", adapters, "--tasks", ",".join(env.tasks),
          "--include-path", str(env.include_path), "--batch-size", "4", "--log-samples",
          "--output-dir", str(tmp_path), "--no-fast-blas"])
    printed = capsys.readouterr().out
    models = {n: json.loads((tmp_path / f"{n}.json").read_text()) for n in ("base", "a", "b")}
    _check(models, env.reference)
    table = (tmp_path / "table.md").read_text()
    assert table in printed
    row = next(line for line in table.splitlines() if line.startswith(f"| {MC} | acc |"))
    ref = env.reference
    change_a = ref["a"][MC]["acc"] - ref["base"][MC]["acc"]
    assert row.split(" | ")[2:5] == [f"{ref['base'][MC]['acc']:.4g}", f"{ref['a'][MC]['acc']:.4g}", f"{change_a:+.4g}"
                                     + f" ({change_a / ref['base'][MC]['acc']:+.1%})"]
    assert "mixed several adapters, up to 4 sequences" in printed


@requires_lmeval
@pytest.mark.parametrize(
    "args, message",
    [
        (["--tasks", "no_such_task_xyz"], "unknown task(s) no_such_task_xyz"),
        (["--tasks", MC, "--adapters", "base=x"], "not 'base'"),
        (["--tasks", MC, "--adapters", "a=x,a=y"], "adapter names must differ"),
        (["--tasks", MC, "--adapters", "a=/no/such/adapter"], "not found"),
        (["--tasks", MC, "--batch-size", "0"], "--batch-size must be >= 1"),
    ],
)
def test_cli_errors_are_one_line(lmeval_env, args, message, capsys):
    from gain_mlx.evaluate import main

    with pytest.raises(SystemExit) as e:
        main(["--model", str(lmeval_env.model_dir), "--include-path", str(lmeval_env.include_path), "--no-fast-blas", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code in (1, 2)
    assert err[-1].startswith("error: ") and message in err[-1], err


def test_without_lm_eval_says_how_to_install(monkeypatch, capsys):
    from gain_mlx.evaluate import main

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval raises ImportError
    with pytest.raises(SystemExit) as e:
        main(["--tasks", MC])
    assert e.value.code == 1
    assert capsys.readouterr().err.strip() == "error: lm-eval is not installed: pip install 'gain-mlx[eval]' (lm-eval==0.4.13; it needs no torch)"


def _windowed_loglikelihood(model, tok, text, L):
    """Rolling loglikelihood with a context of at most ``L`` tokens, as lm-eval windows it:
    the first ``L`` tokens follow the prefix token; each later block of up to ``L`` tokens
    is scored in one ``L``-token forward pass that ends just before its last token."""
    from lmeval_fixtures import position_logprobs

    t = tok.encode(text, add_special_tokens=False)
    prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    first = min(L, len(t))
    lp = position_logprobs(model, [prefix] + t[: first - 1])
    total, done = sum(lp[i, t[i]] for i in range(first)), first
    while done < len(t):
        k = min(len(t) - done, L)
        inp = t[done + k - L - 1 : done + k - 1]
        lp = position_logprobs(model, inp)
        total += sum(lp[len(inp) - k + i, t[done + i]] for i in range(k))
        done += k
    return float(total)


@requires_lmeval
def test_rolling_windows_with_short_context(lmeval_env):
    """--max-length 8: documents of ~20 tokens span several windows, batched across adapters."""
    from lmeval_fixtures import PPL_DOCS

    from gain_mlx.evaluate import evaluate

    env = lmeval_env
    out = evaluate(env.model_dir, list(env.adapters.items()), [PPL], include_path=env.include_path,
                   batch_size=5, max_length=8)
    for name, res in out["models"].items():
        model, tok = env.fused(name)
        total = sum(_windowed_loglikelihood(model, tok, text, 8) for text in PPL_DOCS)
        words = sum(len(text.split()) for text in PPL_DOCS)
        assert math.isclose(res["results"][PPL]["word_perplexity,none"], math.exp(-total / words), rel_tol=1e-4), name
        assert abs(total - env.reference[name][PPL]["loglikelihood"]) > 1e-2  # the windows cut context


def test_adapter_list_names():
    from gain_mlx.errors import UsageError
    from gain_mlx.evaluate import adapter_list

    assert adapter_list("runs/legal", ["b=x/y,c=z"]) == [("legal", "runs/legal"), ("b", "x/y"), ("c", "z")]
    with pytest.raises(UsageError, match="must differ"):
        adapter_list("runs/legal", ["legal=z"])
    with pytest.raises(UsageError, match="not 'base'"):
        adapter_list("runs/base")
