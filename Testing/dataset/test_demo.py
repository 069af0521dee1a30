"""The demo's generated dataset: valid, two-channel, oblique, with both structures in every case."""

from __future__ import annotations

import json

import numpy as np
import SimpleITK as sitk

from AutoNNUNetLib.cli import VERB_MODULES, build_parser
from AutoNNUNetLib.dataset import build_dataset
from AutoNNUNetLib.demo import DEMO_CLASSES, dice_scores, generate_case, generate_source
from AutoNNUNetLib.workspace import Workspace


def test_generated_cases_are_a_valid_two_channel_dataset(tmp_path):
    workspace = Workspace(tmp_path)
    folder = build_dataset(generate_source(n_cases=5), workspace, dataset_id=1, name="Demo")
    meta = json.loads((folder / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "T1", "1": "T2"}
    assert meta["labels"] == DEMO_CLASSES
    assert meta["numTraining"] == 5
    channels, label = generate_case(1)
    written = sitk.ReadImage(str(folder / "imagesTr" / "demo_001_0001.nii.gz"))
    assert np.allclose(written.GetDirection(), label.geometry.direction)
    assert np.allclose(written.GetSpacing(), label.geometry.spacing)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(written), channels[1].array)
    written_label = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "labelsTr" / "demo_001.nii.gz")))
    np.testing.assert_array_equal(written_label, label.array)
    assert set(np.unique(written_label)) == {0, 1, 2}


def test_demo_with_fewer_than_five_cases_is_refused_before_any_work(tmp_path, capsys):
    """Issue 12 item 13: `demo --cases 4` died after preprocessing with a scikit-learn message."""
    from AutoNNUNetLib import cli

    assert cli.main(["demo", "--workdir", str(tmp_path / "demo"), "--cases", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("--cases 4: the demo needs at least 5 cases for nnU-Net's 5-fold cross-validation split")
    assert "\n" not in err and not (tmp_path / "demo").exists()


def test_generation_is_deterministic_and_cases_differ():
    a_channels, a_label = generate_case(5)
    b_channels, b_label = generate_case(5)
    _, c_label = generate_case(6)
    np.testing.assert_array_equal(a_label.array, b_label.array)
    np.testing.assert_array_equal(a_channels[0].array, b_channels[0].array)
    assert not np.array_equal(a_label.array, c_label.array)


def test_dice_scores():
    truth = np.zeros((4, 4, 4), np.uint8)
    truth[:2] = 1
    truth[2:3] = 2
    prediction = truth.copy()
    prediction[0] = 0  # half of class 1 missed
    scores = dice_scores(prediction, truth, DEMO_CLASSES)
    assert scores["rim"] == 2 * 16 / (16 + 32)
    assert scores["core"] == 1.0


def _verbs(parser) -> set[str]:
    return set(parser._subparsers._group_actions[0].choices)  # argparse keeps them here


def test_every_pipeline_verb_is_registered():
    verbs = _verbs(build_parser())
    assert {"dataset", "fingerprint", "train", "predict", "export-model", "import-model", "demo", "search",
            "report"} <= verbs
    # The verb -> module table used to import only the module a command needs is complete.
    assert verbs == set(VERB_MODULES)
    for verb, module in VERB_MODULES.items():
        assert verb in _verbs(build_parser(verb)), (verb, module)


def test_server_and_remote_verbs_do_not_load_the_imaging_stack():
    import subprocess
    import sys

    code = ("import sys; from AutoNNUNetLib.cli import build_parser; build_parser('serve'); build_parser('remote'); "
            "print(sorted(m for m in ('numpy', 'SimpleITK', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
