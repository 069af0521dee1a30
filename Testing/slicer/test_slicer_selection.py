"""The Inference panel with a selection: its members (checkable), folds and TTA reach the request.

The selection root is laid out as ``autonnunet select`` writes it (nnU-Net results tree, one model
folder per member, ``selection.json`` written by the library's own SelectionResult record); its
two members are copies of the session's trained model, so that segmenting with one member must
give exactly the label map the model gives on its own. The job is the module's real predict job
(a child ``autonnunet predict --model <selection root> --members ...``).
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "AutoNNUNet"))

from AutoNNUNetSlicerLib import jobs as modulejobs  # noqa: E402
from AutoNNUNetSlicerLib import models  # noqa: E402

MEMBERS = ("incumbent", "pareto1")


@pytest.fixture(scope="module")
def selection_root(trained_model, tmp_path_factory) -> Path:
    from AutoNNUNetLib.model import read_model_info
    from AutoNNUNetLib.selection.choose import ModelScore, SelectionResult
    from AutoNNUNetLib.selection.layout import RESULTS_DIR, SELECTION_RECORD
    from AutoNNUNetLib.selection.postprocessing import PostprocessingPlan
    from AutoNNUNetLib.selection.scores import CVScore

    info = read_model_info(trained_model)
    root = tmp_path_factory.mktemp("selection") / "root"
    results = root / RESULTS_DIR / info.dataset_name
    members = []
    for name in MEMBERS:
        folder = f"nnUNetTrainer__nnUNetPlans_{name}__3d_fullres"
        shutil.copytree(trained_model, results / folder, ignore=shutil.ignore_patterns("validation", "*.png", "*.txt"))
        members.append({"name": name, "folder_name": folder, "configuration": "3d_fullres",
                        "plans_identifier": f"nnUNetPlans_{name}", "model_dir": f"{RESULTS_DIR}/{info.dataset_name}/{folder}"})
    key = "ensemble___" + "___".join(m["folder_name"] for m in members) + "___0"
    result = SelectionResult(root, info.dataset_name, [0], True, {1: "Anterior", 2: "Posterior"}, members,
                             [ModelScore(key, list(MEMBERS), CVScore({1: 0.8, 2: 0.8}, 0.8))], key,
                             PostprocessingPlan(dice_before=0.8, dice_after=0.8),
                             f"{RESULTS_DIR}/{info.dataset_name}/ensembles/{key}/postprocessing.pkl")
    (root / SELECTION_RECORD).write_text(json.dumps(result.to_dict(), indent=2))
    assert SelectionResult.load(root).members == members  # the library reads back what it wrote
    return root


def test_a_selection_offers_its_members_folds_and_tta(selection_root, trained_model):
    described = models.describe_model(selection_root)
    assert described.selection and described.member_names == list(MEMBERS)
    assert described.folds == [0] and described.mirroring is True
    assert described.channel_names == models.describe_model(trained_model).channel_names
    assert described.classes == {"background": 0, "Anterior": 1, "Posterior": 2}
    assert described.folds_text() == "folds: all (0)"
    single = models.describe_model(trained_model)
    assert not single.selection and single.member_names == [] and single.mirroring is None
    assert models.try_describe(selection_root / "nothing") is None and models.try_describe("") is None
    assert modulejobs.imported_model_dir(selection_root) == selection_root  # an imported selection is used whole

    every = models.predict_choice(described, None, list(MEMBERS), mirroring=True, device="cpu")
    assert every.params_fields() == {"folds": None, "members": None, "mirroring": True, "device": "cpu"}
    one = models.predict_choice(described, [0], ["pareto1"], mirroring=False)
    assert one.params_fields() == {"folds": [0], "members": ["pareto1"], "mirroring": False, "device": "auto"}
    with pytest.raises(ValueError, match="at least one member"):
        models.predict_choice(described, None, [], mirroring=False)
    with pytest.raises(ValueError, match="no fold 3"):
        models.predict_choice(described, [3], list(MEMBERS), mirroring=False)
    assert models.predict_choice(single, [0], ["ignored"], mirroring=False).members is None


def test_the_predict_request_carries_the_members_and_refuses_bad_ones():
    from AutoNNUNetLib.jobs.params import PredictParams, RequestError

    params = PredictParams(members=["a", "b", "a"], mirroring=True, folds=[0], device="cpu")
    assert params.members == ["a", "b"]
    argv = params.to_argv("/sel", "/in", "/out")
    assert argv[argv.index("--members") + 1:] == ["a", "b"] and "--mirroring" in argv
    assert PredictParams.from_json(params.to_json()) == params
    assert "--members" not in PredictParams().to_argv("/m", "/in", "/out")
    for bad in ([], [""], "a", [1]):
        with pytest.raises(RequestError, match="members"):
            PredictParams(members=bad)


def test_segmenting_with_one_member_gives_that_models_labels(selection_root, trained_model, hippocampus_dir, tmp_path):
    from AutoNNUNetLib.imaging import Volume
    from AutoNNUNetLib.inference import Predictor

    image = sorted((hippocampus_dir / "imagesTr").glob("hippocampus_*.nii.gz"))[0]
    channel = Volume.read(image)
    job, context = modulejobs.start_prediction(tmp_path / "work", selection_root, [channel], device="cpu",
                                               members=["pareto1"], folds=[0], python=sys.executable)
    argv = json.loads((Path(job.job_dir) / "job.json").read_text())["steps"][0]["argv"]
    assert argv[argv.index("--members") + 1] == "pareto1" and "--mirroring" not in argv  # TTA off as asked
    board = modulejobs.JobBoard()
    board.add("predict", job, context)
    entry = board.wait("predict", timeout=900, interval=0.5)
    assert entry.state == "succeeded", entry.log
    # The child's own events reached the Inference status (not a lasting "Starting...").
    from AutoNNUNetLib.events import ProgressEvent
    from AutoNNUNetLib.progress import SearchProgress
    from AutoNNUNetSlicerLib import widget

    assert widget.predict_status_text(entry.progress) == "Finished (succeeded): segmentation written"
    running = SearchProgress().update_all([ProgressEvent("stage", {"name": "predict", "message": "segmenting with pareto1"}),
                                           ProgressEvent("progress", {"fraction": 0.25})])
    assert widget.predict_status_text(running) == "segmenting with pareto1 (25%)"
    predicted = Volume.read(context.output_file)
    expected = Predictor(trained_model, folds=[0], device="cpu").predict([channel])
    assert predicted.geometry.close_to(channel.geometry)
    assert np.array_equal(predicted.array, expected.array)
    assert set(np.unique(predicted.array)) <= {0, 1, 2} and predicted.array.any()
    assert not math.isnan(float(predicted.array.mean()))


def test_a_selection_refuses_one_model_options(selection_root, tmp_path, capsys):
    from AutoNNUNetLib.cli import main

    image = tmp_path / "case_0000.nii.gz"
    image.write_bytes(b"")  # never read: the options are refused first
    code = main(["predict", "--model", str(selection_root), "-i", str(image), "-o", str(tmp_path / "o.nii.gz"),
                 "--members", "nobody"])
    assert code != 0 and "nobody is not a member" in capsys.readouterr().err
    code = main(["predict", "--model", str(selection_root), "-i", str(image), "-o", str(tmp_path / "o.nii.gz"),
                 "--largest-component"])
    assert code != 0 and "--largest-component" in capsys.readouterr().err
