#!/usr/bin/env python3
"""Turn AG News CSV files into a fedforge cache file of token ids (the ``tokens`` modality).

    python scripts/make_agnews.py .data/agnews/train.csv .data/agnews/test.csv --out .data/agnews/agnews.npz
    fedforge run --dataset npz:.data/agnews/agnews.npz --model fasttext --partition dirichlet --clients 20

Input: the CSV files of Zhang, Zhao & LeCun's AG News release (``ag_news_csv/{train,test}.csv``: class index 1-4,
title, description; 120,000 + 7,600 articles). Nothing is downloaded: give the files you have (the official test split
alone, 7,600 articles, 1,900 per class, makes a small real text benchmark). Several files are pooled in the order given,
as PFLlib pools the train and test splits before partitioning.

What it does, following PFLlib's ``dataset/generate_AGNews.py`` (whose own code needs torchtext):

* text = title + " " + description (``\\n`` escapes and ``#36;``-style HTML entities as released), label = index − 1;
* tokenizer (``basic_english``-style): lower-case; ``<br />`` becomes a space; ``.``, ``,``, ``(``, ``)``, ``!``, ``?``
  and ``'`` become tokens of their own; ``"``, ``;`` and ``:`` are dropped; then split on whitespace;
* vocabulary: ``<pad>`` 0, ``<cls>`` 1, ``<unk>`` 2, ``<eos>`` 3, then the most frequent tokens of all the given texts
  (ties in alphabetical order) up to ``--max-tokens`` ids in all (PFLlib: 32,000); unknown tokens map to ``<unk>``;
* each text becomes ``<cls>`` followed by its token ids, truncated to ``--max-len`` (PFLlib: 200) and padded with 0.

One difference: ``lengths`` records each text's real length (``<cls>`` included, at most max_len); PFLlib records the
padded length, 200 for every text, so its models read the padding as text.

Output: ``--out`` in the cache format (``x`` int32 (N, max_len), ``y``, ``modality`` = tokens, ``vocab_size``,
``lengths``) and, beside it, ``<out>.vocab.json`` (the id → token list) and ``<out>.json`` (counts and settings).
"""
from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from collections import Counter
from pathlib import Path

import numpy as np

SPECIALS = ["<pad>", "<cls>", "<unk>", "<eos>"]
PAD, CLS, UNK = 0, 1, 2
_RULES = [(re.compile(r"<br \/>"), " "), (re.compile(r"\'"), " '  "), (re.compile(r"\""), ""),
          (re.compile(r"\."), " . "), (re.compile(r","), " , "), (re.compile(r"\("), " ( "), (re.compile(r"\)"), " ) "),
          (re.compile(r"\!"), " ! "), (re.compile(r"\?"), " ? "), (re.compile(r"\;"), " "), (re.compile(r"\:"), " "),
          (re.compile(r"\s+"), " ")]


def tokenize(text: str) -> list[str]:
    """Lower-case, split punctuation off (see the module docstring), split on whitespace."""
    text = text.lower()
    for pattern, repl in _RULES:
        text = pattern.sub(repl, text)
    return text.split()


def read_csv(path: Path) -> tuple[list[str], list[int]]:
    texts, labels = [], []
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.reader(f):
            if not row or row[0] in ("label", "Class Index"):  # a header some copies add
                continue
            if len(row) < 2:
                sys.exit(f"{path}: a row has {len(row)} field(s); AG News rows are class index, title, description.")
            labels.append(int(row[0]) - 1)
            texts.append(" ".join(row[1:]))
    return texts, labels


def build_vocab(tokenized: list[list[str]], max_tokens: int) -> list[str]:
    counts = Counter(t for toks in tokenized for t in toks)
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return SPECIALS + [t for t, _ in ranked[: max(0, max_tokens - len(SPECIALS))] if t not in SPECIALS]


def encode(tokenized: list[list[str]], vocab: list[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    index = {t: i for i, t in enumerate(vocab)}
    ids = np.full((len(tokenized), max_len), PAD, dtype=np.int32)
    lengths = np.zeros(len(tokenized), dtype=np.int64)
    for i, toks in enumerate(tokenized):
        row = ([CLS] + [index.get(t, UNK) for t in toks])[:max_len]
        ids[i, : len(row)] = row
        lengths[i] = len(row)
    return ids, lengths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("csv", nargs="+", type=Path, help="AG News CSV files (class index, title, description), pooled in order")
    ap.add_argument("--out", type=Path, required=True, help="the cache file to write (.npz)")
    ap.add_argument("--max-len", type=int, default=200, help="token ids per text, <cls> included (PFLlib: 200)")
    ap.add_argument("--max-tokens", type=int, default=32000, help="vocabulary size, specials included (PFLlib: 32000)")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from fedforge.data import write_cache

    texts, labels = [], []
    for p in args.csv:
        if not p.is_file():
            sys.exit(f"{p} does not exist; give AG News CSV files (ag_news_csv/train.csv, test.csv).")
        t, y = read_csv(p)
        texts += t
        labels += y
    tokenized = [tokenize(t) for t in texts]
    vocab = build_vocab(tokenized, args.max_tokens)
    ids, lengths = encode(tokenized, vocab, args.max_len)
    y = np.asarray(labels, dtype=np.int64)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_cache(args.out, ids, y, modality="tokens", vocab_size=len(vocab), lengths=lengths)
    args.out.with_suffix(".vocab.json").write_text(json.dumps(vocab))
    info = {"files": [str(p) for p in args.csv], "samples": int(len(y)), "class_counts": np.bincount(y).tolist(),
            "vocab_size": len(vocab), "max_len": args.max_len, "max_tokens": args.max_tokens,
            "truncated": int((lengths == args.max_len).sum()), "mean_length": float(lengths.mean()),
            "unknown_ids": int((ids == UNK).sum())}
    args.out.with_suffix(".json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
