"""Build the downstream probe: pick a word's definition among four (GCIDE), offline.

A stand-in for BoolQ that no training stage sees: multiple-choice questions scored
by log-likelihood, as lm-evaluation-harness scores them. Each question is a headword
of the GNU Collaborative International Dictionary of English (Debian's `dict-gcide`,
fetched with `apt-get download` as tools/make_corpora.py does) with its one-sense
definition and three distractor definitions of other words with the same part of
speech. Only common words are asked: headwords that occur at least `--min-count`
times in Jane Austen's novels (`r-cran-janeaustenr`), so the questions test what a
small model knows rather than 1913 rarities. Chance is 25%.

    python tools/make_probe.py        # -> .cache/corpora/probe/definitions.jsonl

The dictionary domain must then not be a training domain (the `paper` preset of
gain_mlx.sequential leaves it out). Running it again gives the same file.
"""

import argparse
import collections
import gzip
import json
import random
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_corpora  # noqa: E402  (the package fetchers and extractors)

from gain_mlx.files import atomic_write  # noqa: E402

POS = {"n": "noun", "v. t": "verb", "v. i": "verb", "a": "adjective", "adv": "adverb"}
HEADER = re.compile(r"^([A-Za-z]+) \\[^\\\n]+\\(?: \([^)\n]*\))?, (n|v\. t|v\. i|a|adv)\.(?=[\s\[;])")
DEF_CHARS = re.compile(r"^[A-Za-z ,;'()-]+$")


def _strip_brackets(text: str) -> str:
    """Drop [...] groups (etymologies), nested ones included."""
    out, depth = [], 0
    for ch in text:
        depth += ch == "["
        if not depth:
            out.append(ch)
        depth -= ch == "]" and depth > 0
    return "".join(out)


def entries(dictionary_text: str):
    """(word, part of speech, definition) of one-sense GCIDE entries with a short, plain definition."""
    for para in re.split(r"\n\s*\n", dictionary_text):
        m = HEADER.match(para)
        if not m:
            continue
        body = _strip_brackets(para[m.end():])
        body = re.sub(r"\s+", " ", body).strip(" ;.")
        if not body or re.match(r"(?:pl\.|imp\.|p\. p\.|\(|1\.|Note|See|Same as|Alt\.|=)", body):
            continue
        definition = re.split(r"\.(?:\s|$)| --|;", body)[0].strip()
        word = m.group(1)
        if (25 <= len(definition) <= 100 and DEF_CHARS.match(definition)
                and word.lower() not in definition.lower() and not definition.startswith(("Of", "Pertaining"))):
            yield word.lower(), POS[m.group(2)], definition[0].upper() + definition[1:] + "."


def austen_counts(path) -> collections.Counter:
    (blob,) = make_corpora._deb_members(path, r"janeaustenr/data/Rdata\.rdb$").values()
    words = collections.Counter()
    for lines in make_corpora._read_rdb_strings(blob):
        words.update(re.findall(r"[a-z]+", " ".join(lines).lower()))
    return words


def build(dictionary_deb, austen_deb, questions: int, min_count: int, seed: int = 0) -> list:
    (blob,) = make_corpora._deb_members(dictionary_deb, r"/gcide\.dict\.dz$").values()
    text = gzip.decompress(blob).decode("utf-8", "replace")
    common = austen_counts(austen_deb)
    seen, pool = set(), collections.defaultdict(list)
    for word, pos, definition in entries(text):
        if common[word] >= min_count and word not in seen:
            seen.add(word)
            pool[pos].append((word, definition))
    rng = random.Random(seed)
    items = [(pos, word, definition) for pos, rows in sorted(pool.items()) for word, definition in rows]
    rng.shuffle(items)
    out = []
    for pos, word, definition in items[:questions]:
        others = [d for w, d in pool[pos] if w != word]
        choices = rng.sample(others, 3) + [definition]
        rng.shuffle(choices)
        out.append({"word": word, "pos": pos, "choices": choices, "answer": choices.index(definition)})
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=".cache/corpora/probe/definitions.jsonl", help="output .jsonl")
    p.add_argument("--cache", default=".cache/corpora", help="download cache folder (shared with make_corpora)")
    p.add_argument("--questions", type=int, default=400, help="questions to write (default 400)")
    p.add_argument("--min-count", type=int, default=5, help="occurrences in Jane Austen for a word to be asked")
    args = p.parse_args(argv)
    dictionary = make_corpora._fetch("apt", make_corpora.SOURCES["dictionary"][1], args.cache)
    austen = make_corpora._fetch("apt", make_corpora.SOURCES["literature"][1], args.cache)
    items = build(dictionary, austen, args.questions, args.min_count)
    if len(items) < args.questions:
        print(f"warning: only {len(items)} questions found (asked {args.questions})", file=sys.stderr)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps(item) + "\n" for item in items)
    atomic_write(out, lambda tmp: tmp.write_text(lines))
    by_pos = collections.Counter(i["pos"] for i in items)
    print(f"{len(items)} questions ({', '.join(f'{n} {k}s' for k, n in sorted(by_pos.items()))}), "
          f"chance 25% -> {args.out}")


if __name__ == "__main__":
    main()
