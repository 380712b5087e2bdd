"""Archives, downloads and the download stage, offline: crafted archives served from local files."""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import re
import sys
import tarfile
import threading
import types
import zipfile
from pathlib import Path

import pytest
from conftest import source_objects, source_records
from typer.testing import CliRunner

from pipeline.config import Params, default_params, params_to_dict
from pipeline.data.fetch import (
    ChecksumError,
    Downloader,
    UnsafeArchiveError,
    download_url,
    safe_extract,
    url_join,
)
from pipeline.data.prepare import MNRE_FILES, find_files, prepare_dataset
from pipeline.data.records import UMRE_RELATIONS, Dataset, label_list
from pipeline.io import DataError


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _zip(path: Path, entries: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return path


def _tar(path: Path, entries: dict[str, bytes], links: dict[str, str] | None = None) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tf.addfile(info)
    return path


def _pack(folder: Path, archive: Path, top: str) -> Path:
    """Archive every file under ``folder`` below a top folder ``top`` (zip or tar by suffix)."""
    files = {
        f"{top}/{p.relative_to(folder)}": p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }
    return _zip(archive, files) if archive.suffix == ".zip" else _tar(archive, files)


# --- safe extraction ----------------------------------------------------------------------------
def test_extracts_zip_and_tar_into_place(tmp_path):
    entries = {"top/a.txt": b"alpha", "top/sub/b.txt": b"beta"}
    for archive in (_zip(tmp_path / "x.zip", entries), _tar(tmp_path / "x.tar.gz", entries)):
        target = tmp_path / f"out_{archive.name}"
        safe_extract(archive, target)
        assert (target / "top" / "sub" / "b.txt").read_bytes() == b"beta"
        assert (target / "top" / "a.txt").read_bytes() == b"alpha"
    assert not list(tmp_path.glob(".*partial"))


@pytest.mark.parametrize("kind", ["zip", "tar"])
@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("../evil.txt", "points outside the target"),
        ("/tmp/evil.txt", "absolute path"),
        ("ok/../../evil.txt", "points outside the target"),
        ("C:\\evil.txt", "absolute path"),
    ],
)
def test_zip_slip_is_refused(tmp_path, kind, name, message):
    entries = {"good.txt": b"fine", name: b"evil"}
    make = _zip if kind == "zip" else _tar
    archive = make(tmp_path / f"bad.{kind}", entries)
    with pytest.raises(UnsafeArchiveError, match=message) as info:
        safe_extract(archive, tmp_path / "out" / "target")
    assert str(archive) in str(info.value) and repr(name) in str(info.value)
    assert not (tmp_path / "out" / "target").exists()
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "out" / "evil.txt").exists()


def test_tar_links_pointing_out_are_refused_and_inside_allowed(tmp_path):
    bad = _tar(tmp_path / "bad.tgz", {"a/b.txt": b"x"}, links={"a/link": "../../etc/passwd"})
    with pytest.raises(UnsafeArchiveError, match=r"link 'a/link' -> '../../etc/passwd' points"):
        safe_extract(bad, tmp_path / "t1")
    absolute = _tar(tmp_path / "abs.tgz", {"a/b.txt": b"x"}, links={"a/link": "/etc/passwd"})
    with pytest.raises(UnsafeArchiveError, match="points outside"):
        safe_extract(absolute, tmp_path / "t2")
    good = _tar(tmp_path / "good.tgz", {"a/b.txt": b"x"}, links={"a/link": "b.txt"})
    safe_extract(good, tmp_path / "t3")
    assert (tmp_path / "t3" / "a" / "link").read_bytes() == b"x"


