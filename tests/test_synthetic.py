"""The synthetic generator: determinism, coverage, and labels recomputed from the saved files."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from pipeline.config import SyntheticParams, default_params
from pipeline.data.records import PAIR_KINDS, SPLITS, UMRE_RELATIONS, Dataset
from pipeline.data.synthetic import (
    GENERATOR_VERSION,
    VOCABULARY,
    box_contains,
    generate_synthetic,
)

DEFAULTS = default_params()

SMALL = replace(DEFAULTS.data.synthetic, seed=5, train=20, valid=8, test=8, image_size=64)
MEDIUM = replace(DEFAULTS.data.synthetic, seed=7, train=150, valid=60, test=60, image_size=64)

# Written here, not imported, so the rules are checked against an independent reading of the text.
CLAUSE_WORDS = {
    "/per/org/member_of": ("joined", "member", "signed"),
    "/per/org/leader_of": ("leads", "head", "chief"),
    "/per/loc/place_of_birth": ("born", "birthplace", "native"),
    "/org/loc/locate_at": ("based", "office", "offices"),
}
CUE_WORDS = {
    "/per/per/self": ("pictured", "shows", "smiles"),
    "/per/loc/place_of_residence": ("lives", "home", "moved"),
    "/per/misc/present_in": ("attended", "marched", "protest"),
}
CUE_NOUN = {
    "/per/per/self": "person",
    "/per/loc/place_of_residence": "building",
    "/per/misc/present_in": "flag",
}


def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def medium(tmp_path_factory) -> Dataset:
    root = tmp_path_factory.mktemp("syn") / "data"
    generate_synthetic(root, MEDIUM)
    return Dataset(root)


def test_same_seed_gives_byte_identical_files_and_another_seed_does_not(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    generate_synthetic(a, SMALL)
    generate_synthetic(b, SMALL)
    generate_synthetic(c, dataclasses.replace(SMALL, seed=6))
    tree_a, tree_b, tree_c = _tree(a), _tree(b), _tree(c)
    assert tree_a == tree_b
    expected = {"records/train.jsonl", "objects.json", "relations.json", "manifest.json"}
    expected |= {"captions.json", "images/syn_train_00000.png", "depth/syn_train_00000.npy"}
    assert expected <= set(tree_a)
    assert tree_a["records/train.jsonl"] != tree_c["records/train.jsonl"]
    assert tree_a["images/syn_train_00000.png"] != tree_c["images/syn_train_00000.png"]


def test_regenerating_replaces_the_folder(tmp_path):
    root = tmp_path / "data"
    generate_synthetic(root, SMALL)
    (root / "stale.txt").write_text("old")
    generate_synthetic(root, SMALL)
    assert not (root / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no temp folders left


def test_every_split_has_all_pair_kinds_and_none(tmp_path):
    generate_synthetic(tmp_path / "data", SMALL)
    ds = Dataset(tmp_path / "data")
    for split in SPLITS:
        records = ds.records(split)
        assert len(records) == getattr(SMALL, split)
        assert {r.pair_kind for r in records} == set(PAIR_KINDS), split
        assert "none" in {r.relation for r in records}, split


def test_mix_of_pair_kinds_and_none_share(medium):
    records = [r for s in SPLITS for r in medium.records(s)]
    kinds = Counter(r.pair_kind for r in records)
    assert max(kinds.values()) - min(kinds.values()) <= 1
    none_share = sum(r.relation == "none" for r in records) / len(records)
    assert 0.2 <= none_share <= 0.3
    for kind in PAIR_KINDS:  # `none` comes from every pair kind, and so does every positive
        labels = Counter(r.relation for r in records if r.pair_kind == kind)
        assert labels["none"] >= 0.15 * kinds[kind]
        assert len(labels) >= 3


def test_texts_spans_captions_and_vocabulary(medium):
    vocabulary = set(VOCABULARY)
    captions = json.loads(medium.captions_path.read_text())
    for split in SPLITS:
        for r in medium.records(split):
            assert 10 <= len(r.text_tokens) <= 25
            assert set(r.text_tokens) <= vocabulary
            for ent in (r.head, r.tail):
                if ent.kind == "text":
                    start, end = ent.span
                    assert " ".join(r.text_tokens[start:end]) == ent.name
                    assert len(ent.name.split()) == end - start
                assert ent.name in captions[r.image_id]
    for per_image in captions.values():
        for key, caption in per_image.items():
            assert set(caption.split()) <= vocabulary
            if key.startswith("[OBJ"):
                article, colour, noun = caption.split()
                assert article == ("an" if colour[0] in "aeiou" else "a")
                assert noun in ("person", "building", "flag")
            else:
                assert caption in ("a person", "an organisation", "a place")
    names = {ent for per_image in captions.values() for ent in per_image if "[OBJ" not in ent}
    assert any(len(name.split()) >= 2 for name in names)


def test_relations_file_follows_umre_order(medium):
    relations = medium.relations
    assert relations["none"] == 0
    assert sorted(relations.values()) == list(range(len(relations)))
    order = sorted(relations, key=relations.get)
    assert order == [label for label in UMRE_RELATIONS if label in relations]
    used = {r.relation for s in SPLITS for r in medium.records(s)}
    assert used == set(relations)


def _pixels(box: list[float], size: int) -> tuple[int, int, int, int]:
    return tuple(round(v * size) for v in box)


def _scene(ds: Dataset, image_id: str, size: int):
    """Per object: (noun from the caption, pixel box, depth read at the box-centre pixel)."""
    depth = np.load(ds.depth_path(image_id))
    captions = json.loads(ds.captions_path.read_text())[image_id]
    scene = {}
    for name, box in ds.objects[image_id].items():
        x1, y1, x2, y2 = _pixels(box, size)
        scene[name] = (
            captions[name].split()[-1],
            (x1, y1, x2, y2),
            float(depth[(y1 + y2) // 2, (x1 + x2) // 2]),
        )
    return scene, depth


def test_images_depth_maps_and_boxes(medium):
    size = MEDIUM.image_size
    objects = medium.objects
    for image_id in medium.image_ids():
        with Image.open(medium.image_path(image_id)) as im:
            assert im.size == (size, size) and im.mode == "RGB"
        scene, depth = _scene(medium, image_id, size)
        assert depth.dtype == np.float32 and depth.shape == (size, size)
        assert 2 <= len(objects[image_id]) <= 12
        assert sorted(objects[image_id]) == sorted(f"[OBJ{k}]" for k in range(len(scene)))
        depths = [d for _, _, d in scene.values()]
        assert len(set(depths)) == len(depths)  # distinct, and each visible at its centre
        # A Depth-Anything-like scale (raw relative inverse depth), not [0, 1]: 1.5 .. 10.
        assert all(1.5 <= d <= 10.0 for d in depths)
        assert set(np.unique(depth).tolist()) <= {0.0, *depths}
        assert (depth == 0).any()  # background is 0
        for _, (x1, y1, x2, y2), d in scene.values():
            assert 0.19 * size <= x2 - x1 <= 0.46 * size and 0.19 * size <= y2 - y1 <= 0.46 * size
            assert (depth[:y1] != d).all() and (
                depth[y2:] != d
            ).all()  # the object stays in its box
            assert (depth[:, :x1] != d).all() and (depth[:, x2:] != d).all()


# The module docstring's levels: DEPTH_SCALE (10) times 0.15, 0.20, ..., 1.0.
DEPTH_LEVELS = {1.5 + 0.5 * k for k in range(18)}
# Written here, not imported: the RGB each caption colour is drawn with.
RGB = {
    "red": (214, 39, 40),
    "green": (44, 160, 44),
    "blue": (31, 90, 200),
    "orange": (245, 127, 14),
    "purple": (148, 80, 189),
}


def test_object_depths_use_every_documented_level_and_no_other(medium):
    size = MEDIUM.image_size
    seen = set()
    for image_id in medium.image_ids():
        scene, _ = _scene(medium, image_id, size)
        seen |= {d for _, _, d in scene.values()}
    assert seen == DEPTH_LEVELS


def test_boxes_are_whole_pixels_inside_the_image(medium):
    size = MEDIUM.image_size
    for boxes in medium.objects.values():
        for box in boxes.values():
            pixels = [v * size for v in box]
            assert pixels == pytest.approx([round(v) for v in pixels], abs=1e-4), box
            x1, y1, x2, y2 = (round(v) for v in pixels)
            assert 0 <= x1 < x2 <= size and 0 <= y1 < y2 <= size


def test_each_objects_visible_pixels_lie_on_its_shape_in_its_colour(medium):
    # Circles fill the ellipse inscribed in their box, triangles have their apex at the top centre
    # and their base along the bottom edge, squares fill the box; the background is off-white.
    size = MEDIUM.image_size
    captions = json.loads(medium.captions_path.read_text())
    for image_id in medium.image_ids():
        scene, depth = _scene(medium, image_id, size)
        with Image.open(medium.image_path(image_id)) as im:
            rgb = np.asarray(im).astype(int)
        background = rgb[depth == 0]
        assert ((background >= [232, 230, 224]) & (background <= [244, 242, 236])).all()
        for name, (noun, (x1, y1, x2, y2), d) in scene.items():
            ys, xs = np.nonzero(depth == d)
            x, y = xs + 0.5, ys + 0.5  # pixel centres
            cx, cy, half_w, half_h = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2, (y2 - y1) / 2
            if noun == "person":
                assert (((x - cx) / half_w) ** 2 + ((y - cy) / half_h) ** 2 <= 1.0).all(), name
            elif noun == "flag":
                assert (np.abs(x - cx) <= half_w * (y - y1) / (y2 - y1)).all(), name
            colour = captions[image_id][name].split()[1]
            assert (rgb[ys, xs] == RGB[colour]).all(), (image_id, name, colour)


def _segment_index(tokens: tuple[str, ...], span: tuple[int, int]) -> int:
    """Which " . "-separated segment of the post a span lies in."""
    return tokens[: span[0]].count(".")


def _expected_text_label(tokens: tuple[str, ...], head, tail) -> str:
    """A relation holds when both marked mentions sit in one segment with a relation word."""
    segment = _segment_index(tokens, head.span)
    if segment != _segment_index(tokens, tail.span):
        return "none"
    words = set(" ".join(tokens).split(" . ")[segment].split())
    labels = [label for label, ws in CLAUSE_WORDS.items() if words & set(ws)]
    assert len(labels) <= 1
    return labels[0] if labels else "none"


def _expected_object_label(scene, head: str, tail: str) -> str:
    (h_noun, h_box, h_depth), (t_noun, t_box, t_depth) = scene[head], scene[tail]
    cx, cy = (t_box[0] + t_box[2]) / 2, (t_box[1] + t_box[3]) / 2
    if h_noun == "building" and h_box[0] < cx < h_box[2] and h_box[1] < cy < h_box[3]:
        return "/loc/loc/contain"
    if h_noun == "flag" and t_noun == "building":
        return "/misc/loc/held_on"
    if h_noun == t_noun == "person" and h_depth > t_depth:
        return "/per/per/opponent"
    return "none"


def test_labels_follow_the_rules_recomputed_from_saved_files(medium):
    size = MEDIUM.image_size
    seen = Counter()
    for split in SPLITS:
        for r in medium.records(split):
            if r.pair_kind == "text-text":
                expected = _expected_text_label(r.text_tokens, r.head, r.tail)
            elif r.pair_kind == "text-object":
                scene, _ = _scene(medium, r.image_id, size)
                family = [lab for lab, ws in CUE_WORDS.items() if set(ws) & set(r.text_tokens)]
                assert len(family) <= 1
                # The marked person mention is the one in the cue (not in the relation clause).
                segment = " ".join(r.text_tokens).split(" . ")[
                    _segment_index(r.text_tokens, r.head.span)
                ]
                assert not set(segment.split()) & {w for ws in CLAUSE_WORDS.values() for w in ws}
                fits = family and scene[r.tail.name][0] == CUE_NOUN[family[0]]
                expected = family[0] if fits else "none"
                if not fits:
                    seen["text-object none " + ("with cue" if family else "without cue")] += 1
            else:
                scene, _ = _scene(medium, r.image_id, size)
                expected = _expected_object_label(scene, r.head.name, r.tail.name)
            assert r.relation == expected, (r.id, r.text_tokens, r.head, r.tail)
    assert seen["text-object none with cue"] > 0  # the image decides, not only the text
    assert seen["text-object none without cue"] > 0  # and a cue with no family: the text alone


def test_box_contains_needs_the_centre_strictly_inside():
    box = (10, 20, 30, 40)
    assert box_contains(box, (12, 22, 18, 28))  # centre (15, 25)
    assert box_contains(box, (29, 39, 30, 40))  # centre (29.5, 39.5)
    assert box_contains(box, (0, 0, 50, 70))  # only the centre counts: (25, 35)
    for on_edge in [(28, 22, 32, 28), (8, 22, 12, 28), (12, 18, 18, 22), (12, 38, 18, 42)]:
        assert not box_contains(box, on_edge), on_edge  # centre x = 30, x = 10, y = 20, y = 40
    assert not box_contains(box, (31, 22, 35, 28))


def test_depth_and_geometry_decide_object_pairs_both_ways(medium):
    size = MEDIUM.image_size
    cases = Counter()
    for split in SPLITS:
        for r in medium.records(split):
            if r.pair_kind != "object-object":
                continue
            scene, depth = _scene(medium, r.image_id, size)
            (hn, hb, _), (tn, tb, _) = scene[r.head.name], scene[r.tail.name]
            if hn == tn == "person":
                apart = hb[2] <= tb[0] or tb[2] <= hb[0] or hb[3] <= tb[1] or tb[3] <= hb[1]
                cases[(r.relation, "apart" if apart else "overlap")] += 1
            if hn == "building":  # containment: geometry decides, both outcomes occur
                cases[("square head", r.relation)] += 1
    for label in ("/per/per/opponent", "none"):
        for layout in ("apart", "overlap"):
            assert cases[(label, layout)] > 0, cases
    assert cases[("square head", "/loc/loc/contain")] > 0 and cases[("square head", "none")] > 0


def test_manifest_counts_and_checksums_match_the_files(medium):
    manifest = medium.manifest
    assert manifest["source"] == "synthetic" and manifest["params"]["seed"] == MEDIUM.seed
    for split in SPLITS:
        records = medium.records(split)
        counts = manifest["splits"][split]
        assert counts["samples"] == len(records) == getattr(MEDIUM, split)
        assert counts["pair_kinds"] == dict(Counter(r.pair_kind for r in records))
        assert counts["relations"] == dict(Counter(r.relation for r in records))
        assert counts["images"] == len({r.image_id for r in records})
    for name, digest in manifest["sha256"].items():
        assert hashlib.sha256((medium.root / name).read_bytes()).hexdigest() == digest
    assert (
        manifest["images"]
        == len(medium.image_ids())
        == len(list((medium.root / "images").iterdir()))
    )


def test_images_per_split_and_bad_params(tmp_path):
    params = replace(
        DEFAULTS.data.synthetic,
        seed=1,
        train=12,
        valid=6,
        test=6,
        image_size=48,
        images_per_split=3,
    )
    manifest = generate_synthetic(tmp_path / "d", params, max_objects=4)
    assert [manifest["splits"][s]["images"] for s in SPLITS] == [3, 3, 3]
    assert manifest["params"] == {
        "seed": 1,
        "train": 12,
        "valid": 6,
        "test": 6,
        "image_size": 48,
        "images_per_split": 3,
        "max_objects": 4,
    }
    assert max(len(v) for v in Dataset(tmp_path / "d").objects.values()) <= 4
    with pytest.raises(ValueError, match="images_per_split"):
        generate_synthetic(
            tmp_path / "e", replace(DEFAULTS.data.synthetic, train=40, images_per_split=2)
        )
    with pytest.raises(ValueError, match="max_objects"):
        generate_synthetic(tmp_path / "f", SMALL, max_objects=1)
    assert not (tmp_path / "e").exists() and not (tmp_path / "f").exists()


def _tiny(**sizes: int) -> SyntheticParams:
    return replace(DEFAULTS.data.synthetic, seed=3, image_size=32, **sizes)


def test_record_ids_count_up_within_each_split(tmp_path):
    generate_synthetic(tmp_path / "d", SMALL)
    ds = Dataset(tmp_path / "d")
    for split in SPLITS:
        ids = [r.id for r in ds.records(split)]
        assert ids == [f"syn-{split}-{i:05d}" for i in range(getattr(SMALL, split))]


def test_images_per_split_default_is_one_image_per_two_samples_rounded_up(tmp_path):
    params = _tiny(train=7, valid=3, test=4, images_per_split=0)
    manifest = generate_synthetic(tmp_path / "d", params, max_objects=4)
    assert [manifest["splits"][s]["images"] for s in SPLITS] == [4, 2, 2]
    # More images asked than samples: one sample per image, and no image without a sample.
    params = _tiny(train=7, valid=3, test=4, images_per_split=5)
    manifest = generate_synthetic(tmp_path / "e", params, max_objects=4)
    assert [manifest["splits"][s]["images"] for s in SPLITS] == [5, 3, 4]
    ds = Dataset(tmp_path / "e")
    assert sorted(ds.objects) == ds.image_ids()
    assert sorted(p.name for p in (tmp_path / "e" / "images").iterdir()) == ds.image_ids()


def test_at_most_nine_samples_share_an_image(tmp_path):
    manifest = generate_synthetic(
        tmp_path / "d", _tiny(train=9, valid=3, test=3, images_per_split=1), max_objects=6
    )
    assert [manifest["splits"][s]["images"] for s in SPLITS] == [1, 1, 1]
    with pytest.raises(ValueError, match=r"10 samples over 1 images is 10 per image \(expected"):
        generate_synthetic(tmp_path / "e", _tiny(train=10, valid=3, test=3, images_per_split=1))


def test_smallest_accepted_sizes_and_the_first_refused(tmp_path):
    generate_synthetic(tmp_path / "d", _tiny(train=3, valid=3, test=3, images_per_split=0))
    assert [len(Dataset(tmp_path / "d").records(s)) for s in SPLITS] == [3, 3, 3]
    with pytest.raises(ValueError, match="image_size must be at least 32, found 31"):
        generate_synthetic(tmp_path / "e", replace(_tiny(train=3, valid=3, test=3), image_size=31))
    with pytest.raises(ValueError, match="valid needs at least 3 samples, found 2"):
        generate_synthetic(tmp_path / "f", _tiny(train=3, valid=2, test=3))
    assert not (tmp_path / "e").exists() and not (tmp_path / "f").exists()


def test_max_objects_is_reached_and_never_passed(tmp_path):
    params = _tiny(train=12, valid=6, test=6, images_per_split=0)
    generate_synthetic(tmp_path / "two", params, max_objects=2)
    assert {len(v) for v in Dataset(tmp_path / "two").objects.values()} == {2}
    generate_synthetic(tmp_path / "three", params, max_objects=3)
    assert {len(v) for v in Dataset(tmp_path / "three").objects.values()} == {2, 3}


def _decoded_pixels(path: Path) -> bytes:
    """An image's decoded pixels (the same for any PNG encoder)."""
    with Image.open(path) as im:
        return np.asarray(im).tobytes()


