"""The one door from a model name to a loadable source.

A name in params is one of:
- ``"tiny"`` (or ``"tiny-<variant>"``): a small model built from a config with seeded random
  weights, so every code path runs offline;
- a local folder (``./models/bert``, ``/abs/path``): loaded with the library's own loader;
- anything else: a hub id (``bert-base-uncased``) or, for the vision tower, a timm model name.

Each model family (text tower, vision tower, depth, captioner) resolves names here and keeps its own
tiny config beside its loader. The text tokenizer lives here because both the features stage and the
model need the same one, markers included.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

__all__ = ["ModelSource", "resolve", "is_tiny", "MARKERS", "load_tokenizer", "tiny_vocab"]

# Entity markers (DESIGN.md §3): <s1>/<s2> around text head/tail in the sentence; <k1>/<k2> around a
# text entity's caption and <o1>/<o2> around an object's caption in the second segment.
MARKERS = (
    "<s1>", "</s1>", "<s2>", "</s2>",
    "<k1>", "</k1>", "<k2>", "</k2>",
    "<o1>", "</o1>", "<o2>", "</o2>",
)  # fmt: skip

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


@dataclass(frozen=True)
class ModelSource:
    kind: Literal["tiny", "local", "hub"]
    name: str
    path: Path | None = None


def is_tiny(name: str) -> bool:
    return name == "tiny" or name.startswith("tiny-")


def resolve(name: str) -> ModelSource:
    """Classify a model name; a path-like name must exist, a hub id must be well-formed."""
    if not name:
        raise ValueError("model name is empty (use 'tiny', a local folder, or a hub id)")
    if is_tiny(name):
        return ModelSource("tiny", name)
    path = Path(name).expanduser()
    looks_like_path = name.startswith((".", "/", "~")) or path.exists()
    if looks_like_path:
        if not path.is_dir():
            raise FileNotFoundError(f"{name}: model folder not found")
        return ModelSource("local", name, path.resolve())
    if not _HUB_ID.match(name):
        raise ValueError(f"{name!r} is neither 'tiny', an existing folder, nor a valid hub id")
    return ModelSource("hub", name)


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
    from pipeline.data.synthetic import VOCABULARY  # words the synthetic generator can emit

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
