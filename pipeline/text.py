"""The text side every stage shares: the 12 entity markers and the text tower's tokenizer.

The features stage writes marker positions with this tokenizer, the model embeds its ids and
``predict`` encodes new inputs with it, so all three load it here, markers included.
"""

from __future__ import annotations

import string

from pipeline.data.synthetic import VOCABULARY  # words the synthetic generator can emit
from pipeline.hub import resolve

__all__ = ["MARKERS", "load_tokenizer", "tiny_vocab"]

# Entity markers: <s1>/<s2> around text head/tail in the sentence; <k1>/<k2> around a
# text entity's caption and <o1>/<o2> around an object's caption in the second segment.
MARKERS = (
    "<s1>", "</s1>", "<s2>", "</s2>",
    "<k1>", "</k1>", "<k2>", "</k2>",
    "<o1>", "</o1>", "<o2>", "</o2>",
)  # fmt: skip

_TINY_WORDS = tuple(
    """
a an the and or but of in on at to for from with by as is are was were be been has have had it its
this that these those he she they we you i his her their our your who what which where when why how
not no yes new old big small today yesterday tomorrow after before during about over under near
left right front behind above below next said says say told met meets joined joins leads led visits
visited lives lived born works worked plays played won wins game match team city country party
president leader member office home show news photo picture image post via rt great good best
""".split()  # noqa: SIM905 - a word list reads better as text
)


def tiny_vocab() -> list[str]:
    """The word-piece vocabulary of the tiny tokenizer: specials, characters, common and synthetic
    words. Deterministic, so a tiny tokenizer is the same on every machine."""
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab += chars + ["##" + c for c in string.ascii_lowercase + string.digits]
    seen = set(vocab)
    for word in sorted(set(_TINY_WORDS) | {w.lower() for w in VOCABULARY}):
        if word not in seen:
            vocab.append(word)
            seen.add(word)
    return vocab


def load_tokenizer(name: str):
    """The text tower's tokenizer with the 12 entity markers added as special tokens."""
    from transformers import AutoTokenizer, BertTokenizerFast

    source = resolve(name)
    if source.kind == "tiny":
        vocab = {tok: i for i, tok in enumerate(tiny_vocab())}
        # transformers 5.x: `vocab=` (not `vocab_file=`) is what the fast constructor reads.
        tokenizer = BertTokenizerFast(vocab=vocab, do_lower_case=True)
    else:
        tokenizer = AutoTokenizer.from_pretrained(str(source.path or source.name))
    tokenizer.add_special_tokens({"additional_special_tokens": list(MARKERS)})
    return tokenizer
