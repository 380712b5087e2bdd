"""`predict`: input validation, slot assignment, and the round trip against evaluate."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_train import build_world, small_params

from pipeline import predict as predict_module
from pipeline.caption.table import CaptionTable
from pipeline.config import apply_overrides
from pipeline.data.records import Dataset
from pipeline.io import DataError
from pipeline.model.saved import load_trained
from pipeline.predict import predict_file, predict_inputs, read_inputs
from pipeline.train.loop import train


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> dict[str, Path]:
    """A briefly trained model and the evaluate outputs of its test split."""
    from pipeline.evaluate.report import evaluate_model

    root = tmp_path_factory.mktemp("predict")
    params = small_params(**{"train.epochs": 2})
    world = build_world(root, params)
    train(params, world["features"], world["raw"], root / "models", root / "dvclive")
    evaluate_model(
        root / "models" / "checkpoint" / "best", world["features"], root / "metrics",
        root / "plots", None, 64, release_dir=root / "models" / "best", dataset_dir=world["raw"],
    )  # fmt: skip
    return {**world, "best": root / "models" / "best", "metrics": root / "metrics"}


def record_inputs(raw: Path, captions: Path, folder: Path) -> list[dict]:
    """Predict inputs for every test record, paths relative to ``folder``."""
    dataset = Dataset(raw)
    table = CaptionTable(captions)
    objects = dataset.objects
    lines = []
    for record in dataset.records("test"):
        boxes = objects.get(record.image_id, {})
        line = {
            "id": record.id,
            "text_tokens": list(record.text_tokens),
            "image": os.path.relpath(dataset.image_path(record.image_id), folder),
            "objects": [boxes[f"[OBJ{k}]"] for k in range(len(boxes))],
            "depth": os.path.relpath(dataset.depth_path(record.image_id), folder),
        }
        for role, entity in (("head", record.head), ("tail", record.tail)):
            line[role] = (
                {"span": list(entity.span)}
                if entity.kind == "text"
                else {"box": boxes[entity.name]}
            )
            caption = table.get(record.image_id, entity.name)
            if caption is not None:
                line[f"{role}_caption"] = caption
        lines.append(line)
    return lines


def write_jsonl(path: Path, lines: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def test_predict_on_test_records_matches_evaluate(model, tmp_path):
    inputs = write_jsonl(tmp_path / "in" / "test.jsonl", record_inputs(
        model["raw"], model["captions"], tmp_path / "in"
    ))  # fmt: skip
    results = predict_file(model["best"], inputs, tmp_path / "out.jsonl", 64)
    evaluated = [
        json.loads(line)
        for line in (model["metrics"] / "predictions.jsonl").read_text().splitlines()
    ]
    assert [r["id"] for r in results] == [e["id"] for e in evaluated]
    assert [r["label"] for r in results] == [e["predicted"] for e in evaluated]
    confidence = [r["probabilities"][r["label"]] for r in results]
    np.testing.assert_allclose(confidence, [e["confidence"] for e in evaluated], atol=2e-6)
    written = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert written == results
    first = written[0]
    assert first["line"] == 1 and sum(first["probabilities"].values()) == pytest.approx(1, abs=1e-4)
    assert first["label"] == max(first["probabilities"], key=first["probabilities"].get)
    # The model did learn something, so the comparison is not between constant predictions.
    assert len({r["label"] for r in results}) > 2


def test_lines_without_depth_get_zeros_and_a_warning(model, tmp_path, caplog):
    line = record_inputs(model["raw"], model["captions"], tmp_path)[0]
    line.pop("depth")
    line.update(
        objects=[], head={"box": [0.0, 0.0, 0.5, 0.5]}, tail={"box": [0.25, 0.25, 1.0, 1.0]}
    )
    trained = load_trained(model["best"])
    path = write_jsonl(tmp_path / "in.jsonl", [line])
    with caplog.at_level(logging.WARNING, logger="pipeline.predict"):
        (result,) = predict_inputs(trained, read_inputs(path, 6), 64)
    assert "depth channel is zeros" in caplog.text
    assert "image but no objects" not in caplog.text  # its image is seen, through its boxes
    assert result["label"] in trained.labels


def test_slots_raw_text_and_captions(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "img.png")
    line = {
        "text": "Anna  Berg visits Paris",
        "image": "img.png",
        "objects": [[0.1, 0.1, 0.4, 0.4], [0.5, 0.5, 0.9, 0.9]],
        "head": {"box": [0.5, 0.5, 0.9, 0.9]},  # = objects[1]
        "tail": {"box": [0.0, 0.0, 1.0, 1.0]},  # new: gets slot 2
        "tail_caption": "a city",
    }
    (item,) = read_inputs(write_jsonl(tmp_path / "in.jsonl", [line]), max_objects=6)
    assert item.tokens == ("Anna", "Berg", "visits", "Paris")
    assert (item.head.name, item.tail.name) == ("[OBJ1]", "[OBJ2]")
    assert len(item.boxes) == 3 and item.image == tmp_path / "img.png"
    assert (item.head_caption, item.tail_caption) == (None, "a city")
    text = {"text_tokens": ["Bill", "Cosby", "in", "Oslo"], "head": {"span": [0, 2]}}
    (item,) = read_inputs(
        write_jsonl(tmp_path / "t.jsonl", [{**text, "tail": {"span": [3, 4]}}]), 6
    )
    assert (item.head.name, item.head.span, item.tail.name) == ("Bill Cosby", (0, 2), "Oslo")
    assert item.image is None and item.boxes == ()  # a text-text pair needs no image


GOOD = {"text_tokens": ["a", "b", "c"], "head": {"span": [0, 1]}, "tail": {"span": [2, 3]}}


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("{not json", "not valid JSON"),
        ([1, 2], "expected a JSON object"),
        ({**GOOD, "colour": 1}, "unknown key 'colour'"),
        ({**GOOD, "text": "a b c"}, "exactly one of 'text'"),
        ({**GOOD, "head": {"span": [2, 9]}}, "head.span: expected [start, end) with 0 <= start"),
        ({**GOOD, "tail": {"name": "x"}}, "'tail': expected"),
        (
            {**GOOD, "tail": {"box": [0.5, 0.1, 0.2, 0.9]}},
            "tail.box: bad box (found [0.5, 0.1, 0.2, 0.9], expected 0 <= x1 < x2",
        ),
        ({**GOOD, "tail": {"box": [0.1, 0.1, 0.2, 0.9]}}, "'image' is required"),
        ({**GOOD, "image": "nope.jpg", "objects": [[0, 0, 1, 1]]}, "nope.jpg: file not found"),
        ({**GOOD, "image": "in.jsonl", "objects": [[0, 0, 1, 1]]}, "in.jsonl: cannot decode it"),
        # checked even where no box uses them
        ({**GOOD, "image": "nope.jpg"}, "nope.jpg: file not found"),
        ({**GOOD, "image": "in.jsonl"}, "in.jsonl: cannot decode it"),
        ({**GOOD, "depth": "nope.npy"}, "nope.npy: file not found"),
        ({**GOOD, "depth": "in.jsonl"}, "depth map "),
        (
            {**GOOD, "objects": [[0, 0, 0.5, 0.5]] * 7, "image": "x"},
            "7 objects, but the model has 6",
        ),
        ({**GOOD, "text_tokens": []}, "the text is empty"),
        ({**GOOD, "objects": "x"}, "'objects': expected a list of boxes, found 'x'"),
        ({**GOOD, "head_caption": 3}, "'head_caption': expected a string"),
        # Neither text key: the line's own error, not a KeyError from further on.
        ({"head": GOOD["head"], "tail": GOOD["tail"]}, "exactly one of 'text'"),
        ({**GOOD, "text_tokens": ["a", 2, "c"]}, "'text_tokens': expected a list of strings"),
        # A negative start would slice the tokens from the end: [-1, 2) names nothing.
        ({**GOOD, "head": {"span": [-1, 2]}}, "head.span: expected [start, end)"),
        ({**GOOD, "head": {"span": [False, True]}}, "head.span: expected [start, end)"),
        ({**GOOD, "tail": {"span": [2, 3], "box": [0, 0, 1, 1]}}, "'tail': expected"),
        ('{"text": }', "not valid JSON (Expecting value at column 10)"),
    ],
)
def test_bad_lines_name_the_file_and_line(tmp_path, line, problem):
    path = write_jsonl(tmp_path / "in.jsonl", [GOOD, "", line])
    with pytest.raises(DataError) as info:
        read_inputs(path, max_objects=6)
    assert str(info.value).startswith(f"{path}:3: ")
    assert problem in str(info.value)


def test_line_numbers_count_blank_lines_and_an_empty_file_is_refused(tmp_path):
    # Lines are numbered as an editor numbers them: blank and white-space lines count.
    path = write_jsonl(tmp_path / "in.jsonl", [" \t", GOOD, "", GOOD])
    items = read_inputs(path, max_objects=6)
    assert [(item.line, item.where) for item in items] == [(2, f"{path}:2"), (4, f"{path}:4")]
    empty = write_jsonl(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(DataError, match=rf"^{empty}: no input lines$"):
        read_inputs(empty, max_objects=6)


def test_as_many_boxes_as_object_slots_fit(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "img.png")
    boxes = [[0.1 * k, 0.0, 0.1 * k + 0.05, 0.5] for k in range(5)]
    line = {**GOOD, "image": "img.png", "objects": boxes, "tail": {"box": [0.0, 0.5, 1.0, 1.0]}}
    (item,) = read_inputs(write_jsonl(tmp_path / "in.jsonl", [line]), max_objects=6)
    assert len(item.boxes) == 6 and item.tail.name == "[OBJ5]"


def _depth_seen(monkeypatch) -> dict[str, np.ndarray]:
    """The depth map the features code reads for each input line's image, by image id."""
    seen = {}
    real = predict_module.featurize_image

    def spy(image_id, image_path, objects, depth, params):
        if objects and depth is not None:
            seen[image_id] = np.array(depth.get(image_id))
        return real(image_id, image_path, objects, depth, params)

    monkeypatch.setattr(predict_module, "featurize_image", spy)
    return seen


