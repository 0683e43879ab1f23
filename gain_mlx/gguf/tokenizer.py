"""Rebuild a Hugging Face tokenizer from a GGUF's ``tokenizer.ggml.*`` metadata.

The result tokenizes exactly like llama.cpp (``llama_tokenize`` with
``parse_special=True``): BPE vocabularies get llama.cpp's pre-tokenizer regexes
for their ``tokenizer.ggml.pre`` name, SentencePiece (``llama``) vocabularies get
llama.cpp's score-ordered merges, ``▁`` escaping and byte fallback.
"""

import json
import os
import tempfile
from pathlib import Path

import gguf
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models
from tokenizers import normalizers, pre_tokenizers, processors

from . import GGUFImportError

T = gguf.TokenType

# Pre-tokenizer regexes, verbatim from llama.cpp src/llama-vocab.cpp
# (llm_tokenizer_bpe). GPT-2's carries the trailing \s+ that llama.cpp's
# hand-written GPT-2 splitter implements.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_LLAMA3 = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_DEFAULT = [r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"]

# pre name -> (regexes, ignore_merges, add_bos default); names as llama.cpp.
_PRE = {
    **dict.fromkeys(["default"], (_DEFAULT, False, False)),
    **dict.fromkeys(["gpt-2", "phi-2", "mpt", "olmo", "jais"], ([_GPT2], False, False)),
    **dict.fromkeys(
        ["smollm", "starcoder", "refact", "command-r", "codeshell", "exaone"],
        ([r"\p{N}", _GPT2], False, False),
    ),
    **dict.fromkeys(
        ["qwen2", "deepseek-r1-qwen", "stablelm2", "megrez"], ([_QWEN2], False, False)
    ),
    **dict.fromkeys(
        ["llama-bpe", "llama3", "llama-v3", "falcon3", "pixtral"], ([_LLAMA3], True, True)
    ),
    **dict.fromkeys(["dbrx", "smaug-bpe"], ([_LLAMA3], False, False)),
}

# Tokens llama.cpp marks CONTROL by their text whatever their stored type
# (EOT/EOG/FIM auto-detection in llama_vocab::impl::load).
_FORCED_CONTROL = {
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
    "<|end_of_text|>", "<EOT>", "_<EOT>", "<end_of_utterance>", "<|eom_id|>",
    "<|return|>", "<|call|>", "</s>", "<eos>",
    "<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<PRE>", "▁<PRE>",
    "<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<SUF>", "▁<SUF>",
    "<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<MID>", "▁<MID>",
    "<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>",
    "<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>",
    "<|file_sep|>",
}

_SPM_DECODER = [
    decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()
]


def _field(reader, key, default=None):
    """A metadata value as Python data, or default when the key is absent."""
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def _vocab(reader):
    """(tokens, token types as llama.cpp sees them, text -> id)."""
    tokens = _field(reader, "tokenizer.ggml.tokens")
    if tokens is None:
        raise GGUFImportError("GGUF has no tokenizer.ggml.tokens: it carries no vocabulary")
    tokens = [t or f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
    types = _field(reader, "tokenizer.ggml.token_type") or [T.NORMAL] * len(tokens)
    types = [
        T.CONTROL if (t == T.NORMAL and s in _FORCED_CONTROL) else t
        for s, t in zip(tokens, types)
    ]
    vocab = {}
    for i, s in enumerate(tokens):
        if vocab.setdefault(s, i) != i:
            raise GGUFImportError(f"duplicate token {s!r} in GGUF vocabulary (ids {vocab[s]}, {i})")
    return tokens, types, vocab


# llama.cpp's special-token ids when the GGUF does not name them.
_DEFAULT_IDS = {"llama": {"bos": 1, "eos": 2, "unknown": 0}, "gpt2": {"bos": 11, "eos": 11}}
_SPECIAL_NAMES = ("bos", "eos", "unknown", "padding")


def _special_ids(reader, model, n_tokens):
    """{"bos"|"eos"|"unknown"|"padding": id} for the ids inside the vocabulary."""
    ids = {
        name: _field(reader, f"tokenizer.ggml.{name}_token_id", _DEFAULT_IDS[model].get(name))
        for name in _SPECIAL_NAMES
    }
    return {name: i for name, i in ids.items() if i is not None and 0 <= i < n_tokens}


def _spm_merges(tokens, scores, vocab):
    """Every split of every token into two tokens, best score first: llama.cpp's
    SPM tokenizer merges the adjacent pair whose concatenation scores highest.

    llama.cpp breaks score ties by position (leftmost first), which merge ranks
    cannot say; longer tokens first reproduces it where ties happen in practice,
    runs of one character (gemma's whitespace pieces all score 0): the leftmost
    piece grows to the longest run in the vocabulary before the next one starts.
    """
    ranked = []
    for i, s in enumerate(tokens):
        for k in range(1, len(s)):
            if s[:k] in vocab and s[k:] in vocab:
                ranked.append((-scores[i], -len(s), i, k))
    ranked.sort()
    return [(tokens[i][:k], tokens[i][k:]) for *_, i, k in ranked]


def _bpe_merges(reader, vocab):
    """The GGUF's merges as pairs, first occurrence kept (llama.cpp's rank)."""
    merges, seen = [], set()
    for m in _field(reader, "tokenizer.ggml.merges") or []:
        pos = m.find(" ", 1)  # as llama.cpp: a merge may start with a space
        a, b = (m[:pos], m[pos + 1 :]) if pos > 0 else ("", "")
        if a and b and (a, b) not in seen and a in vocab and b in vocab and a + b in vocab:
            seen.add((a, b))
            merges.append((a, b))
    return merges


def _build_bpe(reader, tokens, vocab):
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    if pre not in _PRE:
        raise GGUFImportError(
            f"unsupported tokenizer.ggml.pre {pre!r}; supported: {', '.join(sorted(_PRE))}"
        )
    regexes, ignore_merges, _ = _PRE[pre]
    tok = Tokenizer(
        models.BPE(vocab, _bpe_merges(reader, vocab), ignore_merges=ignore_merges)
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), "isolated") for r in regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def _build_spm(reader, tokens, vocab):
    scores = _field(reader, "tokenizer.ggml.scores") or [0.0] * len(tokens)
    unk = _special_ids(reader, "llama", len(tokens)).get("unknown")
    tok = Tokenizer(
        models.BPE(
            vocab,
            _spm_merges(tokens, scores, vocab),
            unk_token=None if unk is None else tokens[unk],
            byte_fallback=True,
        )
    )
    prefix = _field(reader, "tokenizer.ggml.add_space_prefix", True)
    tok.normalizer = normalizers.Sequence(
        ([normalizers.Prepend("▁")] if prefix else []) + [normalizers.Replace(" ", "▁")]
    )
    tok.decoder = decoders.Sequence(
        _SPM_DECODER + ([decoders.Strip(" ", 1, 0)] if prefix else [])
    )
    return tok


