"""Random batches in the batch contract (docs/ARCHITECTURE.md), for tests and benchmarks.

Each sample is ``[CLS] sentence [SEP] captions [SEP]`` with random word pieces, the entity markers of
its pair kind (``<s1> .. </s1>`` around a text head, ``<k1> cap </k1>`` or ``<o1> cap </o1>`` in the
caption segment, and the same with 2 for the tail), random object crops, depth crops and boxes.
"""

from __future__ import annotations

import torch

__all__ = ["random_batch"]


def _words(vocabulary: torch.Tensor, count: int, generator: torch.Generator) -> list[int]:
    return vocabulary[torch.randint(len(vocabulary), (count,), generator=generator)].tolist()


def random_batch(
    tokenizer,
    lengths: list[int],
    *,
    max_objects: int = 12,
    crop_size: int = 64,
    num_labels: int = 28,
    caption_length: int = 6,
    use_caption: bool = True,
    pad_to: int | None = None,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """A batch of ``len(lengths)`` samples whose sentences have ``lengths[b]`` word pieces (markers
    excluded); pair kinds cycle text-text, text-object, object-object. Texts are padded to ``pad_to``
    (default: the longest)."""
    if min(lengths) < 4:
        raise ValueError("sentences need at least 4 word pieces to hold two entities")
    generator = torch.Generator().manual_seed(seed)
    special = set(tokenizer.all_special_ids)
    vocabulary = torch.tensor([i for i in range(len(tokenizer)) if i not in special])
    ids = tokenizer.convert_tokens_to_ids
    cls_id, sep_id, pad_id = tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id
    texts, segments, markers, slots, counts = [], [], [], [], []
    for b, length in enumerate(lengths):
        kind = b % 3
        count = int(torch.randint(2, max_objects + 1, (1,), generator=generator))
        head_is_object, tail_is_object = kind == 2, kind >= 1
        sentence = _words(vocabulary, length, generator)
        starts = sorted(torch.randperm(max(length - 2, 2), generator=generator)[:2].tolist())
        spans = [(starts[0], starts[0] + 1), (starts[1] + 1, starts[1] + 2)]
        tokens = [cls_id]
        position = [-1, -1, -1, -1, -1, -1]  # [head, tail] x [<s>, <k>, <o>]
        for i, word in enumerate(sentence):
            for entity, (start, end) in enumerate(spans):
                is_object = (head_is_object, tail_is_object)[entity]
                if not is_object and i == start:
                    position[3 * entity] = len(tokens)
                    tokens.append(ids(f"<s{entity + 1}>"))
                if not is_object and i == end:
                    tokens.append(ids(f"</s{entity + 1}>"))
            tokens.append(word)
        tokens.append(sep_id)
        sentence_end = len(tokens)
        if use_caption:
            for entity, is_object in enumerate((head_is_object, tail_is_object)):
                tag = "o" if is_object else "k"
                position[3 * entity + (2 if is_object else 1)] = len(tokens)
                tokens.append(ids(f"<{tag}{entity + 1}>"))
                tokens += _words(vocabulary, caption_length, generator)
                tokens.append(ids(f"</{tag}{entity + 1}>"))
            tokens.append(sep_id)
        texts.append(tokens)
        segments.append([0] * sentence_end + [1] * (len(tokens) - sentence_end))
        markers.append(position)
        object_slots = torch.randperm(count, generator=generator)[:2].tolist()
        slots.append(
            [object_slots[0] if head_is_object else -1, object_slots[1] if tail_is_object else -1]
        )
        counts.append(count)

    width = pad_to or max(len(t) for t in texts)
    if width < max(len(t) for t in texts):
        raise ValueError(f"pad_to {width} is shorter than the longest text")
    batch_size = len(lengths)
    input_ids = torch.full((batch_size, width), pad_id, dtype=torch.long)
    token_type_ids = torch.zeros((batch_size, width), dtype=torch.long)
    attention_mask = torch.zeros((batch_size, width), dtype=torch.long)
    for b, (tokens, segment) in enumerate(zip(texts, segments, strict=True)):
        input_ids[b, : len(tokens)] = torch.tensor(tokens)
        token_type_ids[b, : len(tokens)] = torch.tensor(segment)
        attention_mask[b, : len(tokens)] = 1
    num_objects = torch.tensor(counts)
    filled = (torch.arange(max_objects)[None, :] < num_objects[:, None]).float()
    corner = torch.rand(batch_size, max_objects, 2, generator=generator) * 0.6
    size = 0.1 + torch.rand(batch_size, max_objects, 2, generator=generator) * 0.3
    boxes = torch.cat([corner, corner + size, (size[..., :1] * size[..., 1:])], dim=-1)
    shape = (batch_size, max_objects, crop_size, crop_size)
    return {
        "input_ids": input_ids,
        "token_type_ids": token_type_ids,
        "attention_mask": attention_mask,
        "marker_pos": torch.tensor(markers).reshape(batch_size, 2, 3),
        "object_slot": torch.tensor(slots),
        "pixel_values": torch.randn(*shape[:2], 3, *shape[2:], generator=generator)
        * filled[..., None, None, None],
        "depth_values": torch.rand(*shape, generator=generator) * filled[..., None, None],
        "boxes": boxes * filled[..., None],
        "num_objects": num_objects,
        "labels": torch.randint(0, num_labels, (batch_size,), generator=generator),
        "pair_kind": torch.tensor([b % 3 for b in range(batch_size)]),
    }
