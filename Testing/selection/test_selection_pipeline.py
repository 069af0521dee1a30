"""Finalize two configurations x 5 folds on hippocampus, select, and reproduce it with stock nnU-Net.

Tiny CPU budgets (1 epoch x 2 iterations per fold): the models are poor, which is fine: the tests
check that the files are written, that stock tools and our Selection give the same label maps
voxel for voxel, and that a re-run of finalize trains only the missing folds.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from AutoNNUNetLib.config import TrialConfig
from AutoNNUNetLib.selection.candidates import Candidate
from AutoNNUNetLib.selection.finalize import finalize, load_finalized
from AutoNNUNetLib.selection.layout import CV_MARKER

EPOCHS, ITERATIONS = 1, 2


def _candidates():
    return [Candidate("incumbent", TrialConfig(), origin="incumbent"),
            Candidate("pareto1", TrialConfig(base_num_features=16, initial_lr=0.02), origin="pareto")]


def _checkpoints(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("checkpoint_final.pth")}


@pytest.fixture(scope="module")
def finalized(hippo_workspace, tmp_path_factory):
    root = tmp_path_factory.mktemp("selection") / "root"
    result = finalize(hippo_workspace, _candidates(), root, epochs=EPOCHS, iterations_per_epoch=ITERATIONS,
                      device="cpu", seed=0)
    return result


def test_finalize_trains_every_fold_and_keeps_probabilities(finalized):
    assert sorted(finalized.actions.values()) == ["trained"] * 10
    for entry in finalized.candidates:
        assert entry.model_dir.name == f"nnUNetTrainer__nnUNetPlans_{entry.candidate.name}__3d_fullres"
        cases = set()
        for fold in range(5):
            validation = entry.model_dir / f"fold_{fold}" / "validation"
            assert (entry.model_dir / f"fold_{fold}" / "checkpoint_final.pth").is_file()
            assert (validation / CV_MARKER).is_file()
            names = sorted(p.name[:-4] for p in validation.glob("*.npz"))
            assert names and not cases & set(names)  # each case is validated by exactly one fold
            cases |= set(names)
            with np.load(validation / f"{names[0]}.npz") as data:
                probabilities = data["probabilities"]
            assert probabilities.shape[0] == 3 and np.allclose(probabilities.sum(0), 1, atol=1e-4)
        assert len(cases) == 60


def test_select_writes_nnunet_files_and_report(finalized):
    from AutoNNUNetLib.files import read_json
    from AutoNNUNetLib.selection.choose import SelectionResult, select
    from AutoNNUNetLib.selection.report import format_report

    result = select(finalized.root)
    results = finalized.root / "nnUNet_results" / "Dataset004_Hippocampus"
    info = read_json(results / "inference_information.json")
    assert info["folds"] == [0, 1, 2, 3, 4]
    chosen = info["best_model_or_ensemble"]
    assert Path(chosen["postprocessing_file"]).is_file() and Path(chosen["some_plans_file"]).is_file()
    assert [m["plans_identifier"] for m in chosen["selected_model_or_models"]] == \
        [m["plans_identifier"] for m in result.members]
    assert len(info["all_results"]) == 3  # two candidates and their ensemble
    best = max(info["all_results"].values())
    assert chosen["result_on_crossval_pre_pp"] == pytest.approx(best)
    assert chosen["result_on_crossval_post_pp"] >= chosen["result_on_crossval_pre_pp"]
    text = (results / "inference_instructions.txt").read_text()
    assert "nnUNetv2_predict -d Dataset004_Hippocampus" in text and "nnUNetv2_apply_postprocessing" in text
    loaded = SelectionResult.load(finalized.root)
    assert loaded.best == result.best and loaded.to_dict() == result.to_dict()
    report = format_report(loaded, markdown=True)
    assert "| incumbent + pareto1" in report and "largest component: all foreground" in report


def test_select_cli_prints_the_table_and_one_line_errors(finalized, tmp_path, capsys):
    from AutoNNUNetLib import cli

    assert cli.main(["select", str(finalized.root), "--markdown"]) == 0
    out = capsys.readouterr().out
    assert "| incumbent + pareto1" in out and "Postprocessing" in out and "nnU-Net files:" in out
    assert cli.main(["select", str(finalized.root), "--report-only"]) == 0
    assert "incumbent + pareto1" in capsys.readouterr().out
    assert cli.main(["select", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "finalize.json: missing" in err and "Traceback" not in err


def test_stock_tools_reproduce_the_selection(finalized, hippo_workspace, hippocampus_dir, tmp_path):
    """Forced: the ensemble of both candidates with every postprocessing step, on held-out images."""
    from AutoNNUNetLib.imaging import Volume
    from AutoNNUNetLib.selection.choose import write_selection
    from AutoNNUNetLib.selection.instructions import stock_commands
    from AutoNNUNetLib.selection.postprocessing import PostprocessingPlan, PostprocessingStep
    from AutoNNUNetLib.selection.predictor import Selection

    root = tmp_path / "root"
    shutil.copytree(finalized.root, root)
    state = load_finalized(root)
    plan = PostprocessingPlan([PostprocessingStep(t, k, {}, {}, 0.0, 0.0, True)
                               for t, k in (((1, 2), "all_foreground"), (1, "label"), (2, "label"))])
    written = write_selection(state, ["incumbent", "pareto1"], plan)
    inputs = tmp_path / "in"
    inputs.mkdir()
    # The shared data has no test images: two training images, copied under new case names.
    held_out = sorted((hippocampus_dir / "imagesTr").glob("hippocampus_*.nii.gz"))[:2]
    assert len(held_out) == 2
    for path in held_out:
        shutil.copy(path, inputs / path.name.replace("hippocampus_", "heldout_").replace(".nii.gz", "_0000.nii.gz"))

    env = dict(os.environ, nnUNet_results=str(root / "nnUNet_results"), nnUNet_raw=str(hippo_workspace.raw),
               nnUNet_preprocessed=str(hippo_workspace.preprocessed), nnUNet_compile="false")
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    output = tmp_path / "out"
    member_dicts = written.members
    commands = stock_commands(written.dataset, member_dicts, written.folds, root / written.postprocessing_file,
                              root / written.postprocessing_file.replace("postprocessing.pkl", "plans.json"),
                              written.use_mirroring, str(inputs), str(output), device="cpu", processes=1)
    assert [c[0] for c in commands] == ["nnUNetv2_predict", "nnUNetv2_predict", "nnUNetv2_ensemble",
                                        "nnUNetv2_apply_postprocessing"]
    for argv in commands:
        completed = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
        assert completed.returncode == 0, completed.stderr[-2000:]

    # Ours on the bounded path: each member's probabilities go to a scratch .npy, averaged in
    # slabs; the scratch folder is empty again after each case.
    scratch = tmp_path / "scratch"
    selection = Selection(root, device="cpu", max_memory_gb=0.25, scratch_dir=scratch)
    assert selection.is_ensemble and len(selection.postprocessing.kept) == 3
    compared = 0
    for path in held_out:
        case = path.name.replace("hippocampus_", "heldout_").replace(".nii.gz", "")
        events = []
        labels = selection.predict_labels([Volume.read(inputs / f"{case}_0000.nii.gz")], progress=events.append)
        assert np.array_equal(labels, Volume.read(output / f"{case}.nii.gz").array)  # before postprocessing
        stock = Volume.read(Path(f"{output}_PP") / f"{case}.nii.gz").array
        assert labels.shape == stock.shape and np.array_equal(selection.postprocessing.apply(labels), stock)
        assert list(scratch.iterdir()) == []
        fractions = [e.data["fraction"] for e in events if e.kind == "progress"]
        assert fractions == sorted(fractions) and fractions[-1] == 1.0 and min(fractions) <= 0.5
        assert {e.data["message"].split(" (")[0] for e in events if e.kind == "progress"} == {"incumbent", "pareto1"}
        compared += 1
    assert compared == 2

    # The command line takes the same budget for a selection (it used to refuse it), and the engine flag.
    from AutoNNUNetLib import cli

    assert cli.main(["predict", "--model", str(root), "-i", str(inputs), "-o", str(tmp_path / "cli"),
                     "--device", "cpu", "--max-memory", "0.25", "--engine", "torch"]) == 0
    names = sorted(path.name.replace("hippocampus_", "heldout_") for path in held_out)
    assert sorted(p.name for p in (tmp_path / "cli").iterdir()) == names  # its scratch folder is gone
    for name in names:  # Selection.predict end to end: labels, postprocessing, geometry of the input
        ours, stock = Volume.read(tmp_path / "cli" / name), Volume.read(Path(f"{output}_PP") / name)
        assert np.array_equal(ours.array, stock.array) and ours.geometry.close_to(stock.geometry)


def test_finalize_rerun_trains_only_missing_folds(finalized, hippo_workspace, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(finalized.root, root)
    killed = root / "nnUNet_results" / "Dataset004_Hippocampus" / "nnUNetTrainer__nnUNetPlans_pareto1__3d_fullres" / "fold_3"
    shutil.rmtree(killed)  # as a finalize killed while training pareto1's fold 3 leaves it
    before = _checkpoints(root)
    rerun = finalize(hippo_workspace, _candidates(), root, epochs=EPOCHS, iterations_per_epoch=ITERATIONS,
                     device="cpu", seed=0)
    assert rerun.trained() == [("pareto1", 3)]
    assert {a for k, a in rerun.actions.items() if k != ("pareto1", 3)} == {"kept"}
    after = _checkpoints(root)
    assert {k: after[k] for k in before} == before  # the finished folds were not touched
    assert (killed / "checkpoint_final.pth").is_file() and (killed / "validation" / CV_MARKER).is_file()

    from AutoNNUNetLib.selection.layout import SelectionError

    with pytest.raises(SelectionError, match="epochs"):
        finalize(hippo_workspace, _candidates(), root, epochs=EPOCHS + 1, iterations_per_epoch=ITERATIONS,
                 device="cpu")


def test_finalize_reuses_folds_of_a_source_model(finalized, hippo_workspace, tmp_path):
    source = finalized.candidates[0].model_dir
    candidate = Candidate("incumbent", TrialConfig(), origin="incumbent", source_dir=source)
    result = finalize(hippo_workspace, [candidate], tmp_path / "reuse", epochs=EPOCHS, iterations_per_epoch=ITERATIONS,
                      folds=[0], device="cpu")
    assert result.actions == {("incumbent", 0): "reused"}
    copied = result.candidates[0].model_dir / "fold_0" / "checkpoint_final.pth"
    assert copied.read_bytes() == (source / "fold_0" / "checkpoint_final.pth").read_bytes()


# -- the selection as one zip, and in the HTML report ----------------------------------------------


@pytest.fixture(scope="module")
def selected(finalized):
    """The selection of the two finalized candidates (select's own decision, files on disk)."""
    from AutoNNUNetLib.selection.choose import select

    select(finalized.root)
    return finalized.root


def _rewrite_zip(source: Path, dest: Path, change) -> Path:
    """A copy of a zip with ``change(name, data) -> [(name, data), ...]`` applied to each member."""
    import zipfile

    with zipfile.ZipFile(source) as original, zipfile.ZipFile(dest, "w") as copy:
        for name in original.namelist():
            for new_name, data in change(name, original.read(name)):
                copy.writestr(new_name, data)
    return dest


def test_selection_zip_round_trip_predicts_the_same_labels(selected, hippocampus_dir, tmp_path):
    import zipfile

    from AutoNNUNetLib import cli
    from AutoNNUNetLib.files import read_json
    from AutoNNUNetLib.imaging import Volume
    from AutoNNUNetLib.model import ModelError, import_model
    from AutoNNUNetLib.selection.predictor import Selection

    archive = tmp_path / "selection.zip"
    assert cli.main(["export-model", str(selected), str(archive)]) == 0
    names = zipfile.ZipFile(archive).namelist()
    chosen = read_json(selected / "selection.json")
    assert "selection.json" in names and not any("/validation/" in n for n in names)
    for member in chosen["members"]:
        assert sum(n.startswith(member["model_dir"] + "/fold_") for n in names) == 5
    assert chosen["postprocessing_file"] in names and (tmp_path / "selection.zip.sha256").is_file()
    # The pickle in the archive is not what the import keeps: it is written again from the plan.
    tampered = _rewrite_zip(archive, tmp_path / "tampered.zip", lambda name, data: [
        (name, b"not a pickle" if name.endswith("postprocessing.pkl") else data)])
    dest = tmp_path / "imported"
    assert cli.main(["import-model", str(tampered), str(dest)]) == 0
    assert (dest / chosen["postprocessing_file"]).read_bytes() == (selected / chosen["postprocessing_file"]).read_bytes()
    information = read_json(dest / "nnUNet_results" / chosen["dataset"] / "inference_information.json")
    assert Path(information["best_model_or_ensemble"]["postprocessing_file"]) == dest.resolve() / chosen["postprocessing_file"]
    assert information["all_results"] == read_json(selected / "nnUNet_results" / chosen["dataset"] /
                                                   "inference_information.json")["all_results"]
    with pytest.raises(ModelError, match="holds a model selection"):
        import_model(archive, tmp_path / "as-model")  # one model's import would drop the postprocessing

    before, after = Selection(selected, device="cpu"), Selection(dest, device="cpu")
    assert [m["name"] for m in after.members] == [m["name"] for m in chosen["members"]]
    image = sorted((hippocampus_dir / "imagesTr").glob("hippocampus_*.nii.gz"))[0]
    volume = [Volume.read(image)]
    ours, theirs = before.predict(volume), after.predict(volume)
    assert ours.array.shape == volume[0].array.shape and set(np.unique(ours.array)) <= {0, 1, 2}
    assert np.array_equal(ours.array, theirs.array) and theirs.geometry.close_to(ours.geometry)


def test_hostile_selection_zips_are_refused_and_leave_nothing(selected, tmp_path, capsys):
    import json

    from AutoNNUNetLib import cli
    from AutoNNUNetLib.model import ModelError
    from AutoNNUNetLib.selection.archive import import_selection

    archive = tmp_path / "selection.zip"
    cli.main(["export-model", str(selected), str(archive)])
    capsys.readouterr()
    record = json.loads((selected / "selection.json").read_text())

    def only_record(name, data):
        return [(name, data)] if name == "selection.json" else []

    escaping = _rewrite_zip(archive, tmp_path / "escaping.zip",
                            lambda name, data: only_record(name, data) + ([("../evil.txt", b"x")]
                                                                           if name == "selection.json" else []))
    assert cli.main(["import-model", str(escaping), str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "points outside" in err and "Traceback" not in err
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "a").exists()

    hostile = dict(record, members=[dict(record["members"][0], model_dir="nnUNet_results/../../outside")])
    named = _rewrite_zip(archive, tmp_path / "named.zip", lambda name, data: [
        (name, json.dumps(hostile).encode() if name == "selection.json" else data)])
    with pytest.raises(ModelError, match="points outside"):
        import_selection(named, tmp_path / "b")
    with pytest.raises(ModelError, match="expands to"):
        import_selection(archive, tmp_path / "c", max_ratio=0.5)
    missing = _rewrite_zip(archive, tmp_path / "missing.zip", lambda name, data: [] if "fold_3" in name else [(name, data)])
    with pytest.raises(ModelError, match="fold_3"):
        import_selection(missing, tmp_path / "d")
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "mine.txt").write_text("someone's file")
    with pytest.raises(ModelError, match="not empty"):
        import_selection(archive, tmp_path / "e", overwrite=True)
    assert (tmp_path / "e" / "mine.txt").read_text() == "someone's file"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".import-")) == []