def _pixels_digest(path: Path) -> str:
    return hashlib.sha256(_decoded_pixels(path)).hexdigest()


def test_each_split_draws_its_own_scenes(tmp_path):
    generate_synthetic(tmp_path / "a", SMALL)
    generate_synthetic(tmp_path / "b", replace(SMALL, train=SMALL.train + 3))
    a, b = _tree(tmp_path / "a"), _tree(tmp_path / "b")
    # A split's size changes only that split's files.
    for name in a:
        if "train" not in name and name not in ("objects.json", "captions.json", "manifest.json"):
            assert a[name] == b[name], name
    # No scene is repeated across splits (the splits do not share a random stream).
    images = sorted((tmp_path / "a" / "images").iterdir())
    assert len({_pixels_digest(p) for p in images}) == len(images)
    texts = {s: {r.text_tokens for r in Dataset(tmp_path / "a").records(s)} for s in SPLITS}
    assert not texts["train"] & texts["valid"] and not texts["train"] & texts["test"]


def _content_digests(root: Path) -> dict[str, str]:
    """sha256 per folder or top-level file of a dataset, over names and contents: decoded pixels
    and depth values (a new PNG encoder gives the same digest), the manifest left out."""
    parts: dict[str, Any] = {}
    for path in sorted(root.rglob("*")):
        if not path.is_file() or path.name == "manifest.json":
            continue
        if path.suffix == ".png":
            content = _decoded_pixels(path)
        elif path.suffix == ".npy":
            content = np.load(path).tobytes()
        else:
            content = path.read_bytes()
        digest = parts.setdefault(path.relative_to(root).parts[0], hashlib.sha256())
        digest.update(path.name.encode() + content)
    return {part: digest.hexdigest() for part, digest in parts.items()}