def test_depth_maps_given_computed_or_zeros_reach_their_own_line(model, tmp_path, monkeypatch):
    from pipeline.depth.model import predict_depth, tiny_depth_model
    from pipeline.depth.store import DepthStore, store_rounding

    by_image = {}  # one line per image, three images: swapped maps would show
    for line in record_inputs(model["raw"], model["captions"], tmp_path):
        if line["objects"]:
            by_image.setdefault(line["image"], line)
    lines = list(by_image.values())[:3]
    assert len(lines) == 3
    trained = load_trained(model["best"])
    seen = _depth_seen(monkeypatch)
    path = write_jsonl(tmp_path / "given.jsonl", lines)
    predict_inputs(trained, read_inputs(path, 6), 8)
    # A given map is read as evaluate read it: the depth stage's stored values, to the bit.
    store = DepthStore(model["depth"])
    image_of = {record.id: record.image_id for record in Dataset(model["raw"]).records("test")}
    for k, line in enumerate(lines):
        np.testing.assert_array_equal(seen[f"input-{k:07d}"], store.get(image_of[line["id"]]))
    # A map of values that float16 does not hold is rounded as a depth store rounds it.
    rough = np.random.default_rng(0).uniform(1, 3, (40, 50)).astype(np.float32)
    np.save(tmp_path / "rough.npy", rough)
    seen.clear()
    path = write_jsonl(tmp_path / "rough.jsonl", [{**lines[0], "depth": "rough.npy"}])
    predict_inputs(trained, read_inputs(path, 6), 8)
    np.testing.assert_array_equal(seen["input-0000000"], store_rounding(rough))
    assert not np.array_equal(seen["input-0000000"], rough)
    np.testing.assert_allclose(seen["input-0000000"], rough, rtol=2.0**-11)

    # Without a map: the model named in the params computes it (depth.source model), one per
    # line, as the depth stage would (its raw output, float16-rounded as a store keeps it) ...
    seen.clear()
    overrides = {"depth.source": "model", "depth.model": "tiny", "depth.batch_size": 2}
    computed = replace(trained, params=apply_overrides(trained.params, overrides | {
        "depth.dtype": "bfloat16",  # autocast on a GPU only: the same numbers here
    }))  # fmt: skip
    calls, real_depth = [], predict_module.predict_depth

    def recording(depth_model, images, batch_size, dtype):
        calls.append((len(images), batch_size, dtype))
        return real_depth(depth_model, images, batch_size, dtype)

    monkeypatch.setattr(predict_module, "predict_depth", recording)
    bare = [{k: v for k, v in line.items() if k != "depth"} for line in lines]
    predict_inputs(computed, read_inputs(write_jsonl(tmp_path / "bare.jsonl", bare), 6), 8)
    assert calls == [(3, 2, "bfloat16")]  # the saved params' depth settings, all lines at once
    images = []
    for line in bare:
        with Image.open(tmp_path / line["image"]) as image:
            images.append(image.convert("RGB"))
    expected = predict_depth(tiny_depth_model(), images, 2, "float32")  # the same batches
    for k in range(len(bare)):
        got = seen[f"input-{k:07d}"]
        np.testing.assert_array_equal(got, store_rounding(expected[k]))
        assert not np.array_equal(got, expected[k])
    # ... and a model trained on shipped maps gets zeros at the image's size.
    seen.clear()
    predict_inputs(trained, read_inputs(write_jsonl(tmp_path / "bare.jsonl", bare), 6), 8)
    for k, line in enumerate(bare):
        with Image.open(tmp_path / line["image"]) as image:
            width, height = image.size
        np.testing.assert_array_equal(seen[f"input-{k:07d}"], np.zeros((height, width)))