_MODELS = {"gpt2": _build_bpe, "llama": _build_spm}


def _add_flags(reader):
    """(add_bos, add_eos) as llama.cpp decides them: metadata, else its defaults."""
    model = _field(reader, "tokenizer.ggml.model")
    pre = _PRE.get(_field(reader, "tokenizer.ggml.pre", "default"), (None, None, False))
    add_bos = _field(reader, "tokenizer.ggml.add_bos_token", model == "llama" or pre[2])
    return bool(add_bos), bool(_field(reader, "tokenizer.ggml.add_eos_token", False))


def _post_processor(reader, model, tokens):
    """BOS/EOS added around the text when llama.cpp adds them (add_special)."""
    ids = _special_ids(reader, model, len(tokens))
    adds = zip(("bos", "eos"), _add_flags(reader))
    ends = {name: ids[name] for name, add in adds if add and name in ids}
    if not ends:
        return None
    bos, eos = ([tokens[ends[k]]] if k in ends else [] for k in ("bos", "eos"))
    single = bos + ["$A"] + eos
    return processors.TemplateProcessing(
        single=" ".join(single),
        pair=" ".join(single + bos + ["$B"] + eos),
        special_tokens=[(tokens[i], i) for i in sorted(set(ends.values()))],
    )


def build_tokenizer(reader: gguf.GGUFReader) -> Tokenizer:
    """A ``tokenizers.Tokenizer`` that tokenizes like llama.cpp on this GGUF."""
    model = _field(reader, "tokenizer.ggml.model")
    if model not in _MODELS:
        raise GGUFImportError(
            f"unsupported tokenizer.ggml.model {model!r}; supported: {', '.join(_MODELS)}"
        )
    tokens, types, vocab = _vocab(reader)
    tok = _MODELS[model](reader, tokens, vocab)
    tok.add_tokens([
        AddedToken(s, special=t != T.USER_DEFINED, normalized=False)
        for s, t in zip(tokens, types)
        if t in (T.CONTROL, T.USER_DEFINED, T.UNKNOWN)
    ])
    post = _post_processor(reader, model, tokens)
    if post is not None:
        tok.post_processor = post
    return tok


def tokenizer_config(reader: gguf.GGUFReader) -> dict:
    """tokenizer_config.json contents: special tokens, BOS/EOS flags, chat template."""
    model = _field(reader, "tokenizer.ggml.model")
    tokens, _, _ = _vocab(reader)
    add_bos, add_eos = _add_flags(reader)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
    }
    names = dict(zip(_SPECIAL_NAMES, ("bos_token", "eos_token", "unk_token", "pad_token")))
    for name, i in _special_ids(reader, model, len(tokens)).items():
        config[names[name]] = tokens[i]
    template = _field(reader, "tokenizer.chat_template")
    if template:
        config["chat_template"] = template
    return config


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_tokenizer_files(reader: gguf.GGUFReader, out_dir: Path) -> None:
    """Write tokenizer.json and tokenizer_config.json for this GGUF into out_dir."""
    out_dir = Path(out_dir)
    tok = build_tokenizer(reader)
    config = tokenizer_config(reader)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_atomic(out_dir / "tokenizer.json", tok.to_str())
    config_text = json.dumps(config, indent=2, ensure_ascii=False)
    _write_atomic(out_dir / "tokenizer_config.json", config_text)
