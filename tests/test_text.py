"""The tiny tokenizer: its word pieces against a plain WordPiece loop, its markers, its ids."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from pipeline.text import MARKERS, load_tokenizer, tiny_vocab

ROOT = Path(__file__).resolve().parents[1]


def reference_pieces(text: str, vocab: set[str]) -> list[str]:
    """BERT's uncased tokenization of ASCII text written as a loop: lower-case, split on spaces
    and punctuation, then greedy longest-match word pieces (``##`` inside a word), [UNK] for a
    word that cannot be covered."""
    out = []
    for word in re.findall(r"[a-z0-9]+|[^a-z0-9\s]", text.lower()):
        pieces, start = [], 0
        while start < len(word):
            end = len(word)
            while end > start:
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in vocab:
                    break
                end -= 1
            if end == start:
                pieces = ["[UNK]"]
                break
            pieces.append(piece)
            start = end
        out += pieces
    return out


def test_tiny_tokenizer_lower_cases_and_splits_unknown_words_into_pieces():
    tokenizer = load_tokenizer("tiny")
    vocab = set(tiny_vocab())
    text = "RT Bill Cosby visited PARIS today, said Xqzw: 42 wins! (via @News)"
    expected = reference_pieces(text, vocab)
    assert "[UNK]" not in expected and "##s" in expected  # every ASCII word is covered
    assert tokenizer.tokenize(text) == expected
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids == [tiny_vocab().index(p) for p in expected]


def test_tiny_tokenizer_markers_are_single_tokens_after_the_vocabulary():
    tokenizer = load_tokenizer("tiny")
    size = len(tiny_vocab())
    assert tokenizer.convert_tokens_to_ids(list(MARKERS)) == list(range(size, size + 12))
    assert tokenizer.tokenize("<s1> paris </s1>") == ["<s1>", "paris", "</s1>"]


def test_tiny_vocabulary_is_the_same_in_every_process():
    # Features are built in one process and predict encodes in another: the ids must not depend
    # on the interpreter's string hash seed.
    script = "from pipeline.text import tiny_vocab; print('\\n'.join(tiny_vocab()))"
    vocabs = []
    for seed in ("0", "1", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        result = subprocess.run(
            [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True
        )
        assert result.returncode == 0, result.stderr
        vocabs.append(result.stdout.splitlines())
    assert vocabs[0] == vocabs[1] == vocabs[2] == tiny_vocab()
    assert len(set(tiny_vocab())) == len(tiny_vocab())
