"""Model folders: export to a reproducible zip, validated import, installation for stock nnU-Net."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import stat
import zipfile
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch

from AutoNNUNetLib.cli import main as cli_main
from AutoNNUNetLib.model import (
    ModelError,
    export_model,
    import_model,
    inspect_model,
    install_for_nnunet,
    load_record,
)

MODEL_FOLDER = "nnUNetTrainer__nnUNetPlans__3d_fullres"
PREFIX = f"Dataset004_Hippocampus/{MODEL_FOLDER}"
EXPECTED_MEMBERS = [
    f"{PREFIX}/autonnunet.json",
    f"{PREFIX}/dataset.json",
    f"{PREFIX}/dataset_fingerprint.json",
    f"{PREFIX}/fold_0/checkpoint_final.pth",
    f"{PREFIX}/plans.json",
]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def exported(trained_model, tmp_path_factory) -> Path:
    return export_model(trained_model, tmp_path_factory.mktemp("export") / "model.zip")


def test_export_is_minimal_sorted_reproducible_and_checksummed(trained_model, exported, tmp_path):
    with zipfile.ZipFile(exported) as archive:
        names = archive.namelist()
        assert names == EXPECTED_MEMBERS  # sorted, and only what inference and the record need
        assert all(info.date_time == (1980, 1, 1, 0, 0, 0) for info in archive.infolist())
        assert archive.testzip() is None
    sidecar = exported.with_name("model.zip.sha256")
    assert sidecar.read_text() == f"{_sha256(exported)}  model.zip\n"

    again = export_model(trained_model, tmp_path / "again.zip")
    assert again.read_bytes() == exported.read_bytes()


def test_round_trip_preserves_files_and_checksums(trained_model, exported, tmp_path):
    model = import_model(exported, tmp_path / "models")
    assert model == tmp_path / "models" / "Dataset004_Hippocampus" / MODEL_FOLDER
    imported = sorted(str(p.relative_to(model)) for p in model.rglob("*") if p.is_file())
    assert imported == sorted(m[len(PREFIX) + 1:] for m in EXPECTED_MEMBERS)
    for relative in imported:
        assert _sha256(model / relative) == _sha256(trained_model / relative), relative
    assert load_record(model) == load_record(trained_model)
    assert load_record(model)["mean_dice"] > 0
    info = inspect_model(model)
    assert (info.trainer_name, info.configuration, info.folds) == ("nnUNetTrainer", "3d_fullres", [0])
    # Nothing but the model folder is left in the destination (no staging folders).
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["Dataset004_Hippocampus"]

    with pytest.raises(ModelError, match="already exists"):
        import_model(exported, tmp_path / "models")
    assert import_model(exported, tmp_path / "models", overwrite=True) == model


def _copy_archive_without(source: Path, target: Path, drop: str = "", extra: dict[str, bytes] | None = None,
                          symlink: str = "") -> Path:
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w") as dst:
        for info in src.infolist():
            if drop and info.filename.endswith(drop):
                continue
            dst.writestr(info, src.read(info.filename))
        for name, data in (extra or {}).items():
            dst.writestr(name, data)
        if symlink:
            link = zipfile.ZipInfo(symlink)
            link.create_system = 3
            link.external_attr = (stat.S_IFLNK | 0o777) << 16
            dst.writestr(link, "/etc/passwd")
    return target


@pytest.mark.parametrize(
    "member, message",
    [
        ("../escaped.txt", "contains '..' \\(path traversal\\)"),
        (f"{PREFIX}/../../../escaped.txt", "path traversal"),
        ("/tmp/absolute.txt", "is an absolute path"),
        ("C:/windows.txt", "is an absolute path"),
    ],
)
def test_unsafe_member_names_are_rejected(exported, tmp_path, member, message):
    bad = _copy_archive_without(exported, tmp_path / "bad.zip", extra={member: b"owned"})
    destination = tmp_path / "dest"
    with pytest.raises(ModelError, match=message) as error:
        import_model(bad, destination)
    assert str(bad) in str(error.value) and repr(member) in str(error.value)
    assert not destination.exists()  # rejected before anything was written
    assert not (tmp_path / "escaped.txt").exists()


def test_symbolic_links_are_rejected(exported, tmp_path):
    bad = _copy_archive_without(exported, tmp_path / "link.zip", symlink=f"{PREFIX}/fold_0/link.pth")
    with pytest.raises(ModelError, match="is a symbolic link"):
        import_model(bad, tmp_path / "dest")


def test_archive_without_checkpoint_is_rejected(exported, tmp_path):
    bad = _copy_archive_without(exported, tmp_path / "nockpt.zip", drop="checkpoint_final.pth")
    with pytest.raises(ModelError) as error:
        import_model(bad, tmp_path / "dest")
    message = str(error.value)
    assert "nockpt.zip" in message and "checkpoint_final.pth" in message and "missing" in message
    assert not any((tmp_path / "dest").iterdir())  # the staging folder was cleaned up


def test_archive_without_plans_is_rejected(exported, tmp_path):
    bad = _copy_archive_without(exported, tmp_path / "noplans.zip", drop="plans.json")
    with pytest.raises(ModelError, match="no plans.json inside"):
        import_model(bad, tmp_path / "dest")


def test_checksum_sidecar_is_enforced(exported, tmp_path):
    copy = tmp_path / "model.zip"
    shutil.copy(exported, copy)
    (tmp_path / "model.zip.sha256").write_text("0" * 64 + "  model.zip\n")
    with pytest.raises(ModelError, match="does not match model.zip.sha256"):
        import_model(copy, tmp_path / "dest")


def _model_copy_with_checkpoint(trained_model: Path, target: Path, **changes) -> Path:
    shutil.copytree(trained_model, target, ignore=shutil.ignore_patterns("checkpoint_best.pth"))
    path = target / "fold_0" / "checkpoint_final.pth"
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    checkpoint.update(changes)
    torch.save(checkpoint, path)
    return target


def test_custom_trainer_name_is_refused(trained_model, tmp_path):
    model = _model_copy_with_checkpoint(trained_model, tmp_path / "custom", trainer_name="MyOwnTrainer")
    with pytest.raises(ModelError, match="trainer_name 'MyOwnTrainer' is not a trainer that ships with nnU-Net") as error:
        export_model(model, tmp_path / "custom.zip")
    assert "checkpoint_final.pth" in str(error.value)
    assert not (tmp_path / "custom.zip").exists()


class _Payload:
    """Unpickling this would call a function: a safe checkpoint reader must refuse it."""

    def __reduce__(self):
        return (os.getcwd, ())


def test_checkpoint_with_code_is_not_loaded(trained_model, tmp_path):
    model = _model_copy_with_checkpoint(trained_model, tmp_path / "evil", extra=_Payload())
    with pytest.raises(ModelError, match="cannot be read as a plain checkpoint"):
        inspect_model(model)
    assert inspect_model(model, trust_checkpoint=True).trainer_name == "nnUNetTrainer"


def test_install_for_nnunet_links_where_nnunet_looks(trained_model, tmp_path):
    results = tmp_path / "nnUNet_results"
    target = install_for_nnunet(trained_model, results)
    assert target == results / "Dataset004_Hippocampus" / MODEL_FOLDER
    assert target.resolve() == trained_model.resolve()
    assert (target / "fold_0" / "checkpoint_final.pth").is_file()
    # Installing again (e.g. a newer incumbent) replaces the link...
    assert install_for_nnunet(trained_model, results) == target
    # ...but never a real folder someone trained, unless asked; a copy is made where links are not wanted.
    other = install_for_nnunet(trained_model, tmp_path / "copied", "Dataset123_Other", link=False)
    assert not other.is_symlink() and other.parent.name == "Dataset123_Other"
    assert _sha256(other / "fold_0" / "checkpoint_final.pth") == _sha256(trained_model / "fold_0" / "checkpoint_final.pth")
    assert not (other / "fold_0" / "checkpoint_best.pth").exists()
    with pytest.raises(ModelError, match="already exists"):
        install_for_nnunet(trained_model, tmp_path / "copied", "Dataset123_Other")
    with pytest.raises(ModelError, match="not of nnU-Net's form DatasetNNN_Name"):
        install_for_nnunet(trained_model, results, "hippocampus")


def test_cli_export_and_import(trained_model, tmp_path):
    out = io.StringIO()
    with redirect_stdout(out):
        assert cli_main(["export-model", str(trained_model), str(tmp_path / "cli.zip")]) == 0
        assert cli_main(["import-model", str(tmp_path / "cli.zip"), str(tmp_path / "imported")]) == 0
    printed = out.getvalue().split()
    assert printed == [str(tmp_path / "cli.zip"), str(tmp_path / "imported" / "Dataset004_Hippocampus" / MODEL_FOLDER)]
    # A user error is one line on stderr and exit status 2, not a traceback.
    assert cli_main(["import-model", str(tmp_path / "missing.zip"), str(tmp_path / "x")]) == 2
