"""The tokenizer rebuilt from GGUF metadata gives llama.cpp's token ids, token for token."""

import inspect
import json
import random
import textwrap

import gguf
import pytest
from gguf_vocab import MULTILINGUAL, STYLES, add_vocab
from pydoc_data.topics import topics

from gain_mlx import models
from gain_mlx.errors import UserError
from gain_mlx.gguf.tokenizer import build_tokenizer, write_tokenizer_files

CHUNK = 2000  # characters per compared chunk

SPECIALS = [
    "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|begin_of_text|>",
    "<s>", "</s>", "<unk>", "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>", "<mask>",
    "<|im_start", "im_end|>", "<<|im_end|>>",
]
WHITESPACE = [" ", "  ", "   ", "    ", "\t", "\t\t", "\n", "\n\n", "\n   ", "\n\t", "\r\n",
              " \n  ", "\u00a0", "\u3000", "\u2028", "\x0b", "\x0c", "\x85", "\u2009 ",
              "\x1c", "\x1f ", "\u180e", "\u200b", "\u2007", "\u205f", "\ufeff",
              " " * 40, "\n" * 35, "\t" * 9, " " * 75 + "x", "\n" * 70]
WORDS = ["the", "The", "don't", "I'M", "it's", "we'll", "THEY'RE", "you'd", "über", "naïve",
         "e\u0301te\u0301", "日本語", "中文", "한국어", "Привет", "مرحبا", "नमस्ते", "🙂", "👩‍💻",
         "👍🏽", "x²", "½", "٣٤", "①", "--", "...", "!?", "{}", "();", "==", "->", "#", "$5"]


def _numbers(rng):
    return rng.choice([
        str(rng.randrange(10 ** rng.randrange(1, 13))),
        f"{rng.uniform(-1e4, 1e4):.{rng.randrange(6)}f}",
        f"{rng.randrange(10**6):,}",
        "".join(rng.choice("٠١٢٣٤٥٦٧٨٩") for _ in range(rng.randrange(1, 5))),
    ])


def _mixed(n_chars, seed=0):
    """Seeded random mix of words, scripts, emoji, numbers, whitespace runs, specials."""
    rng, out, size = random.Random(seed), [], 0
    while size < n_chars:
        kind = rng.random()
        piece = (rng.choice(SPECIALS) if kind < 0.05 else _numbers(rng) if kind < 0.2
                 else rng.choice(WHITESPACE) if kind < 0.5 else rng.choice(WORDS))
        out.append(piece)
        size += len(piece)
    return "".join(out)


def corpus() -> str:
    """>= 200 KB (UTF-8) of prose, code, multilingual text and adversarial mixes."""
    prose = "\n\n".join(topics[k] for k in sorted(topics))[:90_000]
    code = "".join(inspect.getsource(m) for m in (textwrap, json.decoder, random))[:80_000]
    chat = "".join(
        f"<|im_start|>{r}\n{line}<|im_end|>\n"
        for line in MULTILINGUAL * 4 for r in ("user", "assistant")
    )
    text = "\n".join([prose, code, chat, "\n".join(MULTILINGUAL * 10), _mixed(60_000)])
    assert len(text.encode()) >= 200_000
    return text


def chunks(text):
    return [text[i : i + CHUNK] for i in range(0, len(text), CHUNK)]


@pytest.fixture(scope="module")
def texts():
    return chunks(corpus())


def _mismatches(expected, got, texts):
    bad = [(t, a, b) for t, a, b in zip(texts, expected, got) if a != b]
    detail = ""
    if bad:
        t, a, b = bad[0]
        k = next(i for i, (x, y) in enumerate(zip(a + [None], b + [None])) if x != y)
        detail = f"; first at token {k} of {t!r:.300}: llama.cpp {a[k:k+8]} vs ours {b[k:k+8]}"
    return len(bad), detail


def _llama(path):
    """llama.cpp's own tokenizer for this GGUF: the reference."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is the reference")
    return llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)


def _check(llama, encode, texts, add_bos):
    expected = [llama.tokenize(t.encode(), add_bos=add_bos, special=True) for t in texts]
    n_bad, detail = _mismatches(expected, encode(texts), texts)
    assert n_bad == 0, f"{n_bad} of {len(texts)} chunks differ from llama.cpp{detail}"
    return expected


def _hf_encode(tok, add_bos):
    return lambda ts: [e.ids for e in tok.encode_batch(ts, add_special_tokens=add_bos)]


def _mlx_encode(wrapper, add_bos):
    return lambda ts: [wrapper.encode(t, add_special_tokens=add_bos) for t in ts]


def _load_mlx(reader, out_dir):
    """Write the files, load them the way mlx_lm.load loads a model's tokenizer."""
    from mlx_lm.utils import load_tokenizer

    write_tokenizer_files(reader, out_dir)
    return load_tokenizer(out_dir)


