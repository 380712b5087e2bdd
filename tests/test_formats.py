"""Record-format reader: parsing, box normalization, and every validation error with its message."""

from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path

import pytest
from conftest import TOKENS, source_objects, source_records, write_images, write_lines

from pipeline.data.formats import (
    MNRE_RELATIONS,
    ImageIndex,
    Problems,
    SourceReader,
    json_key_lines,
    read_label_file,
)
from pipeline.data.records import UMRE_RELATIONS
from pipeline.io import DataError

GOOD = source_records()["train_set.json"][0]


def _reader(root: Path, on_error: str = "raise", objects: dict | None = None, max_objects=12):
    write_images(root / "UMKE_IMG")
    objects_file = root / "pos_umke.json"
    objects_file.write_text(json.dumps(source_objects() if objects is None else objects, indent=2))
    return SourceReader(
        labels=UMRE_RELATIONS,
        images=ImageIndex([root], prefer=("UMKE_IMG",)),
        problems=Problems(on_error),
        max_objects=max_objects,
        objects_file=objects_file,
    )


def test_reads_records_and_normalizes_pixel_boxes(tmp_path):
    reader = _reader(tmp_path)
    path = write_lines(tmp_path / "train_set.json", source_records()["train_set.json"] + [""])
    records = reader.read_split(path, "train")
    assert [r.id for r in records] == ["train-000001", "train-000002", "train-000003"]
    first, second, third = records
    assert first.text_tokens == tuple(TOKENS) and first.image_id == "img_a.jpg"
    assert (first.head.kind, first.head.name, first.head.span) == ("text", "Bill Cosby", (1, 3))
    assert first.tail.span == (5, 8) and first.relation == "/per/misc/present_in"
    assert (second.pair_kind, third.pair_kind) == ("text-object", "object-object")
    assert third.head.name == "[OBJ0]" and third.relation == "/loc/loc/contain"
    # img_a is 200 x 100: the pixel boxes of pos_umke.json are divided by its size.
    objects = reader.objects(["img_a.jpg", "img_b.jpg"])
    assert objects == {
        "img_a.jpg": {"[OBJ0]": [0.0, 0.0, 0.5, 0.5], "[OBJ1]": [0.1, 0.1, 0.6, 0.9]},
        "img_b.jpg": {},
    }


def test_mnre_none_spelling_and_label_list(tmp_path):
    reader = _reader(tmp_path)
    path = write_lines(tmp_path / "val.txt", [{**GOOD, "relation": "None"}])
    assert reader.read_split(path, "valid")[0].relation == "none"
    assert len(MNRE_RELATIONS) == 23 and MNRE_RELATIONS[0] == "none"
    assert len(set(MNRE_RELATIONS)) == 23 and "/per/per/self" not in MNRE_RELATIONS


def test_mnre_relations_have_the_ids_of_mnre_rel2id():
    # MNRE v2's rel2id as published with the dataset (its "None" spelled "none" here): a label
    # id is what a trained model's output means, so the order is part of the format.
    rel2id = {
        "None": 0, "/per/per/parent": 1, "/per/per/siblings": 2, "/per/per/couple": 3,
        "/per/per/neighbor": 4, "/per/per/peer": 5, "/per/per/charges": 6, "/per/per/alumi": 7,
        "/per/per/alternate_names": 8, "/per/org/member_of": 9, "/per/loc/place_of_residence": 10,
        "/per/loc/place_of_birth": 11, "/org/org/alternate_names": 12, "/org/org/subsidiary": 13,
        "/org/loc/locate_at": 14, "/loc/loc/contain": 15, "/per/misc/present_in": 16,
        "/per/misc/awarded": 17, "/per/misc/race": 18, "/per/misc/religion": 19,
        "/per/misc/nationality": 20, "/misc/misc/part_of": 21, "/misc/loc/held_on": 22,
    }  # fmt: skip
    assert {("None" if n == "none" else n): i for i, n in enumerate(MNRE_RELATIONS)} == rel2id