def _damaged_archives(folder: Path) -> dict[str, Path]:
    import struct

    data = bytes(range(256)) * 4000
    whole = _tar(folder / "whole.tar.gz", {"x/a.bin": data}).read_bytes()
    (folder / "truncated.tar.gz").write_bytes(whole[: len(whole) // 2])
    with zipfile.ZipFile(folder / "good.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("x/a.txt", b"hello world " * 1000)
    good = (folder / "good.zip").read_bytes()
    corrupt = bytearray(good)
    corrupt[60:80] = bytes(20)  # inside the deflated data
    (folder / "corrupt.zip").write_bytes(bytes(corrupt))
    lying = bytearray(good)
    entry = lying.rfind(b"PK\x01\x02")  # the central directory claims 10 bytes
    lying[entry + 24 : entry + 28] = struct.pack("<I", 10)
    (folder / "lying.zip").write_bytes(bytes(lying))
    _tar(folder / "chain.tar.gz", {}, links={"a": ".", "a/b": "..", "a/b/c": ".."})
    return {n: folder / n for n in ("truncated.tar.gz", "corrupt.zip", "lying.zip", "chain.tar.gz")}


@pytest.mark.parametrize(
    ("name", "error", "message"),
    [
        (
            "truncated.tar.gz",
            DataError,
            r"corrupt or truncated archive \(found EOFError: Compressed",
        ),
        ("corrupt.zip", DataError, r"corrupt or truncated archive \(found zlib.error: Error -3"),
        ("lying.zip", DataError, r"corrupt or truncated archive \(found BadZipFile: Bad CRC-32"),
        ("chain.tar.gz", UnsafeArchiveError, r"'a/b' would link to .*outside the destination"),
    ],
)
def test_damaged_archives_are_named_errors_and_leave_nothing(tmp_path, name, error, message):
    archive = _damaged_archives(tmp_path)[name]
    with pytest.raises(error, match=re.escape(str(archive)) + ": " + message):
        safe_extract(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == []


def test_size_limit_and_non_archives(tmp_path):
    archive = _zip(tmp_path / "big.zip", {"a.bin": b"0" * 5000, "b.bin": b"1" * 5000})
    with pytest.raises(
        UnsafeArchiveError, match=r"unpacks to 10000 bytes \(expected at most 9999\)"
    ):
        safe_extract(archive, tmp_path / "t", max_bytes=9999)
    safe_extract(archive, tmp_path / "t", max_bytes=10000)
    text = tmp_path / "notes.txt"
    text.write_text("hello world")
    with pytest.raises(DataError, match=r"notes.txt: not a zip or tar archive \(found first bytes"):
        safe_extract(text, tmp_path / "t2")


def test_the_size_limit_holds_for_tar_archives_too(tmp_path):
    archive = _tar(tmp_path / "big.tar.gz", {"a.bin": b"0" * 6000, "d/b.bin": b"1" * 4000})
    with pytest.raises(
        UnsafeArchiveError, match=r"unpacks to 10000 bytes \(expected at most 9999\)"
    ):
        safe_extract(archive, tmp_path / "t", max_bytes=9999)
    assert not (tmp_path / "t").exists()
    safe_extract(archive, tmp_path / "t", max_bytes=10000)
    assert (tmp_path / "t" / "d" / "b.bin").read_bytes() == b"1" * 4000


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_backslash_paths_that_climb_out_are_refused(tmp_path, kind):
    # Written on Windows, "ok\..\..\evil.txt" climbs two folders up once unpacked there.
    name = "ok\\..\\..\\evil.txt"
    make = _zip if kind == "zip" else _tar
    archive = make(tmp_path / f"bad.{kind}", {"ok/good.txt": b"fine", name: b"evil"})
    with pytest.raises(UnsafeArchiveError, match="points outside the target") as info:
        safe_extract(archive, tmp_path / "out")
    assert repr(name) in str(info.value)
    assert not (tmp_path / "out").exists()


def test_special_files_in_a_tar_are_refused_by_name(tmp_path):
    for kind, label in ((tarfile.FIFOTYPE, "fifo"), (tarfile.CHRTYPE, "dev")):
        archive = tmp_path / f"{label}.tar"
        with tarfile.open(archive, "w") as tf:
            info = tarfile.TarInfo(f"a/{label}")
            info.type = kind
            tf.addfile(info)
        expected = f"{archive}: entry 'a/{label}' is a special file (expected files and folders)"
        with pytest.raises(UnsafeArchiveError, match=re.escape(expected)):
            safe_extract(archive, tmp_path / "out")
        assert not (tmp_path / "out").exists()


# --- downloads ----------------------------------------------------------------------------------
class _RangeHandler(http.server.BaseHTTPRequestHandler):
    payload = b""
    honour_range = True
    seen_ranges: list = []
    # "ok"; "wrong-range": a 206 that starts at 0 whatever was asked; "short": the connection
    # closes after half the declared Content-Length; "416": every Range request is refused;
    # "chunked-cut": a chunked response whose connection drops mid-chunk.
    mode = "ok"

    def do_GET(self):  # noqa: N802 (http.server's naming)
        rng = self.headers.get("Range")
        type(self).seen_ranges.append(rng)
        if self.mode == "chunked-cut":  # the connection drops inside the second chunk
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.wfile.write(b"%x\r\n%s\r\n%x\r\n%s" % (5000, self.payload[:5000], 5000, b"x" * 10))
            return
        if rng and self.mode == "416":
            self.send_response(416)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data, status = self.payload, 200
        if rng and self.honour_range:
            start = int(rng.removeprefix("bytes=").rstrip("-"))
            if self.mode == "wrong-range":
                start = 0
            data, status = self.payload[start:], 206
        self.send_response(status)
        if status == 206:
            self.send_header(
                "Content-Range", f"bytes {start}-{len(self.payload) - 1}/{len(self.payload)}"
            )
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[: len(data) // 2] if self.mode == "short" else data)

    def log_message(self, *args):
        pass


@pytest.fixture
def http_server():
    _RangeHandler.payload = bytes(range(256)) * 400
    _RangeHandler.seen_ranges = []
    _RangeHandler.mode = "ok"
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RangeHandler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/file.bin"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("honour_range", [True, False])
def test_http_download_resumes_a_partial_file(tmp_path, http_server, honour_range, monkeypatch):
    monkeypatch.setattr(_RangeHandler, "honour_range", honour_range)
    payload = _RangeHandler.payload
    dest = tmp_path / "file.bin"
    (tmp_path / "file.bin.part").write_bytes(payload[:30000])
    download_url(http_server, dest)
    assert dest.read_bytes() == payload and not (tmp_path / "file.bin.part").exists()
    assert _RangeHandler.seen_ranges == ["bytes=30000-"]  # asked to resume; served whole if refused
    download_url(http_server, tmp_path / "again.bin")
    assert (
        _RangeHandler.seen_ranges[-1] is None and (tmp_path / "again.bin").read_bytes() == payload
    )


def test_a_206_for_another_range_than_asked_is_not_appended(tmp_path, http_server, monkeypatch):
    monkeypatch.setattr(_RangeHandler, "mode", "wrong-range")
    payload = _RangeHandler.payload
    (tmp_path / "file.bin.part").write_bytes(payload[:30000])
    download_url(http_server, tmp_path / "file.bin")
    assert _RangeHandler.seen_ranges == ["bytes=30000-"]
    assert (tmp_path / "file.bin").read_bytes() == payload  # written from the start


def test_a_cut_download_stays_partial_and_the_next_run_resumes_it(
    tmp_path, http_server, monkeypatch
):
    payload = _RangeHandler.payload
    dest = tmp_path / "file.bin"
    monkeypatch.setattr(_RangeHandler, "mode", "short")
    half = len(payload) // 2
    expected = (
        f"{http_server}: incomplete download (found {half} bytes, expected {len(payload)}); "
        "rerun to resume"
    )
    with pytest.raises(DataError, match=re.escape(expected)):
        download_url(http_server, dest)
    assert not dest.exists()
    assert (tmp_path / "file.bin.part").read_bytes() == payload[:half]
    monkeypatch.setattr(_RangeHandler, "mode", "ok")
    download_url(http_server, dest)
    assert _RangeHandler.seen_ranges == [None, f"bytes={half}-"]
    assert dest.read_bytes() == payload and not (tmp_path / "file.bin.part").exists()


def test_a_connection_dropped_mid_chunk_is_a_named_error(tmp_path, http_server, monkeypatch):
    # http.client raises IncompleteRead (no OSError): it must not escape as a traceback.
    monkeypatch.setattr(_RangeHandler, "mode", "chunked-cut")
    dest = tmp_path / "file.bin"
    with pytest.raises(DataError, match=re.escape(f"{http_server}: download interrupted (found ")):
        download_url(http_server, dest)
    assert not dest.exists()
    # the first chunk arrived whole and is kept: the rerun asks for the rest only
    assert (tmp_path / "file.bin.part").read_bytes() == _RangeHandler.payload[:5000]
    monkeypatch.setattr(_RangeHandler, "mode", "ok")
    download_url(http_server, dest)
    assert _RangeHandler.seen_ranges == [None, "bytes=5000-"]
    assert dest.read_bytes() == _RangeHandler.payload


def test_a_reply_that_is_not_http_is_a_named_error(tmp_path):
    import socketserver

    class NotHttp(socketserver.StreamRequestHandler):
        def handle(self):
            self.rfile.readline()
            self.wfile.write(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")  # e.g. a wrong port

    with socketserver.ThreadingTCPServer(("127.0.0.1", 0), NotHttp) as server:
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        url = f"http://127.0.0.1:{server.server_address[1]}/file.bin"
        try:
            with pytest.raises(DataError, match=re.escape(f"{url}: download failed (found ")):
                download_url(url, tmp_path / "file.bin")
        finally:
            server.shutdown()
    assert not (tmp_path / "file.bin").exists()


def test_a_partial_file_the_server_cannot_resume_is_downloaded_again(
    tmp_path, http_server, monkeypatch
):
    # A .part as long as the file or longer (stale): the server answers 416 to the Range.
    monkeypatch.setattr(_RangeHandler, "mode", "416")
    payload = _RangeHandler.payload
    (tmp_path / "file.bin.part").write_bytes(b"stale" * 20000)
    download_url(http_server, tmp_path / "file.bin")
    assert _RangeHandler.seen_ranges == ["bytes=100000-", None]
    assert (tmp_path / "file.bin").read_bytes() == payload


def test_local_paths_and_file_urls_use_the_same_code(tmp_path):
    src = tmp_path / "dir with space" / "mnre_val .txt"
    src.parent.mkdir()
    src.write_bytes(b"line\n")
    url = url_join(src.parent.as_uri(), src.name)
    assert url.endswith("/mnre_val%20.txt")
    assert download_url(url, tmp_path / "a.txt").read_bytes() == b"line\n"
    dl = Downloader(tmp_path / "cache")
    got = dl.fetch(str(src), "b.txt")
    assert got.path.read_bytes() == b"line\n" and got.sha256 == _sha(src) and not got.pinned
    with pytest.raises(DataError, match="download failed"):
        download_url((tmp_path / "missing.bin").as_uri(), tmp_path / "c.bin")


def test_checksum_mismatch_names_file_expected_and_found(tmp_path):
    src = tmp_path / "archive.zip"
    src.write_bytes(b"not what was pinned")
    dl = Downloader(tmp_path / "cache")
    wrong = "0" * 64
    with pytest.raises(ChecksumError) as info:
        dl.fetch(str(src), "archive.zip", sha256=wrong)
    key = hashlib.sha256(str(src).encode()).hexdigest()[:12]
    dest = tmp_path / "cache" / "downloads" / key / "archive.zip"
    assert str(info.value) == f"{dest}: sha256 mismatch (found {_sha(src)}, expected {wrong})"
    assert not dest.exists() and dest.with_name("archive.zip.mismatch").exists()
    assert dl.fetch(str(src), "archive.zip", sha256=_sha(src).upper()).pinned


def test_a_cached_file_that_no_longer_matches_its_pin_is_downloaded_again(tmp_path):
    src = tmp_path / "data.bin"
    src.write_bytes(b"version 1")
    dl = Downloader(tmp_path / "cache")
    first = dl.fetch(str(src), "data.bin")
    assert first.path.read_bytes() == b"version 1" and not first.pinned
    src.write_bytes(b"version 2")  # the source moved on; the pin is the new file's
    second = dl.fetch(str(src), "data.bin", sha256=_sha(src))
    assert second.path == first.path and second.path.read_bytes() == b"version 2"
    assert second.sha256 == _sha(src) and second.pinned
    assert sorted(p.name for p in first.path.parent.iterdir()) == ["data.bin"]


def test_extractions_are_cached_by_checksum_not_by_name(tmp_path):
    dl = Downloader(tmp_path / "cache")
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    one = _zip(tmp_path / "one" / "data.zip", {"x.txt": b"one"})
    two = _zip(tmp_path / "two" / "data.zip", {"x.txt": b"two"})
    first = dl.extract(dl.fetch(str(one), "data.zip"))
    second = dl.extract(dl.fetch(str(two), "data.zip"))
    assert (first / "x.txt").read_bytes() == b"one" and (second / "x.txt").read_bytes() == b"two"
    assert second == tmp_path / "cache" / "extracted" / _sha(two)[:16]


def test_drive_sources_go_through_gdown(tmp_path, monkeypatch):
    calls = []

    def fake_download(id, output, quiet, resume):  # noqa: A002 (gdown's keyword)
        calls.append((id, resume))
        Path(output).write_bytes(b"from drive")
        return output

    monkeypatch.setitem(sys.modules, "gdown", types.SimpleNamespace(download=fake_download))
    got = Downloader(tmp_path).fetch("gdrive:ABC123", "x.bin")
    assert calls == [("ABC123", True)] and got.path.read_bytes() == b"from drive"
    Downloader(tmp_path).fetch("gdrive:ABC123", "x.bin")  # cached: no second download
    assert len(calls) == 1
    Downloader(tmp_path).fetch("gdrive:OTHER", "x.bin")  # another id never reuses that file
    assert calls[-1] == ("OTHER", True)


def test_a_drive_download_that_leaves_no_file_is_an_error(tmp_path, monkeypatch):
    def fake_download(id, output, quiet, resume):  # noqa: A002 (gdown's keyword)
        return None  # what gdown returns when it gives up (quota, permissions)

    monkeypatch.setitem(sys.modules, "gdown", types.SimpleNamespace(download=fake_download))
    dest = tmp_path / "downloads" / hashlib.sha256(b"gdrive:ABC").hexdigest()[:12] / "x.bin"
    expected = f"Google Drive file ABC: download failed (found no file at {dest}; expected a public"
    with pytest.raises(DataError, match=re.escape(expected)):
        Downloader(tmp_path).fetch("gdrive:ABC", "x.bin")


# --- end to end ---------------------------------------------------------------------------------
def _params(**overrides) -> Params:
    return default_params(overrides)


def _umre_archives(tmp_path: Path, umre_tree) -> tuple[Path, Path]:
    """The two published archives: images under a nested top folder (zip), the partner files
    under umke_partner/ (tar.gz)."""
    tree = umre_tree(tmp_path / "src")
    dataset = _pack(tree / "UMKE_IMG", tmp_path / "umre_dataset.zip", "UMRE/data/UMKE_IMG")
    partner = _pack(tree / "umke_partner", tmp_path / "umke_partner.tar.gz", "umke_partner")
    return dataset, partner


def test_umre_end_to_end_from_archives(tmp_path, umre_tree):
    dataset, partner = _umre_archives(tmp_path, umre_tree)
    params = _params(**{"data.source": "umre", "data.umre.partner_sha256": _sha(partner)})
    u = params.data.umre
    redirect = {f"gdrive:{u.dataset_id}": str(dataset), f"gdrive:{u.partner_id}": str(partner)}
    out = tmp_path / "raw" / "umre"
    manifest = prepare_dataset(
        params, out, tmp_path / "cache", downloader=Downloader(tmp_path / "cache", redirect)
    )
    ds = Dataset(out)
    assert [len(ds.records(s)) for s in ("train", "valid", "test")] == [3, 1, 1]
    assert ds.records("valid")[0].relation == "none"
    assert ds.relations == {label: i for i, label in enumerate(UMRE_RELATIONS)}
    assert ds.objects == {
        "img_a.jpg": {"[OBJ0]": [0.0, 0.0, 0.5, 0.5], "[OBJ1]": [0.1, 0.1, 0.6, 0.9]},
        "img_b.jpg": {},
        "img_c.png": {"[OBJ0]": [0.1, 0.1, 0.9, 0.9]},
    }
    assert sorted(p.name for p in (out / "images").iterdir()) == [
        "img_a.jpg",
        "img_b.jpg",
        "img_c.png",
    ]
    assert (out / "images" / "img_a.jpg").read_bytes() == (
        tmp_path / "src" / "UMKE_IMG" / "img_a.jpg"
    ).read_bytes()
    captions = json.loads(ds.captions_path.read_text())
    assert captions == {
        "img_a.jpg": {"Bill Cosby": "a man", "[OBJ1]": "a man in a suit"},
        "img_b.jpg": {"Walk of Fame": "a street"},
    }
    downloads = manifest["downloads"]
    assert downloads["partner"] == {
        "source": f"gdrive:{u.partner_id}",
        "sha256": _sha(partner),
        "pinned": True,
    }
    assert downloads["dataset"]["sha256"] == _sha(dataset) and not downloads["dataset"]["pinned"]
    assert manifest["splits"]["train"]["pair_kinds"] == {
        "text-text": 1,
        "text-object": 1,
        "object-object": 1,
    }
    assert manifest["skipped"] == {"records": 0, "problems": 0, "report": "skipped.tsv"}
    assert (out / "skipped.tsv").read_text() == "file\tline\treason\n"
    assert manifest["files"]["train"].endswith("umke_partner/train_set.json")
    # A rerun uses the cache: the sources may be gone.
    dataset.unlink()
    partner.unlink()
    again = prepare_dataset(
        params, out, tmp_path / "cache", downloader=Downloader(tmp_path / "cache", redirect)
    )
    assert again["sha256"] == manifest["sha256"]


def test_pinned_checksum_mismatch_stops_before_writing(tmp_path, umre_tree):
    dataset, partner = _umre_archives(tmp_path, umre_tree)
    params = _params(**{"data.source": "umre", "data.umre.dataset_sha256": "ab" * 32})
    u = params.data.umre
    redirect = {f"gdrive:{u.dataset_id}": str(dataset), f"gdrive:{u.partner_id}": str(partner)}
    expected = f"umre_dataset: sha256 mismatch (found {_sha(dataset)}, expected {'ab' * 32})"
    _assert_pin_refused(tmp_path, params, redirect, expected)


def _assert_pin_refused(tmp_path, params, redirect: dict, expected: str) -> None:
    """prepare_dataset stops at a pinned archive's checksum and writes no dataset."""
    with pytest.raises(ChecksumError, match=re.escape(expected)):
        prepare_dataset(
            params,
            tmp_path / "out",
            tmp_path / "cache",
            downloader=Downloader(tmp_path / "cache", redirect),
        )
    assert not (tmp_path / "out").exists()


def test_mnre_end_to_end_text_urls_and_image_archive(tmp_path, mnre_tree):
    mnre_tree(tmp_path / "mnre_txt", tmp_path / "imgs")
    images = _pack(tmp_path / "imgs", tmp_path / "mnre_images.zip", "mnre_image")
    params = _params(
        **{"data.source": "mnre", "data.mnre.text_url": (tmp_path / "mnre_txt").as_uri()}
    )
    redirect = {f"gdrive:{params.data.mnre.images_id}": str(images)}
    out = tmp_path / "raw" / "mnre"
    manifest = prepare_dataset(
        params, out, tmp_path / "cache", downloader=Downloader(tmp_path / "cache", redirect)
    )
    ds = Dataset(out)
    assert [len(ds.records(s)) for s in ("train", "valid", "test")] == [1, 1, 1]
    assert ds.records("test")[0].relation == "/per/per/parent"
    assert ds.records("valid")[0].relation == "none"  # MNRE spells it "None"
    assert ds.objects == {"img_a.jpg": {}, "img_b.jpg": {}, "img_c.png": {}}
    assert len(ds.relations) == 23 and ds.relations["none"] == 0
    assert manifest["downloads"]["valid"]["source"].endswith("/mnre_txt/mnre_val%20.txt")
    assert not ds.captions_path.exists()


def test_local_folder_in_skip_mode_reports_bad_records(tmp_path, umre_tree):
    bad = [
        "{'token': ['x'",
        {
            "token": ["a", "b"],
            "h": {"name": "a", "pos": [0, 1]},
            "t": {"name": "b", "pos": [1, 3]},
            "img_id": "img_a.jpg",
            "relation": "/per/per/self",
        },
    ]

    tree = umre_tree(
        tmp_path / "tree", records={"val_set.json": source_records()["val_set.json"] + bad}
    )
    out = tmp_path / "out"
    params = _params(
        **{"data.source": "local", "data.local.path": str(tree), "data.on_error": "skip"}
    )
    manifest = prepare_dataset(params, out, tmp_path / "cache")
    assert manifest["skipped"] == {"records": 2, "problems": 2, "report": "skipped.tsv"}
    assert manifest["splits"]["valid"]["samples"] == 1
    rows = (out / "skipped.tsv").read_text().splitlines()
    assert rows[1].startswith(f"{tree / 'umke_partner' / 'val_set.json'}\t2\tmalformed line")
    assert rows[2].startswith(
        f"{tree / 'umke_partner' / 'val_set.json'}\t3\tspan outside the tokens"
    )
    raising = _params(**{"data.source": "local", "data.local.path": str(tree)})
    with pytest.raises(DataError, match=r"val_set.json:2: malformed line"):
        prepare_dataset(raising, tmp_path / "out2", tmp_path / "cache")
    assert not (tmp_path / "out2").exists()


@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_an_empty_split_is_refused_by_name(tmp_path, umre_tree, on_error):
    tree = umre_tree(tmp_path / "tree", records={"test_set.json": []})
    test_file = tree / "umke_partner" / "test_set.json"
    params = _params(
        **{"data.source": "local", "data.local.path": str(tree), "data.on_error": on_error}
    )
    with pytest.raises(DataError, match=rf"{test_file}: the test split has no usable records"):
        prepare_dataset(params, tmp_path / "out", tmp_path / "cache")
    assert not (tmp_path / "out").exists()
    # Skipping every record empties a split too: the message gives the first reason.
    tree = umre_tree(tmp_path / "tree2", records={"val_set.json": ["{'token': ['x'"]})
    params = _params(
        **{"data.source": "local", "data.local.path": str(tree), "data.on_error": "skip"}
    )
    with pytest.raises(
        DataError,
        match=r"valid split has no usable records \(1 problems, the "
        r"first: .*val_set.json:1: malformed line",
    ):
        prepare_dataset(params, tmp_path / "out", tmp_path / "cache")


def bomb_png(width: int = 20000, height: int = 20000) -> bytes:
    """A tiny PNG whose header declares ``width x height`` pixels (a decompression bomb)."""
    import struct
    import zlib

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = struct.pack(">II", width, height)  # IHDR: width, height, then its CRC
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def _hostile_tree(tmp_path, umre_tree) -> Path:
    """Good records plus one line for each kind of damage a received dataset may carry."""
    tree = umre_tree(tmp_path / "tree")
    folder = tree / "UMKE_IMG"
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "text.png").write_text("not an image")
    full = (folder / "img_a.jpg").read_bytes()
    (folder / "trunc.jpg").write_bytes(full[: len(full) // 2])
    (folder / "bomb.png").write_bytes(bomb_png())
    good = source_records()["train_set.json"]
    pixel_box = {"name": "[OBJ0]", "pos": [0, 0, 10, 10]}
    lines = [repr(r) for r in good] + [
        "{['token']: 1}",
        repr({**good[0], "relation": ["none"]}),
        repr({**good[0], "t": None}).replace("None", "null"),
        *(repr({**good[1], "img_id": name, "t": pixel_box}) for name in ("zero.jpg", "text.png")),
        *(repr({**good[0], "img_id": name}) for name in ("trunc.jpg", "bomb.png")),
    ]
    path = tree / "umke_partner" / "train_set.json"
    path.write_bytes("\n".join(lines).encode() + b"\n" + repr(good[0]).encode()[:-2] + b"\xff'}\n")
    return tree


def test_hostile_records_and_images_are_reported_never_a_traceback(tmp_path, umre_tree):
    tree = _hostile_tree(tmp_path, umre_tree)
    train_file = tree / "umke_partner" / "train_set.json"
    skip = _params(
        **{"data.source": "local", "data.local.path": str(tree), "data.on_error": "skip"}
    )
    manifest = prepare_dataset(skip, tmp_path / "out", tmp_path / "cache")
    assert manifest["splits"]["train"]["samples"] == 3
    rows = (tmp_path / "out" / "skipped.tsv").read_text().splitlines()[1:]
    reasons = {int(r.split("\t")[1]): r.split("\t")[2] for r in rows}
    assert all(r.split("\t")[0] == str(train_file) for r in rows)
    assert manifest["skipped"]["records"] == len(rows) == 8
    assert reasons[4].startswith("malformed line (found TypeError: unhashable type: 'list'")
    assert reasons[5].startswith("malformed line (found relation ['none'], expected a string)")
    assert reasons[6].startswith("malformed line (found 'null' at column")
    assert "0x" not in reasons[6]
    for line, name in [(7, "zero.jpg"), (8, "text.png")]:
        assert reasons[line].startswith(f"t [OBJ0]: image {name} unreadable"), reasons[line]
    assert reasons[9].startswith("image trunc.jpg does not decode (")
    assert (
        reasons[10].startswith("image bomb.png does not decode (")
        and "exceeds limit" in reasons[10]
    )
    column = len(repr(source_records()["train_set.json"][0])) - 1
    assert reasons[11] == f"not UTF-8 (found byte 0xff at column {column}, expected UTF-8 text)"
    # The report is a function of the input (no addresses, no ordering by chance).
    again = prepare_dataset(skip, tmp_path / "out2", tmp_path / "cache")
    assert (tmp_path / "out2" / "skipped.tsv").read_bytes() == (
        tmp_path / "out" / "skipped.tsv"
    ).read_bytes()
    assert again["sha256"] == manifest["sha256"]
    # raise: the first problem, at its line, as a DataError (a clean CLI error, never a traceback).
    raising = _params(**{"data.source": "local", "data.local.path": str(tree)})
    with pytest.raises(DataError, match=rf"{train_file}:4: malformed line"):
        prepare_dataset(raising, tmp_path / "out3", tmp_path / "cache")


@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_links_out_of_the_source_folder_are_refused(tmp_path, umre_tree, on_error):
    tree = umre_tree(tmp_path / "tree")
    secret = tmp_path / "elsewhere" / "secret.jpg"
    secret.parent.mkdir()
    secret.write_bytes((tree / "UMKE_IMG" / "img_a.jpg").read_bytes())
    (tree / "UMKE_IMG" / "secret.jpg").symlink_to(secret)
    (tree / "UMKE_IMG" / "alias.jpg").symlink_to(tree / "UMKE_IMG" / "img_b.jpg")  # inside: fine
    good = source_records()["train_set.json"][0]
    records = source_records()["train_set.json"] + [
        {**good, "img_id": "secret.jpg"},
        {**good, "img_id": "alias.jpg"},
    ]
    tree = umre_tree(tree, records={"train_set.json": records})
    params = _params(
        **{"data.source": "local", "data.local.path": str(tree), "data.on_error": on_error}
    )
    link = tree / "UMKE_IMG" / "secret.jpg"
    message = f"image refused ({link} is a link to {secret}, outside the source folder {tree}"
    if on_error == "raise":
        with pytest.raises(DataError, match=re.escape(f"train_set.json:4: {message}")):
            prepare_dataset(params, tmp_path / "out", tmp_path / "cache")
    else:
        manifest = prepare_dataset(params, tmp_path / "out", tmp_path / "cache")
        assert manifest["splits"]["train"]["samples"] == 4
        assert sorted(p.name for p in (tmp_path / "out" / "images").iterdir()) == [
            "alias.jpg", "img_a.jpg", "img_b.jpg", "img_c.png",
        ]  # fmt: skip
        assert message in (tmp_path / "out" / "skipped.tsv").read_text()
    # A record file that is a link out of the folder is refused outright.
    (tree / "umke_partner" / "test_set.json").unlink()
    (tree / "umke_partner" / "test_set.json").symlink_to(secret)
    with pytest.raises(DataError, match="test_set.json is a link to .*outside the source folder"):
        prepare_dataset(params, tmp_path / "out2", tmp_path / "cache")


def test_several_files_for_one_image_id(tmp_path, umre_tree):
    from PIL import Image

    tree = umre_tree(tmp_path / "tree")
    images = tree / "UMKE_IMG"
    original = images / "img_a.jpg"
    for folder in ("a", "b"):
        (images / folder).mkdir()
    params = _params(**{"data.source": "local", "data.local.path": str(tree)})
    # Identical copies are one image, wherever they are.
    (images / "a" / "img_a.jpg").write_bytes(original.read_bytes())
    (images / "b" / "img_a.jpg").write_bytes(original.read_bytes())
    manifest = prepare_dataset(params, tmp_path / "out1", tmp_path / "cache")
    assert manifest["hygiene"]["image_ids_chosen_among_different_files"] == 0
    # A different file deeper down: the rule (shallowest) picks the top one, and it is counted.
    Image.new("RGB", (200, 100), (255, 0, 0)).save(images / "b" / "img_a.jpg")
    manifest = prepare_dataset(params, tmp_path / "out2", tmp_path / "cache")
    assert manifest["hygiene"]["image_ids_chosen_among_different_files"] == 1
    assert (tmp_path / "out2" / "images" / "img_a.jpg").read_bytes() == original.read_bytes()
    # Two different files the rule cannot choose between: the record's line says which.
    original.rename(images / "a" / "img_a.jpg")
    expected = (
        "train_set.json:1: ambiguous image (found 2 different files for img_id 'img_a.jpg': "
        f"{images / 'a' / 'img_a.jpg'}, {images / 'b' / 'img_a.jpg'}; expected one"
    )
    with pytest.raises(DataError, match=re.escape(expected)):
        prepare_dataset(params, tmp_path / "out3", tmp_path / "cache")
    assert not (tmp_path / "out3").exists()


def test_local_archive_and_missing_files(tmp_path, umre_tree):
    tree = umre_tree(tmp_path / "tree")
    archive = _pack(tree, tmp_path / "mine.tar.gz", "release-v1")
    params = _params(**{"data.source": "local", "data.local.path": str(archive)})
    manifest = prepare_dataset(params, tmp_path / "out", tmp_path / "cache")
    assert manifest["source"] == "local" and manifest["downloads"]["archive"]["sha256"] == _sha(
        archive
    )
    (tree / "umke_partner" / "test_set.json").unlink()
    params = _params(**{"data.source": "local", "data.local.path": str(tree)})
    with pytest.raises(DataError, match=r"dataset file not found \(expected test_set.json\)"):
        prepare_dataset(params, tmp_path / "out3", tmp_path / "cache")
    twice = umre_tree(tmp_path / "twice")
    (twice / "dup").mkdir()
    copy = (twice / "umke_partner" / "train_set.json").read_text()
    (twice / "dup" / "train_set.json").write_text(copy)  # the same file twice is fine
    params = _params(**{"data.source": "local", "data.local.path": str(twice)})
    assert prepare_dataset(params, tmp_path / "out4", tmp_path / "cache")["images"] == 3
    (twice / "dup" / "train_set.json").write_text(copy.splitlines()[0] + "\n")
    expected = (
        r"dup/train_set.json: ambiguous \(found also .*umke_partner/train_set.json, expected one"
    )
    with pytest.raises(DataError, match=expected):
        prepare_dataset(params, tmp_path / "out4", tmp_path / "cache")


def test_find_files_takes_the_shallowest_then_the_earlier_name(tmp_path):
    for rel, text in [("a/train_set.json", "1"), ("b/c/d/train_set.json", "2")]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    # Other contents deeper down: not a rival of the shallowest.
    assert find_files([tmp_path], ("train_set.json",)) == tmp_path / "a" / "train_set.json"
    # MNRE's two spellings of its dev file side by side: the first listed wins, no ambiguity.
    for name, text in [("mnre_val.txt", "plain"), ("mnre_val .txt", "spaced")]:
        (tmp_path / "x" / name).parent.mkdir(exist_ok=True)
        (tmp_path / "x" / name).write_text(text)
    assert find_files([tmp_path], MNRE_FILES["valid"]) == tmp_path / "x" / "mnre_val .txt"
    assert find_files([tmp_path], ("missing.txt",)) is None


def test_a_repeat_within_a_later_split_is_counted_once_as_leakage(tmp_path, umre_tree):
    records = source_records()
    train0 = records["train_set.json"][0]
    records["val_set.json"] = [*records["val_set.json"], train0, train0]
    tree = umre_tree(tmp_path / "tree", records=records)
    params = _params(**{"data.source": "local", "data.local.path": str(tree)})
    hygiene = prepare_dataset(params, tmp_path / "out", tmp_path / "cache")["hygiene"]
    # The first copy in valid repeats train (leakage); the second repeats valid's own.
    assert hygiene["records_repeated_in_a_later_split"] == 1
    assert hygiene["duplicate_records"] == 1


def test_skip_counts_records_and_problems_apart(tmp_path, umre_tree):
    # Too many objects for one image is a problem of the objects file: no record is left out.
    objects = source_objects()
    objects["img_b.jpg"] = {f"[OBJ{k}]": [0, 0, 32, 32] for k in range(13)}
    tree = umre_tree(tmp_path / "tree", objects=objects)
    skip = _params(
        **{"data.source": "local", "data.local.path": str(tree), "data.on_error": "skip"}
    )
    manifest = prepare_dataset(skip, tmp_path / "out", tmp_path / "cache")
    assert manifest["skipped"] == {"records": 0, "problems": 1, "report": "skipped.tsv"}
    assert [manifest["splits"][s]["samples"] for s in ("train", "valid", "test")] == [3, 1, 1]
    assert len(Dataset(tmp_path / "out").objects["img_b.jpg"]) == 12


@pytest.mark.parametrize(
    ("name", "cut", "message"),
    [
        # A zip cut short loses its central directory: zipfile no longer knows it for a zip.
        ("mine.zip", 0.5, "corrupt or truncated archive"),
        ("download", 0.5, "corrupt or truncated archive"),  # a zip by its first bytes
        ("notes.txt", None, "not a folder, zip or tar archive"),
    ],
)
def test_a_local_path_that_is_no_readable_archive_says_which(tmp_path, name, cut, message):
    whole = _zip(tmp_path / "whole.zip", {"x/a.txt": b"hello" * 100}).read_bytes()
    path = tmp_path / name
    path.write_bytes(whole[: int(len(whole) * cut)] if cut else b"just some notes")
    params = _params(**{"data.source": "local", "data.local.path": str(path)})
    with pytest.raises(DataError, match=re.escape(f"{path}: {message}")):
        prepare_dataset(params, tmp_path / "out", tmp_path / "cache")
    assert not (tmp_path / "out").exists()


def test_stage_command_writes_the_synthetic_dataset(tmp_path):
    import yaml

    from stages.cli import app

    raw = params_to_dict(
        _params(
            **{
                "data.synthetic.train": 12,
                "data.synthetic.valid": 6,
                "data.synthetic.test": 6,
                "data.synthetic.image_size": 48,
            }
        )
    )
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(raw))
    out = tmp_path / "raw"
    command = ["download", "--params", str(params_file), "--out", str(out)]
    command += ["--cache", str(tmp_path / "c")]
    result = CliRunner().invoke(app, command)
    assert result.exit_code == 0, result.output
    assert Dataset(out).manifest["splits"]["train"]["samples"] == 12
    raw["data"]["source"], raw["data"]["local"]["path"] = "local", str(tmp_path / "nowhere")
    params_file.write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(app, command)
    assert result.exit_code == 1 and "nowhere: not found (data.local.path)" in result.output


def test_a_tampered_dataset_is_refused_where_a_stage_opens_it(tmp_path):
    from pipeline.data.synthetic import generate_synthetic
    from pipeline.io import file_sha256, write_json

    params = _params(**{"data.synthetic.train": 6, "data.synthetic.valid": 3,
                        "data.synthetic.test": 3, "data.synthetic.image_size": 48})  # fmt: skip
    root = tmp_path / "raw"
    generate_synthetic(root, params.data.synthetic, params.data.max_objects)
    Dataset(root)  # as written: fine
    records = root / "records" / "train.jsonl"
    lines = records.read_text().splitlines()
    first = json.loads(lines[0])
    for bad_id in ("../../outside.png", "/etc/hostname", "a\\..\\b.png"):
        lines[0] = json.dumps({**first, "image_id": bad_id})
        records.write_text("\n".join(lines) + "\n")
        with pytest.raises(DataError, match=r"train.jsonl: changed after download"):
            Dataset(root)
        # Even with the manifest rewritten to match, the id cannot leave images/.
        manifest = json.loads((root / "manifest.json").read_text())
        manifest["sha256"]["records/train.jsonl"] = file_sha256(records)
        write_json(root / "manifest.json", manifest)
        with pytest.raises(DataError, match=r"train.jsonl:1: unsafe image_id \(found"):
            Dataset(root).records("train")


def test_hygiene_is_counted_in_the_manifest_and_long_values_are_cut(tmp_path, umre_tree):
    records = source_records()
    train = records["train_set.json"]
    moved = {**train[1], "t": {"name": "[OBJ1]", "pos": [30, 10, 120, 90]}}  # objects file: 20
    records["train_set.json"] = [*train, train[0], moved, {**train[0], "img_id": "sub/img_a.jpg"}]
    misnamed = {**train[0], "h": {"name": "Bill Cosby", "pos": [0, 2]}}  # the span: "RT Bill"
    records["train_set.json"] += [misnamed, {**train[0], "t": train[0]["h"]}]
    records["test_set.json"] = [*records["test_set.json"], train[2]]
    tree = umre_tree(tmp_path / "tree", records=records)
    objects_file = tree / "umke_partner" / "pos_umke.json"
    text = objects_file.read_text()
    objects_file.write_text(text.replace('"img_b.jpg": {}', '"img_b.jpg": {}, "img_b.jpg": {}'))
    params = _params(**{"data.source": "local", "data.local.path": str(tree)})
    manifest = prepare_dataset(params, tmp_path / "out", tmp_path / "cache")
    assert manifest["hygiene"] == {
        "duplicate_records": 2,  # train[0] twice; `moved` is train[1] once its box is the file's
        "records_repeated_in_a_later_split": 1,
        "record_boxes_disagreeing_with_objects_file": 1,
        "record_boxes_disagreeing_with_an_earlier_record": 0,  # the objects file's boxes rule
        "duplicate_keys_in_objects_file": 1,
        "image_ids_resolved_by_file_name_only": 1,
        "image_ids_chosen_among_different_files": 0,
        "text_entity_names_differing_from_their_span": 1,
        "pairs_whose_head_is_their_tail": 1,
    }
    # A huge field is cut in the report (and in the error), never echoed whole.
    huge = {**train[0], "relation": "x" * 1_000_000}
    tree = umre_tree(
        tmp_path / "tree2", records={"val_set.json": [records["val_set.json"][0], huge]}
    )
    skip = _params(
        **{"data.source": "local", "data.local.path": str(tree), "data.on_error": "skip"}
    )
    prepare_dataset(skip, tmp_path / "out2", tmp_path / "cache")
    (row,) = (tmp_path / "out2" / "skipped.tsv").read_text().splitlines()[1:]
    assert len(row) < 1000 and row.endswith("more characters)")


def test_fuzzed_records_and_images_never_crash_download(tmp_path, umre_tree):
    """Seeded corruption of record lines (byte flips, truncation, type swaps) and of image files
    (truncation, byte flips), through download in skip mode: no traceback, every line either kept
    or listed in skipped.tsv, untouched lines kept, and two runs byte-identical."""
    import random

    rng = random.Random(20261204)
    tree = umre_tree(tmp_path / "tree")
    images = tree / "UMKE_IMG"
    objects_file = tree / "umke_partner" / "pos_umke.json"
    objects = json.loads(objects_file.read_text())
    original = (images / "img_a.jpg").read_bytes()
    names = [f"f{k}.jpg" for k in range(10)]
    damaged_images = set(names[:5])
    for name in names:
        data = bytearray(original)
        if name in damaged_images:
            if rng.random() < 0.5:
                data = data[: rng.randrange(1, len(data) // 2)]
            else:
                for _ in range(20):
                    data[rng.randrange(len(data) // 4, len(data))] = rng.randrange(256)
        (images / name).write_bytes(bytes(data))
        objects[name] = objects["img_a.jpg"]
    objects_file.write_text(json.dumps(objects, indent=2))

    templates = source_records()["train_set.json"]
    swaps = [("relation", 3), ("relation", None), ("h", "x"), ("token", "a b"), ("img_id", 7)]
    lines, touched = [], set()
    for number in range(1, 301):
        record = {**templates[number % 3], "img_id": names[number % 10]}
        text = repr(record).encode()
        kind = rng.randrange(6)
        if kind == 0:  # byte flips (never a line break: line numbers stay put)
            data = bytearray(text)
            for _ in range(rng.randrange(1, 4)):
                data[rng.randrange(len(data))] = rng.choice(
                    [b for b in range(256) if b not in (10, 13)]
                )
            text = bytes(data)
        elif kind == 1:
            text = text[: rng.randrange(1, len(text))]
        elif kind == 2:
            key, value = rng.choice(swaps)
            text = repr({**record, key: value}).encode()
        if kind < 3:
            touched.add(number)
        lines.append(text)
    train_file = tree / "umke_partner" / "train_set.json"
    train_file.write_bytes(b"\n".join(lines) + b"\n")

    skip = _params(
        **{"data.source": "local", "data.local.path": str(tree), "data.on_error": "skip"}
    )
    outputs = []
    for run in ("a", "b"):
        out = tmp_path / run
        manifest = prepare_dataset(skip, out, tmp_path / f"cache-{run}")
        outputs.append((manifest["sha256"], (out / "skipped.tsv").read_bytes()))
    assert outputs[0] == outputs[1]
    kept = {int(r.id.rsplit("-", 1)[1]) for r in Dataset(tmp_path / "a").records("train")}
    rows = [r.split("\t") for r in (tmp_path / "a" / "skipped.tsv").read_text().splitlines()[1:]]
    skipped = {int(line) for file, line, _ in rows if file == str(train_file)}
    assert kept.isdisjoint(skipped) and kept | skipped == set(range(1, 301))
    clean = {n for n in range(1, 301) if n not in touched and names[n % 10] not in damaged_images}
    assert clean <= kept
    assert len(skipped) > 100  # the corruption did bite


def test_a_local_dataset_with_its_own_relations(tmp_path, umre_tree, monkeypatch):
    # The dataset's own relation names, its records as JSON lines (double quotes, a `true`).
    own = {"/per/misc/present_in": "appears_at", "/per/per/self": "same_person"}
    own["/loc/loc/contain"] = "contains"
    records = {
        name: [
            json.dumps({**r, "relation": own.get(r["relation"], r["relation"]), "checked": True})
            for r in recs
        ]
        for name, recs in source_records().items()
    }
    tree = umre_tree(tmp_path / "tree", records=records)
    labels_file = tree / "relations.txt"
    labels_file.write_text("NA\nappears_at\n\ncontains\nsame_person\nunused\n")
    local = {"data.source": "local", "data.local.path": str(tree)}
    params = _params(**local, **{"data.local.labels": "relations.txt"})
    manifest = prepare_dataset(params, tmp_path / "out", tmp_path / "cache")
    ds = Dataset(tmp_path / "out")
    assert ds.relations == {
        "none": 0, "appears_at": 1, "contains": 2, "same_person": 3, "unused": 4
    }  # fmt: skip
    assert [r.relation for r in ds.records("train")] == ["appears_at", "same_person", "contains"]
    assert [r.relation for r in ds.records("valid")] == ["none"]  # "None" in the record
    assert manifest["labels_file"] == {"path": str(labels_file), "sha256": _sha(labels_file)}

    # Without the file, UMRE's set applies: the first own name is an unknown relation at its line.
    with pytest.raises(DataError, match=r"train_set.json:1: unknown relation \(found 'appears_at'"):
        prepare_dataset(_params(**local), tmp_path / "out2", tmp_path / "cache")
    # With it, a record outside the file's set is one too.
    labels_file.write_text("None\nappears_at\nsame_person\n")
    with pytest.raises(DataError, match=r"train_set.json:3: unknown relation \(found 'contains'"):
        prepare_dataset(params, tmp_path / "out2", tmp_path / "cache")

    # A rel2id object (ids out of file order), found relative to the working directory.
    monkeypatch.chdir(tmp_path)
    rel2id = {"contains": 2, "None": 0, "same_person": 3, "appears_at": 1}
    (tmp_path / "rel2id.json").write_text(json.dumps(rel2id, indent=1))
    params = _params(**local, **{"data.local.labels": "rel2id.json"})
    prepare_dataset(params, tmp_path / "out3", tmp_path / "cache")
    assert label_list(Dataset(tmp_path / "out3").relations) == [
        "none", "appears_at", "contains", "same_person"
    ]  # fmt: skip
    params = _params(**local, **{"data.local.labels": "nowhere.txt"})
    expected = (
        f"nowhere.txt: label file not found (data.local.labels; looked for {tree / 'nowhere.txt'}, "
        f"{tmp_path / 'nowhere.txt'})"
    )
    with pytest.raises(DataError, match=re.escape(expected)):
        prepare_dataset(params, tmp_path / "out4", tmp_path / "cache")


def test_the_empty_split_message_counts_and_quotes_its_own_files_first_problem(tmp_path, umre_tree):
    # Two bad lines empty valid; a bad line in train is another file's problem.
    bad = ["{'token': ['x'", "{'token': 3}"]
    records = {"val_set.json": bad, "train_set.json": [*source_records()["train_set.json"], bad[0]]}
    tree = umre_tree(tmp_path / "tree", records=records)
    params = _params(
        **{"data.source": "local", "data.local.path": str(tree), "data.on_error": "skip"}
    )
    val = tree / "umke_partner" / "val_set.json"
    expected = (
        f"{val}: the valid split has no usable records (2 problems, the first: {val}:1: malformed"
    )
    with pytest.raises(DataError, match=re.escape(expected)):
        prepare_dataset(params, tmp_path / "out", tmp_path / "cache")


def test_the_manifest_records_format_files_on_error_and_local_path(tmp_path, umre_tree):
    tree = umre_tree(tmp_path / "tree")
    partner = tree / "umke_partner"
    local = {"data.source": "local", "data.local.path": str(tree)}
    manifest = prepare_dataset(
        _params(**local, **{"data.on_error": "skip"}), tmp_path / "out", tmp_path / "cache"
    )
    assert manifest["source"] == "local" and manifest["format"] == "umre"
    assert manifest["local"] == {"path": str(tree)} and manifest["on_error"] == "skip"
    assert manifest["files"] == {
        "train": str(partner / "train_set.json"),
        "valid": str(partner / "val_set.json"),
        "test": str(partner / "test_set.json"),
        "objects": str(partner / "pos_umke.json"),
        "captions": str(partner / "cap_qwenvl_simply.json"),
    }
    # Without the optional files: empty names, and no captions.json.
    (partner / "pos_umke.json").unlink()
    (partner / "cap_qwenvl_simply.json").unlink()
    manifest = prepare_dataset(_params(**local), tmp_path / "out2", tmp_path / "cache")
    assert manifest["on_error"] == "raise"
    assert manifest["files"]["objects"] == "" and manifest["files"]["captions"] == ""
    assert not Dataset(tmp_path / "out2").captions_path.exists()


def test_a_captions_file_without_any_used_image_gives_an_empty_captions_json(tmp_path, umre_tree):
    tree = umre_tree(tmp_path / "tree", captions={"unused.jpg": {"x": "y"}})
    params = _params(**{"data.source": "local", "data.local.path": str(tree)})
    prepare_dataset(params, tmp_path / "out", tmp_path / "cache")
    assert json.loads(Dataset(tmp_path / "out").captions_path.read_text()) == {}


def test_malformed_captions_are_reported_at_their_line(tmp_path, umre_tree):
    captions = {"img_a.jpg": {"Bill Cosby": "a man", "[OBJ1]": "a suit"}, "img_b.jpg": ["street"]}
    tree = umre_tree(tmp_path / "tree", captions=captions)
    captions_file = tree / "umke_partner" / "cap_qwenvl_simply.json"
    local = {"data.source": "local", "data.local.path": str(tree)}
    # img_b.jpg's key is on line 6 of the indented file.
    expected = f"{captions_file}:6: image img_b.jpg: malformed captions (found ['street'], expected"
    with pytest.raises(DataError, match=re.escape(expected)):
        prepare_dataset(_params(**local), tmp_path / "out", tmp_path / "cache")
    # A caption that is not a string is malformed too; skip keeps the other images' captions.
    captions["img_b.jpg"] = {"Walk of Fame": 3}
    tree = umre_tree(tmp_path / "tree", captions=captions)
    manifest = prepare_dataset(
        _params(**local, **{"data.on_error": "skip"}), tmp_path / "out", tmp_path / "cache"
    )
    assert manifest["skipped"] == {"records": 0, "problems": 1, "report": "skipped.tsv"}
    rows = (tmp_path / "out" / "skipped.tsv").read_text().splitlines()[1:]
    assert rows == [
        f"{captions_file}\t6\timage img_b.jpg: malformed captions (found {{'Walk of Fame': 3}}, "
        "expected {entity or '[OBJk]': caption})"
    ]
    assert json.loads(Dataset(tmp_path / "out").captions_path.read_text()) == {
        "img_a.jpg": captions["img_a.jpg"]
    }
    # A captions file that is no object at all is refused whole.
    captions_file.write_text(json.dumps([captions["img_a.jpg"]]))
    with pytest.raises(
        DataError, match=re.escape(f"{captions_file}:1: malformed captions (found list")
    ):
        prepare_dataset(_params(**local), tmp_path / "out3", tmp_path / "cache")


def test_a_captions_file_that_is_not_utf8_is_named_at_its_line(tmp_path, umre_tree):
    tree = umre_tree(tmp_path / "tree")
    captions_file = tree / "umke_partner" / "cap_qwenvl_simply.json"
    captions_file.write_bytes(b'{"img_a.jpg":\n  {"Bill Cosby": "caf\xe9"}}\n')  # Latin-1
    local = {"data.source": "local", "data.local.path": str(tree)}
    with pytest.raises(DataError) as caught:
        prepare_dataset(_params(**local), tmp_path / "out", tmp_path / "cache")
    assert str(caught.value) == (
        f"{captions_file}:2: not UTF-8 (found byte 0xe9 at column 22, expected UTF-8 JSON)"
    )


def test_a_record_relabelled_in_the_same_split_is_no_duplicate(tmp_path, umre_tree):
    train = source_records()["train_set.json"]
    records = {"train_set.json": [*train, {**train[0], "relation": "/per/per/self"}]}
    tree = umre_tree(tmp_path / "tree", records=records)
    params = _params(**{"data.source": "local", "data.local.path": str(tree)})
    hygiene = prepare_dataset(params, tmp_path / "out", tmp_path / "cache")["hygiene"]
    assert hygiene["duplicate_records"] == 0
    assert hygiene["records_repeated_in_a_later_split"] == 0


def test_umre_images_come_from_umke_img_before_a_shallower_copy(tmp_path, umre_tree):
    from PIL import Image

    tree = umre_tree(tmp_path / "tree")
    Image.new("RGB", (200, 100), (255, 0, 0)).save(tree / "img_a.jpg")  # other pixels, depth 1
    params = _params(**{"data.source": "local", "data.local.path": str(tree)})
    manifest = prepare_dataset(params, tmp_path / "out", tmp_path / "cache")
    kept = (tmp_path / "out" / "images" / "img_a.jpg").read_bytes()
    assert kept == (tree / "UMKE_IMG" / "img_a.jpg").read_bytes()
    assert manifest["hygiene"]["image_ids_chosen_among_different_files"] == 1


def test_a_local_mnre_folder_with_its_own_labels(tmp_path, mnre_tree):
    from PIL import Image

    tree = tmp_path / "tree"
    mnre_tree(tree, tree)
    Image.new("RGB", (200, 100), (255, 0, 0)).save(tree / "img_a.jpg")  # shallower than img_org/
    (tree / "labels.txt").write_text("None\n/per/per/parent\n/per/misc/present_in\n")
    local = {"data.source": "local", "data.local.path": str(tree), "data.local.format": "mnre"}
    manifest = prepare_dataset(
        _params(**local, **{"data.local.labels": "labels.txt"}), tmp_path / "out", tmp_path / "c"
    )
    assert manifest["source"] == "local" and manifest["format"] == "mnre"
    ds = Dataset(tmp_path / "out")
    assert ds.relations == {"none": 0, "/per/per/parent": 1, "/per/misc/present_in": 2}
    assert ds.objects == {"img_a.jpg": {}, "img_b.jpg": {}, "img_c.png": {}}
    kept = (tmp_path / "out" / "images" / "img_a.jpg").read_bytes()
    assert kept == (tree / "img_org" / "train" / "img_a.jpg").read_bytes()
    # Without the file, MNRE's 23 relations.
    prepare_dataset(_params(**local), tmp_path / "out2", tmp_path / "c")
    assert len(Dataset(tmp_path / "out2").relations) == 23


def test_the_synthetic_source_honours_data_max_objects(tmp_path):
    sizes = {"data.synthetic.train": 6, "data.synthetic.valid": 3, "data.synthetic.test": 3}
    params = _params(**sizes, **{"data.synthetic.image_size": 32, "data.max_objects": 2})
    manifest = prepare_dataset(params, tmp_path / "out", tmp_path / "cache")
    assert manifest["params"]["max_objects"] == 2
    assert {len(v) for v in Dataset(tmp_path / "out").objects.values()} == {2}


def test_a_pinned_mnre_image_archive_checksum_is_checked(tmp_path, mnre_tree):
    mnre_tree(tmp_path / "mnre_txt", tmp_path / "imgs")
    images = _pack(tmp_path / "imgs", tmp_path / "mnre_images.zip", "mnre_image")
    text_url = (tmp_path / "mnre_txt").as_uri()
    params = _params(
        **{
            "data.source": "mnre",
            "data.mnre.text_url": text_url,
            "data.mnre.images_sha256": "ab" * 32,
        }
    )
    redirect = {f"gdrive:{params.data.mnre.images_id}": str(images)}
    expected = f"mnre_images: sha256 mismatch (found {_sha(images)}, expected {'ab' * 32})"
    _assert_pin_refused(tmp_path, params, redirect, expected)


def test_an_empty_local_path_is_refused_by_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # "" must not silently mean the working directory
    params = _params(**{"data.source": "local", "data.local.path": ""})
    with pytest.raises(DataError, match=re.escape("data.local.path: empty (expected an archive")):
        prepare_dataset(params, tmp_path / "out", tmp_path / "cache")


def test_local_paths_and_label_files_may_start_with_a_tilde(tmp_path, umre_tree, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    tree = umre_tree(tmp_path / "home" / "tree")
    (tmp_path / "home" / "labels.txt").write_text("\n".join(UMRE_RELATIONS) + "\n")
    params = _params(
        **{"data.source": "local", "data.local.path": "~/tree", "data.local.labels": "~/labels.txt"}
    )
    manifest = prepare_dataset(params, tmp_path / "out", tmp_path / "cache")
    assert manifest["local"] == {"path": str(tree)}
    assert manifest["labels_file"]["path"] == str(tmp_path / "home" / "labels.txt")


def test_a_label_file_is_a_file_and_an_absolute_one_is_looked_for_once(
    tmp_path, umre_tree, monkeypatch
):
    tree = umre_tree(tmp_path / "tree")
    (tree / "labels.txt").mkdir()  # a folder of that name in the dataset is no label file
    work = tmp_path / "work"
    work.mkdir()
    (work / "labels.txt").write_text("\n".join(UMRE_RELATIONS) + "\n")
    monkeypatch.chdir(work)
    local = {"data.source": "local", "data.local.path": str(tree)}
    manifest = prepare_dataset(
        _params(**local, **{"data.local.labels": "labels.txt"}), tmp_path / "out", tmp_path / "c"
    )
    assert manifest["labels_file"]["path"] == str(work / "labels.txt")
    missing = tmp_path / "nowhere.txt"
    expected = f"{missing}: label file not found (data.local.labels; looked for {missing})"
    with pytest.raises(DataError, match=re.escape(expected) + "$"):
        prepare_dataset(
            _params(**local, **{"data.local.labels": str(missing)}), tmp_path / "o2", tmp_path / "c"
        )