def test_search_report_has_the_model_selection_section(selected, tmp_path):
    from AutoNNUNetLib import cli
    from AutoNNUNetLib.files import atomic_write_json, read_json
    from AutoNNUNetLib.search.results import SearchResults

    search = tmp_path / "search"
    search.mkdir()
    atomic_write_json(search / "results.json", SearchResults(str(search), {}, {}, [], None, None, [], {}).to_dict())
    assert cli.main(["report", str(search), "--selection", str(selected), "--out", str(tmp_path / "r")]) == 0
    page = (tmp_path / "r" / "index.html").read_text()
    assert "<h2 id='selection'>Model selection</h2>" in page
    record = read_json(selected / "selection.json")
    labels = record["labels"]
    for score in record["scores"]:
        row = page.split(f"<td>{' + '.join(score['members'])}</td>", 1)[1].split("</tr>", 1)[0]
        cells = [f"{100 * score['per_label'][value]:.2f}" for value in labels] + [f"{100 * score['foreground_mean']:.2f}"]
        assert row.startswith("".join(f"<td>{c}</td>" for c in cells)), (score["members"], row)
    assert "largest component: all foreground" in page and "kept" in page
    # Not this search's selection (its candidates came from elsewhere): no section by default.
    shutil.copytree(selected, tmp_path / "selection", ignore=shutil.ignore_patterns("*.pth", "*.npz"))
    assert cli.main(["report", str(search), "--out", str(tmp_path / "r2")]) == 0
    assert "Model selection" not in (tmp_path / "r2" / "index.html").read_text()