def _bad(**changes) -> dict:
    return {**GOOD, **changes}


BAD_LINES = [
    ("{'token': ['a', 'b'], 'h': ", r"malformed line \(found SyntaxError"),
    ("print('hi')", r"malformed line \(found \"print\('hi'\)\" at column 1, not a literal"),
    (
        "{'token': ['a'], 'h': null, 't': 1}",
        r"malformed line \(found 'null' at column 23, not a literal, expected a dict literal",
    ),
    ("{['token']: 1}", r"malformed line \(found TypeError: unhashable type: 'list'"),
    (_bad(relation=["none"]), r"malformed line \(found relation \['none'\], expected a string\)"),
    (
        repr({k: v for k, v in GOOD.items() if k != "img_id"}),
        r"malformed line \(found missing img_id",
    ),
    (
        _bad(h={"name": "Bill Cosby", "pos": [3, 12]}),
        r"span outside the tokens \(found h pos \[3, 12\), expected 0 <= start < end <= 9\)",
    ),
    (
        _bad(t={"name": "[OBJ1]", "pos": [10, 10, 250, 50]}),
        r"t \[OBJ1\]: bad box \(found \[10, 10, 250, 50\], normalized \[0.05, 0.1, 1.25, 0.5\], "
        r"expected 0 <= x1 < x2 <= 1",
    ),
    (
        _bad(t={"name": "[OBJ1]", "pos": [0.5, 0.2, 0.4, 0.3]}),
        r"t \[OBJ1\]: bad box \(found \[0.5, 0.2, 0.4, 0.3\]",
    ),
    (
        _bad(t={"name": "[OBJ7]", "pos": [0.1, 0.1, 0.2, 0.2]}),
        r"object \[OBJ7\] missing from pos_umke.json for image img_a.jpg "
        r"\(found \[OBJ0\], \[OBJ1\], expected \[OBJ7\]",
    ),
    (
        _bad(t={"name": "[OBJ12]", "pos": [0.1, 0.1, 0.2, 0.2]}),
        r"t: object \[OBJ12\] beyond the object slots \(found slot 12, expected at most 12 objects",
    ),
    (
        _bad(t={"name": "car", "pos": [0.1, 0.1, 0.2, 0.2]}),
        r"t: bad object name \(found 'car', expected '\[OBJk\]'\)",
    ),
    (
        _bad(h={"name": "Bill", "pos": [3, 3]}),
        r"span outside the tokens \(found h pos \[3, 3\), expected 0 <= start < end <= 9\)",
    ),
    (
        _bad(t={"name": "RT", "pos": [-1, 1]}),
        r"span outside the tokens \(found t pos \[-1, 1\), expected 0 <= start < end <= 9\)",
    ),
    (
        _bad(h={"name": "Bill", "pos": [True, 3]}),
        r"malformed line \(found h pos \[True, 3\], expected 2 ints\)",
    ),
    (_bad(img_id="nope.jpg"), r"missing image \(found no file 'nope.jpg', expected one under "),
    (
        _bad(relation="/per/per/friend"),
        r"unknown relation \(found '/per/per/friend', expected one of the 28 labels",
    ),
]


@pytest.mark.parametrize(("line", "message"), BAD_LINES)
def test_each_problem_raises_with_file_line_and_reason(tmp_path, line, message):
    reader = _reader(tmp_path)
    path = write_lines(tmp_path / "train_set.json", [GOOD, line, GOOD])
    with pytest.raises(DataError) as info:
        reader.read_split(path, "train")
    assert re.match(re.escape(f"{path}:2: ") + message, str(info.value)), str(info.value)