def test_generator_output_is_pinned_to_its_version(medium, tmp_path):
    # Any change to what the generator draws (placement, planted containment, sampling weights,
    # noise, object names) changes the committed pipeline outputs: bump GENERATOR_VERSION, rerun
    # `dvc repro`, and write the new digests here. The medium set's records catch the sampling
    # weights, which the small one is too small to feel.
    generate_synthetic(tmp_path / "d", SMALL)
    assert GENERATOR_VERSION == "2"
    assert _content_digests(medium.root)["records"] == (
        "0eb06118792a724456392745fb7cdb95c762ca3f11d5bc0e1702ad5c97604dd9"
    )
    assert _content_digests(tmp_path / "d") == {
        "captions.json": "7eb143f08ef2cb9dae4f0d8409b7fab14fcbb73ce2bcac55cb0e9a0c4c94aae7",
        "depth": "0dde8b8719bae351bb5a659076f8190af0bc612f5640b2dabd1e0f4328a74f39",
        "images": "90d3bcc455c8e213f1a62e4504cc8c8e4351685aea65bd1ef2c9e3169ee97049",
        "objects.json": "3e506281944839df3ac05aafbfb285b1da6cf4f44af8b5389f6e3b849997f848",
        "records": "ba57a439a66d913c534357528ca780eb4ea87a880cd640607a44f6da27c10df0",
        "relations.json": "9c1153a33229cc4e8fb3a3d469f53abd03a88ef5721f26baae98c6a34b8b40f9",
    }


