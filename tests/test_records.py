"""The normalized layout (pipeline.data.records): what write_dataset writes and refuses, what a
reader of a dataset at rest accepts."""

from __future__ import annotations

import hashlib
import json

import pytest

from pipeline.data.records import (
    Dataset,
    Entity,
    Record,
    iter_records,
    parse_object_name,
    safe_image_id,
    write_dataset,
)
from pipeline.io import DataError

LABELS = ["none", "/per/per/self", "/loc/loc/contain"]
BILL = Entity("text", "Bill", (0, 1))
FAME = Entity("text", "Fame", (2, 3))
OBJ0, OBJ1 = Entity("object", "[OBJ0]"), Entity("object", "[OBJ1]")
OBJECTS = {"a.jpg": {"[OBJ0]": [0.0, 0.0, 0.5, 0.5], "[OBJ1]": [0.1, 0.1, 0.6, 0.9]}, "b.jpg": {}}


def _record(rid: str, image_id: str, head: Entity, tail: Entity, relation: str) -> Record:
    return Record(rid, ("Bill", "at", "Fame"), image_id, head, tail, relation)


def _splits() -> dict[str, list[Record]]:
    # a.jpg is used by train and test: one image of the dataset, counted once in the total.
    return {
        "train": [
            _record("train-000001", "a.jpg", BILL, FAME, "none"),
            _record("train-000002", "a.jpg", BILL, OBJ0, "/per/per/self"),
            _record("train-000003", "a.jpg", OBJ0, OBJ1, "/loc/loc/contain"),
        ],
        "valid": [_record("valid-000001", "b.jpg", BILL, FAME, "/per/per/self")],
        "test": [_record("test-000001", "a.jpg", FAME, OBJ1, "none")],
    }


def test_write_dataset_counts_and_checksums_what_it_wrote(tmp_path):
    (tmp_path / "captions.json").write_text('{"a.jpg": {"Bill": "a man"}}\n')
    manifest = write_dataset(
        tmp_path, _splits(), OBJECTS, LABELS, source="test", version="7", extra={"note": 1}
    )
    kinds = ("text-text", "text-object", "object-object")
    assert manifest["splits"] == {
        "train": {
            "samples": 3,
            "images": 1,
            "pair_kinds": dict(zip(kinds, (1, 1, 1), strict=True)),
            "relations": {"/loc/loc/contain": 1, "/per/per/self": 1, "none": 1},
        },
        "valid": {
            "samples": 1,
            "images": 1,
            "pair_kinds": dict(zip(kinds, (1, 0, 0), strict=True)),
            "relations": {"/per/per/self": 1},
        },
        "test": {
            "samples": 1,
            "images": 1,
            "pair_kinds": dict(zip(kinds, (0, 1, 0), strict=True)),
            "relations": {"none": 1},
        },
    }
    assert manifest["images"] == 2  # a.jpg and b.jpg, whichever splits use them
    assert (manifest["source"], manifest["version"], manifest["note"]) == ("test", "7", 1)
    names = ["records/train.jsonl", "records/valid.jsonl", "records/test.jsonl"]
    names += ["objects.json", "relations.json", "captions.json"]
    assert manifest["sha256"] == {
        name: hashlib.sha256((tmp_path / name).read_bytes()).hexdigest() for name in names
    }
    assert json.loads((tmp_path / "relations.json").read_text()) == {
        "none": 0, "/per/per/self": 1, "/loc/loc/contain": 2
    }  # fmt: skip
    assert json.loads((tmp_path / "manifest.json").read_text()) == manifest
    ds = Dataset(tmp_path)
    assert {s: ds.records(s) for s in ("train", "valid", "test")} == _splits()


def test_a_changed_captions_file_is_refused_like_the_records(tmp_path):
    (tmp_path / "captions.json").write_text('{"a.jpg": {"Bill": "a man"}}\n')
    write_dataset(tmp_path, _splits(), OBJECTS, LABELS, source="test", version="1")
    Dataset(tmp_path)
    (tmp_path / "captions.json").write_text('{"a.jpg": {"Bill": "a woman"}}\n')
    with pytest.raises(DataError, match=r"captions.json: changed after download"):
        Dataset(tmp_path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"relation": "/per/per/friend"}, "record x: relation '/per/per/friend' not in relations"),
        ({"tail": Entity("object", "[OBJ5]")}, r"record x: \[OBJ5\] not in objects of a.jpg"),
        ({"image_id": "b.jpg", "tail": OBJ0}, r"record x: \[OBJ0\] not in objects of b.jpg"),
    ],
)
def test_write_dataset_refuses_records_the_layout_cannot_hold(tmp_path, change, message):
    record = _record("x", "a.jpg", BILL, OBJ0, "none")
    bad = Record(**{**record.__dict__, **change})
    with pytest.raises(ValueError, match=message):
        write_dataset(tmp_path, {"train": [bad]}, OBJECTS, LABELS, source="t", version="1")


def test_write_dataset_needs_none_first(tmp_path):
    with pytest.raises(ValueError, match=r"relations must start with 'none', found \['/per"):
        write_dataset(tmp_path, {}, {}, LABELS[1:] + ["none"], source="t", version="1")


def test_iter_records_skips_blank_lines_and_counts_them_in_line_numbers(tmp_path):
    good = json.dumps(_splits()["train"][0].to_json())
    path = tmp_path / "train.jsonl"
    path.write_text(f"{good}\n\n   \n{good}\n")
    assert len(list(iter_records(path))) == 2
    path.write_text(f"{good}\n\n{{}}\n")
    with pytest.raises(DataError, match=r"train.jsonl:3: malformed record"):
        list(iter_records(path))


def test_parse_object_name_reads_ascii_digits_only():
    assert [parse_object_name(n) for n in ("[OBJ0]", "[OBJ11]")] == [0, 11]
    # "\u0663" is an Arabic-Indic three: str.isdigit says yes, int() reads it as 3.
    for bad in ("[OBJ\u0663]", "[OBJ]", "[OBJ-1]", "[obj1]", "OBJ1", "[OBJ1", 1, None):
        assert parse_object_name(bad) is None, bad


def test_safe_image_ids_stay_inside_images():
    for good in ("a.jpg", "sub/a.jpg", "a..b.jpg", "~a.jpg"):
        assert safe_image_id(good), good
    for bad in ("", "../a.jpg", "sub/../../a.jpg", "/etc/a.jpg", "~/a.jpg", "a\\b.jpg",
                "a\0.jpg", 3, None):  # fmt: skip
        assert not safe_image_id(bad), bad
