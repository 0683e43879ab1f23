"""Small valid tokenizer vocabularies for tiny test GGUFs that llama.cpp loads.

``add_vocab(writer, style, size)`` writes the ``tokenizer.*`` metadata of one
style into a ``gguf.GGUFWriter`` (the writer already names the architecture):

- ``qwen2`` / ``smollm`` / ``llama-bpe``: GPT-2 byte-level BPE with that
  ``tokenizer.ggml.pre`` and ChatML (or llama-3) control tokens;
- ``llama`` / ``gemma``: SentencePiece-style (``tokenizer.ggml.model = llama``):
  scores, ``<0xNN>`` byte-fallback tokens, ``▁`` spaces (gemma: no space prefix,
  newline/tab/space-run tokens, gemma's special-token ids).

The vocabularies are trained with the ``tokenizers`` library on Python's own
documentation text plus a few multilingual lines: deterministic and offline.
"""

import functools
import json

import gguf
from pydoc_data.topics import topics
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

T = gguf.TokenType

MULTILINGUAL = [
    "Déjà vu: the café's crème brûlée was über-good, señor! Ça va? Él está aquí.",
    "Привет, мир! Как дела? Съешь же ещё этих мягких французских булок.",
    "日本語のテキストです。東京は晴れ。中文文本：你好，世界！今天天气很好。",
    "한국어 문장입니다. 안녕하세요! Ελληνικά: Καλημέρα κόσμε. עברית: שלום עולם.",
    "العربية: مرحبا بالعالم. हिन्दी: नमस्ते दुनिया। ไทย: สวัสดีชาวโลก",
    "Emoji 🙂🚀🎉👍🏽 👩‍💻 ❤️ ½ ¾ ² ³ ٣٤٥ ①②③ Ⅻ — “quotes” ‘single’ … ©®™ €£¥",
]

_CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}"
    "<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
_GEMMA = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>"
    "{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n{{ m['content'] }}"
    "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
_LLAMA2 = "{% for m in messages %}{{ bos_token + m['content'] + eos_token }}{% endfor %}"

_CHATML_SPECIALS = [
    ("<|endoftext|>", T.CONTROL), ("<|im_start|>", T.CONTROL), ("<|im_end|>", T.CONTROL)
]

# style -> tokenizer metadata; "specials" open the vocabulary (ids 0..), "extra"
# are normal SPM pieces added before the trained ones.
STYLES = {
    "qwen2": dict(model="gpt2", pre="qwen2", specials=_CHATML_SPECIALS, bos=0, eos=2,
                  pad=0, add_bos=False, template=_CHATML),
    "smollm": dict(model="gpt2", pre="smollm", specials=_CHATML_SPECIALS, bos=1, eos=2,
                   pad=2, add_bos=False, template=_CHATML),
    "llama-bpe": dict(model="gpt2", pre="llama-bpe", specials=[
        ("<|begin_of_text|>", T.CONTROL), ("<|end_of_text|>", T.CONTROL),
        ("<|start_header_id|>", T.CONTROL), ("<|end_header_id|>", T.CONTROL),
        ("<|eot_id|>", T.CONTROL)], bos=0, eos=4, add_bos=True, template=_LLAMA3),
    "llama": dict(model="llama", specials=[
        ("<unk>", T.UNKNOWN), ("<s>", T.CONTROL), ("</s>", T.CONTROL)],
        bos=1, eos=2, unk=0, add_bos=True, space_prefix=True, template=_LLAMA2),
    "gemma": dict(model="llama", specials=[
        ("<pad>", T.CONTROL), ("<eos>", T.CONTROL), ("<bos>", T.CONTROL),
        ("<unk>", T.UNKNOWN), ("<mask>", T.USER_DEFINED),
        ("<start_of_turn>", T.CONTROL), ("<end_of_turn>", T.CONTROL)],
        extra=["\t"] + ["\n" * k for k in range(1, 32)] + ["▁" * k for k in range(2, 32)],
        bos=2, eos=1, unk=3, pad=0, add_bos=True, space_prefix=False, template=_GEMMA),
}

_BYTES = [f"<0x{b:02X}>" for b in range(256)]


def training_text(n_chars: int = 300_000) -> str:
    """Deterministic English prose (Python's documentation topics) + multilingual lines."""
    prose = "\n\n".join(topics[k] for k in sorted(topics))[:n_chars]
    return prose + "\n" + "\n".join(MULTILINGUAL * 20)


def _trained(tok: Tokenizer, trainer) -> dict:
    tok.train_from_iterator(training_text().split("\n\n"), trainer)
    return json.loads(tok.to_str())["model"]


@functools.lru_cache(maxsize=None)
def bpe_vocab(n_trained: int) -> tuple:
    """(tokens, merges) of a byte-level BPE with n_trained entries (256 bytes included)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    model = _trained(tok, trainers.BpeTrainer(
        vocab_size=n_trained, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tokens = sorted(model["vocab"], key=model["vocab"].get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return tokens, merges


@functools.lru_cache(maxsize=None)
def spm_pieces(n: int, exclude: frozenset = frozenset()) -> tuple:
    """n SentencePiece-style pieces (not in `exclude`), best first, characters last;
    and their scores."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always")
    model = _trained(tok, trainers.BpeTrainer(
        vocab_size=n + len(exclude), limit_alphabet=120, show_progress=False))
    merged = ["".join(m.split(" ") if isinstance(m, str) else m) for m in model["merges"]]
    chars = [t for t in sorted(model["vocab"], key=model["vocab"].get) if t not in set(merged)]
    merged, chars = ([p for p in x if p not in exclude] for x in (merged, chars))
    pieces = merged[: n - len(chars)] + chars
    return pieces, [-float(i) for i in range(len(pieces))]


def add_vocab(writer: gguf.GGUFWriter, style: str, size: int = 1024) -> None:
    """Write a `size`-token vocabulary of `style` (see STYLES) into `writer`."""
    s = STYLES[style]
    specials = [t for t, _ in s["specials"]]
    types = [ty for _, ty in s["specials"]]
    writer.add_tokenizer_model(s["model"])
    if s["model"] == "gpt2":
        tokens, merges = bpe_vocab(size - len(specials))
        tokens = specials + tokens
        types += [T.NORMAL] * (len(tokens) - len(specials))
        writer.add_tokenizer_pre(s["pre"])
        writer.add_token_merges(merges)
    else:
        extra = s.get("extra", [])
        fixed = len(specials) + len(_BYTES) + len(extra)
        pieces, scores = spm_pieces(size - fixed, frozenset(specials + extra))
        tokens = specials + _BYTES + extra + pieces
        types += [T.BYTE] * len(_BYTES) + [T.NORMAL] * (len(extra) + len(pieces))
        # extra pieces score 0 like gemma's whitespace runs: merges into them tie
        writer.add_token_scores([0.0] * fixed + [x - 1 for x in scores])
        writer.add_add_space_prefix(s["space_prefix"])
        writer.add_unk_token_id(s["unk"])
    if len(tokens) != size:
        raise ValueError(f"{style} vocabulary has {len(tokens)} tokens, not {size}: "
                         f"use a size of at least {len(tokens)}")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_bos_token_id(s["bos"])
    writer.add_eos_token_id(s["eos"])
    if "pad" in s:
        writer.add_pad_token_id(s["pad"])
    writer.add_add_bos_token(s["add_bos"])
    writer.add_chat_template(s["template"])