def test_atomic_write_gives_files_the_usual_mode(tmp_path):
    import os

    from pipeline.io import atomic_write_text

    target = tmp_path / "out.txt"
    atomic_write_text(target, "x")
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask
    assert target.read_text() == "x"


def test_read_json_errors_name_the_file_and_line(tmp_path):
    from pipeline.io import DataError, read_json

    bad = tmp_path / "captions.json"
    bad.write_text('{\n  "a": 1,\n  oops\n}\n')
    with pytest.raises(DataError, match=r"captions\.json:3: not valid JSON"):
        read_json(bad, "caption file")
    with pytest.raises(DataError, match=r"missing\.json: caption file not found"):
        read_json(tmp_path / "missing.json", "caption file")
    good = tmp_path / "ok.json"
    good.write_text('{"k": [1]}')
    assert read_json(good, "x") == {"k": [1]}


def test_a_post_of_the_shortest_length_is_accepted():
    # 10 tokens is the shortest post the templates allow: no opener, "posted by PER", a
    # three-word clause with one-word names. The generator's own length check must let it pass.
    from pipeline.data.synthetic import _make_post

    post = _make_post(np.random.default_rng(7168))
    assert post.tokens == (
        "posted", "by", "Sara", "Nilsen", ".", "Acme", "wrote", "about", "Kyoto", ".",
    )  # fmt: skip
    assert post.cue_span == (2, 4) and post.spans == {"PER": (2, 4), "ORG": (5, 6), "LOC": (8, 9)}


