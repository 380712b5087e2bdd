"""The feature cache and its loader: markers, captions, truncation, crops, depth, batches."""

import json
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from transformers import BertTokenizerFast

from pipeline.config import apply_overrides, default_params
from pipeline.data.images import box_to_pixels
from pipeline.data.records import PAIR_KINDS, Dataset, Entity, Record, label_list, write_records
from pipeline.features import build as build_module
from pipeline.features.build import build_features
from pipeline.features.dataset import METADATA_KEY, FeatureDataset, cache_settings, make_loader
from pipeline.features.featurize import check_record, featurize_image
from pipeline.features.images import (
    check_depth_map,
    crop_depth,
    crop_objects,
    normalize_depth,
    object_layout,
)
from pipeline.features.text import TextEncoder
from pipeline.io import DataError, StaleCacheError, write_json
from pipeline.text import MARKERS, load_tokenizer

DEFAULTS = default_params()
# The crops' normalization as published: OpenAI CLIP's preprocessing and ImageNet's (DeiT).
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

ROOT = Path(__file__).resolve().parents[1]

VOCAB = [
    "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "bill", "co", "##sby", "visited", "paris", ".",
    "is", "home", "to", "a", "man", "in", "red", "shirt", "tall", "tower", "the", "city", "of",
    "lights", "comedian", "##s",
]  # fmt: skip
RELATIONS = ["none", "/per/loc/place_of_residence", "/per/misc/present_in", "/loc/loc/contain"]
SENT_A = ("Bill", "Cosby", "visited", "Paris", ".")
SENT_B = ("Paris", "is", "home", "to", "Bill", "Cosby")
OBJECTS = {
    "a.png": {"[OBJ0]": [0.1, 0.2, 0.6, 0.9], "[OBJ2]": [0.5, 0.0, 1.0, 0.5]},
    "b.jpg": {"[OBJ0]": [0.0, 0.0, 1.0, 1.0], "[OBJ1]": [0.25, 0.3, 0.8, 0.71]},
    "c.png": {},
}
CAPTIONS = {
    "a.png": {"Bill Cosby": "a comedian", "[OBJ2]": "a tall tower"},
    "b.jpg": {"[OBJ1]": "a man in a red shirt", "Paris": "the city of lights"},
}


def text(name, start, end):
    return Entity("text", name, (start, end))


def obj(k):
    return Entity("object", f"[OBJ{k}]")


RECORDS = {
    "train": [
        Record("t0", SENT_A, "a.png", text("Bill Cosby", 0, 2), text("Paris", 3, 4), RELATIONS[2]),
        Record("t1", SENT_B, "a.png", text("Paris", 0, 1), text("Bill Cosby", 4, 6), RELATIONS[0]),
        Record("t2", SENT_A, "a.png", text("Bill Cosby", 0, 2), obj(2), RELATIONS[2]),
        Record("t3", SENT_A, "a.png", obj(0), obj(2), RELATIONS[3]),
        Record("t4", SENT_B, "b.jpg", obj(1), text("Paris", 0, 1), RELATIONS[1]),
        Record("t5", SENT_B, "c.png", text("Paris", 0, 1), text("Bill Cosby", 4, 6), RELATIONS[0]),
    ],
    "valid": [
        Record("v0", SENT_A, "b.jpg", obj(0), obj(1), RELATIONS[0]),
        Record("v1", SENT_B, "c.png", text("Paris", 0, 1), text("Bill Cosby", 4, 6), RELATIONS[1]),
    ],
    "test": [Record("s0", SENT_A, "a.png", text("Paris", 3, 4), obj(0), RELATIONS[2])],
}


class FakeDepth:
    """The DepthStore interface over in-memory maps (a missing id raises KeyError)."""

    def __init__(self, maps):
        self.maps = maps

    def get(self, image_id):
        return self.maps[image_id].copy()