def test_too_many_objects_is_reported_at_the_objects_file_line(tmp_path):
    objects = source_objects()
    objects["img_b.jpg"] = {f"[OBJ{k}]": [0, 0, 32, 32] for k in range(14)}
    reader = _reader(tmp_path, objects=objects)
    line = (tmp_path / "pos_umke.json").read_text().splitlines().index('  "img_b.jpg": {') + 1
    path = write_lines(tmp_path / "val.txt", [_bad(img_id="img_b.jpg")])
    reader.read_split(path, "valid")  # text-only record: fine so far
    with pytest.raises(DataError) as info:
        reader.objects(["img_b.jpg"])
    assert str(info.value).startswith(
        f"{tmp_path / 'pos_umke.json'}:{line}: image img_b.jpg has too many objects "
        "(found 14, expected at most 12 named [OBJ0]..[OBJ11]; left out: [OBJ12], [OBJ13])"
    )


def test_box_units_are_decided_per_file_and_slight_overshoot_is_clipped(tmp_path):
    # A file of normalized boxes: 1.004 is rounding past the border (clipped), not a pixel.
    normalized = {"img_a.jpg": {"[OBJ0]": [0.5, 0.5, 1.004, 0.9], "[OBJ1]": [0.1, 0.1, 0.4, 0.5]}}
    normalized["img_c.png"] = {"[OBJ0]": [0.1, 0.1, 0.9, 0.9], "[OBJ1]": [20, 30, 60, 90]}
    reader = _reader(tmp_path / "n", on_error="skip", objects=normalized)
    out = reader.objects(["img_a.jpg", "img_c.png"])
    assert out["img_a.jpg"]["[OBJ0]"] == [0.5, 0.5, 1.0, 0.9]
    assert out["img_c.png"] == {"[OBJ0]": [0.1, 0.1, 0.9, 0.9]}
    (problem,) = reader.problems.items
    assert problem.reason == (
        "image img_c.png, [OBJ1]: pixel box in a file of normalized boxes (found [20, 30, 60, 90],"
        " expected 0 <= x, y <= 1 like the file's other boxes)"
    )
    # A record file: the same rule over its records' boxes.
    records = [
        _bad(
            t={"name": "[OBJ0]", "pos": [0.0, 0.0, 0.5, 0.5]},
            h={"name": "[OBJ1]", "pos": [0.1, 0.1, 0.6, 0.9]},
        ),
        _bad(t={"name": "[OBJ0]", "pos": [0.1, 0.1, 1.5, 0.5]}),
    ]
    reader = _reader(tmp_path / "r", objects={})
    reader = SourceReader(
        labels=UMRE_RELATIONS, images=ImageIndex([tmp_path / "r"]), problems=Problems("raise")
    )
    path = write_lines(tmp_path / "train.txt", records)
    with pytest.raises(
        DataError,
        match=re.escape(
            f"{path}:2: t [OBJ0]: pixel box in a file of normalized boxes (found [0.1, 0.1, 1.5, 0.5]"
        ),
    ):
        reader.read_split(path, "train")


@pytest.mark.parametrize(
    ("name", "box"),
    [
        ("[OBJ1]", [90, 10, 20, 50]),  # x2 < x1
        # Boxes are stored to 6 decimals: a side under 5e-7 of the image would be written empty
        # and refused later, by the features stage; it is refused here, at its line.
        ("[OBJ0]", [10, 20, 10.00001, 180]),
    ],
    ids=["reversed", "rounds-to-empty"],
)
def test_bad_box_in_objects_file_names_image_and_object(tmp_path, name, box):
    objects = source_objects()
    objects["img_c.png"][name] = box
    reader = _reader(tmp_path, objects=objects)
    expected = rf"pos_umke.json:\d+: image img_c.png, {re.escape(name)}: bad box"
    with pytest.raises(DataError, match=expected):
        reader.objects(["img_c.png"])


def test_a_narrow_box_that_survives_rounding_is_kept(tmp_path):
    objects = source_objects()
    objects["img_c.png"]["[OBJ0]"] = [10, 20, 10.001, 180]  # 1e-5 of the width
    (box,) = _reader(tmp_path, objects=objects).objects(["img_c.png"])["img_c.png"].values()
    assert box[2] > box[0]


