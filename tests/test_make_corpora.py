"""tools/make_corpora.py: chunking and the document-level split (offline, no downloads)."""

import importlib.util
import random
import struct
import zlib
from pathlib import Path

spec = importlib.util.spec_from_file_location(
    "make_corpora", Path(__file__).resolve().parent.parent / "tools" / "make_corpora.py")
mc = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mc)


def _docs(n=40, seed=0):
    rng = random.Random(seed)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()

    def sentence():
        return " ".join(rng.choice(words) for _ in range(rng.randint(4, 30))).capitalize() + "."

    return [(f"doc{i}", "\n\n".join(" ".join(sentence() for _ in range(rng.randint(1, 12)))
                                    for _ in range(rng.randint(3, 30)))) for i in range(n)]


def test_chunks_keep_text_and_size():
    (_, text), = _docs(1, seed=3)
    chunks = mc.chunk(text, size=300, min_chars=0)
    assert all(len(c) <= 450 for c in chunks)
    assert sum(len(c) >= 300 for c in chunks) >= len(chunks) - 1  # only the last may be short
    # nothing lost or invented: same words in the same order
    assert " ".join(chunks).split() == text.split()


def test_split_is_deterministic_disjoint_and_within_budget():
    docs = _docs()
    budgets = {"valid": 3000, "test": 3000, "train": 20000}
    a = mc.split_documents(list(docs), budgets, 300)
    b = mc.split_documents(list(reversed(docs)), budgets, 300)
    assert a == b
    for name, budget in budgets.items():
        assert budget * 0.8 <= sum(map(len, a[name])) <= budget
    seen = [set(a[n]) for n in budgets]
    assert not (seen[0] & seen[2]) and not (seen[1] & seen[2]) and not (seen[0] & seen[1])
    # split by document: each document's chunks land in one split only
    owner = {}
    for doc, text in docs:
        for c in mc.chunk(text, 300):
            for name in budgets:
                if c in a[name]:
                    owner.setdefault(doc, set()).add(name)
    assert all(len(v) == 1 for v in owner.values())


def test_rdb_character_vectors():
    """An R lazy-load database record (zlib'd XDR, format 3) holding a character vector."""
    strings = ["It is a truth", "", "universally acknowledged"]
    body = b"X\n" + struct.pack(">iii", 3, 0x40201, 0x30500) + struct.pack(">i", 5) + b"UTF-8"
    body += struct.pack(">ii", 16, len(strings))
    for s in strings:
        body += struct.pack(">ii", 0x40009, len(s)) + s.encode()
    record = struct.pack(">i", len(body)) + zlib.compress(body)
    assert mc._read_rdb_strings(record + record) == [strings, strings]
