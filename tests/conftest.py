"""Shared fixtures: small source trees in the published UMRE and MNRE record formats."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

# Image name -> (width, height); two in pixels-box images, one square.
SOURCE_IMAGES = {"img_a.jpg": (200, 100), "img_b.jpg": (64, 64), "img_c.png": (100, 200)}
TOKENS = ["RT", "Bill", "Cosby", "at", "the", "Walk", "of", "Fame", "today"]


def source_records() -> dict[str, list[dict]]:
    """Good records per split (UMRE split file names); boxes in pixels, as the objects file's."""
    bill = {"name": "Bill Cosby", "pos": [1, 3]}
    walk = {"name": "Walk of Fame", "pos": [5, 8]}
    return {
        "train_set.json": [
            {
                "token": TOKENS,
                "h": bill,
                "t": walk,
                "img_id": "img_a.jpg",
                "relation": "/per/misc/present_in",
            },
            {
                "token": TOKENS,
                "h": bill,
                "t": {"name": "[OBJ1]", "pos": [20, 10, 120, 90]},
                "img_id": "img_a.jpg",
                "relation": "/per/per/self",
            },
            {
                "token": TOKENS,
                "h": {"name": "[OBJ0]", "pos": [0, 0, 100, 50]},
                "t": {"name": "[OBJ1]", "pos": [20, 10, 120, 90]},
                "img_id": "img_a.jpg",
                "relation": "/loc/loc/contain",
            },
        ],
        "val_set.json": [
            {"token": TOKENS, "h": bill, "t": walk, "img_id": "img_b.jpg", "relation": "None"},
        ],
        "test_set.json": [
            {
                "token": TOKENS,
                "h": walk,
                "t": {"name": "[OBJ0]", "pos": [10, 20, 90, 180]},
                "img_id": "img_c.png",
                "relation": "none",
            },
        ],
    }


def source_objects() -> dict[str, dict[str, list[float]]]:
    return {
        "img_a.jpg": {"[OBJ0]": [0, 0, 100, 50], "[OBJ1]": [20, 10, 120, 90]},
        "img_b.jpg": {},
        "img_c.png": {"[OBJ0]": [10, 20, 90, 180]},
    }


def write_lines(path: Path, records: list) -> Path:
    """One Python dict literal per line (single quotes), as the published files have."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else repr(r)) + "\n" for r in records))
    return path


def held_locks(folder: Path, names: list[str]) -> list[str]:
    """Which of the lock files ``folder/name`` someone holds now (each tried once, without
    waiting): what a stage command's output locks look like from inside the stage."""
    from filelock import FileLock, Timeout

    held = []
    for name in names:
        lock = FileLock(folder / name, timeout=0)
        try:
            lock.acquire()
        except Timeout:
            held.append(name)
        else:
            lock.release()
    return held


def disk_full_at(monkeypatch: pytest.MonkeyPatch, module, name: str) -> None:
    """Make ``module.write_json`` raise ``OSError("disk full")`` when it writes a file called
    ``name`` (and write every other file): a run that dies partway through its outputs."""
    real = module.write_json

    def failing(path, obj):
        if Path(path).name == name:
            raise OSError("disk full")
        real(path, obj)

    monkeypatch.setattr(module, "write_json", failing)


def write_images(folder: Path, sizes: dict[str, tuple[int, int]] = SOURCE_IMAGES) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, (name, size) in enumerate(sizes.items()):
        Image.new("RGB", size, (40 * i, 100, 200)).save(folder / name)


@pytest.fixture
def umre_tree() -> Callable[..., Path]:
    """Write a UMRE-layout tree under ``root`` (images in UMKE_IMG/, the rest in umke_partner/);
    keyword arguments replace the records of a split file, the objects or the captions."""

    def make(
        root: Path,
        records: dict | None = None,
        objects: dict | None = None,
        captions: dict | None = None,
    ) -> Path:
        write_images(root / "UMKE_IMG")
        partner = root / "umke_partner"
        for name, recs in {**source_records(), **(records or {})}.items():
            write_lines(partner / name, recs)
        objects = source_objects() if objects is None else objects
        (partner / "pos_umke.json").write_text(json.dumps(objects, indent=2))
        if captions is None:
            captions = {
                "img_a.jpg": {"Bill Cosby": "a man", "[OBJ1]": "a man in a suit"},
                "img_b.jpg": {"Walk of Fame": "a street"},
                "unused.jpg": {"x": "y"},
            }
        (partner / "cap_qwenvl_simply.json").write_text(json.dumps(captions, indent=2))
        return root

    return make


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Tests use tiny tensors: one thread avoids oversubscription stalls on a shared 2-core CPU,
    and keeps float results independent of the thread count."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def mnre_tree() -> Callable[..., Path]:
    """Write MNRE text files into ``text_root`` and images under ``image_root/img_org/``."""

    def make(text_root: Path, image_root: Path) -> None:
        recs = source_records()
        text_only = {
            k: [r for r in v if len(r["t"]["pos"]) == 2 and len(r["h"]["pos"]) == 2]
            for k, v in recs.items()
        }
        text_only["test_set.json"] = [
            {**text_only["train_set.json"][0], "img_id": "img_c.png", "relation": "/per/per/parent"}
        ]
        write_lines(text_root / "mnre_train.txt", text_only["train_set.json"])
        write_lines(text_root / "mnre_val .txt", text_only["val_set.json"])
        write_lines(text_root / "mnre_test.txt", text_only["test_set.json"])
        write_images(image_root / "img_org" / "train")

    return make
