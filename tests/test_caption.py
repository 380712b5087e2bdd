"""The caption stage: items, prompts, batched generation, resume, shards, file import, reader."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import disk_full_at, held_locks
from PIL import Image
from typer.testing import CliRunner

from pipeline.caption.captioner import Captioner, crop_box
from pipeline.caption.prompts import build_prompt, load_prompts
from pipeline.caption.rowlog import append_rows, read_row_log, settings_id
from pipeline.caption.run import run_caption, shard_items
from pipeline.caption.table import CaptionTable, caption_items, coverage_of
from pipeline.config import default_params, params_to_dict
from pipeline.data.images import box_to_pixels
from pipeline.data.records import Dataset
from pipeline.data.synthetic import generate_synthetic
from pipeline.io import DataError

DEFAULTS = default_params()

PROMPTS = Path(__file__).resolve().parents[1] / "pipeline" / "prompts" / "caption_v1.json"
MLLM = replace(
    DEFAULTS.caption,
    backend="mllm",
    model="tiny",
    prompts=str(PROMPTS),
    max_new_tokens=6,
    batch_size=4,
)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Dataset:
    root = tmp_path_factory.mktemp("caption") / "raw"
    generate_synthetic(
        root, replace(DEFAULTS.data.synthetic, seed=5, train=6, valid=3, test=3, image_size=64), 4
    )
    return Dataset(root)


@pytest.fixture(scope="module")
def captioner() -> Captioner:
    return Captioner.load("tiny", dtype=MLLM.dtype, max_new_tokens=MLLM.max_new_tokens)


@pytest.fixture(scope="module")
def reference(dataset, captioner, tmp_path_factory) -> Path:
    """An uninterrupted mllm run, for the other runs to be compared with."""
    out = tmp_path_factory.mktemp("reference") / "captions"
    run_caption(dataset, out, MLLM, captioner=captioner, progress=False)
    return out


def spy(monkeypatch, captioner: Captioner) -> list[tuple[str, Image.Image]]:
    """Record every (prompt, image) the captioner is asked about."""
    calls: list[tuple[str, Image.Image]] = []
    describe = captioner.describe

    def recording(prompts, images, system=""):
        calls.extend(zip(prompts, images, strict=True))
        return describe(prompts, images, system)

    monkeypatch.setattr(captioner, "describe", recording)
    return calls


def expected_keys(root: Path) -> set[tuple[str, str]]:
    """Every (image id, key) worth a caption, computed from the raw files, not the library."""
    keys, images = set(), set()
    for split in ("train", "valid", "test"):
        for line in (root / "records" / f"{split}.jsonl").read_text().splitlines():
            record = json.loads(line)
            images.add(record["image_id"])
            for entity in (record["head"], record["tail"]):
                if entity["kind"] == "text":
                    keys.add((record["image_id"], entity["name"]))
    objects = json.loads((root / "objects.json").read_text())
    keys |= {(image, key) for image in images for key in objects.get(image, {})}
    return keys


def test_every_text_entity_and_object_gets_one_row(dataset, reference):
    keys = expected_keys(dataset.root)
    rows = [json.loads(line) for line in (reference / "captions.jsonl").read_text().splitlines()]
    assert sorted((r["image_id"], r["key"]) for r in rows) == sorted(keys)
    assert {(r["model"], r["prompt_version"]) for r in rows} == {("tiny", "caption_v1")}
    kinds = {(r["image_id"], r["key"]): r["kind"] for r in rows}
    assert all((kinds[k] == "object") == k[1].startswith("[OBJ") for k in keys)

    table = CaptionTable(reference)
    assert (
        table.backend == "mllm" and table.model == "tiny" and table.prompt_version == "caption_v1"
    )
    assert len(table) == len(keys)
    assert all(table.get(r["image_id"], r["key"]) == r["caption"] for r in rows)
    assert table.get(rows[0]["image_id"], "[OBJ99]") is None
    assert table.get("no-such-image.png", rows[0]["key"]) is None
    coverage = table.coverage(dataset)
    assert (coverage.total, coverage.found, coverage.missing) == (len(keys), len(keys), ())
    n_objects = sum(k[1].startswith("[OBJ") for k in keys)
    assert (coverage.objects_total, coverage.entities_total) == (n_objects, len(keys) - n_objects)
    manifest = json.loads((reference / "manifest.json").read_text())
    assert manifest["coverage"]["found"] == manifest["items"] == len(keys)
    # The random tiny model still answers differently for different prompts and images.
    assert len({r["caption"] for r in rows}) > len(rows) // 2


def test_prompts_name_the_entity_and_carry_the_post(dataset, captioner, tmp_path, monkeypatch):
    calls = spy(monkeypatch, captioner)
    run_caption(dataset, tmp_path / "out", MLLM, captioner=captioner, progress=False)
    items = caption_items(dataset)
    assert len(calls) == len(items)
    texts = {}
    for split in ("train", "valid", "test"):
        for record in dataset.records(split):
            texts.setdefault(record.image_id, " ".join(record.text_tokens))
    for item, (prompt, image) in zip(items, calls, strict=True):
        assert texts[item.image_id] in prompt
        full = Image.open(dataset.image_path(item.image_id))
        if item.kind == "entity":
            assert f"what is '{item.key}' in the text?" in prompt
            assert image.size == full.size
        else:
            assert "[OBJ" not in prompt
            x1, y1, x2, y2 = item.box
            assert image.tobytes() == crop_box(full.convert("RGB"), item.box).tobytes()
            assert image.size[0] == pytest.approx((x2 - x1) * full.size[0], abs=2)
            assert image.size[1] == pytest.approx((y2 - y1) * full.size[1], abs=2)


def test_an_object_prompt_may_show_the_whole_picture(dataset, captioner, tmp_path, monkeypatch):
    raw = json.loads(PROMPTS.read_text())
    raw["object"]["image"] = "full"
    (tmp_path / "full.json").write_text(json.dumps(raw))
    shown = []

    def describe(prompts, images, system=""):
        shown.extend(images)
        return ["an answer"] * len(prompts)

    monkeypatch.setattr(captioner, "describe", describe)
    params = replace(MLLM, prompts=str(tmp_path / "full.json"))
    run_caption(dataset, tmp_path / "out", params, captioner=captioner, progress=False)
    items = caption_items(dataset)
    assert len(shown) == len(items) and any(it.kind == "object" for it in items)
    for item, image in zip(items, shown, strict=True):
        full = Image.open(dataset.image_path(item.image_id)).convert("RGB")
        assert image.tobytes() == full.tobytes()


def test_batched_generation_equals_one_at_a_time(dataset, captioner, reference, tmp_path):
    items = caption_items(dataset)[:6]
    prompts = load_prompts(PROMPTS)
    questions = [build_prompt(it, prompts) for it in items]
    images = []
    for item in items:
        image = Image.open(dataset.image_path(item.image_id)).convert("RGB")
        images.append(crop_box(image, item.box) if item.kind == "object" else image)
    batched = captioner.describe(questions, images)
    single = [captioner.describe([q], [im])[0] for q, im in zip(questions, images, strict=True)]
    assert batched == single
    assert len(set(batched)) > 1

    # The same through the stage: batch size 1 writes exactly what batch size 4 wrote.
    one = dataclasses.replace(MLLM, batch_size=1)
    run_caption(dataset, tmp_path / "one", one, captioner=captioner, progress=False)
    for name in ("captions.json", "captions.jsonl"):
        assert (tmp_path / "one" / name).read_bytes() == (reference / name).read_bytes()


class Killed(Exception):
    pass


def kill_at_once(rows_made: int) -> None:
    raise Killed


def test_kill_and_resume_equals_uninterrupted(dataset, captioner, reference, tmp_path, monkeypatch):
    out = tmp_path / "captions"

    def kill_after_two_batches(rows_made: int) -> None:
        if rows_made >= 2 * MLLM.batch_size:
            raise Killed

    with pytest.raises(Killed):
        run_caption(
            dataset, out, MLLM, captioner=captioner, progress=False,
            after_batch=kill_after_two_batches,
        )  # fmt: skip
    assert not (out / "manifest.json").exists() and not (out / "captions.json").exists()
    assert len(read_row_log(out / "captions.jsonl")) == 2 * MLLM.batch_size
    # A crash in the middle of the next write leaves a cut line; it must not be trusted.
    with (out / "captions.jsonl").open("a") as fh:
        fh.write('{"caption": "half a row", "image_id": "syn_tr')

    # Killed again one batch later: the cut line is gone and the log holds whole rows only.
    calls = spy(monkeypatch, captioner)
    with pytest.raises(Killed):
        run_caption(
            dataset, out, MLLM, captioner=captioner, progress=False,
            after_batch=kill_at_once,
        )  # fmt: skip
    assert len(read_row_log(out / "captions.jsonl")) == 3 * MLLM.batch_size
    assert (out / "captions.jsonl").read_text().count("\n") == 3 * MLLM.batch_size

    manifest = run_caption(dataset, out, MLLM, captioner=captioner, progress=False)
    total = len(caption_items(dataset))
    assert len(calls) == total - 2 * MLLM.batch_size
    assert manifest["coverage"]["found"] == total
    for name in ("captions.json", "captions.jsonl", "manifest.json"):
        assert (out / name).read_bytes() == (reference / name).read_bytes()

    # A rerun of a finished folder generates nothing and changes nothing.
    calls.clear()
    run_caption(dataset, out, MLLM, captioner=captioner, progress=False)
    assert calls == []
    assert (out / "captions.json").read_bytes() == (reference / "captions.json").read_bytes()


def test_row_log_drops_a_cut_last_line_and_rejects_corruption(tmp_path):
    path = tmp_path / "log.jsonl"
    rows = [{"image_id": "a.jpg", "key": k, "caption": "c", "settings": "s"} for k in "xy"]
    append_rows(path, rows)
    whole = path.read_bytes()
    with path.open("ab") as fh:
        fh.write(b'{"image_id": "a.jpg", "key": "z", "capt')
    assert read_row_log(path) == rows
    assert path.read_bytes() != whole  # a reader that does not own the log leaves it alone
    assert read_row_log(path, repair=True) == rows
    assert path.read_bytes() == whole
    append_rows(path, rows[:1])
    assert read_row_log(path) == rows + rows[:1]

    path.write_text(whole.decode() + '{"image_id": "b.jpg"}\n')
    with pytest.raises(DataError, match=r"log\.jsonl:3: corrupt caption row"):
        read_row_log(path)


def test_other_model_or_prompt_version_is_not_reused(
    dataset, captioner, reference, tmp_path, monkeypatch
):
    prompts = load_prompts(PROMPTS)
    base = settings_id("tiny", prompts, 6, "float32")
    assert len({
        base,
        settings_id("tiny-b", prompts, 6, "float32"),
        settings_id("tiny", dataclasses.replace(prompts, version="caption_v2"), 6, "float32"),
        settings_id("tiny", prompts, 7, "float32"),
        settings_id("tiny", prompts, 6, "bfloat16"),
    }) == 5  # fmt: skip

    out = tmp_path / "captions"
    shutil.copytree(reference, out)
    raw = json.loads(PROMPTS.read_text())
    raw["version"] = "caption_v2"
    v2 = tmp_path / "caption_v2.json"
    v2.write_text(json.dumps(raw))
    calls = spy(monkeypatch, captioner)
    manifest = run_caption(
        dataset, out, dataclasses.replace(MLLM, prompts=str(v2)), captioner=captioner,
        progress=False,
    )  # fmt: skip
    assert len(calls) == manifest["items"]
    rows = read_row_log(out / "captions.jsonl")
    assert {r["prompt_version"] for r in rows} == {"caption_v2"}
    assert len(rows) == manifest["items"]
    assert manifest["prompt_version"] == "caption_v2"

    # Same version, edited text: also regenerated (the template's hash is part of the settings).
    raw["entity"]["prompt"] += " Answer in one line."
    v2.write_text(json.dumps(raw))
    calls.clear()
    run_caption(
        dataset, out, dataclasses.replace(MLLM, prompts=str(v2)), captioner=captioner,
        progress=False,
    )  # fmt: skip
    assert len(calls) == manifest["items"]


def test_shards_split_the_work_and_merge_to_the_single_run(
    dataset, captioner, reference, tmp_path, monkeypatch
):
    items = caption_items(dataset)
    parts = [shard_items(items, i, 3) for i in range(3)]
    assert [it for part in parts for it in part] == items
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    with pytest.raises(ValueError, match="--shard"):
        shard_items(items, 3, 3)

    # Two workers: the first leaves its part; the last to finish finds every item done and merges.
    out = tmp_path / "captions"
    first = run_caption(dataset, out, MLLM, shard=0, num_shards=2, captioner=captioner,
                        progress=False)  # fmt: skip
    assert first["generated"] == first["items"] == len(shard_items(items, 0, 2))
    assert first["missing"] == len(shard_items(items, 1, 2))
    again = run_caption(dataset, out, MLLM, shard=0, num_shards=2, captioner=captioner,
                        progress=False)  # fmt: skip
    assert (again["items"], again["generated"]) == (first["items"], 0)  # its part was done
    assert [p.name for p in (out / "shards").iterdir()] == ["part-000-of-002.jsonl"]
    assert not (out / "captions.json").exists() and not (out / "manifest.json").exists()
    last = run_caption(dataset, out, MLLM, shard=1, num_shards=2, captioner=captioner,
                       progress=False)  # fmt: skip
    assert last["coverage"]["found"] == len(items)
    assert not (out / "shards").exists()
    for name in ("captions.json", "captions.jsonl", "manifest.json"):
        assert (out / name).read_bytes() == (reference / name).read_bytes()

    # One worker of three done elsewhere; a plain run merges its part and generates the rest.
    merged = tmp_path / "merged"
    run_caption(dataset, merged, MLLM, shard=1, num_shards=3, captioner=captioner, progress=False)
    calls = spy(monkeypatch, captioner)
    run_caption(dataset, merged, MLLM, captioner=captioner, progress=False)
    assert len(calls) == len(items) - len(shard_items(items, 1, 3))
    assert not (merged / "shards").exists()
    for name in ("captions.json", "captions.jsonl", "manifest.json"):
        assert (merged / name).read_bytes() == (reference / name).read_bytes()


def crafted_caption_file(dataset: Dataset, path: Path) -> tuple[dict, tuple, tuple]:
    """A UMRE-style file: every item but one entity and one object, plus an entity no record
    pairs, an image the dataset does not have and an object the image does not have."""
    items = caption_items(dataset)
    dropped_entity = next(it for it in items if it.kind == "entity")
    dropped_object = next(it for it in items if it.kind == "object")
    mapping: dict[str, dict[str, str]] = {}
    for n, it in enumerate(items):
        if it not in (dropped_entity, dropped_object):
            mapping.setdefault(it.image_id, {})[it.key] = f"caption {n} of {it.key}"
    first = items[0]
    mapping[first.image_id][first.text.split()[0]] = "a word of the post, no record pairs it"
    mapping["not_in_dataset.jpg"] = {"Someone": "unknown image"}
    mapping[first.image_id]["[OBJ11]"] = "unknown object"
    path.write_text(json.dumps(mapping))
    return mapping, dropped_entity, dropped_object


def test_file_backend_round_trip_with_coverage_and_fill(dataset, tmp_path, caplog):
    mapping, dropped_entity, dropped_object = crafted_caption_file(dataset, tmp_path / "cap.json")
    params = replace(
        DEFAULTS.caption, backend="file", file=str(tmp_path / "cap.json"), on_missing="fill"
    )
    with caplog.at_level(logging.WARNING):
        manifest = run_caption(dataset, tmp_path / "out", params)
    items = caption_items(dataset)
    n_objects = sum(it.kind == "object" for it in items)
    assert manifest["coverage"] == {
        "total": len(items),
        "found": len(items) - 2,
        "fraction": round((len(items) - 2) / len(items), 6),
        "entities": {"total": len(items) - n_objects, "found": len(items) - n_objects - 1},
        "objects": {"total": n_objects, "found": n_objects - 1},
    }
    assert (manifest["filled"], manifest["unused"], manifest["unknown"]["count"]) == (2, 1, 2)
    unknown = {(e["image_id"], e["key"]) for e in manifest["unknown"]["entries"]}
    assert unknown == {("not_in_dataset.jpg", "Someone"), (items[0].image_id, "[OBJ11]")}
    assert "image 'not_in_dataset.jpg' key 'Someone'" in caplog.text
    assert f"image {items[0].image_id!r} key '[OBJ11]'" in caplog.text

    table = CaptionTable(tmp_path / "out")
    assert table.backend == "file"
    for item in items:
        want = mapping.get(item.image_id, {}).get(item.key, "")
        assert table.get(item.image_id, item.key) == want
    assert table.get(dropped_entity.image_id, dropped_entity.key) == ""
    assert table.get("not_in_dataset.jpg", "Someone") is None
    # The reader also opens a bare caption file, as is.
    bare = CaptionTable(tmp_path / "cap.json")
    assert bare.backend == "file" and bare.as_dict() == mapping


def test_file_import_keeps_unused_names_of_the_post_and_reports_at_most_100_unknown(
    dataset, tmp_path
):
    items = caption_items(dataset)
    mapping: dict[str, dict[str, str]] = {}
    for it in items:
        mapping.setdefault(it.image_id, {})[it.key] = f"caption of {it.key}"
    first = items[0]
    words = first.text.split()
    # Two words of the post that no record pairs: a name the post holds, not an unknown entry.
    pairs = (" ".join(words[i : i + 2]) for i in range(len(words) - 1))
    unused = next(p for p in pairs if p not in mapping[first.image_id])
    mapping[first.image_id][unused] = "a name of the post"
    for k in range(101):
        mapping[f"not_in_dataset_{k:03d}.jpg"] = {"Someone": "unknown image"}
    (tmp_path / "cap.json").write_text(json.dumps(mapping))
    params = replace(DEFAULTS.caption, backend="file", file=str(tmp_path / "cap.json"))
    manifest = run_caption(dataset, tmp_path / "out", params)
    assert (manifest["unused"], manifest["unknown"]["count"]) == (1, 101)
    entries = manifest["unknown"]["entries"]
    assert [e["image_id"] for e in entries] == [f"not_in_dataset_{k:03d}.jpg" for k in range(100)]


def test_an_empty_caption_in_the_file_is_a_caption_not_a_gap(dataset, tmp_path):
    items = caption_items(dataset)
    mapping: dict[str, dict[str, str]] = {}
    for n, it in enumerate(items):
        mapping.setdefault(it.image_id, {})[it.key] = "" if n == 0 else f"caption {n}"
    (tmp_path / "cap.json").write_text(json.dumps(mapping))
    params = replace(DEFAULTS.caption, backend="file", file=str(tmp_path / "cap.json"))
    manifest = run_caption(dataset, tmp_path / "out", params)
    assert manifest["filled"] == 0 and manifest["coverage"]["found"] == len(items)
    coverage = CaptionTable(tmp_path / "out").coverage(dataset)
    assert (coverage.found, coverage.missing) == (len(items), ())
    assert coverage_of({}, []).fraction == 1.0  # nothing wanted: nothing missing


def test_file_backend_fails_on_missing_captions_naming_them(dataset, tmp_path):
    _, dropped_entity, dropped_object = crafted_caption_file(dataset, tmp_path / "cap.json")
    params = replace(
        DEFAULTS.caption, backend="file", file=str(tmp_path / "cap.json"), on_missing="fail"
    )
    with pytest.raises(DataError) as err:
        run_caption(dataset, tmp_path / "out", params)
    message = str(err.value)
    assert "2 of" in message and "on_missing: fill" in message
    for item in (dropped_entity, dropped_object):
        assert f"image {item.image_id!r} key {item.key!r}" in message
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_file_backend_defaults_to_the_datasets_captions(dataset, tmp_path):
    manifest = run_caption(dataset, tmp_path / "out", DEFAULTS.caption)
    assert manifest["source_file"] == str(dataset.captions_path)
    assert manifest["coverage"]["found"] == manifest["items"] == len(caption_items(dataset))
    shipped = json.loads(dataset.captions_path.read_text())
    table = CaptionTable(tmp_path / "out")
    for item in caption_items(dataset):
        assert table.get(item.image_id, item.key) == shipped[item.image_id][item.key]


def test_bad_caption_file_names_image_and_key(dataset, tmp_path):
    image_id = caption_items(dataset)[0].image_id
    (tmp_path / "cap.json").write_text(json.dumps({image_id: {"[OBJ0]": ["not", "text"]}}))
    params = replace(DEFAULTS.caption, backend="file", file=str(tmp_path / "cap.json"))
    with pytest.raises(DataError, match=rf"image '{image_id}' key '\[OBJ0\]': expected a caption"):
        run_caption(dataset, tmp_path / "out", params)


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (
            [["x.jpg", {"[OBJ0]": "a dog"}]],
            "expected a JSON object image id -> {key: caption}, found list",
        ),
        ({"x.jpg": ["a dog"]}, "image 'x.jpg': expected an object {key: caption}, found list"),
    ],
)
def test_a_caption_file_of_another_shape_is_refused(tmp_path, content, problem):
    path = tmp_path / "cap.json"
    path.write_text(json.dumps(content))
    with pytest.raises(DataError, match=f"^{re.escape(f'{path}: {problem}')}$"):
        CaptionTable(path)


def test_a_bare_caption_files_images_are_sorted_and_its_dict_is_a_copy(tmp_path):
    path = tmp_path / "cap.json"
    path.write_text(json.dumps({"b.jpg": {"Ann": "a woman"}, "a.jpg": {"[OBJ0]": "a dog"}}))
    table = CaptionTable(path)
    assert table.image_ids() == ["a.jpg", "b.jpg"]
    copy = table.as_dict()
    copy["a.jpg"]["[OBJ0]"] = "changed"
    copy["c.jpg"] = {}
    assert table.get("a.jpg", "[OBJ0]") == "a dog" and table.image_ids() == ["a.jpg", "b.jpg"]
    # A file's captions were made by no captioning model: caption.model does not matter.
    table.check_made_with(replace(DEFAULTS.caption, backend="file", model="Qwen/Other"))


def test_a_missing_caption_file_says_which_param_to_set(dataset, tmp_path):
    given = replace(DEFAULTS.caption, file=str(tmp_path / "nope.json"))
    message = "nope.json: caption file not found (check caption.file, or use backend mllm or none)"
    with pytest.raises(DataError, match=re.escape(message)):
        run_caption(dataset, tmp_path / "out", given)
    shutil.copytree(dataset.root, tmp_path / "ds")
    bare = Dataset(tmp_path / "ds")
    bare.captions_path.unlink()
    with pytest.raises(DataError, match=re.escape("caption file not found (set caption.file, ")):
        run_caption(bare, tmp_path / "out", DEFAULTS.caption)


def test_a_failed_write_of_the_captions_leaves_no_manifest(dataset, tmp_path, monkeypatch):
    import pipeline.caption.run

    disk_full_at(monkeypatch, pipeline.caption.run, "captions.json")
    with pytest.raises(OSError, match="disk full"):
        run_caption(dataset, tmp_path / "out", DEFAULTS.caption)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_a_killed_run_over_an_earlier_output_leaves_it_unreadable(dataset, captioner, tmp_path):
    out = tmp_path / "captions"
    run_caption(dataset, out, DEFAULTS.caption)  # a complete file-backend output
    assert CaptionTable(out).backend == "file"
    with pytest.raises(Killed):
        run_caption(
            dataset, out, MLLM, captioner=captioner, progress=False, after_batch=kill_at_once
        )
    # Its rows are the new run's; the old manifest no longer vouches for them.
    with pytest.raises(DataError, match="not a caption stage output"):
        CaptionTable(out)


@pytest.mark.parametrize("size", [{"batch_size": 0}, {"max_new_tokens": 0}])
def test_empty_batches_or_answers_are_refused(dataset, captioner, tmp_path, size):
    with pytest.raises(ValueError, match="max_new_tokens must be at least 1"):
        run_caption(dataset, tmp_path / "out", replace(MLLM, **size), captioner=captioner)
    assert not (tmp_path / "out" / "captions.jsonl").exists()


def test_rows_are_reused_only_for_the_same_post_text_box_and_image(
    dataset, captioner, reference, tmp_path, monkeypatch
):
    # A regenerated dataset keeps its image ids and often its entity names: a row whose prompt
    # would read another text, box or image is made again, every other one is reused.
    root = tmp_path / "raw"
    shutil.copytree(dataset.root, root)
    items = caption_items(dataset)
    flipped, retold, moved = sorted({it.image_id for it in items})[:3]
    image = Image.open(root / "images" / flipped)
    image.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(root / "images" / flipped)
    for split in ("train", "valid", "test"):  # the post text is the image's first record's
        path = root / "records" / f"{split}.jsonl"
        records = [json.loads(line) for line in path.read_text().splitlines()]
        first = next((r for r in records if r["image_id"] == retold), None)
        if first is not None:
            first["text_tokens"][-1] += "!"
            path.write_text("".join(json.dumps(r) + "\n" for r in records))
            break
    objects = json.loads((root / "objects.json").read_text())
    key = sorted(objects[moved])[0]
    objects[moved][key] = [round(v * 0.9, 4) for v in objects[moved][key]]
    (root / "objects.json").write_text(json.dumps(objects))
    edited = Dataset(root, verify=False)
    changed = {(it.image_id, it.key) for it in items if it.image_id in (flipped, retold)}
    changed.add((moved, key))
    assert first is not None and len(changed) < len(items)

    out = tmp_path / "captions"
    shutil.copytree(reference, out)
    calls = spy(monkeypatch, captioner)
    manifest = run_caption(edited, out, MLLM, captioner=captioner, progress=False)
    prompted = {build_prompt(it, load_prompts(PROMPTS)) for it in caption_items(edited)
                if (it.image_id, it.key) in changed}  # fmt: skip
    assert len(calls) == len(changed) and {prompt for prompt, _ in calls} == prompted
    assert manifest["items"] == len(items) and manifest["coverage"]["fraction"] == 1.0
    # The merged log keeps one row per item, each made from the inputs it now has.
    assert len(read_row_log(out / "captions.jsonl")) == len(items)
    calls.clear()
    run_caption(edited, out, MLLM, captioner=captioner, progress=False)
    assert calls == []


def test_captions_of_other_settings_are_refused_by_name(dataset, reference, tmp_path):
    table = CaptionTable(reference)
    table.check_made_with(MLLM)  # what made them: fine
    with pytest.raises(
        DataError, match=r"made by caption.backend 'mllm', but the params say 'file'"
    ):
        table.check_made_with(DEFAULTS.caption)
    other = replace(MLLM, model="Qwen/Qwen2.5-VL-7B-Instruct")
    with pytest.raises(DataError, match=r"caption.model 'tiny', but the params say 'Qwen/"):
        table.check_made_with(other)


def test_none_backend_writes_an_empty_table(dataset, reference, tmp_path):
    out = tmp_path / "captions"
    shutil.copytree(reference, out)  # a previous mllm output must not leak through
    manifest = run_caption(dataset, out, replace(DEFAULTS.caption, backend="none"))
    table = CaptionTable(out)
    assert table.backend == "none" and len(table) == 0
    item = caption_items(dataset)[0]
    assert table.get(item.image_id, item.key) is None
    assert manifest["coverage"]["found"] == 0 and manifest["items"] == len(caption_items(dataset))
    assert (out / "captions.jsonl").read_text() == ""


def test_a_saved_model_loads_from_its_folder_and_answers_the_same(dataset, captioner, tmp_path):
    folder = tmp_path / "tiny-qwen"
    captioner.processor.save_pretrained(folder)
    captioner.model.save_pretrained(folder)
    loaded = Captioner.load(str(folder), dtype=MLLM.dtype, max_new_tokens=MLLM.max_new_tokens)
    assert type(loaded.model) is type(captioner.model)
    item = caption_items(dataset)[0]
    question = build_prompt(item, load_prompts(PROMPTS))
    image = Image.open(dataset.image_path(item.image_id)).convert("RGB")
    assert loaded.describe([question], [image]) == captioner.describe([question], [image])


def test_crop_box_cuts_pixels_and_widens_degenerate_boxes():
    image = Image.new("RGB", (200, 100))
    assert crop_box(image, (0.1, 0.2, 0.5, 0.6)).size == (80, 40)
    assert crop_box(image, (0.25, 0.5, 0.25, 0.5)).size == (1, 1)
    thin = crop_box(image, (0.0, 0.0, 1.0, 0.0))  # 200 x 0 pixels: widened to 200 x 2
    assert thin.size == (200, 2)
    assert crop_box(image, (0.9, 0.9, 1.2, 1.3)).size == (20, 10)  # clipped to the image


def test_a_thin_box_is_widened_evenly_around_itself_and_kept_inside_the_image():
    rng = np.random.default_rng(1)
    tall = Image.fromarray(rng.integers(0, 255, (1000, 50, 3), dtype=np.uint8))  # 50 x 1000
    # Column 25 alone (1 x 1000) needs 10 columns for an aspect of 100: 4 added left, 5 right.
    assert np.array_equal(
        np.asarray(crop_box(tall, (0.5, 0.0, 0.5, 1.0))), np.asarray(tall)[:, 21:31]
    )
    # At the right edge the 10 columns end at the image's border.
    assert np.array_equal(
        np.asarray(crop_box(tall, (0.99, 0.0, 1.0, 1.0))), np.asarray(tall)[:, 40:50]
    )
    wide = Image.fromarray(rng.integers(0, 255, (50, 1000, 3), dtype=np.uint8))  # 1000 x 50
    assert np.array_equal(
        np.asarray(crop_box(wide, (0.0, 0.5, 1.0, 0.5))), np.asarray(wide)[21:31, :]
    )
    # 1050 rows need 10.5 columns: 11 (rounded up, so the aspect stays at most 100), 5 each side.
    taller = Image.fromarray(rng.integers(0, 255, (1050, 50, 3), dtype=np.uint8))
    crop = crop_box(taller, (0.5, 0.0, 0.5, 1.0))
    assert np.array_equal(np.asarray(crop), np.asarray(taller)[:, 20:31])
    assert crop.height / crop.width <= 100


def test_the_captioner_sees_the_pixels_the_model_crops():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (37, 53, 3), dtype=np.uint8))
    for box in [(0.11, 0.27, 0.63, 0.9), (0.0, 0.0, 1.0, 1.0), (0.505, 0.01, 0.77, 0.333)]:
        pixels = box_to_pixels(box, image.width, image.height)
        assert np.array_equal(np.asarray(crop_box(image, box)), np.asarray(image.crop(pixels)))


def test_prompt_templates_are_checked(tmp_path):
    prompts = load_prompts(PROMPTS)
    assert prompts.version == "caption_v1" and prompts.entity.image == "full"
    raw = json.loads(PROMPTS.read_text())
    raw["object"]["prompt"] = "what is {name} in {post}?"
    (tmp_path / "bad.json").write_text(json.dumps(raw))
    with pytest.raises(DataError, match=r"bad\.json: \"object\.prompt\": unknown placeholder"):
        load_prompts(tmp_path / "bad.json")
    # {name} is the text entity's: an object has none (caught here, not at the first object).
    raw["object"]["prompt"] = "what is {name}?"
    (tmp_path / "bad.json").write_text(json.dumps(raw))
    with pytest.raises(DataError, match=r"\"object\.prompt\": unknown placeholder\(s\) \['name'\]"):
        load_prompts(tmp_path / "bad.json")
    good = json.loads(PROMPTS.read_text())
    for field, value, problem in [
        ("image", None, r'"entity\.image": expected "full" or "crop", found None'),
        ("system", 3, r'"system": expected a string, found int'),
    ]:
        bad = json.loads(PROMPTS.read_text())
        if field == "image":
            del bad["entity"]["image"]
        else:
            bad[field] = value
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        with pytest.raises(DataError, match=problem):
            load_prompts(tmp_path / "bad.json")
    assert good["system"] == "" and load_prompts(PROMPTS).system == ""
    del raw["version"]
    (tmp_path / "bad.json").write_text(json.dumps(raw))
    with pytest.raises(DataError, match="version"):
        load_prompts(tmp_path / "bad.json")


def test_cli_runs_the_stage_and_checks_shard_options(dataset, tmp_path):
    from stages.cli import app

    params = params_to_dict(DEFAULTS)
    params["caption"]["backend"] = "file"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    runner = CliRunner()
    help_text = runner.invoke(app, ["caption", "--help"]).output
    for option in ("--params", "--dataset", "--out", "--shard", "--num-shards"):
        assert option in help_text
    args = ["caption", "--params", str(tmp_path / "params.yaml"), "--dataset", str(dataset.root)]
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert CaptionTable(tmp_path / "out").coverage(dataset).fraction == 1.0
    bad = runner.invoke(
        app, [*args, "--out", str(tmp_path / "o2"), "--shard", "2", "--num-shards", "2"]
    )
    assert bad.exit_code == 2 and "--shard 2" in bad.output
    wrong_backend = runner.invoke(app, [*args, "--out", str(tmp_path / "o3"), "--num-shards", "2"])
    assert wrong_backend.exit_code == 1 and "mllm only" in wrong_backend.output


def test_place_captioner_casts_the_parameters_and_keeps_float32_buffers():
    """On a GPU in bfloat16 the weights are cast, the rotary inverse frequencies stay float32
    (as from_pretrained(dtype=bfloat16) leaves them), and the parameters stay the same objects."""
    import torch

    from pipeline.caption.captioner import build_tiny_captioner, place_captioner

    _, model = build_tiny_captioner()
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    identities = [id(p) for p in model.parameters()]
    assert buffers and any("inv_freq" in name for name in buffers)
    placed = place_captioner(model, torch.device("cpu"), torch.bfloat16)
    for name, p in placed.named_parameters():
        assert p.dtype == torch.bfloat16
        assert torch.equal(p, weights[name].to(torch.bfloat16)), name
    for name, b in placed.named_buffers():
        assert b.dtype == buffers[name].dtype and torch.equal(b, buffers[name]), name
    # the same Parameter objects, cast in place: shared (tied) weights stay shared
    assert [id(p) for p in placed.parameters()] == identities


def _prompts_v2(tmp_path: Path) -> Path:
    raw = json.loads(PROMPTS.read_text())
    raw["version"] = "caption_v2"
    path = tmp_path / "caption_v2.json"
    path.write_text(json.dumps(raw))
    return path


def test_rows_of_other_settings_in_a_shard_log_are_not_reused(
    dataset, captioner, tmp_path, monkeypatch
):
    out = tmp_path / "captions"
    # A worker's part made with caption_v1, then a plain run with caption_v2 over the same folder.
    run_caption(dataset, out, MLLM, shard=0, num_shards=2, captioner=captioner, progress=False)
    assert (out / "shards" / "part-000-of-002.jsonl").is_file()
    calls = spy(monkeypatch, captioner)
    v2 = replace(MLLM, prompts=str(_prompts_v2(tmp_path)))
    manifest = run_caption(dataset, out, v2, captioner=captioner, progress=False)
    assert len(calls) == manifest["items"] == len(caption_items(dataset))
    assert {r["prompt_version"] for r in read_row_log(out / "captions.jsonl")} == {"caption_v2"}


def test_the_last_worker_merges_rows_another_wrote_while_it_ran(
    dataset, captioner, reference, tmp_path
):
    out = tmp_path / "captions"
    other = []

    def other_worker_finishes(rows_made: int) -> None:
        # Worker 0 starts and finishes after worker 1's first batch, while worker 1 still runs.
        if not other:
            other.append(
                run_caption(
                    dataset, out, MLLM, shard=0, num_shards=2, captioner=captioner,
                    progress=False,
                )
            )  # fmt: skip

    last = run_caption(
        dataset, out, MLLM, shard=1, num_shards=2, captioner=captioner, progress=False,
        after_batch=other_worker_finishes,
    )  # fmt: skip
    assert "coverage" not in other[0]  # worker 0 saw worker 1 unfinished: it left the merge
    assert last["coverage"]["found"] == last["items"]
    for name in ("captions.json", "captions.jsonl", "manifest.json"):
        assert (out / name).read_bytes() == (reference / name).read_bytes()


def test_a_resumed_run_cuts_its_batches_from_the_whole_item_list(
    dataset, captioner, tmp_path, monkeypatch
):
    items = caption_items(dataset)
    out = tmp_path / "captions"
    run_caption(dataset, out, MLLM, shard=1, num_shards=3, captioner=captioner, progress=False)
    done = set(shard_items(items, 1, 3))
    sizes = []
    describe = captioner.describe

    def recording(prompts, images, system=""):
        sizes.append(len(prompts))
        return describe(prompts, images, system)

    monkeypatch.setattr(captioner, "describe", recording)
    run_caption(dataset, out, MLLM, captioner=captioner, progress=False)
    size = MLLM.batch_size
    # The uninterrupted run's batches, less what is done: a half-done batch stays short.
    whole = [sum(it not in done for it in items[i : i + size]) for i in range(0, len(items), size)]
    expected = [n for n in whole if n]
    left = len(items) - len(done)
    assert expected != [min(size, left - i) for i in range(0, left, size)]  # the test can fail
    assert sizes == expected


def test_an_images_post_text_is_that_of_its_first_record(tmp_path):
    from pipeline.data.records import Entity, Record, write_dataset

    ann, bob = Entity("text", "Ann", (0, 1)), Entity("text", "Bob", (0, 1))
    splits = {
        "train": [Record("r1", ("Ann", "smiles"), "x.jpg", ann, ann, "none")],
        "valid": [Record("r2", ("Bob", "waves"), "x.jpg", bob, bob, "none")],
        "test": [Record("r3", ("Ann", "again"), "x.jpg", ann, ann, "none")],
    }
    objects = {"x.jpg": {"[OBJ0]": [0.0, 0.0, 1.0, 1.0]}}
    write_dataset(tmp_path, splits, objects, ["none"], source="test", version="1")
    items = caption_items(Dataset(tmp_path))
    assert [(it.key, it.kind, it.text) for it in items] == [
        ("Ann", "entity", "Ann smiles"),
        ("Bob", "entity", "Ann smiles"),
        ("[OBJ0]", "object", "Ann smiles"),
    ]


def test_items_are_sorted_by_image_then_key_and_skip_images_no_record_uses(tmp_path):
    from pipeline.data.records import Entity, Record, write_dataset

    zed, ann, obj = (
        Entity("text", "Zed", (0, 1)),
        Entity("text", "Ann", (0, 1)),
        Entity("object", "[OBJ0]"),
    )
    splits = {
        "train": [Record("r1", ("Zed", "runs"), "b.jpg", zed, obj, "none")],
        "valid": [Record("r2", ("Ann", "sits"), "a.jpg", ann, ann, "none")],
    }
    objects = {
        "a.jpg": {"[OBJ0]": [0.0, 0.0, 0.5, 0.5]},
        "b.jpg": {"[OBJ0]": [0.5, 0.5, 1.0, 1.0], "[OBJ1]": [0.0, 0.0, 1.0, 1.0]},
        "c.jpg": {"[OBJ0]": [0.0, 0.0, 1.0, 1.0]},  # no record uses this image
    }
    write_dataset(tmp_path, splits, objects, ["none"], source="test", version="1")
    items = caption_items(Dataset(tmp_path))
    assert [(it.image_id, it.key) for it in items] == [
        ("a.jpg", "Ann"),
        ("a.jpg", "[OBJ0]"),
        ("b.jpg", "Zed"),
        ("b.jpg", "[OBJ0]"),
        ("b.jpg", "[OBJ1]"),
    ]
    assert items[-1].box == (0.0, 0.0, 1.0, 1.0) and items[-1].text == "Zed runs"


def test_cli_locks_only_its_own_shard(dataset, tmp_path, monkeypatch):
    import pipeline.caption.run

    seen = {}

    def fake_run(ds, out, params, *, shard, num_shards, progress):
        names = [".out.shard-1-of-2.lock", ".out.shard-0-of-2.lock", ".out.lock"]
        locked = held_locks(out.parent, names)
        seen.update(backend=params.backend, shard=(shard, num_shards), locked=locked)
        return {"items": 5, "generated": 5, "missing": 3}

    monkeypatch.setattr(pipeline.caption.run, "run_caption", fake_run)
    from stages.cli import app

    tree = params_to_dict(DEFAULTS)
    tree["caption"]["backend"] = "mllm"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tree))
    args = ["caption", "--params", str(tmp_path / "params.yaml"), "--dataset", str(dataset.root)]
    args += ["--out", str(tmp_path / "out"), "--shard", "1", "--num-shards", "2"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert seen == {"backend": "mllm", "shard": (1, 2), "locked": [".out.shard-1-of-2.lock"]}


def test_answers_are_the_greedy_new_tokens_and_the_system_prompt_is_asked(captioner):
    """describe() against model.generate run by hand on each prompt alone (no padding): the
    answer is every generated token after the prompt, decoded, white space collapsed; a system
    prompt goes in as the chat's first message."""
    import torch

    rng = np.random.default_rng(3)
    images = [
        Image.fromarray(rng.integers(0, 255, (40 + 8 * k, 56, 3), dtype=np.uint8)) for k in range(3)
    ]
    questions = ["what is this?", "Text: a cat\\nwhat is 'cat' in the text?", "describe it"]
    processor, model = captioner.processor, captioner.model

    def by_hand(question, image, system=""):
        messages = (
            [{"role": "system", "content": [{"type": "text", "text": system}]}] if system else []
        )
        messages.append(
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}
        )
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert text.endswith("<|im_start|>assistant\n")
        if system:
            assert text.startswith(f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n")
        inputs = processor(text=[text], images=[image], return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(
                **inputs, max_new_tokens=MLLM.max_new_tokens, do_sample=False, num_beams=1
            )
        new = out[0, inputs["input_ids"].shape[1] :].tolist()
        assert 0 < len(new) <= MLLM.max_new_tokens
        answer = processor.tokenizer.decode(new, skip_special_tokens=True)
        return " ".join(answer.split())

    expected = [by_hand(q, im) for q, im in zip(questions, images, strict=True)]
    assert captioner.describe(questions, images) == expected
    assert all(expected) and len(set(expected)) > 1
    system = "Answer in three words."
    with_system = [by_hand(q, im, system) for q, im in zip(questions, images, strict=True)]
    assert captioner.describe(questions, images, system) == with_system
    assert with_system != expected  # the system message changed the answers


def test_answers_have_their_white_space_collapsed(captioner, monkeypatch):
    # A real model writes line breaks and runs of spaces; a caption is one line of single spaces.
    monkeypatch.setattr(
        captioner.tokenizer, "batch_decode", lambda ids, **_: [" a\n\n  big\tdog ", ""]
    )
    image = Image.new("RGB", (56, 56))
    assert captioner.describe(["q1", "q2"], [image, image]) == ["a big dog", ""]


def test_a_processor_without_a_chat_template_is_refused_by_name():
    from types import SimpleNamespace

    with pytest.raises(
        ValueError, match=r"^captioner 'org/base': its processor has no chat template"
    ):
        Captioner(
            SimpleNamespace(chat_template=None), None, "org/base", dtype="float32", max_new_tokens=4
        )


def test_without_a_pad_token_generation_pads_with_the_first_end_token():
    import torch

    asked = {}

    class Processor:
        chat_template = "{{ messages }}"
        tokenizer = type("Tokenizer", (), {"pad_token_id": None, "padding_side": "right"})()
        tokenizer.batch_decode = lambda ids, **_: ["an answer"]

        def apply_chat_template(self, messages, **_):
            return "a prompt"

        def __call__(self, **_):
            return {"input_ids": torch.tensor([[1, 2]])}

    model = torch.nn.Linear(1, 1)
    model.generation_config = type("Config", (), {"eos_token_id": [7, 9]})()
    model.generate = lambda **kwargs: asked.update(kwargs) or torch.tensor([[1, 2, 5]])
    captioner = Captioner(Processor(), model, "m", dtype="float32", max_new_tokens=4, device="cpu")
    assert captioner.describe(["q"], [Image.new("RGB", (8, 8))]) == ["an answer"]
    assert (asked["pad_token_id"], asked["eos_token_id"]) == (7, [7, 9])
    assert captioner.tokenizer.padding_side == "left"


def test_a_captioner_that_does_not_load_is_named(monkeypatch):
    import transformers

    def offline(name, *args, **kwargs):
        raise OSError(f"cannot reach the hub for {name}")

    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", offline)
    message = (
        r"^could not load captioner 'org/vl' \(cannot reach the hub for org/vl\); offline, set "
        r"caption.model to a local folder or 'tiny'$"
    )
    with pytest.raises(OSError, match=message):
        Captioner.load("org/vl", dtype="float32", max_new_tokens=4)


def test_row_log_reads_a_whole_log_quietly_and_refuses_rows_it_cannot_use(tmp_path, caplog):
    import logging

    path = tmp_path / "log.jsonl"
    row = {"image_id": "a.jpg", "key": "x", "caption": "c", "settings": "s"}
    path.write_text(json.dumps(row) + "\n\n" + json.dumps(row) + "\n")
    caplog.set_level(logging.WARNING)
    assert read_row_log(path, repair=True) == [row, row]  # a blank line is no row
    assert caplog.records == []  # nothing half-written, nothing said
    no_settings = {k: v for k, v in row.items() if k != "settings"}
    for line in (json.dumps(no_settings), "5"):
        path.write_text(json.dumps(row) + "\n" + line + "\n")
        with pytest.raises(DataError) as error:
            read_row_log(path)
        assert str(error.value).startswith(
            f"{path}:2: corrupt caption row (expected an object with keys image_id, key, "
            "caption, settings)"
        )