def test_skip_mode_keeps_good_records_and_writes_the_report(tmp_path):
    objects = source_objects()
    objects["img_b.jpg"] = {f"[OBJ{k}]": [0, 0, 32, 32] for k in range(13)}
    reader = _reader(tmp_path, on_error="skip", objects=objects)
    lines = [GOOD, "not a dict", _bad(relation="/x/y"), GOOD, _bad(img_id="nope.jpg")]
    lines.append(_bad(img_id="img_b.jpg", t={"name": "[OBJ12]", "pos": [0.1, 0.1, 0.2, 0.2]}))
    lines.append(_bad(img_id="img_b.jpg", t={"name": "[OBJ3]", "pos": [0.1, 0.1, 0.2, 0.2]}))
    path = write_lines(tmp_path / "train_set.json", lines)
    records = reader.read_split(path, "train")
    assert [r.id for r in records] == ["train-000001", "train-000004", "train-000007"]
    objects_out = reader.objects(r.image_id for r in records)
    assert sorted(objects_out["img_b.jpg"]) == sorted(f"[OBJ{k}]" for k in range(12))
    problems = reader.problems
    assert problems.skipped_records == 4
    assert [(p.file, p.line) for p in problems.items[:4]] == [(str(path), n) for n in (2, 3, 5, 6)]
    assert problems.items[4].file.endswith("pos_umke.json")  # image b: 13 objects
    report = tmp_path / "skipped.tsv"
    problems.write_report(report)
    rows = list(csv.reader(report.open(), delimiter="\t"))
    assert rows[0] == ["file", "line", "reason"] and len(rows) == 6
    assert rows[2][1:] == ["3", rows[2][2]] and rows[2][2].startswith("unknown relation")


def test_without_objects_file_the_record_boxes_are_the_objects(tmp_path):
    write_images(tmp_path / "imgs")
    reader = SourceReader(
        labels=UMRE_RELATIONS, images=ImageIndex([tmp_path]), problems=Problems("raise")
    )
    path = write_lines(tmp_path / "train.txt", source_records()["train_set.json"])
    reader.read_split(path, "train")
    assert reader.objects(["img_a.jpg"]) == {
        "img_a.jpg": {"[OBJ0]": [0.0, 0.0, 0.5, 0.5], "[OBJ1]": [0.1, 0.1, 0.6, 0.9]}
    }


def test_image_index_prefers_the_named_folder_then_the_shallowest(tmp_path):
    write_images(tmp_path / "deep" / "copy")
    write_images(tmp_path / "other")
    write_images(tmp_path / "x" / "UMKE_IMG")
    assert ImageIndex([tmp_path], prefer=("UMKE_IMG",)).find("img_a.jpg") == (
        tmp_path / "x" / "UMKE_IMG" / "img_a.jpg"
    )
    assert ImageIndex([tmp_path]).find("img_a.jpg") == tmp_path / "other" / "img_a.jpg"
    assert ImageIndex([tmp_path]).find("missing.jpg") is None
    assert ImageIndex([tmp_path]).size("img_c.png") == (100, 200)


def test_same_size_files_of_other_contents_are_told_apart_by_their_bytes(tmp_path):
    # Unpacked from one archive, two files may share size and mtime: only the bytes tell.
    for folder, data in (("a", b"AAAA"), ("b", b"BBBB"), ("c/deep", b"CCCC"), ("d", b"AAAA")):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "x.jpg").write_bytes(data)
        os.utime(tmp_path / folder / "x.jpg", (1_700_000_000, 1_700_000_000))
    index = ImageIndex([tmp_path])
    assert index.find("x.jpg") == tmp_path / "a" / "x.jpg"
    assert index.ambiguous == {"x.jpg": [tmp_path / "a" / "x.jpg", tmp_path / "b" / "x.jpg"]}
    (tmp_path / "b" / "x.jpg").unlink()  # now only a deeper file differs: chosen, and counted
    index = ImageIndex([tmp_path])
    assert index.find("x.jpg") == tmp_path / "a" / "x.jpg"
    assert index.ambiguous == {} and index.chosen_among_different == {"x.jpg"}


