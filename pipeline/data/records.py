"""The normalized dataset layout and its reader.

Every source (synthetic, UMRE, MNRE, local) is converted to this layout, so later stages never care
where the data came from::

    <root>/records/{train,valid,test}.jsonl   one Record per line
    <root>/objects.json                       image id -> {"[OBJk]": [x1, y1, x2, y2]} in [0, 1]
    <root>/images/<image_id>                  the image files
    <root>/relations.json                     label -> id, "none" = 0
    <root>/manifest.json                      source, version, counts, checksums
    <root>/depth/<image_id stem>.npy          optional: ground-truth depth maps (synthetic)
    <root>/captions.json                      optional: image id -> {entity or "[OBJk]": caption}
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pipeline.io import DataError, atomic_write_text, file_sha256, write_json

SPLITS = ("train", "valid", "test")
PAIR_KINDS = ("text-text", "text-object", "object-object")
NONE_LABEL = "none"

UMRE_RELATIONS = (
    "none",
    "/per/loc/place_of_governance",
    "/per/misc/party",
    "/per/org/member_of",
    "/per/per/self",
    "/per/misc/nationality",
    "/loc/loc/self",
    "/per/misc/present_in",
    "/per/loc/place_of_residence",
    "/org/org/self",
    "/misc/misc/self",
    "/per/per/opponent",
    "/per/loc/place_of_birth",
    "/per/per/partner",
    "/per/org/opposed_to",
    "/loc/loc/contain",
    "/org/loc/locate_at",
    "/per/misc/president",
    "/misc/loc/held_on",
    "/per/org/leader_of",
    "/org/org/subsidiary",
    "/per/per/relatives",
    "/per/misc/awarded",
    "/misc/misc/part_of",
    "/per/misc/race",
    "/per/per/alumni",
    "/per/misc/religion",
    "/org/misc/present_in",
)


@dataclass(frozen=True)
class Entity:
    """A text span (``span`` = [start, end) in tokens) or a visual object (``name`` = "[OBJk]")."""

    kind: Literal["text", "object"]
    name: str
    span: tuple[int, int] | None = None

    @property
    def slot(self) -> int:
        """The object slot index k of "[OBJk]"."""
        if self.kind != "object":
            raise ValueError(f"{self.name!r} is a text entity, not an object")
        return object_slot(self.name)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "name": self.name}
        if self.kind == "text":
            out["span"] = list(self.span)
        return out

    @staticmethod
    def from_json(obj: dict[str, Any]) -> Entity:
        kind = obj["kind"]
        if kind == "text":
            start, end = obj["span"]
            return Entity("text", str(obj["name"]), (int(start), int(end)))
        if kind == "object":
            return Entity("object", str(obj["name"]))
        raise ValueError(f"entity kind must be 'text' or 'object', found {kind!r}")


@dataclass(frozen=True)
class Record:
    id: str
    text_tokens: tuple[str, ...]
    image_id: str
    head: Entity
    tail: Entity
    relation: str

    @property
    def pair_kind(self) -> str:
        kinds = {self.head.kind, self.tail.kind}
        if kinds == {"text"}:
            return "text-text"
        if kinds == {"object"}:
            return "object-object"
        return "text-object"

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "text_tokens": list(self.text_tokens),
            "image_id": self.image_id,
            "head": self.head.to_json(),
            "tail": self.tail.to_json(),
            "relation": self.relation,
        }

    @staticmethod
    def from_json(obj: dict[str, Any]) -> Record:
        return Record(
            id=str(obj["id"]),
            text_tokens=tuple(str(t) for t in obj["text_tokens"]),
            image_id=str(obj["image_id"]),
            head=Entity.from_json(obj["head"]),
            tail=Entity.from_json(obj["tail"]),
            relation=str(obj["relation"]),
        )


def parse_object_name(name: Any) -> int | None:
    """The slot k of an object name ``"[OBJk]"``, or None when ``name`` is not one."""
    if isinstance(name, str) and name.startswith("[OBJ") and name.endswith("]"):
        digits = name[4:-1]
        if digits.isascii() and digits.isdigit():
            return int(digits)
    return None


def object_name(slot: int) -> str:
    """3 -> ``"[OBJ3]"``."""
    return f"[OBJ{slot}]"


def object_slot(name: str) -> int:
    """``"[OBJ3]"`` -> 3."""
    slot = parse_object_name(name)
    if slot is None:
        raise ValueError(f"object name must look like '[OBJk]', found {name!r}")
    return slot


def label_list(relations: dict[str, int]) -> list[str]:
    """``relations.json`` (label -> id) as a list indexed by id; checks ids are 0..n-1, none = 0."""
    labels = [name for name, _ in sorted(relations.items(), key=lambda kv: kv[1])]
    if sorted(relations.values()) != list(range(len(labels))):
        raise ValueError(
            f"relation ids must be 0..{len(labels) - 1}, found {sorted(relations.values())}"
        )
    if relations.get(NONE_LABEL) != 0:
        raise ValueError(
            f"relation {NONE_LABEL!r} must have id 0, found {relations.get(NONE_LABEL)!r}"
        )
    return labels


def label_map_hash(labels: Sequence[str]) -> str:
    """A short hash of the label names in id order: what a label id in a cache or model means."""
    return hashlib.sha256(json.dumps(list(labels)).encode()).hexdigest()[:16]


def write_records(path: str | Path, records: list[Record]) -> None:
    lines = (json.dumps(r.to_json(), ensure_ascii=False, sort_keys=True) for r in records)
    atomic_write_text(path, "".join(line + "\n" for line in lines))


def iter_records(path: str | Path) -> Iterator[Record]:
    """Read a normalized ``records/<split>.jsonl``; a bad line raises ``file:line: problem``."""
    path = Path(path)
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = Record.from_json(json.loads(line))
            except (ValueError, KeyError, TypeError) as exc:
                raise DataError(f"{path}:{lineno}: malformed record ({exc})") from exc
            if not safe_image_id(record.image_id):
                raise DataError(
                    f"{path}:{lineno}: unsafe image_id (found {record.image_id!r:.200}, expected a "
                    "relative path inside images/)"
                )
            yield record


def safe_image_id(image_id: Any) -> bool:
    """A relative path that stays inside ``images/``: no root, drive, ``..`` or backslash."""
    if not isinstance(image_id, str) or not image_id or "\\" in image_id or "\0" in image_id:
        return False
    path = Path(image_id)
    return not path.is_absolute() and ".." not in path.parts and path.parts[:1] != ("~",)


class Dataset:
    """Read access to a normalized dataset folder; imports no model code."""

    def __init__(self, root: str | Path, *, verify: bool = True):
        """Open ``root``; ``verify`` checks the manifest's checksums of the records, objects,
        relations and captions first (a few MB at most), so that a stage never reads a dataset
        changed after ``download`` wrote it. Images are not hashed (thousands of files): their
        ids are checked instead, so no read leaves ``images/``."""
        self.root = Path(root)
        if not (self.root / "manifest.json").is_file():
            raise DataError(f"{self.root}: not a normalized dataset (no manifest.json)")
        if verify:
            for name, expected in sorted(self.manifest.get("sha256", {}).items()):
                path = self.root / name
                found = file_sha256(path) if path.is_file() else "no file"
                if found != expected:
                    raise DataError(
                        f"{path}: changed after download (found sha256 {found[:16]}, "
                        f"manifest.json says {expected[:16]}); rerun the download stage "
                        "(dvc repro download) or restore the file (dvc checkout)"
                    )

    def records(self, split: str) -> list[Record]:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, found {split!r}")
        return list(iter_records(self.root / "records" / f"{split}.jsonl"))

    @property
    def manifest(self) -> dict[str, Any]:
        return json.loads((self.root / "manifest.json").read_text())

    @property
    def relations(self) -> dict[str, int]:
        return json.loads((self.root / "relations.json").read_text())

    @property
    def objects(self) -> dict[str, dict[str, list[float]]]:
        return json.loads((self.root / "objects.json").read_text())

    def image_path(self, image_id: str) -> Path:
        return self.root / "images" / image_id

    def image_ids(self) -> list[str]:
        """Every image referenced by any split, sorted (the order stages process them in)."""
        ids = {r.image_id for split in SPLITS for r in self.records(split)}
        return sorted(ids)

    @property
    def depth_dir(self) -> Path:
        """The depth maps shipped with the dataset (synthetic only; absent elsewhere)."""
        return self.root / "depth"

    def depth_path(self, image_id: str) -> Path:
        """Ground-truth depth map shipped with the dataset (synthetic only)."""
        return self.depth_dir / (Path(image_id).stem + ".npy")

    @property
    def captions_path(self) -> Path:
        return self.root / "captions.json"


def write_dataset(
    root: str | Path,
    splits: Mapping[str, Sequence[Record]],
    objects: Mapping[str, Mapping[str, Sequence[float]]],
    relations: Sequence[str],
    *,
    source: str,
    version: str,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write records, objects.json, relations.json and manifest.json into ``root`` (images and
    captions.json are the caller's); counts and checksums come from what was written."""
    root = Path(root)
    if list(relations[:1]) != [NONE_LABEL]:
        raise ValueError(f"relations must start with {NONE_LABEL!r}, found {list(relations[:1])}")
    label_ids = {label: i for i, label in enumerate(relations)}
    counts: dict[str, Any] = {}
    for split in SPLITS:
        records = list(splits.get(split, ()))
        for r in records:
            if r.relation not in label_ids:
                raise ValueError(f"record {r.id}: relation {r.relation!r} not in relations")
            for ent in (r.head, r.tail):
                if ent.kind == "object" and ent.name not in objects.get(r.image_id, {}):
                    raise ValueError(f"record {r.id}: {ent.name} not in objects of {r.image_id}")
        write_records(root / "records" / f"{split}.jsonl", records)
        counts[split] = {
            "samples": len(records),
            "images": len({r.image_id for r in records}),
            "pair_kinds": {k: sum(r.pair_kind == k for r in records) for k in PAIR_KINDS},
            "relations": dict(sorted(Counter(r.relation for r in records).items())),
        }
    write_json(root / "objects.json", {k: dict(v) for k, v in sorted(objects.items())})
    write_json(root / "relations.json", label_ids)
    checksummed = [f"records/{s}.jsonl" for s in SPLITS] + ["objects.json", "relations.json"]
    if (root / "captions.json").is_file():
        checksummed.append("captions.json")
    manifest = {
        "source": source,
        "version": version,
        "splits": counts,
        "images": len({r.image_id for recs in splits.values() for r in recs}),
        "sha256": {name: file_sha256(root / name) for name in checksummed},
        **(extra or {}),
    }
    write_json(root / "manifest.json", manifest)
    return manifest
