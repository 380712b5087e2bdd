"""pipeline.hub: how a model name in params is classified (tiny, local folder, hub id)."""

from __future__ import annotations

import pytest

from pipeline.hub import ModelSource, is_tiny, resolve


def test_tiny_names_are_tiny_and_only_they():
    assert [is_tiny(n) for n in ("tiny", "tiny-vit", "tinyllama", "bert-tiny", "Tiny")] == [
        True, True, False, False, False
    ]  # fmt: skip
    assert resolve("tiny-depth") == ModelSource("tiny", "tiny-depth")
    assert resolve("tinyllama") == ModelSource("hub", "tinyllama")


def test_hub_ids_are_one_or_two_well_formed_parts():
    for name in ("bert-base-uncased", "depth-anything/Depth-Anything-V2-Large-hf",
                 "vit_base_patch32_clip_quickgelu_224.openai"):  # fmt: skip
        assert resolve(name) == ModelSource("hub", name), name
    for name in ("org/name/extra", "bert base", "-bert", "org/", "bert?x"):
        with pytest.raises(ValueError, match="neither 'tiny', an existing folder, nor a valid hub"):
            resolve(name)
    with pytest.raises(ValueError, match="model name is empty"):
        resolve("")


def test_folders_are_local_and_a_path_must_be_an_existing_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "bert").mkdir(parents=True)
    (tmp_path / "weights.bin").write_bytes(b"")
    # An existing folder named like a hub id is the folder.
    assert resolve("models/bert") == ModelSource(
        "local", "models/bert", tmp_path / "models" / "bert"
    )
    assert resolve("./models") == ModelSource("local", "./models", tmp_path / "models")
    for name in ("./weights.bin", "weights.bin", "./missing", str(tmp_path / "nope")):
        with pytest.raises(FileNotFoundError, match="model folder not found"):
            resolve(name)


def test_a_home_relative_name_is_a_folder_under_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "bert").mkdir()
    assert resolve("~/bert") == ModelSource("local", "~/bert", tmp_path / "bert")
    # A missing one is a missing folder, not a malformed hub id.
    with pytest.raises(FileNotFoundError, match="~/nothing: model folder not found"):
        resolve("~/nothing")
