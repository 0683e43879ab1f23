"""lm-evaluation-harness model class for a base and its gain adapters in one model.

:class:`Runner` owns the model, its :class:`~gain_mlx.multi.AdapterSet` and the rows to
evaluate. Each lm-eval request is computed for every row at once (sequences of
different adapters share a batch through per-sequence gains) and cached; :class:`GainLM`
is the lm-eval model of one row, so evaluating the base and then each adapter computes
everything during the first pass and reads the cache after. Follows ``mlx_lm.evaluate``
and lm-eval's ``HFLM`` conventions (context/continuation split, rolling windows, prefix
token). Importing this module needs lm-eval.
"""

import json

import mlx.core as mx
import numpy as np
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM

DEFAULT_MAX_LENGTH = 2048
CHUNK_ELEMENTS = 1 << 27  # logits per forward chunk (512 MB of float32)


def _stop_at(text: str, until) -> str:
    """``text`` up to the first occurrence of any string in ``until``."""
    cut = [i for i in (text.find(u) for u in until if u) if i >= 0]
    return text[: min(cut)] if cut else text


class Runner:
    """Batched scoring and greedy generation for several stack rows of one model."""

    def __init__(self, model, tokenizer, adapters, rows, batch_size=8, max_length=None, max_gen_tokens=None):
        self.model, self.tokenizer, self.adapters = model, tokenizer, adapters
        self.rows = list(rows)
        self.batch_size = batch_size
        self.max_length = max_length or getattr(model.args, "max_position_embeddings", None) or DEFAULT_MAX_LENGTH
        self.max_gen_tokens = max_gen_tokens
        self.cache = {}  # (key, row) -> result
        self.stats = {"forward_passes": 0, "max_batch": 0, "mixed_passes": 0, "sequences": 0}

    def _run(self, keys, row, compute):
        """Results of ``keys`` for ``row``; missing ones are computed for every row."""
        missing = list(dict.fromkeys(k for k in keys if (k, row) not in self.cache))
        if missing:
            items = [(k, r) for k in missing for r in self.rows]
            self.cache.update(zip(items, compute(items)))
        return [self.cache[(k, row)] for k in keys]

    def _forward(self, batch_rows, tokens, cache=None):
        s = self.stats
        s["forward_passes"] += 1
        s["max_batch"] = max(s["max_batch"], len(batch_rows))
        s["mixed_passes"] += len(set(batch_rows)) > 1
        self.adapters.select(batch_rows)
        try:
            return self.model(tokens, cache=cache)
        finally:
            self.adapters.select(None)

    # -- loglikelihood

    def loglikelihood(self, requests, row):
        """``[(sum logprob of continuation, greedy)]`` for ``requests`` of ``(context ids,
        continuation ids)`` under stack row ``row``."""
        keys = [("ll", tuple(c), tuple(k)) for c, k in requests]
        return self._run(keys, row, self._score)

    def _score(self, items):
        # Longest first (as lm-eval's collator): similar lengths share a batch, and each
        # request's rows are neighbours, so batches mix adapters.
        order = sorted(range(len(items)), key=lambda i: -(len(items[i][0][1]) + len(items[i][0][2])))
        out = [None] * len(items)
        for b in range(0, len(order), self.batch_size):
            idx = order[b : b + self.batch_size]
            seqs, conts = [], []
            for i in idx:
                (_, ctx, cont), _ = items[i]
                seqs.append((list(ctx) + list(cont))[-(self.max_length + 1) :][:-1])
                conts.append(list(cont)[-len(seqs[-1]) :])  # what a truncated window can score
            for i, result in zip(idx, self._score_batch([items[i][1] for i in idx], seqs, conts)):
                out[i] = result
        return out

    def _score_batch(self, rows, seqs, conts):
        """Right-padded sequences, run in chunks of positions through one KV cache, so that
        logits (and attention) stay within ``CHUNK_ELEMENTS`` however long the documents."""
        from mlx_lm.models.cache import make_prompt_cache

        B, T = len(seqs), max(len(s) for s in seqs)
        inputs = np.zeros((B, T), dtype=np.int32)
        targets = np.zeros((B, T), dtype=np.int32)  # position p predicts targets[:, p]
        mask = np.zeros((B, T), dtype=bool)
        for j, (s, c) in enumerate(zip(seqs, conts)):
            inputs[j, : len(s)] = s
            targets[j, len(s) - len(c) : len(s)] = c
            mask[j, len(s) - len(c) : len(s)] = True
        first = int(mask.any(axis=0).argmax())  # positions before it score nothing
        vocab = getattr(self.model.args, "vocab_size", None) or 32000
        step = max(16, CHUNK_ELEMENTS // (B * vocab))
        cache = make_prompt_cache(self.model) if T > step else None
        self.stats["sequences"] += B
        scores, greedy = mx.zeros((B,)), mx.ones((B,), dtype=mx.bool_)
        for lo in range(0, T, step):
            logits = self._forward(rows, mx.array(inputs[:, lo : lo + step]), cache)
            if lo + step <= first:
                mx.eval([c.state for c in cache])
                continue
            logits = logits.astype(mx.float32)
            tgt, m = mx.array(targets[:, lo : lo + step]), mx.array(mask[:, lo : lo + step])
            picked = mx.take_along_axis(logits, tgt[..., None], axis=-1)[..., 0] - mx.logsumexp(logits, axis=-1)
            scores = scores + mx.where(m, picked, 0.0).sum(axis=-1)
            greedy = greedy & mx.all(mx.where(m, mx.argmax(logits, axis=-1) == tgt, True), axis=-1)
            mx.eval(scores, greedy)
        return [(sc, bool(g)) for sc, g in zip(scores.tolist(), greedy.tolist())]

    # -- generation

    def generate(self, requests, row):
        """Greedy continuations of ``requests`` of ``(prompt ids, until, max tokens)``."""
        keys = [("gen", tuple(p), tuple(u), n) for p, u, n in requests]
        return self._run(keys, row, self._generate)

    def _generate(self, items):
        from mlx_lm.generate import BatchGenerator
        from mlx_lm.models.cache import make_prompt_cache

        from .serve_engine import _RowModel, _Rows

        stats = {"forward_passes": 0, "max_batch": 0, "mixed_passes": 0}
        gen = BatchGenerator(
            _RowModel(self.model, self.adapters, stats),
            stop_tokens=[[t] for t in sorted(self.tokenizer.eos_token_ids)],
            completion_batch_size=self.batch_size,
            prefill_batch_size=self.batch_size,
        )
        uids = gen.insert(
            [list(k[1]) for k, _ in items],
            max_tokens=[k[3] for k, _ in items],
            caches=[make_prompt_cache(self.model) + [_Rows([r])] for _, r in items],
        )
        where = {u: i for i, u in enumerate(uids)}
        tokens = {u: [] for u in uids}
        texts = [None] * len(items)
        try:
            while len(where):
                _, responses = gen.next()
                for r in responses:
                    i = where[r.uid]
                    if r.finish_reason != "stop":
                        tokens[r.uid].append(r.token)
                    text = self.tokenizer.decode(tokens[r.uid])
                    until = items[i][0][2]
                    if r.finish_reason is not None or _stop_at(text, until) != text:
                        if r.finish_reason is None:
                            gen.remove([r.uid])
                        texts[i] = _stop_at(text, until)
                        del where[r.uid]
        finally:
            gen.close()
            self.adapters.select(None)
        for k in ("forward_passes", "mixed_passes"):
            self.stats[k] += stats[k]
        self.stats["max_batch"] = max(self.stats["max_batch"], stats["max_batch"])
        self.stats["sequences"] += len(items)
        return texts


class GainLM(TemplateLM):
    """The lm-eval model of one stack row (0: the base) of a :class:`Runner`."""

    def __init__(self, runner: Runner, row: int = 0, name: str = "base"):
        super().__init__()
        self.runner, self.row, self.name = runner, row, name
        self.tokenizer = runner.tokenizer

    @property
    def eot_token_id(self):
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self):
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self):
        return self.runner.max_length

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "name_or_path", "tokenizer").replace("/", "__")

    def chat_template(self, chat_template=False):
        return getattr(self.tokenizer, "chat_template", None) if chat_template else None

    def apply_chat_template(self, chat_history, add_generation_prompt=True) -> str:
        return self.tokenizer.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt,
        )

    def tok_encode(self, string, add_special_tokens=None, **kwargs):
        """As lm-eval's HFLM: the tokenizer's special tokens unless the text already starts with BOS."""
        if add_special_tokens is None:
            bos = getattr(self.tokenizer, "bos_token", None)
            add_special_tokens = not (bos and string.startswith(bos))
        return self.tokenizer.encode(string, add_special_tokens=add_special_tokens)

    def get_model_info(self) -> dict:
        return {"adapter": self.name}

    def _loglikelihood_tokens(self, requests, disable_tqdm=False, **kwargs):
        return self.runner.loglikelihood([(ctx, cont) for _, ctx, cont in requests], self.row)

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        windows, owner = [], []
        for n, (string,) in enumerate(req.args for req in requests):
            for ctx, cont in map(
                lm_utils.make_disjoint_window,
                lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            ):
                windows.append((ctx, cont))
                owner.append(n)
        totals = [0.0] * len(requests)
        for n, (ll, _) in zip(owner, self.runner.loglikelihood(windows, self.row)):
            totals[n] += ll
        return totals

    def generate_until(self, requests, disable_tqdm=False):
        batch = []
        for context, kwargs in (req.args for req in requests):
            kwargs = dict(kwargs or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            if kwargs.get("do_sample") or (kwargs.get("temperature") or 0) > 0:
                raise ValueError(f"sampled generation ({json.dumps(kwargs)}) is not supported: gain_mlx.evaluate decodes greedily")
            max_tokens = self.runner.max_gen_tokens or int(kwargs.get("max_gen_toks", 256))
            ids = self.tok_encode(context)
            ids = ids[-max(1, self.max_length - max_tokens) :]
            batch.append((ids, until, max_tokens))
        return self.runner.generate(batch, self.row)