def test_damaged_images_depth_maps_and_bytes_name_their_line(model, tmp_path):
    from test_download import bomb_png

    whole = tmp_path / "whole.jpg"
    Image.new("RGB", (64, 48), (10, 200, 30)).save(whole)
    (tmp_path / "truncated.jpg").write_bytes(whole.read_bytes()[:200])
    (tmp_path / "bomb.png").write_bytes(bomb_png())
    box = {**GOOD, "objects": [[0.1, 0.1, 0.5, 0.5]]}
    for name, problem in [
        ("truncated.jpg", "truncated.jpg: cannot decode it"),
        ("bomb.png", "bomb.png: cannot decode it"),
    ]:
        path = write_jsonl(tmp_path / f"{name}.jsonl", [GOOD, {**box, "image": name}])
        with pytest.raises(DataError, match=rf"^{path}:2: image .*{problem}"):
            read_inputs(path, max_objects=6)
    path = tmp_path / "bytes.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=rf"^{path}:2: not UTF-8 \(found byte 0xe9 at column 14"):
        read_inputs(path, max_objects=6)
    np.save(tmp_path / "nan.npy", np.full((48, 64), np.nan, dtype=np.float32))
    for line in ({**box, "image": "whole.jpg"}, GOOD):  # with objects, and without any
        path = write_jsonl(tmp_path / "nan.jsonl", [{**line, "depth": "nan.npy"}])
        with pytest.raises(DataError, match=rf"^{path}:1: depth map .*nan.npy: 3072 of 3072 depth"):
            read_inputs(path, 6)


def test_an_image_without_objects_is_checked_and_its_disuse_said(model, tmp_path, caplog):
    Image.new("RGB", (64, 48), (10, 200, 30)).save(tmp_path / "whole.jpg")
    path = write_jsonl(tmp_path / "in.jsonl", [{**GOOD, "image": "whole.jpg"}, GOOD])
    trained = load_trained(model["best"])
    with caplog.at_level(logging.WARNING, logger="pipeline.predict"):
        results = predict_inputs(trained, read_inputs(path, 6), 8)
    assert "1 input lines give an image but no objects" in caplog.text
    assert results[0]["probabilities"] == results[1]["probabilities"]  # the image played no part


def test_a_line_whose_markers_fell_to_truncation_is_flagged(model, tmp_path, caplog):
    tokens = [f"w{i}" for i in range(200)]  # far beyond data.max_seq (48)
    long = {"text_tokens": tokens, "head": {"span": [0, 1]}, "tail": {"span": [190, 191]}}
    path = write_jsonl(tmp_path / "in.jsonl", [GOOD, long])
    trained = load_trained(model["best"])
    with caplog.at_level(logging.WARNING):
        short, flagged = predict_inputs(trained, read_inputs(path, 6), 8)
    assert "markers_lost_to_truncation" not in short
    lost = flagged["markers_lost_to_truncation"]
    assert lost[:2] == ["<s2>", "</s2>"] and "<s1>" not in lost  # and the caption segment's
    assert f"{path}:2: entity markers <s2>, </s2>, " in caplog.text


@pytest.mark.parametrize(
    "tower, mean, std",
    [
        ("tiny", (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
        ("deit_tiny_patch16_224", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ],
)
def test_predict_normalizes_crops_with_the_towers_mean_std(
    model, tmp_path, monkeypatch, tower, mean, std
):
    pixels = np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "img.png")
    line = {**GOOD, "image": "img.png", "objects": [[0.1, 0.2, 0.7, 0.9]]}
    trained = load_trained(model["best"])
    trained = replace(
        trained, params=apply_overrides(trained.params, {"model.vision_model": tower})
    )
    seen = {}
    real = predict_module.predict_dataset

    def spy(net, dataset, *args, **kwargs):
        seen["crop"], seen["batch"] = dataset.object_crops[0, 0], dataset.batch([0])
        return real(net, dataset, *args, **kwargs)

    monkeypatch.setattr(predict_module, "predict_dataset", spy)
    predict_inputs(trained, read_inputs(write_jsonl(tmp_path / "in.jsonl", [line]), 6), 8)
    expected = (seen["crop"] / 255 - np.array(mean)[:, None, None]) / np.array(std)[:, None, None]
    assert seen["crop"].any()
    np.testing.assert_allclose(seen["batch"]["pixel_values"][0, 0].numpy(), expected, atol=2e-6)


def test_line_captions_reach_only_a_model_that_uses_captions(model, tmp_path):
    captioned = {**GOOD, "head_caption": "a person in a suit", "tail_caption": "a large city"}
    path = write_jsonl(tmp_path / "in.jsonl", [captioned, GOOD])
    trained = load_trained(model["best"])
    with_captions, without = predict_inputs(trained, read_inputs(path, 6), 8)
    assert with_captions["probabilities"] != without["probabilities"]  # captions matter here
    off = replace(trained, params=apply_overrides(trained.params, {"data.use_caption": False}))
    with_captions, without = predict_inputs(off, read_inputs(path, 6), 8)
    assert with_captions["probabilities"] == without["probabilities"]


def test_a_failed_write_leaves_the_previous_output_whole(model, tmp_path, monkeypatch):
    inputs = write_jsonl(tmp_path / "in.jsonl", [GOOD])
    output = tmp_path / "out.jsonl"
    output.write_text("an earlier run's output\n")

    def disk_full(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", disk_full)  # the rename that publishes a new file
    with pytest.raises(OSError, match="disk full"):
        predict_file(model["best"], inputs, output, 8)
    assert output.read_text() == "an earlier run's output\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl"]


def test_predict_command(model, tmp_path):
    from typer.testing import CliRunner

    from stages.cli import app

    good = write_jsonl(tmp_path / "good.jsonl", [{**GOOD, "id": 7}])
    args = ["predict", "--model", str(model["best"]), "--output", str(tmp_path / "out.jsonl")]
    result = CliRunner().invoke(app, [*args, "--input", str(good)])
    assert result.exit_code == 0, result.output
    (row,) = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert row["id"] == "7" and row["label"] in row["probabilities"]
    bad = write_jsonl(tmp_path / "bad.jsonl", [GOOD, {**GOOD, "head": {"span": [1, 1]}}])
    result = CliRunner().invoke(app, [*args, "--input", str(bad)])
    assert result.exit_code == 1
    assert f"{bad}:2: head.span" in result.output


def test_inputs_are_checked_before_the_weights_load(model, tmp_path, monkeypatch):
    monkeypatch.setattr(predict_module, "load_for_inference", pytest.fail)
    bad = write_jsonl(tmp_path / "bad.jsonl", [GOOD, {**GOOD, "head": {"span": [2, 9]}}])
    with pytest.raises(DataError, match=rf"^{bad}:2: head\.span"):
        predict_file(model["best"], bad, tmp_path / "out.jsonl", 8)
    assert not (tmp_path / "out.jsonl").exists()


def test_a_hub_model_is_looked_up_once_for_its_params_and_its_weights(model, tmp_path, monkeypatch):
    import huggingface_hub

    fetched = []
    monkeypatch.setattr(
        huggingface_hub,
        "snapshot_download",
        lambda repo_id: fetched.append(repo_id) or model["best"],
    )
    inputs = write_jsonl(tmp_path / "in.jsonl", [GOOD])
    (result,) = predict_file("org/remote", inputs, tmp_path / "out.jsonl", 8)
    assert fetched == ["org/remote"] and result["line"] == 1


def test_a_mistyped_model_folder_is_named_before_the_hub_error(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(repo_id, **_):
        raise LocalEntryNotFoundError(f"Got: ConnectError for {repo_id}\nmore detail")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    monkeypatch.chdir(tmp_path)
    message = (
        r"^models/bset: no such model folder, and fetching it as a Hub model failed "
        r"\(LocalEntryNotFoundError: Got: ConnectError for models/bset\)$"
    )
    with pytest.raises(FileNotFoundError, match=message):
        load_trained("models/bset")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a trained model folder"):
        load_trained("empty")


def test_remote_model_from_pretrained_names_a_mistyped_folder_too(model, tmp_path, monkeypatch):
    import huggingface_hub.hub_mixin
    from huggingface_hub.errors import LocalEntryNotFoundError

    import pipeline.model.remote
    from pipeline.model.remote import RemoteModel

    def offline(repo_id, *args, **_):
        raise LocalEntryNotFoundError(f"Got: ConnectError for {repo_id}\nmore detail")

    monkeypatch.setattr(huggingface_hub.hub_mixin, "hf_hub_download", offline)
    monkeypatch.setattr(pipeline.model.remote, "snapshot_download", offline)
    monkeypatch.chdir(tmp_path)
    message = (
        r"^models/bset: no such model folder, and fetching it as a Hub model failed "
        r"\(LocalEntryNotFoundError: Got: ConnectError for models/bset\)$"
    )
    with pytest.raises(FileNotFoundError, match=message):
        RemoteModel.from_pretrained("models/bset")
    # A real folder loads, and a broken one keeps its own error.
    assert not RemoteModel.from_pretrained(str(model["best"])).training
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"^empty: not a REMOTE model folder"):
        RemoteModel.from_pretrained("empty")


def test_a_model_folder_under_home_loads_by_its_tilde_path(model, tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", pytest.fail)  # never the Hub
    monkeypatch.setenv("HOME", str(tmp_path))
    shutil.copytree(model["best"], tmp_path / "models" / "best")
    trained = load_trained("~/models/best")
    assert trained.labels == load_trained(model["best"]).labels


def test_a_path_is_never_fetched_from_the_hub_and_each_hub_failure_is_named(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import HFValidationError

    fetched, failures = [], []

    def failing(repo_id, **_):
        fetched.append(repo_id)
        raise failures.pop(0)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", failing)
    monkeypatch.chdir(tmp_path)
    for name in ("./models/bset", "/nowhere/models/best"):
        with pytest.raises(FileNotFoundError, match="not a trained model folder"):
            load_trained(name)
    assert fetched == []
    # An ill-formed id (a ValueError) and a failure without a message are named like the rest.
    failures += [HFValidationError("Repo id must use alphanumeric chars: 'a..b'.\nmore"), OSError()]
    reason = r"HFValidationError: Repo id must use alphanumeric chars: 'a\.\.b'\."
    message = rf"^a\.\.b: no such model folder, .* failed \({reason}\)$"
    with pytest.raises(FileNotFoundError, match=message):
        load_trained("a..b")
    with pytest.raises(FileNotFoundError, match=r"^org/name: .* failed \(OSError: OSError\)$"):
        load_trained("org/name")
    assert fetched == ["a..b", "org/name"]


class _CountingSplit:
    """A feature split as predict_dataset reads it: sample ``i`` has gold ``i % 3`` and pair
    kind ``i % 2``; batches come from ``__getitems__``, as the feature reader's do."""

    def __init__(self, size: int):
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitems__(self, indices: list[int]) -> dict:
        import torch

        index = torch.tensor(indices)
        return {"index": index, "labels": index % 3, "pair_kind": index % 2}


def test_predict_dataset_labels_each_sample_asked_for_and_keeps_the_models_mode():
    import torch

    class Scorer(torch.nn.Module):
        """Logit 2 for class (2 * index) % 3, 0 for the others; dropout only when training."""

        def __init__(self):
            super().__init__()
            self.dropout = torch.nn.Dropout(0.9)

        def forward(self, batch):
            hot = torch.nn.functional.one_hot((2 * batch["index"]) % 3, 3).float()
            return self.dropout(2 * hot)

    from pipeline.inference import predict_dataset

    model = Scorer().eval()
    asked = [7, 2, 5, 9, 0]
    out = predict_dataset(model, _CountingSplit(10), 2, "cpu", indices=asked)
    assert not model.training
    assert out["index"].tolist() == asked
    assert out["gold"].tolist() == [i % 3 for i in asked]
    assert out["pair_kind"].tolist() == [i % 2 for i in asked]
    assert out["pred"].tolist() == [(2 * i) % 3 for i in asked]
    top = np.exp(2) / (np.exp(2) + 2)  # softmax of (2, 0, 0), by hand
    expected = np.full((len(asked), 3), (1 - top) / 2)
    expected[np.arange(len(asked)), out["pred"]] = top
    np.testing.assert_allclose(out["probs"], expected, rtol=1e-6)
    # A model that was training (dev scoring between epochs) is scored in eval mode and goes on
    # training afterwards.
    model.train()
    again = predict_dataset(model, _CountingSplit(10), 3, "cpu", indices=asked)
    assert model.training
    np.testing.assert_allclose(again["probs"], expected, rtol=1e-6)
    # Mixed precision (accelerate's autocast) wraps every forward pass: 5 samples, batches of 2.
    entered = []

    @contextlib.contextmanager
    def autocast():
        entered.append(torch.is_inference_mode_enabled())
        yield

    predict_dataset(model, _CountingSplit(10), 2, "cpu", indices=asked, autocast=autocast)
    assert entered == [True, True, True]


def test_to_device_moves_the_tensors_and_keeps_the_other_values():
    import torch

    from pipeline.inference import to_device

    batch = {"input_ids": torch.arange(3), "text_padded": False, "note": "kept"}
    out = to_device(batch, torch.device("cpu"))
    assert out.keys() == batch.keys() and torch.equal(out["input_ids"], torch.arange(3))
    assert (out["text_padded"], out["note"]) == (False, "kept")
