"""Readers for the published record formats (UMRE, MNRE; MORE once in UMRE's layout), with
validation.

A record file has one dict per line: a Python literal (parsed with ``ast.literal_eval``), as the
published files have it, or a JSON object::

    {'token': [...], 'h': {'name': ..., 'pos': [3, 5]},
     't': {'name': '[OBJ1]', 'pos': [x1, y1, x2, y2]}, 'img_id': '....jpg', 'relation': ...}

A ``pos`` of 2 ints is a token span [start, end); 4 numbers are an object box, named ``[OBJk]``.
An objects file (UMRE ``pos_umke.json``) maps image -> {"[OBJk]": box}. Boxes may be in pixels or
in [0, 1], decided once per file by the majority of its boxes (:func:`~pipeline.data.images.box_units`):
pixel boxes are divided by their image's size, boxes up to 1% outside the image are clipped, and a
box in the other unit than its file's is reported.

Every problem is reported as ``file:line: problem (found ..., expected ...)``. With
``on_error="raise"`` the first one raises :class:`DataError`; with ``"skip"`` the record (or
object) is left out and the problem kept for the report.
"""

from __future__ import annotations

import ast
import csv
import filecmp
import io
import json
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pipeline.data.images import (
    BOX_RANGE,
    BOX_SHAPE,
    BoxUnits,
    box_numbers,
    box_units,
    clip_box,
    fits_unit_square,
    image_size,
)
from pipeline.data.records import NONE_LABEL, Entity, Record, parse_object_name, safe_image_id
from pipeline.io import DataError, atomic_write_text, not_utf8, read_utf8

__all__ = [
    "MNRE_RELATIONS",
    "Problem",
    "Problems",
    "ImageIndex",
    "SourceReader",
    "normalize_label",
    "read_label_file",
    "json_key_lines",
]

# MNRE v2: 22 relations plus "None" (spelled "none" here), in the order of its rel2id.
MNRE_RELATIONS = (
    NONE_LABEL,
    "/per/per/parent",
    "/per/per/siblings",
    "/per/per/couple",
    "/per/per/neighbor",
    "/per/per/peer",
    "/per/per/charges",
    "/per/per/alumi",
    "/per/per/alternate_names",
    "/per/org/member_of",
    "/per/loc/place_of_residence",
    "/per/loc/place_of_birth",
    "/org/org/alternate_names",
    "/org/org/subsidiary",
    "/org/loc/locate_at",
    "/loc/loc/contain",
    "/per/misc/present_in",
    "/per/misc/awarded",
    "/per/misc/race",
    "/per/misc/religion",
    "/per/misc/nationality",
    "/misc/misc/part_of",
    "/misc/loc/held_on",
)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp")


NONE_SPELLINGS = (NONE_LABEL, "None", "NA")


def normalize_label(label: str) -> str:
    """MNRE and MORE spell the empty relation "None"; the normalized layout uses "none"."""
    return NONE_LABEL if label in NONE_SPELLINGS else label


