"""pipeline.io: atomic writes, folder swaps that survive a kill between renames, hashing."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from pipeline.io import (
    DataError,
    atomic_path,
    atomic_write_text,
    file_sha256,
    not_utf8,
    read_json,
    read_utf8,
    recover_swap,
    staging_dir,
    swap_into_place,
    tree_sha256,
    write_json,
)


def test_atomic_write_replaces_whole_files_and_leaves_no_temp(tmp_path):
    path = tmp_path / "sub" / "a.txt"
    atomic_write_text(path, "first")
    atomic_write_text(path, "second")
    assert path.read_text() == "second"
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.txt"]


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert path.read_text() == "old" and sorted(os.listdir(tmp_path)) == ["a.txt"]


def test_a_leftover_temp_of_a_killed_write_is_overwritten(tmp_path):
    path = tmp_path / "a.txt"
    (tmp_path / ".a.txt.tmp").write_text("left by a kill -9")
    atomic_write_text(path, "done")
    assert sorted(os.listdir(tmp_path)) == ["a.txt"] and path.read_text() == "done"


def test_json_is_sorted_and_bad_json_names_the_line(tmp_path):
    write_json(tmp_path / "x.json", {"b": 1, "a": [1, 2]})
    assert (tmp_path / "x.json").read_text() == '{\n  "a": [\n    1,\n    2\n  ],\n  "b": 1\n}\n'
    (tmp_path / "bad.json").write_text('{\n  "a": 1,\n  oops\n}')
    with pytest.raises(DataError, match=r"bad\.json:3: not valid JSON"):
        read_json(tmp_path / "bad.json", "thing")
    with pytest.raises(DataError, match="thing not found"):
        read_json(tmp_path / "none.json", "thing")
    (tmp_path / "latin1.json").write_bytes(b'{\n  "caf\xe9": 1\n}')
    with pytest.raises(DataError) as caught:
        read_json(tmp_path / "latin1.json", "thing")
    assert str(caught.value) == (
        f"{tmp_path / 'latin1.json'}:2: not UTF-8 (found byte 0xe9 at column 7, expected UTF-8 JSON)"
    )


@pytest.mark.parametrize(
    ("data", "line", "column"),
    [
        (b"\xff", 1, 1),
        (b"ab\xffc", 1, 3),
        (b"one\ntwo\n\xfe", 3, 1),
        (b"one\r\ntw\xc3(o", 2, 3),  # a lead byte followed by no continuation byte
        (
            "d\u00e9j\u00e0\n\u00e9t\u00e9 \xe9".encode("utf-8")[:-2] + b"\xe9",
            2,
            7,
        ),  # columns in bytes
    ],
)
def test_not_utf8_names_the_line_and_byte_column_of_the_bad_byte(data, line, column):
    with pytest.raises(UnicodeDecodeError) as caught:
        data.decode("utf-8")
    # The reference: split the bytes into lines by hand and find the first line that fails.
    lines = data.split(b"\n")
    bad = next(i for i, raw in enumerate(lines) if not _decodes(raw))
    offset = sum(len(raw) + 1 for raw in lines[:bad])
    assert (bad + 1, caught.value.start - offset + 1) == (line, column)
    byte = data[caught.value.start]
    assert not_utf8(data, caught.value) == (
        line,
        f"not UTF-8 (found byte 0x{byte:02x} at column {column}, expected UTF-8 text)",
    )


def _decodes(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def test_read_utf8_reads_like_read_text_and_names_a_bad_byte(tmp_path):
    path = tmp_path / "x.txt"
    for data in (b"a\r\nb\rc\nd", "caf\u00e9\n".encode(), b""):
        path.write_bytes(data)
        assert read_utf8(path) == path.read_text(encoding="utf-8")
    path.write_bytes(b"fine\nbad \x80 here\n")
    with pytest.raises(DataError) as caught:
        read_utf8(path, "UTF-8 JSON")
    assert str(caught.value) == (
        f"{path}:2: not UTF-8 (found byte 0x80 at column 5, expected UTF-8 JSON)"
    )
    with pytest.raises(FileNotFoundError):
        read_utf8(tmp_path / "missing.txt")


def test_staging_dir_swaps_in_on_success_only(tmp_path):
    out = tmp_path / "out"
    with staging_dir(out) as tmp:
        (tmp / "f").write_text("1")
    with pytest.raises(KeyError), staging_dir(out) as tmp:
        (tmp / "f").write_text("2")
        raise KeyError("failed")
    assert (out / "f").read_text() == "1"
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_a_swap_cut_between_its_renames_is_recovered(tmp_path):
    final, new = tmp_path / "best", tmp_path / "new"
    final.mkdir()
    (final / "v").write_text("old")
    os.replace(final, tmp_path / ".best.old")  # the kill came after the first rename
    recover_swap(final)
    assert (final / "v").read_text() == "old" and not (tmp_path / ".best.old").exists()
    new.mkdir()
    (new / "v").write_text("new")
    swap_into_place(new, final)
    assert (final / "v").read_text() == "new" and sorted(os.listdir(tmp_path)) == ["best"]


def test_hashes_match_hashlib_and_see_names_and_contents(tmp_path):
    (tmp_path / "t" / "d").mkdir(parents=True)
    (tmp_path / "t" / "a").write_bytes(b"x" * 3_000_000)
    (tmp_path / "t" / "d" / "b").write_bytes(b"y")
    assert file_sha256(tmp_path / "t" / "a") == hashlib.sha256(b"x" * 3_000_000).hexdigest()
    expected = hashlib.sha256()
    for rel, data in (("a", b"x" * 3_000_000), ("d/b", b"y")):
        expected.update(rel.encode() + b"\0" + hashlib.sha256(data).digest())
    assert tree_sha256(tmp_path / "t") == expected.hexdigest()
    before = tree_sha256(tmp_path / "t")
    os.rename(tmp_path / "t" / "d" / "b", tmp_path / "t" / "d" / "c")
    assert tree_sha256(tmp_path / "t") != before
    json.dumps(before)  # a plain string, storable in checkpoint metadata


def test_the_temp_file_is_fsynced_before_it_is_renamed_into_place(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.fstat(fd).st_ino))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src), str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    atomic_write_text(tmp_path / "a.txt", "data")
    tmp, final = str(tmp_path / ".a.txt.tmp"), tmp_path / "a.txt"
    # The file synced is the one renamed (the inode that is now a.txt), and before the rename.
    assert events == [("fsync", final.stat().st_ino), ("replace", tmp, str(final))]


def test_an_interrupted_write_leaves_no_temp(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("old")
    with pytest.raises(KeyboardInterrupt), atomic_path(path) as tmp:
        tmp.write_text("half")
        raise KeyboardInterrupt
    assert path.read_text() == "old" and sorted(os.listdir(tmp_path)) == ["a.txt"]


def test_tree_hash_takes_files_in_sorted_order_whatever_the_folder_order(tmp_path):
    names = [f"f{k:02d}" for k in range(40)] + [f"d/g{k:02d}" for k in range(10)]
    for name in names[1::2] + names[::2]:  # neither sorted nor reversed
        (tmp_path / "t" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "t" / name).write_bytes(name.encode())
    expected = hashlib.sha256()
    for name in sorted(names):
        expected.update(name.encode() + b"\0" + hashlib.sha256(name.encode()).digest())
    assert tree_sha256(tmp_path / "t") == expected.hexdigest()


def test_a_swap_cut_after_its_second_rename_keeps_the_new_folder(tmp_path):
    final, old = tmp_path / "best", tmp_path / ".best.old"
    for folder, text in ((final, "new"), (old, "old")):
        folder.mkdir()
        (folder / "v").write_text(text)
    recover_swap(final)  # the kill came before the old folder was removed
    assert (final / "v").read_text() == "new" and sorted(os.listdir(tmp_path)) == ["best"]


def test_staging_dir_removes_leftovers_and_recovers_a_cut_swap_first(tmp_path):
    out = tmp_path / "out"
    (tmp_path / ".out.x1y2.partial" / "sub").mkdir(parents=True)  # left by a killed run
    (tmp_path / ".out.old").mkdir()  # a swap cut between its renames: out is gone
    (tmp_path / ".out.old" / "f").write_text("previous")
    with pytest.raises(KeyError), staging_dir(out) as tmp:
        # Before any work: the previous version is back and the leftover is gone.
        assert sorted(os.listdir(tmp_path)) == sorted(["out", tmp.name])
        raise KeyError("failed")
    assert (out / "f").read_text() == "previous" and sorted(os.listdir(tmp_path)) == ["out"]


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_a_staged_folder_gets_the_mode_of_a_new_folder(tmp_path, umask):
    previous = os.umask(umask)
    try:
        with staging_dir(tmp_path / "out") as tmp:
            (tmp / "f").write_text("1")
        (tmp_path / "plain").mkdir()
    finally:
        os.umask(previous)
    mode = (tmp_path / "out").stat().st_mode & 0o777
    assert mode == (tmp_path / "plain").stat().st_mode & 0o777 == 0o777 & ~umask