class FakeCaptions:
    """The CaptionTable interface over a dict."""

    def __init__(self, table, backend="file"):
        self.table, self.backend = table, backend

    def get(self, image_id, key):
        return self.table.get(image_id, {}).get(key)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A crafted normalized dataset, depth maps, captions and a local tokenizer folder."""
    root = tmp_path_factory.mktemp("features")
    data = root / "dataset"
    rng = np.random.default_rng(0)
    (data / "images").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(data / "images/a.png")
    Image.fromarray(rng.integers(0, 256, (21, 33, 3), dtype=np.uint8)).save(data / "images/b.jpg")
    Image.fromarray(rng.integers(0, 256, (10, 10), dtype=np.uint8)).save(data / "images/c.png")
    for split, records in RECORDS.items():
        write_records(data / "records" / f"{split}.jsonl", records)
    write_json(data / "objects.json", OBJECTS)
    write_json(data / "relations.json", {r: i for i, r in enumerate(RELATIONS)})
    write_json(data / "manifest.json", {"source": "test", "version": "1"})
    depth = FakeDepth(
        {
            "a.png": (rng.random((15, 20)) * 5 + 2).astype(np.float32),  # half the image size
            "b.jpg": (rng.random((21, 33)) * 3 - 1).astype(np.float32),
            "c.png": np.ones((10, 10), np.float32),
        }
    )
    tok_dir = root / "tokenizer"
    BertTokenizerFast(
        vocab={w: i for i, w in enumerate(VOCAB)}, do_lower_case=True
    ).save_pretrained(tok_dir)
    params = default_params(
        {
            "model.text_model": str(tok_dir),
            "data.pad_to_max": True,
            "data.max_objects": 4,
            "data.max_seq": 40,
            "features.crop_size": 16,
            "features.shard_size": 4,
            "features.image_shard_size": 2,
        },
    )
    return {
        "root": root,
        "dataset": Dataset(data),
        "depth": depth,
        "captions": FakeCaptions(CAPTIONS),
        "params": params,
        "tokenizer": load_tokenizer(str(tok_dir)),
    }


def build(world, name, params=None, **kwargs):
    params = params or world["params"]
    out = world["root"] / name
    kwargs.setdefault("depth", world["depth"])
    kwargs.setdefault("captions", world["captions"])
    report = build_features(world["dataset"], out, params, **kwargs)
    return out, report


@pytest.fixture(scope="module")
def cache(world):
    return build(world, "cache")


def tokens(world, ids):
    return world["tokenizer"].convert_ids_to_tokens(ids)


# ---------------------------------------------------------------------------------------------
# Text


def test_markers_wrap_the_word_pieces_of_multi_word_and_edge_entities(world):
    encoder = TextEncoder(world["tokenizer"], max_seq=40)
    t0, t1 = RECORDS["train"][:2]
    got = encoder.encode(t0, None)
    assert tokens(world, got.input_ids) == [
        "[CLS]", "<s1>", "bill", "co", "##sby", "</s1>", "visited", "<s2>", "paris", "</s2>", ".",
        "[SEP]",
    ]  # fmt: skip
    assert got.token_type_ids == [0] * 12
    # entity at the sentence start (head) and at its end (tail)
    got = encoder.encode(t1, None)
    assert tokens(world, got.input_ids) == [
        "[CLS]", "<s1>", "paris", "</s1>", "is", "home", "to", "<s2>", "bill", "co", "##sby",
        "</s2>", "[SEP]",
    ]  # fmt: skip
    expected = {"<s1>": 1, "</s1>": 3, "<s2>": 7, "</s2>": 11}
    assert got.marker_positions == [expected.get(m, -1) for m in MARKERS]


def original_marked_words(words, head, tail):
    """The original's marker placement, written as its loop: at word i, <s1> if the head starts at
    i, </s1> if it ends at i, <s2> / </s2> likewise, then the word (closers at len(words) last)."""
    out = []
    for i in range(len(words) + 1):
        for n, (start, end) in ((1, head), (2, tail)):
            if start == i:
                out.append(f"<s{n}>")
            if end == i:
                out.append(f"</s{n}>")
        if i < len(words):
            out.append(words[i])
    return out


@pytest.mark.parametrize(
    "head, tail, expected",
    [
        # tail just before the head: "... </s2> <s1> ..." in ours before, the original's order now
        ((1, 2), (0, 1), ["<s2>", "w0", "<s1>", "</s2>", "w1", "</s1>", "w2"]),
        ((0, 1), (1, 2), ["<s1>", "w0", "</s1>", "<s2>", "w1", "</s2>", "w2"]),
        # the same span for head and tail: not nested, head first on both sides
        ((1, 2), (1, 2), ["w0", "<s1>", "<s2>", "w1", "</s1>", "</s2>", "w2"]),
        # a span ending at the sentence end, touching the other at its start
        ((2, 3), (0, 2), ["<s2>", "w0", "w1", "<s1>", "</s2>", "w2", "</s1>"]),
        # nested spans sharing an end
        ((0, 3), (1, 3), ["<s1>", "w0", "<s2>", "w1", "w2", "</s1>", "</s2>"]),
        # an empty head span: its opening marker before its closing one, then the tail's
        ((1, 1), (0, 1), ["<s2>", "w0", "<s1>", "</s1>", "</s2>", "w1", "w2"]),
    ],
)
def test_touching_spans_follow_the_original_marker_order(world, head, tail, expected):
    vocab = world["tokenizer"].get_vocab()
    words = tuple(w for w in ("bill", "visited", "paris") if w in vocab)
    assert len(words) == 3
    encoder = TextEncoder(world["tokenizer"], max_seq=40)
    record = Record("x", words, "a.png", text("A", *head), text("B", *tail), "none")
    names = [w if w.startswith("<") else words[int(w[1])] for w in expected]
    assert original_marked_words(words, head, tail) == names
    assert tokens(world, encoder.encode(record, None).input_ids)[1:-1] == names


def test_encoder_refuses_a_span_past_the_sentence_and_a_max_seq_under_six(world):
    with pytest.raises(ValueError, match="at least 6, found 5"):
        TextEncoder(world["tokenizer"], max_seq=5)
    encoder = TextEncoder(world["tokenizer"], max_seq=6)  # [CLS] [SEP] and two marker pairs
    record = Record("x", SENT_A, "a.png", text("Paris", 3, 6), obj(0), "none")  # 5 words
    with pytest.raises(DataError, match=r"'Paris' span \[3, 6\) is outside its 5 tokens"):
        encoder.encode(record, None)
    # a span that starts before the sentence, or ends before it starts, is refused too
    for span in ((-1, 2), (3, 2)):
        record = Record("x", SENT_A, "a.png", obj(0), text("Paris", *span), "none")
        with pytest.raises(DataError, match=rf"'Paris' span \[{span[0]}, {span[1]}\) is outside"):
            encoder.encode(record, None)


def test_encoder_refuses_a_tokenizer_without_the_markers(world):
    # Without them every marker would be [UNK]: one id for all twelve, no entity to find.
    plain = BertTokenizerFast(vocab={w: i for i, w in enumerate(VOCAB)}, do_lower_case=True)
    with pytest.raises(
        ValueError, match=r"lacks the entity markers \['<s1>', '</s1>', .*'</o2>'\]"
    ):
        TextEncoder(plain, max_seq=40)


def test_object_entities_get_no_sentence_markers(world):
    encoder = TextEncoder(world["tokenizer"], max_seq=40)
    got = encoder.encode(RECORDS["train"][3], None)  # object-object
    assert tokens(world, got.input_ids) == ["[CLS]", "bill", "co", "##sby", "visited", "paris", ".",
                                            "[SEP]"]  # fmt: skip
    assert got.marker_positions == [-1] * 12


def test_markers_written_in_the_text_are_ordinary_word_pieces(world):
    # A post or caption that contains "<s1>" or "[SEP]" must not place a marker or a separator.
    encoder = TextEncoder(world["tokenizer"], max_seq=64)
    words = ("i", "saw", "<s1>", "paris", "[SEP]")
    record = Record("x", words, "a.png", text("Paris", 3, 4), obj("[OBJ1]"), "none")
    got = encoder.encode(record, ("<o1> a flag </s2>", "a tower"))
    toks = tokens(world, got.input_ids)
    assert toks.count("<s1>") == 1 and toks.count("</s2>") == 0 and toks.count("[SEP]") == 2
    assert toks.count("<o1>") == 0 and toks.count("<k1>") == 1
    pos = dict(zip(MARKERS, got.marker_positions, strict=True))
    assert toks[pos["<s1>"] : pos["<s1>"] + 3] == ["<s1>", "paris", "</s1>"]
    caption = toks[pos["<k1>"] + 1 : pos["</k1>"]]
    assert len(caption) > 4 and not set(caption) & set(MARKERS)  # split into ordinary pieces


def test_caption_segment_order_and_missing_caption(world):
    encoder = TextEncoder(world["tokenizer"], max_seq=40)
    t2 = RECORDS["train"][2]  # text head "Bill Cosby", object tail [OBJ2]
    got = encoder.encode(t2, ("a comedian", "a tall tower"))
    toks = tokens(world, got.input_ids)
    sep = toks.index("[SEP]")
    assert toks[sep:] == [
        "[SEP]", "<k1>", "a", "comedian", "</k1>", "<o2>", "a", "tall", "tower", "</o2>", "[SEP]",
    ]  # fmt: skip
    assert got.token_type_ids == [0] * (sep + 1) + [1] * 10
    pos = dict(zip(MARKERS, got.marker_positions, strict=True))
    assert (pos["<s1>"], pos["<k1>"], pos["<o2>"], pos["<s2>"], pos["<k2>"]) == (1, 10, 14, -1, -1)
    # object head, text tail with a missing caption: markers kept around empty content
    got = encoder.encode(RECORDS["train"][4], ("a man", None))
    toks = tokens(world, got.input_ids)
    assert toks[toks.index("[SEP]") :] == [
        "[SEP]", "<o1>", "a", "man", "</o1>", "<k2>", "</k2>", "[SEP]",
    ]  # fmt: skip


def test_truncation_cuts_captions_before_the_sentence(world):
    t2 = RECORDS["train"][2]  # sentence: 8 tokens + [CLS] [SEP]
    captions = ("a comedian comedians", "a tall tower")  # 4 and 3 word pieces
    full = TextEncoder(world["tokenizer"], 40).encode(t2, captions)
    assert len(full.input_ids) == 10 + 4 + 3 + 4 + 1
    # 20 tokens: 2 caption pieces must go, longest caption first (4 -> 3, then tie -> tail's)
    got = TextEncoder(world["tokenizer"], 20).encode(t2, captions)
    assert len(got.input_ids) == 20
    assert tokens(world, got.input_ids)[10:] == [
        "<k1>", "a", "comedian", "comedian", "</k1>", "<o2>", "a", "tall", "</o2>", "[SEP]",
    ]  # fmt: skip
    assert (got.caption_tokens_cut, got.sentence_tokens_cut, got.markers_dropped) == (2, 0, [])
    # 14 tokens: only the two empty marker pairs fit (+ [SEP])
    got = TextEncoder(world["tokenizer"], 15).encode(t2, captions)
    assert tokens(world, got.input_ids)[10:] == ["<k1>", "</k1>", "<o2>", "</o2>", "[SEP]"]
    assert got.caption_tokens_cut == 7 and got.markers_dropped == []
    # 13 tokens: the tail's block goes first, the head keeps its markers
    got = TextEncoder(world["tokenizer"], 13).encode(t2, captions)
    assert tokens(world, got.input_ids)[10:] == ["<k1>", "</k1>", "[SEP]"]
    assert got.markers_dropped == ["<o2>", "</o2>"]
    # every caption piece is counted as cut: the dropped block's 3 and the head's 4
    assert (got.caption_tokens_cut, got.sentence_tokens_cut) == (7, 0)
    # 9 tokens: no caption segment at all, then the sentence loses its last piece
    got = TextEncoder(world["tokenizer"], 9).encode(t2, captions)
    assert tokens(world, got.input_ids) == [
        "[CLS]", "<s1>", "bill", "co", "##sby", "</s1>", "visited", "paris", "[SEP]",
    ]  # fmt: skip
    assert got.sentence_tokens_cut == 1 and got.token_type_ids == [0] * 9
    assert got.caption_tokens_cut == 7
    assert got.markers_dropped == ["<k1>", "</k1>", "<o2>", "</o2>"]
    # 6 tokens: the sentence cut drops the closing head marker too
    got = TextEncoder(world["tokenizer"], 6).encode(t2, captions)
    assert tokens(world, got.input_ids) == ["[CLS]", "<s1>", "bill", "co", "##sby", "[SEP]"]
    assert got.markers_dropped == ["</s1>", "<k1>", "</k1>", "<o2>", "</o2>"]
    assert got.marker_positions[:2] == [1, -1]


def test_markers_dropped_are_listed_in_marker_order_not_sentence_order(world):
    # Tail before head: the sentence holds <s2> <s1> </s2> </s1>; a cut after "visited" loses
    # </s2> then </s1>, reported as MARKERS lists them.
    head, tail = text("visited Paris", 2, 4), text("Bill Cosby visited", 0, 3)
    record = Record("x", SENT_A, "a.png", head, tail, "none")
    full = TextEncoder(world["tokenizer"], 40).encode(record, None)
    assert tokens(world, full.input_ids)[1:-1] == [
        "<s2>", "bill", "co", "##sby", "<s1>", "visited", "</s2>", "paris", "</s1>", ".",
    ]  # fmt: skip
    got = TextEncoder(world["tokenizer"], 8).encode(record, None)
    assert tokens(world, got.input_ids)[-2:] == ["visited", "[SEP]"]
    assert got.markers_dropped == ["</s1>", "</s2>"] and got.sentence_tokens_cut == 4


def test_report_counts_truncation_and_missing_captions(world):
    params = apply_overrides(world["params"], {"data.max_seq": 14})
    out, report = build(world, "short", params)
    assert json.loads((out / "report.json").read_text()) == report
    train = report["splits"]["train"]
    # every train sentence (10-13 tokens with [CLS]/[SEP]) leaves <= 3 tokens for captions; check
    # against the encoder sample by sample
    encoder = TextEncoder(world["tokenizer"], 14)
    expected_markers = {m: 0 for m in MARKERS}
    expected_samples = 0
    for r in RECORDS["train"]:
        pair = tuple(world["captions"].get(r.image_id, e.name) for e in (r.head, r.tail))
        enc = encoder.encode(r, pair)
        expected_samples += bool(enc.markers_dropped)
        for m in enc.markers_dropped:
            expected_markers[m] += 1
    assert train["markers_dropped"] == expected_markers
    assert train["samples_with_dropped_markers"] == expected_samples > 0
    assert train["length"]["max"] <= 14
    # Samples that lost caption pieces / sentence pieces, counted with the encoder: at 14 every
    # sample with a caption (all but t5) loses caption pieces and no sentence is cut; at 11 the
    # three sentences over 9 tokens (t0, t1, t5) are cut too.
    for max_seq, expected in ((14, (5, 0)), (11, (5, 3))):
        encoder = TextEncoder(world["tokenizer"], max_seq)
        encoded = [
            encoder.encode(
                r, tuple(world["captions"].get(r.image_id, e.name) for e in (r.head, r.tail))
            )
            for r in RECORDS["train"]
        ]
        counts = (
            sum(e.caption_tokens_cut > 0 for e in encoded),
            sum(e.sentence_tokens_cut > 0 for e in encoded),
        )
        assert counts == expected
        if max_seq != 14:
            params = apply_overrides(world["params"], {"data.max_seq": max_seq})
            train = build(world, f"short{max_seq}", params)[1]["splits"]["train"]
        assert train["truncated"] == {"caption_samples": counts[0], "sentence_samples": counts[1]}
    # no caption for Paris in a.png (t0, t1), anything in c.png (t5: 2), [OBJ0] in a.png (t3)
    full = build(world, "full_report")[1]["splits"]["train"]
    assert full["captions_missing"] == {"text": 4, "object": 1}
    assert full["samples_with_dropped_markers"] == 0
    assert full["truncated"] == {"caption_samples": 0, "sentence_samples": 0}
    assert full["markers_dropped"] == {m: 0 for m in MARKERS}


# ---------------------------------------------------------------------------------------------
# Images


def test_box_to_pixels_rounds_clamps_and_keeps_one_pixel():
    assert box_to_pixels([0.1, 0.2, 0.6, 0.9], 40, 30) == (4, 6, 24, 27)
    assert box_to_pixels([0.0, 0.0, 1.0, 1.0], 33, 21) == (0, 0, 33, 21)
    assert box_to_pixels([0.5, 0.5, 0.5, 0.5], 10, 10) == (5, 5, 6, 6)
    assert box_to_pixels([0.99, 0.0, 1.0, 0.01], 10, 10) == (9, 0, 10, 1)
    assert box_to_pixels([0.25, 0.25, 0.75, 0.75], 10, 10) == (2, 2, 8, 8)  # 2.5 -> 2, 7.5 -> 8


def test_box_to_pixels_is_the_pil_crop_of_the_float_box():
    # The original cropped with the float box (x W, y H); PIL rounds it half to even.
    rng = np.random.default_rng(7)
    image = Image.fromarray(rng.integers(0, 256, (37, 52, 3), dtype=np.uint8))
    boxes = np.sort(rng.random((200, 2, 2)), axis=1).reshape(200, 4)[:, [0, 2, 1, 3]]
    halves = np.array([[0.25, 0.125, 0.75, 0.875]])  # lands on .5 pixels: 13, 4.625, 39, 32.375
    for x1, y1, x2, y2 in np.concatenate([boxes, halves]):
        float_box = (x1 * 52, y1 * 37, x2 * 52, y2 * 37)
        if round(float_box[2]) <= round(float_box[0]) or round(float_box[3]) <= round(float_box[1]):
            continue  # under a pixel: we keep one pixel, the original had an empty crop
        ours = image.crop(box_to_pixels([x1, y1, x2, y2], 52, 37))
        assert np.array_equal(np.asarray(ours), np.asarray(image.crop(float_box)))


def clip_reference(crop: Image.Image, size: int) -> np.ndarray:
    """CLIP's feature extractor at size = crop size = ``size``, before scaling: resize the short
    side to ``size`` (long side int(size * long / short), bicubic), then the centre square with
    offsets (h - size) // 2, (w - size) // 2. uint8 [3, size, size]."""
    w, h = crop.size
    new = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    resized = np.asarray(crop.resize(new, Image.Resampling.BICUBIC) if new != (w, h) else crop)
    top, left = (resized.shape[0] - size) // 2, (resized.shape[1] - size) // 2
    return resized[top : top + size, left : left + size].transpose(2, 0, 1)


