"""The one safe-extraction rule (AutoNNUNetLib.archives) and model import on it (issue 12 items 4, 17).

Real zip and tar files written with the standard library, as other tools write them.
"""

from __future__ import annotations

import io
import json
import stat
import tarfile
import time
import zipfile
from pathlib import Path

import pytest

from AutoNNUNetLib.archives import ArchiveError, inspect_archive, safe_extract
from AutoNNUNetLib.errors import AutoNNUNetError
from AutoNNUNetLib.model import ModelError, import_model

MiB = 1 << 20


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)  # Python's default: no file-type bits in the mode
    return path


def _tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w:gz") as archive:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            archive.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _info(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info


def test_members_without_file_type_bits_are_regular_files(tmp_path):
    path = tmp_path / "plain.zip"
    with zipfile.ZipFile(path, "w") as archive:
        bare = zipfile.ZipInfo("data/a.txt")
        bare.external_attr = 0  # no mode at all (Windows tools)
        archive.writestr(bare, "a")
        archive.writestr("data/b.txt", "b")  # mode 0o600, no S_IFREG
        archive.writestr(zipfile.ZipInfo("data/empty/"), "")
    _, members = inspect_archive(path)
    assert [(str(m.path), m.is_dir) for m in members] == [("data/a.txt", False), ("data/b.txt", False),
                                                          ("data/empty", True)]
    safe_extract(path, tmp_path / "out")
    assert (tmp_path / "out" / "data" / "a.txt").read_text() == "a"
    assert (tmp_path / "out" / "data" / "b.txt").read_text() == "b"
    assert (tmp_path / "out" / "data" / "empty").is_dir()


@pytest.mark.parametrize("name, message", [
    ("../evil.txt", "points outside"), ("a/../../evil.txt", "path traversal"), ("/tmp/evil.txt", "absolute path"),
    ("C:/evil.txt", "absolute path"), ("a\\evil.txt", "backslash"),
])
def test_escaping_names_are_refused_before_writing(tmp_path, name, message):
    path = _zip(tmp_path / "bad.zip", {"ok.txt": b"x", name: b"x"})
    with pytest.raises(ArchiveError, match=message) as caught:
        safe_extract(path, tmp_path / "out")
    assert isinstance(caught.value, AutoNNUNetError) and repr(name) in str(caught.value)
    assert not (tmp_path / "out").exists() and not list(tmp_path.rglob("evil.txt"))


def test_links_devices_and_duplicates_are_refused(tmp_path):
    link = zipfile.ZipInfo("data/link")
    link.create_system, link.external_attr = 3, (stat.S_IFLNK | 0o777) << 16
    with zipfile.ZipFile(tmp_path / "link.zip", "w") as archive:
        archive.writestr(link, "/etc/passwd")
    with pytest.raises(ArchiveError, match="is a symbolic link"):
        inspect_archive(tmp_path / "link.zip")
    for kind, message in ((tarfile.SYMTYPE, "is a link"), (tarfile.LNKTYPE, "is a link"),
                          (tarfile.CHRTYPE, "device"), (tarfile.FIFOTYPE, "FIFO")):
        path = _tar(tmp_path / f"{kind!r}.tgz", [(_info("data/x", kind, "/etc/passwd"), None)])
        with pytest.raises(ArchiveError, match=message):
            inspect_archive(path)
    twice = _tar(tmp_path / "twice.tgz", [(_info("data/x"), b"1"), (_info("data/x"), b"2")])
    with pytest.raises(ArchiveError, match="twice"):
        inspect_archive(twice)


def test_a_zip_bomb_is_refused_before_a_byte_is_written(tmp_path):
    path = tmp_path / "bomb.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive, archive.open("zeros.bin", "w") as handle:
        for _ in range(64):
            handle.write(bytes(MiB))
    assert path.stat().st_size < MiB
    with pytest.raises(ArchiveError, match="expands to 64.0 MB"):
        safe_extract(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # And a disk that would keep less than the reserve free.
    small = _zip(tmp_path / "small.zip", {"a.txt": b"x" * 1000})
    with pytest.raises(ArchiveError, match="not enough free disk space"):
        safe_extract(small, tmp_path / "out", min_free_bytes=1 << 60)


# -- model import on the rule -------------------------------------------------------------------

PREFIX = "Dataset004_Hippocampus/nnUNetTrainer__nnUNetPlans__3d_fullres"


def test_model_import_refuses_a_decompression_bomb_quickly(tmp_path):
    """Issue 12 item 4: a 1 MB model zip wrote 1,026 MB before it was refused."""
    path = tmp_path / "model.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(f"{PREFIX}/plans.json", json.dumps({"configurations": {"3d_fullres": {}}}))
        archive.writestr(f"{PREFIX}/dataset.json", "{}")
        with archive.open(f"{PREFIX}/fold_0/checkpoint_final.pth", "w") as handle:
            for _ in range(100):
                handle.write(bytes(MiB))
    started = time.monotonic()
    with pytest.raises(ModelError, match="expands to") as caught:
        import_model(path, tmp_path / "models")
    assert str(path) in str(caught.value)
    assert time.monotonic() - started < 5
    written = sum(p.stat().st_size for p in (tmp_path / "models").rglob("*") if p.is_file())
    assert written == 0


def test_model_import_accepts_members_without_file_type_bits(trained_model, tmp_path):
    """Issue 12 item 17: a valid model zip re-packed with ``writestr`` (mode bits but no type)."""
    repacked = tmp_path / "repacked.zip"
    with zipfile.ZipFile(repacked, "w") as archive:
        for path in sorted(trained_model.rglob("*")):
            relative = path.relative_to(trained_model).as_posix()
            if path.is_file() and (relative.count("/") == 0 or relative.endswith("checkpoint_final.pth")):
                archive.writestr(f"{PREFIX}/{relative}", path.read_bytes())
    modes = {info.external_attr >> 16 for info in zipfile.ZipFile(repacked).infolist()}
    assert all(stat.S_IFMT(mode) == 0 for mode in modes) and modes != {0}
    model = import_model(repacked, tmp_path / "models")
    assert (model / "fold_0" / "checkpoint_final.pth").read_bytes() == \
        (trained_model / "fold_0" / "checkpoint_final.pth").read_bytes()


def test_model_import_into_a_file_is_a_clear_error(tmp_path):
    target = tmp_path / "a-file"
    target.write_text("x")
    archive = _zip(tmp_path / "m.zip", {f"{PREFIX}/plans.json": b"{}"})
    with pytest.raises(ModelError, match="is not a folder"):
        import_model(archive, target)