def test_a_span_may_end_at_the_last_token(tmp_path):
    reader = _reader(tmp_path)
    whole = _bad(h={"name": " ".join(TOKENS), "pos": [0, len(TOKENS)]})
    path = write_lines(tmp_path / "train.txt", [whole])
    (record,) = reader.read_split(path, "train")
    assert record.head.span == (0, 9)


def test_names_that_differ_from_their_span_only_in_case_and_spaces_are_not_counted(tmp_path):
    reader = _reader(tmp_path)
    lines = [
        _bad(h={"name": "bill  COSBY", "pos": [1, 3]}),  # the same words
        _bad(h={"name": "Bill", "pos": [1, 3]}),  # other words: counted
        _bad(h={"name": "RT Bill", "pos": [0, 2]}, t={"name": "rtbill", "pos": [0, 2]}),
    ]
    reader.read_split(write_lines(tmp_path / "train.txt", lines), "train")
    assert reader.hygiene["text_entity_names_differing_from_their_span"] == 1


def test_without_objects_file_the_first_box_of_an_object_is_kept(tmp_path):
    write_images(tmp_path / "imgs")
    reader = SourceReader(
        labels=UMRE_RELATIONS, images=ImageIndex([tmp_path]), problems=Problems("raise")
    )
    first = _bad(t={"name": "[OBJ0]", "pos": [20, 10, 120, 90]})
    second = _bad(t={"name": "[OBJ0]", "pos": [0, 0, 100, 50]})
    again = _bad(t={"name": "[OBJ0]", "pos": [20.1, 10, 120, 90]})  # within 1e-3 of the first
    reader.read_split(write_lines(tmp_path / "train.txt", [first, second, again]), "train")
    assert reader.objects(["img_a.jpg"]) == {"img_a.jpg": {"[OBJ0]": [0.1, 0.1, 0.6, 0.9]}}
    # The later, other box is not used, and counted: only `second` differs from the first.
    assert reader.hygiene["record_boxes_disagreeing_with_an_earlier_record"] == 1
    assert reader.hygiene["record_boxes_disagreeing_with_objects_file"] == 0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            '{\n  "a.jpg": {"[OBJ0]": [1, 2, 3, 4]},\n\n  "b.jpg": {},\n  "c.jpg": {}\n}\n',
            [2, 4, 5],
        ),
        # A key's text inside an earlier value, even the one just before it, is not the key.
        ('{\n  "a.jpg": {"note": "c.jpg"},\n  "b.jpg": {},\n  "c.jpg": {}\n}\n', [2, 3, 4]),
        ('{\n  "a.jpg": {"b.jpg": "c.jpg"},\n  "b.jpg": "\\"c.jpg\\"",\n  "c.jpg": 1}', [2, 3, 4]),
        # Keys written with escapes, and values over several lines.
        ('{"a.jpg": [1,\n 2],\n "\\u00e9.jpg": {\n "x": "}"},\n\t"\\/c.jpg" : null}', [1, 3, 5]),
        ("\n\n { }", []),
    ],
)
def test_json_key_lines_finds_each_top_level_key(text, expected):
    keys = list(json.loads(text))
    assert json_key_lines(text) == dict(zip(keys, expected, strict=True))


