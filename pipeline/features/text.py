"""Text features: word pieces of a record with entity markers and its caption segment.

Input text: ``[CLS] sentence [SEP] captions [SEP]``. The sentence has ``<s1>..</s1>`` /
``<s2>..</s2>`` around a text head / tail (where spans touch or overlap, markers follow the
original's order at each word position: ``<s1>``, ``</s1>``, ``<s2>``, ``</s2>``, then the word);
the caption segment (token type 1) is
``<k1>|<o1> head caption </k1>|</o1> <k2>|<o2> tail caption </k2>|</o2>``. A missing caption keeps
its markers with empty content; there is no caption segment at all when captions are off.

Truncation to ``data.max_seq`` takes from the captions first: caption words are cut longest caption
first, then (only if even empty marker pairs do not fit) whole caption blocks, tail's first; only
then is the sentence cut from the right. Every marker lost is counted.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pipeline.data.records import Record
from pipeline.io import DataError
from pipeline.text import MARKERS

__all__ = ["EncodedText", "TextEncoder"]

_MARKER_INDEX = {name: i for i, name in enumerate(MARKERS)}


@dataclass
class EncodedText:
    """One sample's text, unpadded, with where each of the 12 markers landed (-1: absent)."""

    input_ids: list[int]
    token_type_ids: list[int]
    marker_positions: list[int]
    caption_tokens_cut: int = 0
    sentence_tokens_cut: int = 0
    markers_dropped: list[str] = field(default_factory=list)


def _shrink_longest_first(lengths: list[int], cap: int) -> list[int]:
    """Cut one token at a time from the longest entry (the later one on ties) until the sum fits."""
    out = list(lengths)
    excess = sum(out) - max(cap, 0)
    while excess > 0:
        longest = max(range(len(out)), key=lambda i: (out[i], i))
        out[longest] -= 1
        excess -= 1
    return out


class TextEncoder:
    """Builds ``[CLS] sentence-with-markers [SEP] caption-segment [SEP]`` as word-piece ids."""

    def __init__(self, tokenizer: Any, max_seq: int):
        ids = tokenizer.convert_tokens_to_ids(list(MARKERS))
        if tokenizer.unk_token_id in ids:
            missing = [m for m, i in zip(MARKERS, ids, strict=True) if i == tokenizer.unk_token_id]
            raise ValueError(
                f"tokenizer lacks the entity markers {missing}: use pipeline.text.load_tokenizer"
            )
        min_seq = 2 + 4  # [CLS] [SEP] and room for the two sentence marker pairs
        if max_seq < min_seq:
            raise ValueError(f"data.max_seq must be at least {min_seq}, found {max_seq}")
        self.tokenizer = tokenizer
        self.max_seq = max_seq
        self.marker_ids = dict(zip(MARKERS, ids, strict=True))
        self._marker_names = {i: m for m, i in self.marker_ids.items()}
        self.cls_id = tokenizer.cls_token_id
        self.sep_id = tokenizer.sep_token_id
        self._pieces: dict[str, list[int]] = {}

    def pieces(self, texts: Sequence[str]) -> list[list[int]]:
        """Word-piece ids of each text (no special tokens); remembered across calls. A marker or
        special token written in the text itself (a post that says ``<s1>``, a caption with
        ``[SEP]``) is split into ordinary word pieces, so only the encoder places markers."""
        missing = sorted({t for t in texts if t not in self._pieces})
        if missing:
            encoded = self.tokenizer(missing, add_special_tokens=False, split_special_tokens=True)[
                "input_ids"
            ]
            self._pieces.update(zip(missing, encoded, strict=True))
        return [self._pieces[t] for t in texts]

    def sentence(self, record: Record) -> list[int]:
        """The record's words as word pieces, ``<s1>``/``<s2>`` pairs around text head / tail."""
        words = self.pieces(record.text_tokens)
        spans = []  # (start, end, n) for each text entity, n = 1 head, 2 tail
        for n, entity in ((1, record.head), (2, record.tail)):
            if entity.kind != "text":
                continue
            start, end = entity.span
            if not 0 <= start <= end <= len(words):
                raise DataError(
                    f"record {record.id}: {entity.name!r} span [{start}, {end}) is outside its "
                    f"{len(words)} tokens"
                )
            spans.append((start, end, n))
        ids: list[int] = []
        for pos in range(len(words) + 1):
            # The original's order at each position: <s1> if the head starts here, </s1> if it
            # ends here, then <s2>, </s2> likewise, then the word (touching spans: "<s1> </s2>").
            for start, end, n in spans:
                if start == pos:
                    ids.append(self.marker_ids[f"<s{n}>"])
                if end == pos:
                    ids.append(self.marker_ids[f"</s{n}>"])
            if pos < len(words):
                ids.extend(words[pos])
        return ids

    def encode(self, record: Record, captions: tuple[str | None, str | None] | None) -> EncodedText:
        """Encode one record; ``captions`` = (head's, tail's) caption, or None for no segment."""
        sentence = self.sentence(record)
        blocks = []  # (opening id, caption ids, closing id), head's then tail's
        if captions is not None:
            for n, entity, caption in (
                (1, record.head, captions[0]),
                (2, record.tail, captions[1]),
            ):
                letter = "k" if entity.kind == "text" else "o"
                content = self.pieces([caption])[0] if caption else []
                blocks.append(
                    (self.marker_ids[f"<{letter}{n}>"], content, self.marker_ids[f"</{letter}{n}>"])
                )
        markers_before = sentence + [marker for o, _, c in blocks for marker in (o, c)]

        budget = self.max_seq - 2  # [CLS] ... [SEP]
        caption_cut = 0
        if blocks:
            room = budget - 1 - len(sentence)  # the segment's own [SEP] takes one
            # Captions give way before the sentence: first whole blocks if even their marker
            # pairs cannot fit (tail's first), then caption words, longest caption first.
            while blocks and 2 * len(blocks) > room:
                caption_cut += len(blocks.pop()[1])
            lengths = [len(content) for _, content, _ in blocks]
            kept = _shrink_longest_first(lengths, room - 2 * len(blocks))
            caption_cut += sum(lengths) - sum(kept)
            blocks = [(o, c[:k], e) for (o, c, e), k in zip(blocks, kept, strict=True)]
        sentence_cut = max(0, len(sentence) - budget)
        sentence = sentence[:budget]

        input_ids = [self.cls_id, *sentence, self.sep_id]
        token_type_ids = [0] * len(input_ids)
        if blocks:
            segment = [
                i for opening, content, closing in blocks for i in (opening, *content, closing)
            ]
            input_ids += [*segment, self.sep_id]
            token_type_ids += [1] * (len(segment) + 1)

        positions = [-1] * len(MARKERS)
        for pos, token in enumerate(input_ids):
            name = self._marker_names.get(token)
            if name is not None and positions[_MARKER_INDEX[name]] < 0:
                positions[_MARKER_INDEX[name]] = pos
        dropped = Counter(self._marker_names[i] for i in markers_before if i in self._marker_names)
        dropped.subtract(self._marker_names[i] for i in input_ids if i in self._marker_names)
        return EncodedText(
            input_ids=input_ids,
            token_type_ids=token_type_ids,
            marker_positions=positions,
            caption_tokens_cut=caption_cut,
            sentence_tokens_cut=sentence_cut,
            markers_dropped=sorted(dropped.elements(), key=_MARKER_INDEX.__getitem__),
        )
