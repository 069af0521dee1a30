"""CPU tile engines: torch variants and ONNX exports give the torch label maps (up to measured ties)."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest

from AutoNNUNetLib.bounded import predict_bounded
from AutoNNUNetLib.engines import EngineError, cpu_has_bfloat16, make_engine

#: Largest fraction of voxels whose label may differ from torch's where float32 rounding differs.
TIE_FRACTION = 1e-4


@pytest.fixture(scope="module")
def predictor(trained_model):
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    with contextlib.redirect_stdout(io.StringIO()):
        predictor = nnUNetPredictor(perform_everything_on_device=False, device=torch.device("cpu"), allow_tqdm=False)
        predictor.initialize_from_trained_model_folder(str(trained_model), use_folds=(0,))
    return predictor


@pytest.fixture(scope="module")
def image(hippo_workspace):
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    path = sorted((hippo_workspace.raw_dataset / "imagesTr").glob("*_0000.nii.gz"))[0]
    return SimpleITKIO().read_images([str(path)])


def test_channels_last_equals_torch(predictor, image):
    reference = predict_bounded(predictor, *image)
    labels = predict_bounded(predictor, *image, engine=make_engine("torch", predictor, channels_last=True))
    assert np.mean(labels != reference) <= TIE_FRACTION


@pytest.mark.skipif(not cpu_has_bfloat16(), reason="no native bfloat16 on this CPU")
def test_bfloat16_is_close_to_torch(predictor, image):
    reference = predict_bounded(predictor, *image)
    labels = predict_bounded(predictor, *image, engine=make_engine("torch", predictor, bfloat16=True))
    assert np.mean(labels != reference) < 0.01  # reduced precision: close, not equal


@pytest.mark.parametrize("name", ["onnxruntime", "openvino"])
def test_exported_engine_matches_torch_and_caches_its_export(name, predictor, image, trained_model, tmp_path):
    pytest.importorskip(name)
    import shutil

    model = tmp_path / "model"
    shutil.copytree(trained_model, model)
    reference = predict_bounded(predictor, *image)
    engine = make_engine(name, predictor, model_dir=model, folds=[0])
    labels = predict_bounded(predictor, *image, engine=engine)
    assert np.mean(labels != reference) <= TIE_FRACTION
    exported = engine.onnx_path(0)
    assert exported.is_file() and exported.parent == model / "fold_0"
    stamp = exported.stat().st_mtime_ns
    again = make_engine(name, predictor, model_dir=model, folds=[0])
    np.testing.assert_array_equal(predict_bounded(predictor, *image, engine=again), labels)
    assert exported.stat().st_mtime_ns == stamp  # reused, not exported again


def test_unknown_or_misplaced_engines_are_refused(predictor):
    with pytest.raises(EngineError, match="unknown engine"):
        make_engine("tensorrt", predictor)
    with pytest.raises(EngineError, match="model folder"):
        make_engine("onnxruntime", predictor)
