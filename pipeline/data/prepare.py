"""From a `data.source` to a normalized dataset folder.

``synthetic`` is generated; ``umre`` and ``mnre`` are downloaded from their published archives,
checked, unpacked safely and converted; ``local`` converts an archive or folder in either format.
The published archive layouts are not fixed, so the expected files are searched for in the tree.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline.config import DataParams, Params
from pipeline.data.fetch import Download, Downloader, is_archive, looks_like_archive, url_join
from pipeline.data.formats import (
    MNRE_RELATIONS,
    ImageIndex,
    Problems,
    SourceReader,
    json_key_lines,
    link_outside,
    outside_root,
    read_label_file,
)
from pipeline.data.images import open_image
from pipeline.data.records import SPLITS, UMRE_RELATIONS, Record, write_dataset
from pipeline.data.synthetic import generate_synthetic
from pipeline.io import DataError, file_sha256, read_utf8, staging_dir, write_json

__all__ = [
    "prepare_dataset",
    "convert_umre",
    "convert_mnre",
    "find_files",
    "UMRE_FILES",
    "MNRE_FILES",
]

log = logging.getLogger(__name__)

CONVERTER_VERSION = "1"
# The layouts data.source=local reads (tests/test_config.py: the same names params accept).
LOCAL_FORMATS = ("umre", "mnre")
# Split -> the accepted file names, in the order they are looked for.
UMRE_FILES = {"train": ("train_set.json",), "valid": ("val_set.json",), "test": ("test_set.json",)}
UMRE_OBJECTS = "pos_umke.json"
UMRE_CAPTIONS = "cap_qwenvl_simply.json"
UMRE_IMAGE_FOLDER = "UMKE_IMG"
MNRE_FILES = {
    "train": ("mnre_train.txt",),
    "valid": ("mnre_val .txt", "mnre_val.txt"),
    "test": ("mnre_test.txt",),
}


def find_files(roots: Sequence[Path], names: Sequence[str]) -> Path | None:
    """The shallowest file under ``roots`` named one of ``names`` (earlier names win a tie);
    two files with different content at the same depth are ambiguous and raise."""
    found: list[tuple[int, int, Path]] = []
    for root in roots:
        for folder, dirs, files in os.walk(root):
            dirs.sort()
            for rank, name in enumerate(names):
                if name in files:
                    path = Path(folder) / name
                    if outside_root(path, root):
                        raise DataError(link_outside(path, root))
                    found.append((len(path.relative_to(root).parts), rank, path))
    if not found:
        return None
    found.sort(key=lambda f: (f[0], f[1], str(f[2])))
    best = found[0]
    # Equal depth and rank: ambiguous, unless it is the same content twice.
    tied = [f[2] for f in found[1:] if f[:2] == best[:2]]
    digest = file_sha256(best[2]) if tied else ""
    rivals = [path for path in tied if file_sha256(path) != digest]
    if rivals:
        raise DataError(
            f"{best[2]}: ambiguous (found also {', '.join(map(str, rivals))}, expected one "
            f"{names[best[1]]} in the dataset)"
        )
    return best[2]


def _require(roots: Sequence[Path], names: Sequence[str]) -> Path:
    path = find_files(roots, names)
    if path is None:
        where = ", ".join(str(r) for r in roots)
        raise DataError(f"{where}: dataset file not found (expected {' or '.join(names)})")
    return path


def _read_captions(path: Path, image_ids: set[str], problems: Problems) -> dict[str, Any]:
    text = read_utf8(path, "UTF-8 JSON")
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg})") from exc
    if not isinstance(raw, dict):
        raise DataError(
            f"{path}:1: malformed captions (found {type(raw).__name__}, "
            "expected image -> {entity or '[OBJk]': caption})"
        )
    captions: dict[str, Any] = {}
    lines = json_key_lines(text)
    for image_id in sorted(image_ids & set(raw)):
        entry = raw[image_id]
        if isinstance(entry, dict) and all(isinstance(v, str) for v in entry.values()):
            captions[image_id] = entry
        else:
            reason = f"image {image_id}: malformed captions (found {entry!r:.80}, expected "
            problems.add(path, lines[image_id], reason + "{entity or '[OBJk]': caption})")
    return captions


def _convert(
    out_dir: Path,
    data: DataParams,
    *,
    source: str,
    split_files: Mapping[str, Path],
    labels: Sequence[str],
    images: ImageIndex,
    objects_file: Path | None,
    captions_file: Path | None,
    extra: Mapping[str, Any],
) -> dict[str, Any]:
    """Read, validate and write one dataset; shared by every converted source."""
    problems = Problems(data.on_error)
    reader = SourceReader(
        labels=labels,
        images=images,
        problems=problems,
        max_objects=data.max_objects,
        objects_file=objects_file,
    )
    splits: dict[str, list[Record]] = {s: reader.read_split(split_files[s], s) for s in SPLITS}
    splits = _with_decodable_images(splits, split_files, images, problems)
    for split, records in splits.items():
        if not records:
            # An empty dev split cannot select a model, an empty test split scores 0 on n = 0.
            found = [p for p in problems.items if p.file == str(split_files[split])]
            why = f" ({len(found)} problems, the first: {found[0]})" if found else ""
            raise DataError(
                f"{split_files[split]}: the {split} split has no usable records{why}; "
                "every split needs at least one"
            )
    image_ids = {r.image_id for recs in splits.values() for r in recs}
    hygiene = {**_duplicates(splits), **reader.hygiene}
    hygiene["image_ids_resolved_by_file_name_only"] = len(images.resolved_by_name_only)
    hygiene["image_ids_chosen_among_different_files"] = len(images.chosen_among_different)
    objects = reader.objects(image_ids)
    captions = _read_captions(captions_file, image_ids, problems) if captions_file else None
    files = {s: str(p) for s, p in split_files.items()}
    files.update(objects=str(objects_file or ""), captions=str(captions_file or ""))
    with staging_dir(out_dir) as root:
        for image_id in sorted(image_ids):
            dest = root / "images" / image_id
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(images.find(image_id), dest)
        if captions is not None:
            write_json(root / "captions.json", captions)
        problems.write_report(root / "skipped.tsv")
        manifest = write_dataset(
            root,
            splits,
            objects,
            labels,
            source=source,
            version=CONVERTER_VERSION,
            extra={
                **extra,
                "files": files,
                "on_error": data.on_error,
                "hygiene": hygiene,
                "skipped": {
                    "records": problems.skipped_records,
                    "problems": len(problems.items),
                    "report": "skipped.tsv",
                },
            },
        )
    for what, count in hygiene.items():
        if count:
            log.warning("%s: %d (kept; counted in manifest.json under hygiene)", what, count)
    if problems.items:
        log.warning(
            "%d problems, %d records skipped: see %s",
            len(problems.items),
            problems.skipped_records,
            out_dir / "skipped.tsv",
        )
    return manifest


def _duplicates(splits: Mapping[str, list[Record]]) -> dict[str, int]:
    """Records that repeat one in the same split, and records of dev or test that repeat one of
    an earlier split (leakage: a test score that measures memory)."""
    seen: dict[tuple, str] = {}
    within = across = 0
    for split in SPLITS:
        keys = set()
        for r in splits[split]:
            key = (r.text_tokens, r.image_id, r.head, r.tail, r.relation)
            if key in keys:
                within += 1
            elif key in seen:
                across += 1
            keys.add(key)
        for key in keys:
            seen.setdefault(key, split)
    return {"duplicate_records": within, "records_repeated_in_a_later_split": across}


def _with_decodable_images(
    splits: Mapping[str, list[Record]],
    split_files: Mapping[str, Path],
    images: ImageIndex,
    problems: Problems,
) -> dict[str, list[Record]]:
    """Decode every image the records use, once, as every later stage will (a truncated,
    zero-byte, non-image or oversized file fails here, where it enters): a record whose image
    does not decode is reported at its own line (``raise``) or left out (``skip``)."""
    bad: dict[str, str] = {}
    for image_id in sorted({r.image_id for recs in splits.values() for r in recs}):
        try:
            open_image(images.find(image_id))
        except DataError as exc:
            bad[image_id] = str(exc)
    kept = {}
    for split, records in splits.items():
        kept[split] = []
        for record in records:
            if record.image_id not in bad:
                kept[split].append(record)
                continue
            line = int(record.id.rsplit("-", 1)[1])  # ids are <split>-<line>
            reason = f"image {record.image_id} does not decode ({bad[record.image_id]})"
            problems.skip_record(split_files[split], line, reason)
    return kept


def convert_umre(
    roots: Sequence[Path],
    out_dir: Path,
    data: DataParams,
    *,
    source: str = "umre",
    extra: Mapping[str, Any] | None = None,
    labels: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Convert a UMRE-layout tree (split files, pos_umke.json, captions, UMKE_IMG/) found under
    ``roots``; the objects and captions files are optional. ``labels``: the relation set, in id
    order (default UMRE's)."""
    split_files = {s: _require(roots, names) for s, names in UMRE_FILES.items()}
    objects_file = find_files(roots, (UMRE_OBJECTS,))
    captions_file = find_files(roots, (UMRE_CAPTIONS,))
    if objects_file is None:
        log.warning("no %s found: object boxes come from the records", UMRE_OBJECTS)
    return _convert(
        out_dir,
        data,
        source=source,
        split_files=split_files,
        labels=UMRE_RELATIONS if labels is None else labels,
        images=ImageIndex(roots, prefer=(UMRE_IMAGE_FOLDER,)),
        objects_file=objects_file,
        captions_file=captions_file,
        extra={"format": "umre", **(extra or {})},
    )