def _round_trip(decode, texts, expected):
    bad = [t for t, ids in zip(texts, expected) if decode(ids) != t]
    assert not bad, f"{len(bad)} of {len(texts)} chunks do not decode back, e.g. {bad[0]!r:.200}"


# ---- SmolLM2 (packaged GGUF, BPE with pre = smollm) -------------------------


@pytest.fixture(scope="module")
def smollm2():
    try:
        path = models.model_path("smollm2-135m")
    except UserError as e:
        pytest.skip(f"the packaged SmolLM2 GGUF is the real model: {e}")
    return path, gguf.GGUFReader(str(path))


@pytest.mark.real
@pytest.mark.llamacpp
def test_smollm2_tokens_match_llama_cpp(smollm2, texts):
    path, reader = smollm2
    tok, llama = build_tokenizer(reader), _llama(path)
    for add_bos in (False, True):
        expected = _check(llama, _hf_encode(tok, add_bos), texts, add_bos)
    plain = [t for t in texts if not any(s in t for s in SPECIALS)]
    _round_trip(tok.decode, plain, [tok.encode(t, add_special_tokens=False).ids for t in plain])
    assert len(plain) > len(texts) // 2
    assert tok.decode(expected[0], skip_special_tokens=False) == texts[0]


@pytest.mark.real
@pytest.mark.llamacpp
def test_smollm2_files_load_in_mlx_lm(smollm2, texts, tmp_path):
    from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer

    path, reader = smollm2
    wrapper, llama = _load_mlx(reader, tmp_path), _llama(path)
    _check(llama, _mlx_encode(wrapper, False), texts, False)
    _check(llama, _mlx_encode(wrapper, True), texts[:20], True)
    assert isinstance(wrapper.detokenizer, BPEStreamingDetokenizer)
    assert wrapper.chat_template == reader.fields["tokenizer.chat_template"].contents()
    assert (wrapper.bos_token, wrapper.eos_token) == ("<|im_start|>", "<|im_end|>")
    msgs = [{"role": "user", "content": "Hi  there\n  you"}]
    prompt = wrapper.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    ids = wrapper.apply_chat_template(msgs, add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) else ids
    assert list(ids) == llama.tokenize(prompt.encode(), add_bos=False, special=True)


# ---- tiny vocabularies of each style, written with gguf-py ------------------


def _tiny_gguf(tmp_path, style, size=1024):
    path = tmp_path / f"{style}.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    add_vocab(writer, style, size)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.llamacpp
@pytest.mark.parametrize("style", sorted(STYLES))
def test_tiny_vocab_matches_llama_cpp(style, texts, tmp_path):
    path = _tiny_gguf(tmp_path, style)
    reader, llama = gguf.GGUFReader(str(path)), _llama(path)
    tok = build_tokenizer(reader)
    expected = _check(llama, _hf_encode(tok, False), texts, False)
    _check(llama, _hf_encode(tok, True), texts[:20], True)
    plain = [t for t in texts if not any(s in t for s in SPECIALS)]
    _round_trip(tok.decode, plain, [e for t, e in zip(texts, expected) if t in plain])
    wrapper = _load_mlx(reader, tmp_path / "hf")
    _check(llama, _mlx_encode(wrapper, True), texts[:20], True)
    streaming = {"gpt2": "BPEStreamingDetokenizer", "llama": "SPMStreamingDetokenizer"}
    assert type(wrapper.detokenizer).__name__ == streaming[STYLES[style]["model"]]
    assert wrapper.bos_token_id == STYLES[style]["bos"]
    assert wrapper.eos_token_id == STYLES[style]["eos"]


def test_spm_vocab_uses_byte_fallback(tmp_path):
    tok = build_tokenizer(gguf.GGUFReader(str(_tiny_gguf(tmp_path, "llama"))))
    enc = tok.encode("ẞ漢", add_special_tokens=False)
    assert enc.tokens[-6:] == ["<0xE1>", "<0xBA>", "<0x9E>", "<0xE6>", "<0xBC>", "<0xA2>"]
    assert tok.decode(enc.ids) == "ẞ漢"


def test_unknown_pre_tokenizer_is_a_clear_error(tmp_path):
    path = tmp_path / "odd.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen9")
    writer.add_token_list(["a", "b", "ab"])
    writer.add_token_merges(["a b"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    with pytest.raises(ValueError, match=r"'qwen9'.*supported:.*smollm"):
        build_tokenizer(gguf.GGUFReader(str(path)))