def test_crops_equal_the_clip_extractor_on_the_pil_crop(world, cache):
    ds = FeatureDataset.load(cache[0], "train", world["params"], RELATIONS)
    assert ds.image_ids == ["a.png", "b.jpg", "c.png"]
    for i, image_id in enumerate(ds.image_ids):
        image = Image.open(world["dataset"].image_path(image_id)).convert("RGB")
        for slot in range(4):
            box = OBJECTS[image_id].get(f"[OBJ{slot}]")
            if box is None:
                assert not ds.object_crops[i, slot].any()
                continue
            w, h = image.size
            crop = image.crop((box[0] * w, box[1] * h, box[2] * w, box[3] * h))
            np.testing.assert_array_equal(ds.object_crops[i, slot], clip_reference(crop, 16))


def test_clip_crop_keeps_the_aspect_and_stretch_does_not():
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, (40, 120, 3), dtype=np.uint8)  # a 3:1 landscape crop
    pixels[:, :40] = (250, 0, 0)  # left third red: cut off by the centre crop, kept by stretch
    image = Image.fromarray(pixels)
    boxes, mask = object_layout({"[OBJ0]": [0.0, 0.0, 1.0, 1.0]}, 1, "x")
    clip = crop_objects(image, boxes, mask, 16, "clip")[0]
    stretch = crop_objects(image, boxes, mask, 16, "stretch")[0]
    np.testing.assert_array_equal(clip, clip_reference(image, 16))
    resized = image.resize(
        (48, 16), Image.Resampling.BICUBIC
    )  # short side 40 -> 16, long 120 -> 48
    np.testing.assert_array_equal(clip, np.asarray(resized)[:, 16:32].transpose(2, 0, 1))
    direct = np.asarray(image.resize((16, 16), Image.Resampling.BICUBIC)).transpose(2, 0, 1)
    np.testing.assert_array_equal(stretch, direct)
    assert (stretch[:, :, :4] == np.array([250, 0, 0])[:, None, None]).all()
    # In CLIP-normalized units (pixel std ~1) the two differ by far more than rounding.
    normalized = [(c / 255 - np.array(CLIP_MEAN)[:, None, None]) / np.array(CLIP_STD)[:, None, None]
                  for c in (clip, stretch)]  # fmt: skip
    assert np.abs(normalized[0] - normalized[1]).mean() > 0.5
    with pytest.raises(ValueError, match="crop_resize"):
        crop_objects(image, boxes, mask, 16, "squash")


def test_a_solid_box_crops_to_its_colour(tmp_path):
    image = Image.new("RGB", (50, 40), (0, 0, 255))
    image.paste((200, 10, 30), (10, 8, 30, 28))  # exactly the box [0.2, 0.2, 0.6, 0.7]
    boxes, mask = object_layout({"[OBJ1]": [0.2, 0.2, 0.6, 0.7]}, 3, "x")
    for mode in ("clip", "stretch"):
        crops = crop_objects(image, boxes, mask, 8, mode)
        assert crops.shape == (3, 3, 8, 8)
        assert (crops[1].reshape(3, -1).T == [200, 10, 30]).all()
        assert not crops[0].any() and not crops[2].any()


def test_crops_of_a_grey_or_transparent_image_are_those_of_its_rgb_conversion():
    rng = np.random.default_rng(8)
    boxes, mask = object_layout(
        {"[OBJ0]": [0.1, 0.2, 0.7, 0.9], "[OBJ2]": [0.0, 0.0, 1.0, 0.5]}, 3, "x"
    )
    grey = Image.fromarray(rng.integers(0, 256, (20, 30), dtype=np.uint8))
    rgba = Image.fromarray(rng.integers(0, 256, (20, 30, 4), dtype=np.uint8))
    assert (grey.mode, rgba.mode) == ("L", "RGBA")
    for image in (grey, rgba):
        for mode in ("clip", "stretch"):
            expected = crop_objects(image.convert("RGB"), boxes, mask, 8, mode)
            np.testing.assert_array_equal(crop_objects(image, boxes, mask, 8, mode), expected)
    crops = crop_objects(grey, boxes, mask, 8, "clip")
    assert (crops[:, 0] == crops[:, 1]).all() and (crops[:, 0] == crops[:, 2]).all()