def test_json_key_lines_gives_a_repeated_key_the_line_whose_value_is_kept():
    text = '{\n "a.jpg": 1,\n "b.jpg": 2,\n "a.jpg": 3\n}'
    assert json.loads(text)["a.jpg"] == 3
    assert json_key_lines(text) == {"a.jpg": 4, "b.jpg": 3}
    assert json_key_lines("[1, 2]") == {} and json_key_lines('"a"') == {}


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("r.txt", "none\na\n\nb\na\n", "r.txt:5: relation 'a' listed twice (first at line 2)"),
        ("r.txt", "none\nNA\n", "r.txt:2: relation 'NA' listed twice (first at line 1)"),
        ("r.txt", "\na\nNone\n", "r.txt:2: the first relation is 'a'; the no-relation label"),
        ("r.txt", "a\nb\n", "r.txt:1: the first relation is 'a'; the no-relation label"),
        ("r.txt", "none\n", "r.txt: 1 relations (expected at least 2, 'none' first)"),
        ("r.json", '{"None": 0,\n "a": 2}', "r.json:1: relation ids must be 0..1 once each"),
        ("r.json", '{"None": 0,\n "a": "1"}', "r.json:2: relation 'a' has id '1' (expected an"),
        ("r.json", '{"None": 0,\n "a": true}', "r.json:2: relation 'a' has id True (expected"),
        ("r.json", '["none", "a", 3]', "r.json:1: bad relation name (found 3, expected text)"),
        ("r.json", '["none",\n "a",]', "r.json:2: malformed JSON (Expecting value)"),
        ("r.json", '"none"', "r.json:1: found str (expected a list of relation names or a rel2id"),
    ],
)
def test_label_file_problems_name_the_file_and_line(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(DataError) as caught:
        read_label_file(path)
    assert str(caught.value).startswith(f"{tmp_path}/{message}")


def test_label_and_objects_files_that_are_not_utf8_are_named_at_their_line(tmp_path):
    labels = tmp_path / "relations.txt"
    labels.write_bytes(b"none\nborn_in\nlived_\xe0\n")
    with pytest.raises(DataError) as caught:
        read_label_file(labels)
    assert str(caught.value) == (
        f"{labels}:3: not UTF-8 (found byte 0xe0 at column 7, expected UTF-8 text)"
    )
    objects_file = tmp_path / "pos_umke.json"
    objects_file.write_bytes(b'{"img_a.jpg": {"[OBJ0]": [0, 0, 5, 5]},\n "\xff.jpg": {}}')
    with pytest.raises(DataError) as caught:
        SourceReader(
            labels=UMRE_RELATIONS,
            images=ImageIndex([tmp_path]),
            problems=Problems("skip"),  # a file that does not decode is refused even so
            max_objects=12,
            objects_file=objects_file,
        )
    assert str(caught.value) == (
        f"{objects_file}:2: not UTF-8 (found byte 0xff at column 3, expected UTF-8 JSON)"
    )


def test_label_files_give_the_relations_in_id_order(tmp_path):
    text = tmp_path / "relations.txt"
    text.write_text("None\n b \n\na\n")  # blank lines skipped, names stripped
    listed = tmp_path / "relations.json"
    listed.write_text('["NA", "b", "a"]')
    rel2id = tmp_path / "rel2id.json"
    rel2id.write_text('{"a": 2, "none": 0, "b": 1}')
    for path in (text, listed, rel2id):
        assert read_label_file(path) == ("none", "b", "a"), path
    # MNRE's own rel2id file gives MNRE's set, in its order.
    rel2id.write_text(
        json.dumps({"None" if n == "none" else n: i for i, n in enumerate(MNRE_RELATIONS)})
    )
    assert read_label_file(rel2id) == MNRE_RELATIONS


def test_a_record_line_may_be_a_json_object(tmp_path):
    reader = _reader(tmp_path)
    as_json = json.dumps({**GOOD, "checked": True, "note": None})
    path = write_lines(tmp_path / "train.json", [as_json, json.dumps({**GOOD, "h": None})])
    reader.problems = Problems("skip")
    (record,) = reader.read_split(path, "train")
    assert record.relation == GOOD["relation"] and record.image_id == GOOD["img_id"]
    (problem,) = reader.problems.items
    assert problem.line == 2 and "null" not in problem.reason