def read_label_file(path: Path) -> tuple[str, ...]:
    """A dataset's own relation set, in id order, from ``path``:

    - ``.json``: a list of names, or a ``rel2id`` object (name -> id, the ids 0..n-1), as MNRE
      ships ``ours_rel2id.json``;
    - any other file: one name per line (blank lines are ignored).

    The no-relation label (spelled ``none``, ``None`` or ``NA``; it becomes ``none``) must have
    id 0: micro-F1 leaves it out. Every problem names the file and line.
    """
    path = Path(path)
    try:
        text = read_utf8(path)
    except OSError as exc:
        raise DataError(f"{path}: cannot read the label file ({exc})") from exc
    if path.suffix == ".json":
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg})") from exc
        if isinstance(raw, dict):
            lines = json_key_lines(text)
            for name, rel_id in raw.items():
                if not isinstance(rel_id, int) or isinstance(rel_id, bool):
                    raise DataError(
                        f"{path}:{lines[name]}: relation {name!r} has id {rel_id!r} "
                        "(expected an integer)"
                    )
            ids = sorted(raw.values())
            if ids != list(range(len(raw))):
                raise DataError(
                    f"{path}:1: relation ids must be 0..{len(raw) - 1} once each (found {ids})"
                )
            entries = [(lines[n], n) for n, _ in sorted(raw.items(), key=lambda kv: kv[1])]
        elif isinstance(raw, list):
            entries = [(1, name) for name in raw]
        else:
            raise DataError(
                f"{path}:1: found {type(raw).__name__} "
                "(expected a list of relation names or a rel2id object)"
            )
    else:
        entries = [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    labels: list[str] = []
    seen: dict[str, int] = {}
    for line, name in entries:
        if not isinstance(name, str) or not name.strip():
            raise DataError(f"{path}:{line}: bad relation name (found {name!r}, expected text)")
        label = normalize_label(name.strip())
        if label in seen:
            raise DataError(
                f"{path}:{line}: relation {name!r} listed twice (first at line {seen[label]})"
            )
        seen[label] = line
        labels.append(label)
    if len(labels) < 2:
        raise DataError(f"{path}: {len(labels)} relations (expected at least 2, 'none' first)")
    if labels[0] != NONE_LABEL:
        where = f"found at line {seen[NONE_LABEL]}" if NONE_LABEL in seen else "not found"
        raise DataError(
            f"{path}:{entries[0][0]}: the first relation is {entries[0][1]!r}; the no-relation "
            f"label ({' / '.join(NONE_SPELLINGS)}) must come first, with id 0 ({where})"
        )
    return tuple(labels)


@dataclass(frozen=True)
class Problem:
    file: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}"


MAX_REASON_CHARS = 500


class Problems:
    """Validation problems: raise on the first (``raise``) or collect them (``skip``)."""

    def __init__(self, on_error: Literal["raise", "skip"]):
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', found {on_error!r}")
        self.on_error = on_error
        self.items: list[Problem] = []
        self.skipped_records = 0

    def skip_record(self, file: str | Path, line: int, reason: str) -> None:
        """A record left out (``skip``) or the error (``raise``): counted, then added."""
        self.skipped_records += 1
        self.add(file, line, reason)

    def add(self, file: str | Path, line: int, reason: str) -> None:
        if len(reason) > MAX_REASON_CHARS:  # a 1 MB field echoed back helps nobody
            cut = len(reason) - MAX_REASON_CHARS
            reason = f"{reason[:MAX_REASON_CHARS]}… ({cut} more characters)"
        problem = Problem(str(file), line, reason)
        if self.on_error == "raise":
            raise DataError(str(problem))
        self.items.append(problem)

    def write_report(self, path: str | Path) -> None:
        """A TSV with one problem per row: file, line, reason."""
        buf = io.StringIO()
        writer = csv.writer(buf, delimiter="\t", lineterminator="\n")
        writer.writerow(["file", "line", "reason"])
        writer.writerows([p.file, p.line, p.reason] for p in self.items)
        atomic_write_text(path, buf.getvalue())