def upsample_align_corners(depth_map, height, width):
    """The whole map bilinearly upsampled to height x width with align_corners=True, as a plain
    numpy computation: output pixel (r, c) reads source position (r (h-1)/(H-1), c (w-1)/(W-1))."""
    h, w = depth_map.shape
    ys = np.arange(height) * ((h - 1) / (height - 1)) if height > 1 else np.zeros(height)
    xs = np.arange(width) * ((w - 1) / (width - 1)) if width > 1 else np.zeros(width)
    out = np.zeros((height, width))
    for r, y in enumerate(ys):
        for c, x in enumerate(xs):
            y0, x0 = min(int(np.floor(y)), h - 1), min(int(np.floor(x)), w - 1)
            y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
            dy, dx = y - y0, x - x0
            top = depth_map[y0, x0] * (1 - dx) + depth_map[y0, x1] * dx
            bottom = depth_map[y1, x0] * (1 - dx) + depth_map[y1, x1] * dx
            out[r, c] = top * (1 - dy) + bottom * dy
    return out


def original_depth_crop(depth_map, box, width, height, size):
    """The original: upsample to the image size, rows int(H y1):int(H y2), columns likewise, then
    nearest resize to size x size with source index floor(i * extent / size)."""
    full = upsample_align_corners(np.asarray(depth_map, np.float64), height, width)
    cut = full[
        int(height * box[1]) : int(height * box[3]), int(width * box[0]) : int(width * box[2])
    ]
    rows = [int(np.floor(i * cut.shape[0] / size)) for i in range(size)]
    cols = [int(np.floor(i * cut.shape[1] / size)) for i in range(size)]
    return cut[np.ix_(rows, cols)]


def test_upsample_reference_is_torch_bilinear_align_corners():
    depth_map = np.random.default_rng(4).random((5, 7)).astype(np.float32)
    expected = torch.nn.functional.interpolate(
        torch.from_numpy(depth_map)[None, None], size=(11, 16), mode="bilinear", align_corners=True
    )[0, 0].numpy()
    np.testing.assert_allclose(upsample_align_corners(depth_map, 11, 16), expected, atol=1e-6)


def test_depth_crops_are_the_raw_map_upsampled_cut_and_nearest_resized(world, cache):
    ds = FeatureDataset.load(cache[0], "train", world["params"], RELATIONS)
    assert world["params"].features.depth_scale == "raw"
    for i, image_id in enumerate(ds.image_ids):
        depth_map = world["depth"].get(image_id)
        image = Image.open(world["dataset"].image_path(image_id))
        for slot in range(4):
            box = OBJECTS[image_id].get(f"[OBJ{slot}]")
            if box is None:
                assert not ds.depth_crops[i, slot].any()
                continue
            expected = original_depth_crop(depth_map, box, image.width, image.height, 16)
            assert ds.depth_crops[i, slot].dtype == np.float16
            np.testing.assert_allclose(ds.depth_crops[i, slot], expected, rtol=1e-3, atol=1e-3)
    # a.png's map is half its image's size, so the crops come from interpolated values
    a = world["depth"].get("a.png")
    assert a.shape == (15, 20) and not np.isin(ds.depth_crops[0, 0], a.astype(np.float16)).all()


def test_minmax_depth_scales_each_map_first_and_cuts_keep_a_pixel():
    depth_map = np.random.default_rng(5).random((6, 9)).astype(np.float32) * 4 + 3
    boxes, mask = object_layout(
        {"[OBJ0]": [0.1, 0.2, 0.7, 0.9], "[OBJ1]": [0.5, 0.5, 0.52, 0.53]}, 2, "x"
    )
    raw = crop_depth(depth_map, boxes, mask, 8, (30, 20))
    np.testing.assert_allclose(
        raw[0], original_depth_crop(depth_map, boxes[0], 30, 20, 8), rtol=1e-6
    )
    # A box under a pixel (rows 10:10, columns 15:15) still reads one pixel, (10, 15).
    pixel = upsample_align_corners(depth_map.astype(np.float64), 20, 30)[10, 15]
    np.testing.assert_allclose(raw[1], np.full((8, 8), pixel), rtol=1e-6)
    norm = normalize_depth(depth_map)
    low, high = depth_map.min(), depth_map.max()
    np.testing.assert_allclose(norm, (depth_map - low) / (high - low), rtol=1e-6)
    np.testing.assert_allclose(
        crop_depth(norm, boxes, mask, 8, (30, 20))[0], (raw[0] - low) / (high - low), atol=1e-6
    )
    np.testing.assert_array_equal(
        normalize_depth(np.array([[2.0, 4.0], [3.0, 6.0]])), [[0, 0.5], [0.25, 1]]
    )
    assert not normalize_depth(np.full((3, 2), 7.0)).any()  # flat map: zeros


def test_a_depth_map_must_be_a_finite_2d_array_and_is_read_as_float32():
    got = check_depth_map(np.array([[1.5, 2.0], [3.0, 4.25]]), "a.png")  # float64 in
    assert got.dtype == np.float32 and got.tolist() == [[1.5, 2.0], [3.0, 4.25]]
    for bad, problem in (
        (np.zeros((2, 3, 4)), r"expected \[H, W\], found \(2, 3, 4\)"),
        (np.zeros(5), r"expected \[H, W\], found \(5,\)"),
        (np.zeros((0, 5)), r"expected \[H, W\], found \(0, 5\)"),
        (np.array([[1.0, np.nan]]), "has NaN or infinite values"),
        (np.array([[1.0], [-np.inf]]), "has NaN or infinite values"),
    ):
        for read in (check_depth_map, normalize_depth):
            with pytest.raises(DataError, match=rf"^depth map of 'a\.png': {problem}"):
                read(bad, "a.png")


def test_depth_crops_of_an_image_one_pixel_high_or_wide():
    # align_corners=True over a 1-pixel axis reads the map's first row or column (no H - 1 = 0
    # division).
    depth_map = np.random.default_rng(9).random((3, 5)).astype(np.float32)
    boxes, mask = object_layout({"[OBJ0]": [0.0, 0.0, 1.0, 1.0]}, 1, "x")
    for width, height in ((7, 1), (1, 6), (1, 1)):
        got = crop_depth(depth_map, boxes, mask, 4, (width, height))
        expected = original_depth_crop(depth_map, boxes[0], width, height, 4)
        np.testing.assert_allclose(got[0], expected, rtol=1e-6)
    np.testing.assert_array_equal(crop_depth(depth_map, boxes, mask, 4, (1, 1))[0], depth_map[0, 0])


