"""Slab-wise preprocessing equals nnU-Net's DefaultPreprocessor bit for bit, and its peak follows the slab.

The reference is ``DefaultPreprocessor.run_case_npy`` with the session's hippocampus plans (and
variants of them: CT normalization, the mask-based z-score, another axis order, spline orders 1 and
5, a coarse network spacing), on real hippocampus images and on generated volumes with a zero border
(so the crop is real), resampled in slabs much smaller than the volume.
"""

from __future__ import annotations

import copy
import logging
import time
import tracemalloc
import types

import numpy as np
import pytest

from AutoNNUNetLib.bounded.preprocess import preprocess, preprocessing_memory, unsupported_reason

CT_PROPERTIES = {"mean": 40.0, "std": 300.0, "percentile_00_5": -900.0, "percentile_99_5": 1500.0,
                 "median": 40.0, "min": -1000.0, "max": 2000.0}


def _predictor(workspace, scheme: str = "ZScoreNormalization", use_mask: bool = False, spacing=None,
               order: int = 3, transpose=None, resampling: str = "resample_data_or_seg_to_shape"):
    """What preprocessing reads of an ``nnUNetPredictor``: the plans, the configuration, dataset.json."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans = copy.deepcopy(workspace.load_plans())
    configuration = plans["configurations"]["3d_fullres"]
    configuration["normalization_schemes"] = [scheme]
    configuration["use_mask_for_norm"] = [use_mask]
    configuration["resampling_fn_data"] = resampling
    configuration["resampling_fn_data_kwargs"]["order"] = order
    if resampling != "resample_data_or_seg_to_shape":  # nnU-Net's torch resampling takes no spline orders
        configuration["resampling_fn_data_kwargs"] = {"is_seg": False, "force_separate_z": None}
    if spacing is not None:
        configuration["spacing"] = list(spacing)
    if transpose is not None:
        plans["transpose_forward"] = list(transpose)
        plans["transpose_backward"] = [int(i) for i in np.argsort(transpose)]
    if scheme == "CTNormalization":
        plans["foreground_intensity_properties_per_channel"]["0"].update(CT_PROPERTIES)
    manager = PlansManager(plans)
    return types.SimpleNamespace(plans_manager=manager, configuration_manager=manager.get_configuration("3d_fullres"),
                                 dataset_json=workspace.load_dataset_json())


def _nnunet(predictor, image, spacing):
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor

    data, _, properties = DefaultPreprocessor(verbose=False).run_case_npy(
        image, None, {"spacing": list(spacing)}, predictor.plans_manager, predictor.configuration_manager,
        predictor.dataset_json)
    return data, properties


def _assert_equal(predictor, image, spacing, slab_rows=None):
    expected, expected_properties = _nnunet(predictor, image, spacing)
    before = image.copy()
    data, properties = preprocess(predictor, image, {"spacing": list(spacing)}, slab_rows)
    np.testing.assert_array_equal(image, before)  # the caller's array is not touched
    assert data.dtype == np.float32 and data.shape == expected.shape
    np.testing.assert_array_equal(data, expected)  # bit for bit: equal float32 values everywhere
    for key in ("shape_before_cropping", "bbox_used_for_cropping", "shape_after_cropping_and_before_resampling"):
        assert np.array_equal(np.asarray(properties[key]), np.asarray(expected_properties[key])), key
    assert properties["spacing"] == list(spacing)
    return data, properties


def _generated(shape=(64, 72, 60), seed: int = 0, dtype=np.float32):
    """Smooth CT-like intensities inside a zero border (a real crop) with a zero hole (filled by nnU-Net)."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    image = ndimage.gaussian_filter(rng.standard_normal(shape), 2.0) * 3000 + 100
    image[:5] = 0
    image[:, -7:] = 0
    image[30:35, 40:45, 30:35] = 0
    return image[None].astype(dtype)


def test_hippocampus_equals_nnunet(hippo_workspace):
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    predictor = _predictor(hippo_workspace)
    assert unsupported_reason(predictor) is None
    paths = sorted((hippo_workspace.raw_dataset / "imagesTr").glob("*_0000.nii.gz"))[:3]
    for path in paths:
        image, properties = SimpleITKIO().read_images([str(path)])
        _assert_equal(predictor, image, properties["spacing"])
        # The same image declared at another spacing, so that it really resamples (order 3), in slabs of 4 rows.
        data, _ = _assert_equal(predictor, image, [0.8, 1.15, 0.9], slab_rows=4)
        assert data.shape[1] > 4 and data.shape[1:] != image.shape[1:]