def test_object_counts_reach_max_objects_up_to_the_eighteen_depth_levels():
    # Counts are drawn from 2 .. min(max_objects, 18): 18 distinct depth levels exist, so a
    # max_objects above 12 (the default slots) is honoured up to 18 and never passed.
    from pipeline.data.synthetic import _object_count

    rng = np.random.default_rng(0)
    for max_objects, expected in [(2, {2}), (5, {2, 3, 4, 5}), (16, set(range(2, 17)))]:
        drawn = {_object_count(rng, max_objects) for _ in range(3000)}
        assert drawn == expected, max_objects
    assert {_object_count(rng, 40) for _ in range(3000)} == set(range(2, 19))


def test_a_max_objects_above_the_depth_levels_still_generates(tmp_path):
    params = _tiny(train=12, valid=6, test=6, images_per_split=0)
    manifest = generate_synthetic(tmp_path / "d", params, max_objects=40)
    assert manifest["params"]["max_objects"] == 40
    counts = [len(v) for v in Dataset(tmp_path / "d").objects.values()]
    assert min(counts) >= 2 and max(counts) <= 18


def test_samples_sharing_an_image_are_distinct_pairs(tmp_path):
    # Nine samples on one image: three of each pair kind. No pair may be drawn twice (a
    # duplicate record); the same holds with two images per split.
    for images in (1, 2):
        params = _tiny(train=9, valid=9, test=9, images_per_split=images)
        generate_synthetic(tmp_path / str(images), params, max_objects=6)
        ds = Dataset(tmp_path / str(images))
        for split in SPLITS:
            records = ds.records(split)
            pairs = [(r.image_id, r.head, r.tail) for r in records]
            assert len(set(pairs)) == len(pairs) == 9, (images, split)
            assert len({r.image_id for r in records}) == images