class ImageIndex:
    """Finds image files by id under one or more folders (archive layouts vary)."""

    def __init__(self, roots: Iterable[Path], prefer: Sequence[str] = ()):
        self.roots = [Path(r) for r in roots]
        self._by_name: dict[str, list[Path]] = {}
        # name -> why it is not used: a link that leaves its root (a received folder must not
        # smuggle files from elsewhere on this machine into the dataset).
        self.refused: dict[str, str] = {}
        self.resolved_by_name_only: set[str] = set()
        # id -> the files the preference rule cannot choose between, whose contents differ
        self.ambiguous: dict[str, list[Path]] = {}
        # ids with files of other contents that the rule ranked lower (used, and counted)
        self.chosen_among_different: set[str] = set()
        self._found: dict[str, Path | None] = {}
        for root in self.roots:
            for folder, dirs, files in os.walk(root):
                dirs.sort()
                for name in sorted(files):
                    if name.lower().endswith(IMAGE_SUFFIXES):
                        path = Path(folder) / name
                        if outside_root(path, root):
                            self.refused.setdefault(name, link_outside(path, root))
                        else:
                            self._by_name.setdefault(name, []).append(path)
        self._prefer = set(prefer)
        self._sizes: dict[str, tuple[int, int]] = {}

    def __len__(self) -> int:
        return len(self._by_name)

    def find(self, image_id: str) -> Path | None:
        """The file for ``image_id``: a preferred folder first, then the shallowest. Copies with
        the same bytes are one image; files of other contents that tie with the chosen one are
        recorded in ``ambiguous`` (the id cannot be used), lower-ranked ones in
        ``chosen_among_different``."""
        if image_id in self._found:
            return self._found[image_id]
        paths = self._by_name.get(Path(image_id).name)
        if not paths:
            return None
        suffix = Path(image_id).parts
        exact = [p for p in paths if p.parts[-len(suffix) :] == suffix]
        if not exact:  # "a/x.jpg" found only as "b/x.jpg": used, and counted
            self.resolved_by_name_only.add(image_id)

        def rank(path: Path) -> tuple[bool, int]:
            return not self._prefer & set(path.parts), len(path.parts)

        ranked = sorted(exact or paths, key=lambda p: (*rank(p), str(p)))
        best = ranked[0]
        different = [p for p in ranked[1:] if not filecmp.cmp(best, p, shallow=False)]
        tied = [p for p in different if rank(p) == rank(best)]
        if tied:
            self.ambiguous[image_id] = [best, *tied]
        elif different:
            self.chosen_among_different.add(image_id)
        self._found[image_id] = best
        return best

    def size(self, image_id: str) -> tuple[int, int]:
        """(width, height), read from the file header only."""
        if image_id not in self._sizes:
            path = self.find(image_id)
            if path is None:
                raise KeyError(image_id)
            self._sizes[image_id] = image_size(path)
        return self._sizes[image_id]


def outside_root(path: Path, root: Path) -> bool:
    """Whether ``path`` (after following every link) lies outside ``root``."""
    return not path.resolve().is_relative_to(Path(root).resolve())


def link_outside(path: Path, root: Path) -> str:
    return f"{path} is a link to {path.resolve()}, outside the source folder {root}: refused"


def json_key_lines(text: str) -> dict[str, int]:
    """Line numbers of the top-level keys of the JSON object ``text`` (already known to parse).

    A scan of the object itself, value by value, so a key's text inside an earlier value, or a key
    written with other escapes, is never taken for the key. A key given twice gets the line of its
    last occurrence, whose value ``json.loads`` keeps. Not an object: no keys.
    """
    decoder = json.JSONDecoder()
    space = json.decoder.WHITESPACE  # the decoder's own whitespace rule

    def skip(pos: int) -> int:
        return space.match(text, pos).end()

    pos = skip(0)
    if not text.startswith("{", pos):
        return {}
    lines: dict[str, int] = {}
    line, counted = 1, 0
    pos = skip(pos + 1)
    while text.startswith('"', pos):
        line += text.count("\n", counted, pos)
        counted = pos
        key, pos = json.decoder.scanstring(text, pos + 1)
        lines[key] = line
        pos = skip(skip(pos) + 1)  # past the ':'
        _, pos = decoder.raw_decode(text, pos)
        pos = skip(pos)
        if text.startswith(",", pos):
            pos = skip(pos + 1)
    return lines


def _parse_object_name(name: Any, max_objects: int) -> tuple[int | None, str]:
    """The slot of an "[OBJk]" name, or None and the reason it is not usable."""
    slot = parse_object_name(name)
    if slot is None:
        return None, f"bad object name (found {name!r}, expected '[OBJk]')"
    if slot >= max_objects:
        return None, (
            f"object {name} beyond the object slots (found slot {slot}, expected at most "
            f"{max_objects} objects, [OBJ0]..[OBJ{max_objects - 1}])"
        )
    return slot, ""