@pytest.mark.parametrize("variant, spacing, slab_rows", [
    ({"scheme": "CTNormalization"}, (0.8, 0.9, 0.7), 5),
    ({"scheme": "CTNormalization"}, (1.3, 1.6, 1.2), 7),  # upsampling
    ({"scheme": "ZScoreNormalization", "use_mask": True}, (0.8, 0.9, 0.7), 6),  # the filled mask is read
    ({"scheme": "RescaleTo01Normalization"}, (0.8, 0.9, 0.7), 6),
    ({"scheme": "CTNormalization", "transpose": (2, 0, 1)}, (0.8, 0.9, 0.7), 4),
    ({"scheme": "CTNormalization", "order": 1}, (0.8, 0.9, 0.7), 4),
    ({"scheme": "CTNormalization", "order": 5}, (0.9, 0.9, 0.8), 9),
    ({"scheme": "CTNormalization"}, (0.8, 0.8, 4.0), None),  # anisotropic: slices along the last axis
    ({"scheme": "ZScoreNormalization"}, (4.0, 0.8, 0.8), None),  # anisotropic along the first axis
])
def test_generated_volume_in_slabs_equals_nnunet(hippo_workspace, variant, spacing, slab_rows):
    predictor = _predictor(hippo_workspace, **variant)
    image = _generated()
    data, properties = _assert_equal(predictor, image, spacing, slab_rows)
    # The zero border was cropped (the box is in the plan's axis order).
    box = dict(zip(predictor.plans_manager.transpose_forward, properties["bbox_used_for_cropping"]))
    assert box[0] == [5, 64] and box[1] == [0, 65] and box[2] == [0, 60]
    if slab_rows is not None:
        assert data.shape[1] > 3 * slab_rows  # many slabs, each with its own margin


def test_integer_input_and_nnunet_fallback(hippo_workspace, caplog):
    image = _generated(dtype=np.int16)
    _assert_equal(_predictor(hippo_workspace, scheme="CTNormalization"), image, (0.8, 0.8, 0.8), slab_rows=11)
    # A resampling function the slab path does not reproduce: nnU-Net's own preprocessing, with a warning.
    other = _predictor(hippo_workspace, resampling="resample_torch_fornnunet")
    assert "resample_torch_fornnunet" in unsupported_reason(other)
    with caplog.at_level(logging.WARNING, logger="AutoNNUNetLib.bounded.preprocess"):
        data, _ = preprocess(other, image[:, :30, :30, :30], {"spacing": [1.0, 1.0, 1.0]})
    assert "memory is not bounded" in caplog.text and data.shape[0] == 1


def test_peak_follows_the_slab_not_the_input(hippo_workspace):
    """A 256x256x200 CT-like volume at 0.8 mm to a 2.5 mm network grid: the traced peak stays within the
    plan and far below nnU-Net's (about 34 bytes per input voxel, measured alongside)."""
    predictor = _predictor(hippo_workspace, scheme="CTNormalization", spacing=(2.5, 2.5, 2.5))
    shape, spacing = (256, 256, 200), [0.8, 0.8, 0.8]
    rng = np.random.default_rng(0)
    image = np.full((1, *shape), -1000.0, dtype=np.float32)
    image[0, 20:-20, 30:-30, 10:-10] += 1040.0 + rng.standard_normal((216, 196, 180)).astype(np.float32) * 50
    voxels = int(np.prod(shape))

    tracemalloc.start()
    start = time.process_time()
    expected, _ = _nnunet(predictor, image, spacing)
    nnunet_seconds = time.process_time() - start
    nnunet_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()

    memory = preprocessing_memory(predictor, shape, shape, expected.shape[1:], spacing)
    rows = 12
    tracemalloc.start()
    start = time.process_time()
    data, _ = preprocess(predictor, image, {"spacing": spacing}, slab_rows=rows)
    seconds = time.process_time() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    np.testing.assert_array_equal(data, expected)
    assert nnunet_peak > 30 * voxels  # the reference really holds several float copies of the input
    assert peak <= memory.bytes_for(rows), (peak, memory)  # the plan is an upper bound
    assert peak < 8 * voxels and peak < nnunet_peak / 4, (peak, nnunet_peak)
    # Margins cost some repeated filtering; with 12-row slabs it stays within a few times nnU-Net's CPU time.
    assert seconds < 4 * nnunet_seconds + 2.0, (seconds, nnunet_seconds)