def convert_mnre(
    text_roots: Sequence[Path],
    image_roots: Sequence[Path],
    out_dir: Path,
    data: DataParams,
    *,
    source: str = "mnre",
    extra: Mapping[str, Any] | None = None,
    labels: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Convert MNRE text files (``mnre_train.txt``, ``mnre_val .txt``, ``mnre_test.txt``) and
    images; MNRE has no boxes, so each image gets zero objects. ``labels``: the relation set,
    in id order (default MNRE's)."""
    split_files = {s: _require(text_roots, names) for s, names in MNRE_FILES.items()}
    return _convert(
        out_dir,
        data,
        source=source,
        split_files=split_files,
        labels=MNRE_RELATIONS if labels is None else labels,
        images=ImageIndex(image_roots, prefer=("img_org",)),
        objects_file=None,
        captions_file=None,
        extra={"format": "mnre", **(extra or {})},
    )


def _provenance(downloads: Mapping[str, Download]) -> dict[str, Any]:
    return {"downloads": {name: d.provenance() for name, d in downloads.items()}}


def prepare_dataset(
    params: Params, out_dir: Path, cache_dir: Path, *, downloader: Downloader | None = None
) -> dict[str, Any]:
    """Write the dataset named by ``params.data.source`` to ``out_dir`` (replaced atomically);
    downloads and their extraction are kept in ``cache_dir``. Returns the manifest."""
    data = params.data
    out_dir, cache_dir = Path(out_dir), Path(cache_dir)
    if data.source == "synthetic":
        return generate_synthetic(out_dir, data.synthetic, data.max_objects)
    dl = downloader or Downloader(cache_dir)
    if data.source == "umre":
        u = data.umre
        downloads = {
            "dataset": dl.fetch(f"gdrive:{u.dataset_id}", "umre_dataset", u.dataset_sha256),
            "partner": dl.fetch(f"gdrive:{u.partner_id}", "umre_partner", u.partner_sha256),
        }
        roots = [dl.extract(d) for d in downloads.values()]
        return convert_umre(roots, out_dir, data, extra=_provenance(downloads))
    if data.source == "mnre":
        m = data.mnre
        downloads = {
            split: dl.fetch(url_join(m.text_url, names[0]), names[0])
            for split, names in MNRE_FILES.items()
        }
        text_roots = [d.path.parent for d in downloads.values()]
        downloads["images"] = dl.fetch(f"gdrive:{m.images_id}", "mnre_images", m.images_sha256)
        image_root = dl.extract(downloads["images"])
        return convert_mnre(text_roots, [image_root], out_dir, data, extra=_provenance(downloads))
    if data.source == "local":
        return _prepare_local(data, out_dir, dl)
    raise DataError(f"data.source: unknown source {data.source!r}")


def _prepare_local(data: DataParams, out_dir: Path, dl: Downloader) -> dict[str, Any]:
    if not data.local.path:
        raise DataError("data.local.path: empty (expected an archive or a folder)")
    path = Path(data.local.path).expanduser()
    if path.is_dir():
        root, extra = path, {"local": {"path": str(path)}}
    elif is_archive(path):
        archive = Download(str(path), path, file_sha256(path), pinned=False)
        root, extra = dl.extract(archive), _provenance({"archive": archive})
    elif path.is_file() and looks_like_archive(path):
        raise DataError(
            f"{path}: corrupt or truncated archive (neither zip nor tar can open it; "
            "data.local.path)"
        )
    elif path.exists():
        raise DataError(f"{path}: not a folder, zip or tar archive (data.local.path)")
    else:
        raise DataError(f"{path}: not found (data.local.path)")
    labels = None
    if data.local.labels:
        labels_file = _local_labels_file(data.local.labels, root)
        labels = read_label_file(labels_file)
        extra = {
            **extra,
            "labels_file": {"path": str(labels_file), "sha256": file_sha256(labels_file)},
        }
    if data.local.format == "umre":
        return convert_umre([root], out_dir, data, source="local", extra=extra, labels=labels)
    if data.local.format == "mnre":
        return convert_mnre(
            [root], [root], out_dir, data, source="local", extra=extra, labels=labels
        )
    raise ValueError(f"data.local.format {data.local.format!r}: this code reads {LOCAL_FORMATS}")


def _local_labels_file(name: str, root: Path) -> Path:
    """``data.local.labels``: an absolute path, or one relative to the dataset's folder (or
    archive) and then to the working directory."""
    path = Path(name).expanduser()
    candidates = [path] if path.is_absolute() else [root / path, Path.cwd() / path]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    looked = ", ".join(str(c) for c in candidates)
    raise DataError(f"{name}: label file not found (data.local.labels; looked for {looked})")