def test_depth_cuts_truncate_fractional_box_edges_as_the_original():
    # Random boxes put edges at every fraction of a pixel (x W = 8.7 is row 8, not 9): the cut
    # truncates with int() like the original, where the RGB crop rounds (box_to_pixels).
    rng = np.random.default_rng(11)
    depth_map = rng.random((7, 11)).astype(np.float32)
    width, height = 37, 23
    boxes = np.sort(rng.random((200, 2, 2)), axis=1).reshape(200, 4)[:, [0, 2, 1, 3]]
    keep = [
        int(height * y1) < int(height * y2) and int(width * x1) < int(width * x2)
        for x1, y1, x2, y2 in boxes
    ]  # the original's cut is empty under a pixel; ours keeps one (tested above)
    boxes = boxes[keep]
    fractions = np.concatenate([(boxes[:, [0, 2]] * width) % 1, (boxes[:, [1, 3]] * height) % 1])
    assert len(boxes) > 30 and (fractions > 0.5).any() and (fractions < 0.5).any()
    crops = crop_depth(depth_map, boxes, np.ones(len(boxes), bool), 9, (width, height))
    for crop, box in zip(crops, boxes, strict=True):
        expected = original_depth_crop(depth_map, box, width, height, 9)
        np.testing.assert_allclose(crop, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("image_id", ["a.png", "b.jpg"])
def test_featurize_image_follows_crop_resize_and_depth_scale(world, image_id):
    # The features stage and predict both go through featurize_image: its settings must reach the
    # crops. References: PIL's bicubic resize of the float-box crop to S x S (stretch), and the
    # original's depth crop of the map min-max scaled with numpy first (minmax).
    params = apply_overrides(
        world["params"], {"features.crop_resize": "stretch", "features.depth_scale": "minmax"}
    )
    depth_map = world["depth"].get(image_id).astype(np.float64)
    scaled = (depth_map - depth_map.min()) / (depth_map.max() - depth_map.min())
    path = world["dataset"].image_path(image_id)
    got = featurize_image(image_id, path, OBJECTS[image_id], world["depth"], params)
    image = Image.open(path).convert("RGB")
    w, h = image.size
    for slot in range(4):
        box = OBJECTS[image_id].get(f"[OBJ{slot}]")
        if box is None:
            assert not got.object_crops[slot].any() and not got.depth_crops[slot].any()
            continue
        crop = image.crop((box[0] * w, box[1] * h, box[2] * w, box[3] * h))
        stretched = np.asarray(crop.resize((16, 16), Image.Resampling.BICUBIC))
        np.testing.assert_array_equal(got.object_crops[slot], stretched.transpose(2, 0, 1))
        expected = original_depth_crop(scaled, box, w, h, 16)
        np.testing.assert_allclose(got.depth_crops[slot], expected, rtol=0, atol=1e-3)
    assert got.depth_crops.min() >= 0 and got.depth_crops.max() <= 1


def test_caption_segments_hold_the_head_caption_then_the_tail_caption(world, cache):
    # Each cached sample's token-type-1 tokens, rebuilt from CAPTIONS by entity name.
    for split, records in RECORDS.items():
        batch = FeatureDataset.load(cache[0], split, world["params"], RELATIONS).batch(
            range(len(records))
        )
        for b, record in enumerate(records):
            expected = []
            for n, entity in ((1, record.head), (2, record.tail)):
                letter = "k" if entity.kind == "text" else "o"
                caption = CAPTIONS.get(record.image_id, {}).get(entity.name)
                words = world["tokenizer"].tokenize(caption) if caption else []
                expected += [f"<{letter}{n}>", *words, f"</{letter}{n}>"]
            types = batch["token_type_ids"][b].tolist()
            segment = [i for i, t in zip(batch["input_ids"][b].tolist(), types, strict=True) if t]
            assert tokens(world, segment) == [*expected, "[SEP]"], record.id


def test_samples_match_the_records(world, cache):
    for split, records in RECORDS.items():
        ds = FeatureDataset.load(cache[0], split, world["params"], RELATIONS)
        assert ds.sample_ids == [r.id for r in records]
        batch = ds.batch(range(len(ds)))
        assert batch["labels"].tolist() == [RELATIONS.index(r.relation) for r in records]
        assert batch["pair_kind"].tolist() == [PAIR_KINDS.index(r.pair_kind) for r in records]
        slots = [[e.slot if e.kind == "object" else -1 for e in (r.head, r.tail)] for r in records]
        assert batch["object_slot"].tolist() == slots
        assert batch["num_objects"].tolist() == [len(OBJECTS[r.image_id]) for r in records]
        for b, r in enumerate(records):
            ids = batch["input_ids"][b]
            for role, entity in enumerate((r.head, r.tail)):
                s, k, o = batch["marker_pos"][b, role].tolist()
                n = role + 1
                if entity.kind == "text":
                    assert tokens(world, [ids[s]]) == [f"<s{n}>"] and o == -1
                    assert tokens(world, [ids[k]]) == [f"<k{n}>"]
                else:
                    assert s == -1 and k == -1 and tokens(world, [ids[o]]) == [f"<o{n}>"]
    ds = FeatureDataset.load(cache[0], "train", world["params"], RELATIONS)
    a = ds.image_ids.index("a.png")
    np.testing.assert_allclose(
        ds.boxes[a], [[0.1, 0.2, 0.6, 0.9, 0.35], [0] * 5, [0.5, 0.0, 1.0, 0.5, 0.25], [0] * 5]
    )


# ---------------------------------------------------------------------------------------------
# Cache files


def test_reruns_are_byte_identical_and_sharded(world, cache):
    out, _ = cache
    again, _ = build(world, "again")
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    # 6 train samples in shards of 4, 3 images in shards of 2
    assert {str(f) for f in files if f.parts[0] == "train"} == {
        "train/samples-00000.parquet", "train/samples-00001.parquet",
        "train/images-00000.parquet", "train/images-00001.parquet",
    }  # fmt: skip
    # the output holds the report and the shards, no resume stamp or other hidden leftover
    assert {f.parts[0] for f in files} == {"report.json", "train", "valid", "test"}
    assert not [f for f in files if f.name.startswith(".")]
    for f in files:
        assert (out / f).read_bytes() == (again / f).read_bytes(), f
    # rebuilding over an existing cache replaces it in place, same bytes, no leftovers
    build(world, "again")
    assert sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file()) == files
    assert not (world["root"] / "again.partial").exists()