class SourceReader:
    """Reads record files and an optional objects file into normalized records and boxes."""

    def __init__(
        self,
        *,
        labels: Sequence[str],
        images: ImageIndex,
        problems: Problems,
        max_objects: int = 12,
        objects_file: Path | None = None,
    ):
        self.labels = list(labels)
        self._label_set = set(labels)
        self.images = images
        self.problems = problems
        self.max_objects = max_objects
        self.objects_file = objects_file
        self._raw_objects: dict[str, Any] | None = None
        self._object_lines: dict[str, int] = {}
        self._object_units: BoxUnits = "normalized"
        # Not fatal, counted in the manifest: what a careful user wants to know about a dataset.
        self.hygiene: Counter[str] = Counter(
            {
                "record_boxes_disagreeing_with_objects_file": 0,
                "record_boxes_disagreeing_with_an_earlier_record": 0,
                "duplicate_keys_in_objects_file": 0,
                "text_entity_names_differing_from_their_span": 0,
                "pairs_whose_head_is_their_tail": 0,
            }
        )
        self._record_units: BoxUnits = "normalized"  # of the record file being read
        if objects_file is not None:
            text = read_utf8(objects_file, "UTF-8 JSON")
            try:
                raw = json.loads(text, object_pairs_hook=self._count_duplicate_keys)
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{objects_file}:{exc.lineno}: malformed JSON (found {exc.msg}, "
                    "expected an object: image -> {'[OBJk]': box})"
                ) from exc
            if not isinstance(raw, dict):
                raise DataError(
                    f"{objects_file}:1: malformed objects file (found {type(raw).__name__}, "
                    "expected an object: image -> {'[OBJk]': box})"
                )
            self._raw_objects = raw
            self._object_lines = json_key_lines(text)
            self._object_units = box_units(
                coords
                for entry in raw.values()
                if isinstance(entry, dict)
                for box in entry.values()
                if (coords := box_numbers(box)) is not None
            )
        # image -> {name: normalized box}; filled lazily, only for images that records use.
        self._objects: dict[str, dict[str, list[float]]] = {}

    def _count_duplicate_keys(self, pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        self.hygiene["duplicate_keys_in_objects_file"] += len(pairs) - len({k for k, _ in pairs})
        return dict(pairs)  # the last value wins, as json.loads does

    # --- boxes ---------------------------------------------------------------------------------
    def _normalize_box(
        self, box: Any, image_id: str, units: BoxUnits
    ) -> tuple[list[float] | None, str]:
        coords = box_numbers(box)
        if coords is None:
            return None, f"malformed box (found {box!r}, {BOX_SHAPE})"
        if fits_unit_square(coords) != (units == "normalized"):
            other = "pixel" if units == "normalized" else "normalized"
            return None, (
                f"{other} box in a file of {units} boxes (found {list(box)}, expected "
                f"{'0 <= x, y <= 1' if units == 'normalized' else 'pixel coordinates'} like the "
                "file's other boxes)"
            )
        if units == "pixel":
            try:
                width, height = self.images.size(image_id)
            except KeyError:
                return None, f"image {image_id} not found (needed to normalize the pixel box {box})"
            except DataError as exc:
                return (
                    None,
                    f"image {image_id} unreadable (needed to normalize the pixel box {box}: {exc})",
                )
            coords = [coords[0] / width, coords[1] / height, coords[2] / width, coords[3] / height]
        clipped = clip_box(coords)
        if clipped is not None:  # stored to 6 decimals: a side under 5e-7 would round to empty
            clipped = clip_box([round(v, 6) for v in clipped])
        if clipped is None:
            shown = [round(v, 4) for v in coords]
            return None, f"bad box (found {list(box)}, normalized {shown}, {BOX_RANGE})"
        return clipped, ""

    def _image_objects(self, image_id: str) -> dict[str, list[float]]:
        """The image's valid objects from the objects file (problems reported once per image)."""
        if image_id in self._objects:
            return self._objects[image_id]
        objects: dict[str, list[float]] = {}
        self._objects[image_id] = objects
        if self._raw_objects is None:
            return objects
        entry = self._raw_objects.get(image_id, {})
        line = self._object_lines.get(image_id, 1)
        if not isinstance(entry, dict):
            found = type(entry).__name__
            reason = f"image {image_id}: malformed entry (found {found}, expected "
            self.problems.add(self.objects_file, line, reason + "{'[OBJk]': box})")
            return objects
        beyond = [n for n in entry if _parse_object_name(n, self.max_objects)[0] is None]
        if beyond:
            reason = (
                f"image {image_id} has too many objects (found {len(entry)}, expected at most "
                f"{self.max_objects} named [OBJ0]..[OBJ{self.max_objects - 1}]; "
                f"left out: {', '.join(map(str, beyond))})"
            )
            self.problems.add(self.objects_file, line, reason)
        for name, box in entry.items():
            if name in beyond:
                continue
            norm, reason = self._normalize_box(box, image_id, self._object_units)
            if norm is None:
                self.problems.add(self.objects_file, line, f"image {image_id}, {name}: {reason}")
            else:
                objects[name] = norm
        return objects

    def objects(self, image_ids: Iterable[str]) -> dict[str, dict[str, list[float]]]:
        """Normalized boxes for each image (empty for an image without objects)."""
        return {i: dict(sorted(self._image_objects(i).items())) for i in sorted(set(image_ids))}

    # --- records -------------------------------------------------------------------------------
    def read_split(self, path: Path, split: str) -> list[Record]:
        """Read one record file; bad lines are reported (raise) or left out (skip)."""
        parsed: list[tuple[int, Any]] = []
        for lineno, raw_line in enumerate(Path(path).read_bytes().splitlines(), 1):
            try:
                line = raw_line.decode("utf-8")
            except UnicodeDecodeError as exc:
                self.problems.skip_record(path, lineno, not_utf8(raw_line, exc)[1])
                continue
            if not line.strip():
                continue
            raw, reason = _literal(line)
            if reason:
                self.problems.skip_record(path, lineno, reason)
            else:
                parsed.append((lineno, raw))
        self._record_units = box_units(
            coords
            for _, raw in parsed
            if isinstance(raw, dict)
            for key in ("h", "t")
            if isinstance(raw.get(key), dict)
            and (coords := box_numbers(raw[key].get("pos"))) is not None
        )
        records: list[Record] = []
        for lineno, raw in parsed:
            record, reason = self._record(raw, f"{split}-{lineno:06d}")
            if record is None:
                self.problems.skip_record(path, lineno, reason)
            else:
                records.append(record)
        return records

    def _record(self, raw: Any, record_id: str) -> tuple[Record | None, str]:
        expected = _EXPECTED_RECORD
        missing = (
            sorted({"token", "h", "t", "img_id", "relation"} - set(raw))
            if isinstance(raw, dict)
            else None
        )
        if missing is None or missing:
            found = f"missing {', '.join(missing)}" if missing else type(raw).__name__
            return None, f"malformed line (found {found}, {expected})"
        tokens, image_id, relation = raw["token"], raw["img_id"], raw["relation"]
        if not (isinstance(tokens, list) and all(isinstance(t, str) for t in tokens)):
            return None, f"malformed line (found token {tokens!r:.60}, expected a list of strings)"
        if not safe_image_id(image_id):
            return None, f"malformed line (found img_id {image_id!r}, expected a file name)"
        if not isinstance(relation, str):
            return None, f"malformed line (found relation {relation!r:.60}, expected a string)"
        label = normalize_label(relation)
        if label not in self._label_set:
            return None, (
                f"unknown relation (found {relation!r}, expected one of the "
                f"{len(self.labels)} labels: {', '.join(self.labels)})"
            )
        if self.images.find(image_id) is None:
            refused = self.images.refused.get(Path(image_id).name)
            if refused:
                return None, f"image refused ({refused})"
            roots = ", ".join(str(r) for r in self.images.roots)
            return None, f"missing image (found no file {image_id!r}, expected one under {roots})"
        if image_id in self.images.ambiguous:
            files = ", ".join(str(p) for p in self.images.ambiguous[image_id])
            return None, (
                f"ambiguous image (found {len(self.images.ambiguous[image_id])} different files "
                f"for img_id {image_id!r}: {files}; expected one: remove or rename the others)"
            )
        entities = []
        for key in ("h", "t"):
            entity, reason = self._entity(raw[key], key, tokens, image_id)
            if entity is None:
                return None, reason
            entities.append(entity)
        if entities[0] == entities[1]:  # kept, as the original would; counted
            self.hygiene["pairs_whose_head_is_their_tail"] += 1
        return Record(record_id, tuple(tokens), image_id, entities[0], entities[1], label), ""

    def _entity(
        self, raw: Any, key: str, tokens: list[str], image_id: str
    ) -> tuple[Entity | None, str]:
        if not (isinstance(raw, dict) and "name" in raw and "pos" in raw):
            return None, f"malformed line (found {key}={raw!r:.60}, expected {{'name', 'pos'}})"
        name, pos = raw["name"], raw["pos"]
        if not isinstance(pos, list | tuple) or len(pos) not in (2, 4):
            return None, f"malformed line (found {key} pos {pos!r}, expected 2 ints or 4 numbers)"
        if len(pos) == 2:
            if not (all(isinstance(v, int) and not isinstance(v, bool) for v in pos)):
                return None, f"malformed line (found {key} pos {pos!r}, expected 2 ints)"
            start, end = pos
            if not 0 <= start < end <= len(tokens):
                return None, (
                    f"span outside the tokens (found {key} pos [{start}, {end}), expected "
                    f"0 <= start < end <= {len(tokens)})"
                )
            # The span is what the model reads; a name that is other words is counted, not fatal.
            if "".join(str(name).split()).lower() != "".join(tokens[start:end]).lower():
                self.hygiene["text_entity_names_differing_from_their_span"] += 1
            return Entity("text", str(name), (start, end)), ""
        slot, reason = _parse_object_name(name, self.max_objects)
        if slot is None:
            return None, f"{key}: {reason}"
        box, reason = self._normalize_box(pos, image_id, self._record_units)
        if box is None:
            return None, f"{key} {name}: {reason}"
        objects = self._image_objects(image_id)
        if self._raw_objects is None:
            # No objects file: the records' boxes are the objects, the first record's box kept.
            if _boxes_differ(objects.setdefault(name, box), box):
                self.hygiene["record_boxes_disagreeing_with_an_earlier_record"] += 1
        elif name not in objects:
            listed = self._raw_objects.get(image_id)
            found = ", ".join(listed) if isinstance(listed, dict) and listed else "no objects"
            return None, (
                f"object {name} missing from {Path(self.objects_file).name} for image "
                f"{image_id} (found {found}, expected {name} with a valid box)"
            )
        elif _boxes_differ(box, objects[name]):
            # The objects file's box is the one used (as the original did); counted, not fatal.
            self.hygiene["record_boxes_disagreeing_with_objects_file"] += 1
        return Entity("object", name), ""


def _boxes_differ(a: Sequence[float], b: Sequence[float]) -> bool:
    """Two normalized boxes that are not the same box (a coordinate apart by over 1e-3)."""
    return max(abs(x - y) for x, y in zip(a, b, strict=True)) > 1e-3


_EXPECTED_RECORD = "expected a dict literal or JSON object with token, h, t, img_id, relation"
_LITERAL_NODES = (
    ast.Expression, ast.Constant, ast.Dict, ast.List, ast.Tuple, ast.Set, ast.Load,
    ast.UnaryOp, ast.UAdd, ast.USub, ast.BinOp, ast.Add, ast.Sub,
)  # fmt: skip


def _literal(line: str) -> tuple[Any, str]:
    """A line's Python literal, or the reason it is not one (naming what is not a literal,
    e.g. a JSON ``null``, by its text and column, never by an object address)."""
    expected = _EXPECTED_RECORD
    text = line.strip()
    try:
        return ast.literal_eval(text), ""
    except ValueError:
        try:  # a JSON line: true, false and null are not Python literals
            return json.loads(text), ""
        except json.JSONDecodeError:
            pass
        try:
            tree = ast.parse(text, mode="eval")
        except SyntaxError:  # literal_eval parsed it: not expected
            tree = None
        node = next(
            (n for n in ast.walk(tree) if not isinstance(n, _LITERAL_NODES)), None
        ) if tree is not None else None  # fmt: skip
        if node is not None and hasattr(node, "col_offset"):
            found = f"{ast.unparse(node)!r:.40} at column {node.col_offset + 1}, not a literal"
        else:
            found = "a value that is not a literal"
        return None, f"malformed line (found {found}, {expected})"
    except TypeError as exc:  # a dict key or set item that cannot be hashed: {['a']: 1}
        return None, f"malformed line (found TypeError: {exc}, {expected})"
    except (SyntaxError, MemoryError, RecursionError) as exc:
        return None, f"malformed line (found {type(exc).__name__}: {exc}, {expected})"