def test_a_killed_run_resumes_from_finished_image_shards(world, cache, monkeypatch, caplog):
    real = build_module._images_table
    calls = []

    def dying(*args, **kwargs):
        if len(calls) == 3:
            raise KeyboardInterrupt  # killed while building the 4th image shard
        calls.append(args[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(build_module, "_images_table", dying)
    with pytest.raises(KeyboardInterrupt):
        build(world, "resumed")
    assert (world["root"] / "resumed.partial").is_dir()
    assert not (world["root"] / "resumed").exists()
    calls.clear()
    monkeypatch.setattr(
        build_module, "_images_table", lambda *a, **k: calls.append(a[1]) or real(*a, **k)
    )
    caplog.set_level(logging.INFO, logger="pipeline.features")
    out, _ = build(world, "resumed")
    assert calls == [["a.png"]]  # only test's shard: train's 2 and valid's 1 were kept
    partial = world["root"] / "resumed.partial"
    reuse = [r.getMessage() for r in caplog.records if "reused" in r.getMessage()]
    assert reuse == [
        f"train: 2 of 2 image shards reused from {partial} (same params and inputs)",
        f"valid: 1 of 1 image shards reused from {partial} (same params and inputs)",
    ]
    for f in cache[0].rglob("*.parquet"):
        assert (out / f.relative_to(cache[0])).read_bytes() == f.read_bytes()
    # a leftover built with other settings is discarded, not reused
    monkeypatch.setattr(build_module, "_images_table", dying)
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        build(world, "other")
    calls.clear()
    monkeypatch.setattr(
        build_module, "_images_table", lambda *a, **k: calls.append(a[1]) or real(*a, **k)
    )
    caplog.clear()
    build(world, "other", apply_overrides(world["params"], {"data.use_box": False}))
    assert len(calls) == 4
    other = world["root"] / "other.partial"
    assert f"{other}: left by a run with other params or inputs: discarded" in caplog.messages
    assert not [m for m in caplog.messages if "reused" in m]


def kill_after_image_shards(monkeypatch, n):
    """Make the next build raise KeyboardInterrupt while it builds image shard n + 1."""
    real, calls = build_module._images_table, []

    def dying(*args, **kwargs):
        if len(calls) == n:
            raise KeyboardInterrupt
        calls.append(args[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(build_module, "_images_table", dying)
    return real


def shards_built(monkeypatch, real):
    calls = []
    monkeypatch.setattr(
        build_module, "_images_table", lambda *a, **k: calls.append(a[1]) or real(*a, **k)
    )
    return calls


@pytest.mark.parametrize(
    "change", ["image_shard_size", "on_error", "dataset_file", "same_size_input"]
)
def test_a_leftover_of_other_shard_sizes_or_inputs_is_rebuilt(
    world, cache, tmp_path, monkeypatch, change
):
    # What a resumed build may reuse: shards of the same layout params and the same input bytes.
    # A leftover of another image_shard_size holds other images under the same file names; one
    # of another dataset or depth/caption input holds stale crops (an input rewritten with the
    # same size, as a rerun depth store is, differs only in its mtime).
    shutil.copytree(world["dataset"].root, tmp_path / "ds")
    dataset = Dataset(tmp_path / "ds")
    extra = tmp_path / "depth.bin"  # stands for the depth store among the stage's deps
    extra.write_bytes(b"maps v1")
    os.utime(extra, ns=(1_000_000_000, 1_000_000_000))
    out = tmp_path / "features"
    real = kill_after_image_shards(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        build_features(dataset, out, world["params"], world["depth"], world["captions"],
                       input_paths=[extra])  # fmt: skip
    params = world["params"]
    if change == "image_shard_size":
        params = apply_overrides(params, {"features.image_shard_size": 3})
    elif change == "on_error":
        params = apply_overrides(params, {"data.on_error": "skip"})
    elif change == "dataset_file":
        objects = json.loads((tmp_path / "ds" / "objects.json").read_text())
        objects["b.jpg"]["[OBJ1]"] = [0.2, 0.3, 0.8, 0.71]
        write_json(tmp_path / "ds" / "objects.json", objects)
    else:
        extra.write_bytes(b"maps v2")
        os.utime(extra, ns=(2_000_000_000, 2_000_000_000))
    calls = shards_built(monkeypatch, real)
    build_features(dataset, out, params, world["depth"], world["captions"], input_paths=[extra])
    assert calls == ([["a.png", "b.jpg", "c.png"], ["b.jpg", "c.png"], ["a.png"]]
                     if change == "image_shard_size"
                     else [["a.png", "b.jpg"], ["c.png"], ["b.jpg", "c.png"], ["a.png"]])  # fmt: skip
    if change == "same_size_input":  # the same features as an uninterrupted build
        for f in cache[0].rglob("*.parquet"):
            assert (out / f.relative_to(cache[0])).read_bytes() == f.read_bytes()


def test_a_shard_cut_short_by_a_kill_is_not_reused(world, cache, monkeypatch):
    # A kill while a shard is written must leave no file a resumed build would take as finished.
    real_write, writes = build_module.pq.write_table, []

    def dying_write(table, where, **kwargs):
        writes.append(where)
        real_write(table, where, **kwargs)
        if len(writes) == 2:  # the second image shard: half its bytes reach the disk
            Path(where).write_bytes(Path(where).read_bytes()[:200])
            raise KeyboardInterrupt

    monkeypatch.setattr(build_module.pq, "write_table", dying_write)
    with pytest.raises(KeyboardInterrupt):
        build(world, "cut-short")
    monkeypatch.setattr(build_module.pq, "write_table", real_write)
    out, _ = build(world, "cut-short")
    for f in cache[0].rglob("*.parquet"):
        assert (out / f.relative_to(cache[0])).read_bytes() == f.read_bytes(), f


def test_a_slot_past_max_objects_and_an_object_without_a_box_are_data_errors():
    with pytest.raises(DataError, match=r"image 'a\.png' has \[OBJ4\], but data.max_objects is 4"):
        object_layout({"[OBJ0]": [0, 0, 1, 1], "[OBJ4]": [0, 0, 1, 1]}, 4, "a.png")
    labels = {r: i for i, r in enumerate(RELATIONS)}
    t2 = RECORDS["train"][2]  # tail [OBJ2] of a.png
    check_record(t2, labels, OBJECTS)
    with pytest.raises(DataError, match=r"record t2: \[OBJ2\] has no box .* image 'a\.png'"):
        check_record(t2, labels, {"a.png": {"[OBJ0]": OBJECTS["a.png"]["[OBJ0]"]}})
    with pytest.raises(DataError, match="record t2: relation 'x' not in relations.json"):
        check_record(replace(t2, relation="x"), labels, OBJECTS)


def test_crop_columns_are_tensors_whose_type_holds_dtype_and_shape(world, cache):
    schema = pq.read_schema(cache[0] / "train/images-00000.parquet")
    crops, depth = schema.field("object_crops").type, schema.field("depth_crops").type
    assert crops == pa.fixed_shape_tensor(pa.uint8(), (4, 3, 16, 16))
    assert depth == pa.fixed_shape_tensor(pa.float16(), (4, 16, 16))
    assert (crops.value_type, crops.shape) == (pa.uint8(), [4, 3, 16, 16])
    table = pq.read_table(cache[0] / "train/images-00000.parquet")  # a.png and b.jpg
    ds = FeatureDataset.load(cache[0], "train", world["params"], RELATIONS)
    for name in ("object_crops", "depth_crops"):
        array = table.column(name).chunk(0).to_numpy_ndarray()
        assert array.dtype == getattr(ds, name).dtype
        np.testing.assert_array_equal(array, getattr(ds, name)[:2])


def test_a_cache_of_an_older_schema_version_is_refused(world, cache, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(cache[0], old)
    path = old / "train/images-00001.parquet"
    table = pq.read_table(path)
    meta = json.loads(table.schema.metadata[b"remote.features"])
    meta["schema_version"] = 2
    pq.write_table(table.replace_schema_metadata({b"remote.features": json.dumps(meta)}), path)
    with pytest.raises(
        StaleCacheError,
        match=rf"{path}: cache schema version 2, this code reads 3: rerun the features stage",
    ):
        FeatureDataset.load(old, "train", world["params"], RELATIONS)


def test_a_stale_cache_is_refused_naming_the_setting(world, cache):
    changes = [
        ("data.max_objects", 5),
        ("data.max_seq", 64),
        ("data.use_box", False),
        ("data.use_caption", False),
        ("data.use_depth", False),
        ("features.crop_size", 32),
        ("features.crop_resize", "stretch"),
        ("features.depth_scale", "minmax"),
        ("model.text_model", "tiny"),
        ("model.vision_model", "deit_tiny_patch16_224"),  # another pixel normalization
    ]
    assert {key for key, _ in changes} == set(cache_settings(world["params"]))
    for key, value in changes:
        params = apply_overrides(world["params"], {key: value})
        with pytest.raises(StaleCacheError, match=rf"{key}=.*params say {key}={value!r}"):
            FeatureDataset.load(cache[0], "train", params, RELATIONS)
    # pad_to_max is the loader's business: the same cache serves both
    FeatureDataset.load(
        cache[0], "train", apply_overrides(world["params"], {"data.pad_to_max": False}), RELATIONS
    )
    with pytest.raises(FileNotFoundError, match="run the features stage"):
        FeatureDataset.load(world["root"] / "nowhere", "train", world["params"], RELATIONS)
    # A cache is tied to its label map: ids mean names only under the map it was built with.
    for other in (RELATIONS[:3], [*RELATIONS, "/per/per/extra"], [RELATIONS[0], *RELATIONS[:0:-1]]):
        with pytest.raises(
            StaleCacheError, match=rf"another label map \(4 labels.*expected {len(other)} labels"
        ):
            FeatureDataset.load(cache[0], "train", world["params"], other)


def test_a_split_without_image_shards_or_with_a_foreign_parquet_file_is_refused(
    world, cache, tmp_path
):
    copy = tmp_path / "copy"
    shutil.copytree(cache[0], copy)
    for path in (copy / "train").glob("images-*.parquet"):
        path.unlink()
    with pytest.raises(FileNotFoundError, match=rf"^{copy / 'train'}: no feature shards"):
        FeatureDataset.load(copy, "train", world["params"], RELATIONS)
    path = copy / "valid" / "samples-00000.parquet"  # rewritten by a tool that drops metadata
    pq.write_table(pq.read_table(path).replace_schema_metadata(None), path)
    with pytest.raises(StaleCacheError, match=rf"^{path}: not a features cache file"):
        FeatureDataset.load(copy, "valid", world["params"], RELATIONS)


def cache_tables(out, split):
    """A split's sample and image tables as the cache holds them, and the metadata the dataset
    takes with them."""
    folder = out / split
    tables = [
        pa.concat_tables(pq.read_table(p) for p in sorted(folder.glob(f"{kind}-*.parquet")))
        for kind in ("samples", "images")
    ]
    meta = json.loads(pq.read_schema(folder / "samples-00000.parquet").metadata[METADATA_KEY])
    return *tables, {k: meta[k] for k in ("markers", "pad_token_id", "pixel_mean", "pixel_std")}


def test_tables_that_disagree_with_themselves_are_refused(world, cache):
    samples, images, meta = cache_tables(cache[0], "train")
    assert samples.column("image_index").to_pylist() == [0, 0, 0, 0, 1, 2]  # t5 is on c.png
    with pytest.raises(StaleCacheError, match="samples point past the image table"):
        FeatureDataset(samples, images.slice(0, 2), world["params"], **meta)
    lengths = samples.column("length").to_numpy().copy()
    lengths[0] += 1
    wrong = samples.set_column(
        samples.schema.get_field_index("length"), "length", pa.array(lengths, pa.int32())
    )
    with pytest.raises(StaleCacheError, match="token lists disagree with the length column"):
        FeatureDataset(wrong, images, world["params"], **meta)


def test_text_is_padded_with_the_pad_token_the_cache_records(world, cache):
    # The tiny vocabulary's [PAD] is 0; another tokenizer's (RoBERTa's is 1) must pad as itself.
    samples, images, meta = cache_tables(cache[0], "train")
    assert meta["pad_token_id"] == 0
    for pad_to_max in (True, False):
        params = apply_overrides(world["params"], {"data.pad_to_max": pad_to_max})
        ds = FeatureDataset(samples, images, params, **{**meta, "pad_token_id": 99})
        unpadded = samples.take([3, 0])["input_ids"].to_pylist()
        assert len(unpadded[0]) < len(unpadded[1])  # padded in both modes
        width = 40 if pad_to_max else len(unpadded[1])
        expected = [ids + [99] * (width - len(ids)) for ids in unpadded]
        assert ds.batch([3, 0])["input_ids"].tolist() == expected


# ---------------------------------------------------------------------------------------------
# Batches


def test_batches_padded_to_max_seq_or_per_batch(world, cache):
    fixed = FeatureDataset.load(cache[0], "train", world["params"], RELATIONS)
    dynamic = FeatureDataset.load(
        cache[0], "train", apply_overrides(world["params"], {"data.pad_to_max": False}), RELATIONS
    )
    a = fixed.batch([3, 0])
    b = dynamic.batch([3, 0])
    lengths = [int(fixed.lengths[3]), int(fixed.lengths[0])]
    assert a["input_ids"].shape == (2, 40) and b["input_ids"].shape == (2, max(lengths))
    assert a["attention_mask"].sum(1).tolist() == lengths == b["attention_mask"].sum(1).tolist()
    assert (a["input_ids"][0, lengths[0] :] == 0).all()  # [PAD]
    for batch in (a, b):
        assert tokens(world, batch["input_ids"][1, : lengths[1]].tolist())[:3] == [
            "[CLS]", "<s1>", "bill",
        ]  # fmt: skip
        assert batch["token_type_ids"][1, : lengths[1]].tolist() == [0] * 12 + [1] * (
            lengths[1] - 12
        )
    for key in ("pixel_values", "depth_values", "boxes", "marker_pos", "labels", "object_slot"):
        assert torch.equal(a[key], b[key])
    assert a.keys() == {
        "input_ids", "token_type_ids", "attention_mask", "marker_pos", "object_slot",
        "pixel_values", "depth_values", "boxes", "num_objects", "labels", "pair_kind",
        "text_padded",
    }  # fmt: skip
    # The model skips its masks on this flag: it must say exactly whether a text is padded.
    assert a["text_padded"] is True and b["text_padded"] is (lengths[0] != lengths[1])
    assert fixed.batch([0])["text_padded"] is True and dynamic.batch([0])["text_padded"] is False
    dtypes = {k: v.dtype for k, v in a.items() if k != "text_padded"}
    floats = {"pixel_values", "depth_values", "boxes"}
    assert {k for k, d in dtypes.items() if d == torch.float32} == floats
    assert {d for k, d in dtypes.items() if k not in floats} == {torch.int64}
    assert a["pixel_values"].shape == (2, 4, 3, 16, 16)
    assert a["depth_values"].shape == (2, 4, 16, 16)


def test_an_item_is_one_sample_of_the_batch_without_its_batch_dimension(world, cache):
    params = apply_overrides(world["params"], {"data.pad_to_max": False})
    ds = FeatureDataset.load(cache[0], "train", params, RELATIONS)
    batch = ds.batch([2])
    item = ds[2]
    assert item.keys() == batch.keys() - {"text_padded"}  # a flag of the batch, not a sample
    for key, value in item.items():
        assert torch.equal(value, batch[key][0]), key
    assert item["input_ids"].shape == (int(ds.lengths[2]),)  # unpadded: its own length
    assert item["pixel_values"].shape == (4, 3, 16, 16) and item["labels"].shape == ()
    assert torch.equal(ds[-1]["labels"], ds[len(ds) - 1]["labels"])
    assert torch.equal(ds[-6]["input_ids"], ds[0]["input_ids"])
    for index in (6, -7):
        with pytest.raises(IndexError, match=f"index {index} out of range for 6 samples"):
            ds[index]


def test_the_loader_fetches_each_batch_in_one_call_and_gives_it_unchanged(world, cache):
    ds = FeatureDataset.load(cache[0], "train", world["params"], RELATIONS)
    calls = []
    real = ds.batch
    ds.__getitems__ = lambda indices: calls.append(list(indices)) or real(indices)
    subset = torch.utils.data.Subset(ds, [5, 1, 3, 0, 2])
    batches = list(make_loader(subset, 2))
    assert calls == [[5, 1], [3, 0], [2]]
    for indices, got in zip(calls, batches, strict=True):
        expected = real(indices)
        assert got.keys() == expected.keys()
        assert all(
            torch.equal(got[k], v) if torch.is_tensor(v) else got[k] == v
            for k, v in expected.items()
        )


def normalized_crop(world, image_id, slot, mean, std):
    """A crop as the tower sees it, from PIL and numpy alone: (x / 255 - mean) / std per channel."""
    image = Image.open(world["dataset"].image_path(image_id)).convert("RGB")
    w, h = image.size
    box = OBJECTS[image_id][f"[OBJ{slot}]"]
    crop = clip_reference(image.crop((box[0] * w, box[1] * h, box[2] * w, box[3] * h)), 16)
    return (crop / 255 - np.array(mean)[:, None, None]) / np.array(std)[:, None, None]


def assert_pixels_normalized(world, ds, mean, std):
    batch = ds.batch(range(len(ds)))
    for b, record in enumerate(RECORDS["train"]):
        for slot in range(4):
            pixels = batch["pixel_values"][b, slot].numpy()
            if f"[OBJ{slot}]" not in OBJECTS[record.image_id]:
                assert not pixels.any() and not batch["depth_values"][b, slot].any()
                continue
            expected = normalized_crop(world, record.image_id, slot, mean, std)
            np.testing.assert_allclose(pixels, expected, rtol=0, atol=2e-6)


def test_pixel_values_are_the_crops_clip_normalized_and_empty_slots_zero(world, cache):
    ds = FeatureDataset.load(cache[0], "train", world["params"], RELATIONS)
    assert_pixels_normalized(world, ds, CLIP_MEAN, CLIP_STD)
    # the tiny tower is a CLIP ViT: the cache records CLIP's constants, to the last digit
    meta = json.loads(
        pq.read_schema(cache[0] / "train/images-00000.parquet").metadata[b"remote.features"]
    )
    assert (meta["pixel_mean"], meta["pixel_std"]) == (list(CLIP_MEAN), list(CLIP_STD))


@pytest.mark.parametrize(
    "tower, mean, std",
    [
        ("deit_tiny_patch16_224", IMAGENET_MEAN, IMAGENET_STD),
        ("vit_tiny_patch16_224", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),  # AugReg's
    ],
)
def test_a_tower_chosen_by_name_brings_its_own_normalization(world, cache, tower, mean, std):
    params = apply_overrides(world["params"], {"model.vision_model": tower})
    out, _ = build(world, f"tower-{tower}", params)
    ds = FeatureDataset.load(out, "train", params, RELATIONS)
    assert_pixels_normalized(world, ds, mean, std)
    clip = FeatureDataset.load(cache[0], "train", world["params"], RELATIONS)
    np.testing.assert_array_equal(ds.object_crops, clip.object_crops)  # same crops, other units
    assert not torch.equal(ds.batch([0])["pixel_values"], clip.batch([0])["pixel_values"])


def test_make_loader_follows_its_sampler_and_covers_every_sample(world, cache):
    ds = FeatureDataset.load(cache[0], "train", world["params"], RELATIONS)

    def order(seed):
        generator = torch.Generator().manual_seed(seed)
        loader = make_loader(ds, 4, sampler=torch.utils.data.RandomSampler(ds, generator=generator))
        return [i for batch in loader for i in batch["labels"].tolist()], loader

    first, loader = order(7)
    assert first == order(7)[0]
    assert sorted(first) == sorted(RELATIONS.index(r.relation) for r in RECORDS["train"])
    orders = {tuple(order(seed)[0]) for seed in range(6)}
    assert len(orders) > 1
    assert [len(b["labels"]) for b in loader] == [4, 2]
    plain = make_loader(ds, 6)
    assert next(iter(plain))["labels"].tolist() == [
        RELATIONS.index(r.relation) for r in RECORDS["train"]
    ]
    # the worker and pinning options reach the DataLoader (not iterated: no worker processes)
    workers = make_loader(ds, 4, num_workers=2, pin_memory=True)
    assert (workers.num_workers, workers.persistent_workers, workers.pin_memory) == (2, True, True)
    assert (plain.num_workers, plain.persistent_workers, plain.pin_memory) == (0, False, False)


def test_ablation_switches_zero_their_inputs(world, cache):
    params = apply_overrides(
        world["params"], {"data.use_depth": False, "data.use_box": False, "data.use_caption": False}
    )
    out, report = build(world, "ablated", params, depth=None, captions=None)
    assert report["caption_segment"] is False
    ds = FeatureDataset.load(out, "train", params, RELATIONS)
    batch = ds.batch(range(len(ds)))
    full = FeatureDataset.load(cache[0], "train", world["params"], RELATIONS).batch(range(len(ds)))
    assert not batch["depth_values"].any() and full["depth_values"].any()
    assert not batch["boxes"].any() and full["boxes"].any()
    assert torch.equal(batch["pixel_values"], full["pixel_values"])
    assert not batch["token_type_ids"].any()
    assert (batch["marker_pos"][:, :, 1:] == -1).all()  # no <k>/<o> markers
    assert torch.equal(batch["marker_pos"][:, :, 0], full["marker_pos"][:, :, 0])
    # data.use_depth=false leaves the depth channel empty even when a depth store is passed
    out, _ = build(world, "ablated-depth", params, captions=None)
    assert not FeatureDataset.load(out, "train", params, RELATIONS).depth_crops.any()
    # a caption table whose backend is "none" means no caption segment either
    _, report = build(world, "nocap", captions=FakeCaptions({}, backend="none"))
    assert report["caption_segment"] is False


def test_an_undecodable_image_is_an_error_or_leaves_its_records_out(world, tmp_path):
    # As download does: a dataset whose image broke after download (images are not re-hashed).
    shutil.copytree(world["dataset"].root, tmp_path / "ds")
    broken = tmp_path / "ds" / "images" / "a.png"
    broken.write_bytes(broken.read_bytes()[:60])
    dataset = Dataset(tmp_path / "ds")
    with pytest.raises(DataError, match=rf"image 'a.png': image {broken}: .*left out"):
        build_features(dataset, tmp_path / "f1", world["params"], world["depth"], None)
    params = apply_overrides(world["params"], {"data.on_error": "skip"})
    report = build_features(dataset, tmp_path / "f2", params, world["depth"], None)
    train = report["splits"]["train"]
    # t0..t3 use a.png (it has objects, so it is opened); t4, t5 are kept.
    assert train["samples_left_out_for_undecodable_images"] == 4 and train["samples"] == 2
    ds = FeatureDataset.load(tmp_path / "f2", "train", params, RELATIONS)
    assert len(ds) == 2 and ds.batch([0, 1])["labels"].tolist() == [
        RELATIONS.index(r.relation) for r in RECORDS["train"][4:]
    ]
    assert report["splits"]["test"]["samples"] == 0


def test_missing_depth_map_is_an_error_or_zeros_under_skip(world):
    depth = FakeDepth({k: v for k, v in world["depth"].maps.items() if k != "b.jpg"})
    with pytest.raises(DataError, match=r"b\.jpg.*no depth map.*data.on_error=skip"):
        build(world, "nodepth", depth=depth)
    params = apply_overrides(world["params"], {"data.on_error": "skip"})
    out, report = build(world, "nodepth", params, depth=depth)
    assert report["splits"]["train"]["image_problems"]["count"] == 1
    # only the depth channel is lost: b.jpg's records (t4; v0 in valid) stay
    for split in ("train", "valid"):
        assert report["splits"][split]["samples_left_out_for_undecodable_images"] == 0
        assert report["splits"][split]["samples"] == len(RECORDS[split])
    ds = FeatureDataset.load(out, "train", params, RELATIONS)
    assert ds.sample_ids == [r.id for r in RECORDS["train"]]
    b = ds.image_ids.index("b.jpg")
    assert not ds.depth_crops[b].any() and ds.object_crops[b].any()


def test_objects_without_an_image_file_are_an_error_or_zeros_with_every_problem_said(world):
    # predict passes no image for an input line without one
    objects = OBJECTS["a.png"]
    with pytest.raises(
        DataError, match=r"^image 'a\.png': image has objects but no image file \(with data"
    ):
        featurize_image("a.png", None, objects, world["depth"], world["params"])
    skip = apply_overrides(world["params"], {"data.on_error": "skip"})
    got = featurize_image("a.png", None, objects, FakeDepth({}), skip)
    assert got.object_mask.tolist() == [True, False, True, False]
    assert not got.object_crops.any() and not got.depth_crops.any()
    image_problem, depth_problem = got.problem.split("; ")
    assert image_problem == "image has objects but no image file"
    assert depth_problem == "no depth map (a.png)"


def test_only_a_missing_depth_map_becomes_zeros_and_a_bad_one_is_an_error(world):
    path = world["dataset"].image_path("a.png")
    skip = apply_overrides(world["params"], {"data.on_error": "skip"})

    class BrokenDepth:
        def get(self, image_id):
            raise IndexError("a broken depth store")

    with pytest.raises(IndexError, match="a broken depth store"):
        featurize_image("a.png", path, OBJECTS["a.png"], BrokenDepth(), skip)
    nan_map = world["depth"].get("a.png")
    nan_map[3, 4] = np.nan
    for scale in ("raw", "minmax"):
        params = apply_overrides(world["params"], {"features.depth_scale": scale})
        with pytest.raises(DataError, match=r"depth map of 'a\.png': has NaN or infinite"):
            featurize_image("a.png", path, OBJECTS["a.png"], FakeDepth({"a.png": nan_map}), params)


def test_stage_help_lists_the_options():
    result = subprocess.run(
        [sys.executable, "-m", "stages", "features", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    for option in ("--params", "--dataset", "--depth", "--captions", "--out"):
        assert option in result.stdout


def test_stage_runs_on_the_synthetic_dataset_with_the_real_readers(tmp_path):
    import yaml
    from typer.testing import CliRunner

    from pipeline.caption.run import run_caption
    from pipeline.config import params_to_dict
    from pipeline.data.synthetic import generate_synthetic
    from pipeline.depth.run import run_depth
    from pipeline.depth.store import DepthStore
    from stages.cli import app

    params = default_params({"data.max_seq": 48})
    synthetic = replace(DEFAULTS.data.synthetic, seed=3, train=6, valid=3, test=3, image_size=48)
    generate_synthetic(tmp_path / "raw", synthetic, params.data.max_objects)
    dataset = Dataset(tmp_path / "raw")
    run_depth(dataset, tmp_path / "depth", params.depth, params.data.on_error)
    run_caption(dataset, tmp_path / "captions", params.caption, progress=False)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params_to_dict(params)))
    args = [
        "features",
        "--params",
        str(tmp_path / "params.yaml"),
        "--dataset",
        str(tmp_path / "raw"),
    ]
    for name in ("depth", "captions", "out"):
        args += [f"--{name}", str(tmp_path / name)]
    mllm = {
        **params_to_dict(params),
        "caption": {**params_to_dict(params)["caption"], "backend": "mllm"},
    }
    (tmp_path / "mllm.yaml").write_text(yaml.safe_dump(mllm))
    result = CliRunner().invoke(app, [*args[:2], str(tmp_path / "mllm.yaml"), *args[3:]])
    assert result.exit_code == 1 and "captions made by caption.backend 'file'" in result.output
    assert not (tmp_path / "out").exists()
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["caption_segment"] is True
    assert report["splits"]["train"]["captions_missing"] == {"text": 0, "object": 0}

    ds = FeatureDataset.load(tmp_path / "out", "train", params, label_list(dataset.relations))
    records = dataset.records("train")
    batch = ds.batch(range(len(ds)))
    assert batch["labels"].tolist() == [dataset.relations[r.relation] for r in records]
    assert (batch["token_type_ids"].sum(1) > 0).all()  # every sample has its caption segment
    store = DepthStore(tmp_path / "depth")
    image_id = records[0].image_id
    i = ds.image_ids.index(image_id)
    boxes, mask = object_layout(dataset.objects[image_id], params.data.max_objects, image_id)
    size = Image.open(dataset.image_path(image_id)).size
    direct = crop_depth(store.get(image_id), boxes, mask, 64, size)  # raw values (the default)
    np.testing.assert_allclose(ds.depth_crops[i], direct, atol=1e-3)
    assert ds.depth_crops[i][mask].astype(np.float32).std() > 0


def test_empty_splits_are_written_and_read_back(world, tmp_path):
    data = tmp_path / "dataset"
    (data / "images").mkdir(parents=True)
    shutil.copy(world["dataset"].root / "images" / "b.jpg", data / "images" / "b.jpg")
    write_records(data / "records" / "train.jsonl", [])
    write_records(data / "records" / "valid.jsonl", [])
    write_records(data / "records" / "test.jsonl", RECORDS["valid"][:1])
    write_json(data / "objects.json", OBJECTS)
    write_json(data / "relations.json", {r: i for i, r in enumerate(RELATIONS)})
    write_json(data / "manifest.json", {"source": "test", "version": "1"})
    out = tmp_path / "features"
    report = build_features(Dataset(data), out, world["params"], world["depth"], None)
    assert report["splits"]["train"]["samples"] == 0
    assert len(FeatureDataset.load(out, "train", world["params"], RELATIONS)) == 0
    test = FeatureDataset.load(out, "test", world["params"], RELATIONS)
    assert test.image_ids == ["b.jpg"] and test.batch([0])["labels"].tolist() == [0]


@pytest.mark.parametrize("use_depth, use_caption", [(True, True), (False, True), (True, False)])
def test_stage_fingerprints_the_depth_and_caption_inputs_it_reads(
    tmp_path, monkeypatch, use_depth, use_caption
):
    # A killed build resumes only from shards of the same inputs: the stage must hand the depth
    # store and caption table it reads to build_features as inputs, and no reader it does not use.
    import yaml
    from typer.testing import CliRunner

    import pipeline.caption.table
    import pipeline.data.records
    import pipeline.depth.store
    from pipeline.config import params_to_dict
    from stages.cli import app

    class Reader:
        def __init__(self, path):
            self.path = path

        def check_made_with(self, caption_params):
            pass

    seen = {}

    def fake_build(dataset, out, params, depth, captions, *, input_paths=()):
        seen.update(depth=depth and depth.path, captions=captions and captions.path)
        seen["input_paths"] = list(input_paths)
        return {"splits": {}}

    monkeypatch.setattr(pipeline.caption.table, "CaptionTable", Reader)
    monkeypatch.setattr(pipeline.depth.store, "DepthStore", Reader)
    monkeypatch.setattr(pipeline.data.records, "Dataset", Reader)
    monkeypatch.setattr(build_module, "build_features", fake_build)
    params = default_params({"data.use_depth": use_depth, "data.use_caption": use_caption})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params_to_dict(params)))
    args = ["features", "--params", str(tmp_path / "params.yaml")]
    for name in ("dataset", "depth", "captions", "out"):
        args += [f"--{name}", str(tmp_path / name)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    depth = tmp_path / "depth" if use_depth else None
    captions = tmp_path / "captions" if use_caption else None
    assert seen == {"depth": depth, "captions": captions, "input_paths": [depth, captions]}
