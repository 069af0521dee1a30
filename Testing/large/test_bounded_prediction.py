"""Bounded prediction gives nnU-Net's own label maps (and probabilities), reports tiles, and cancels.

The reference is nnU-Net's in-memory stock path, ``nnUNetPredictor.predict_single_npy_array``, on
the session's trained hippocampus model: real hippocampus images, and a generated volume larger than
one tile in every axis at a spacing different from the model's (so the export really resamples).
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest

from AutoNNUNetLib.bounded import PredictionCancelled, predict_bounded
from AutoNNUNetLib.bounded.resample import SlabResampler

N_CASES = 3


def _nnunet_predictor(model_dir, mirroring: bool):
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    with contextlib.redirect_stdout(io.StringIO()):
        predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=mirroring,
                                    perform_everything_on_device=False, device=torch.device("cpu"),
                                    verbose=False, verbose_preprocessing=False, allow_tqdm=False)
        predictor.initialize_from_trained_model_folder(str(model_dir), use_folds=(0,))
    return predictor


@pytest.fixture(scope="module")
def predictor(trained_model):
    return _nnunet_predictor(trained_model, mirroring=False)


@pytest.fixture(scope="module")
def hippocampus_images(hippo_workspace):
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    paths = sorted((hippo_workspace.raw_dataset / "imagesTr").glob("*_0000.nii.gz"))[:N_CASES]
    return [SimpleITKIO().read_images([str(p)]) for p in paths]


def _large_volume(predictor, seed: int = 0):
    """A smooth, structured volume larger than one patch in every axis after resampling to 1 mm."""
    from scipy import ndimage

    patch = np.asarray(predictor.configuration_manager.patch_size)
    spacing = np.array([0.8, 0.9, 0.7])
    shape = tuple(int(v) for v in np.ceil(patch * 1.6 / spacing))
    rng = np.random.default_rng(seed)
    image = ndimage.gaussian_filter(rng.standard_normal(shape), 3.0) * 4000 + 20000
    return image[None].astype(np.float32), {"spacing": [float(s) for s in spacing]}


def _stock(predictor, image, properties, probabilities=False):
    return predictor.predict_single_npy_array(image, dict(properties), None, None, probabilities)


def test_label_maps_equal_stock_on_hippocampus(predictor, hippocampus_images):
    for image, properties in hippocampus_images:
        expected = _stock(predictor, image, properties)
        labels = predict_bounded(predictor, image, properties)
        assert labels.shape == expected.shape == image.shape[1:]
        assert labels.dtype == np.uint8
        np.testing.assert_array_equal(labels, expected)
        assert len(np.unique(labels)) > 1  # a real segmentation, not all background


def test_large_resampled_volume_equals_stock_in_small_slabs(predictor):
    image, properties = _large_volume(predictor)
    network_grid = np.round(np.asarray(image.shape[1:]) * np.asarray(properties["spacing"])).astype(int)
    assert np.all(network_grid > np.asarray(predictor.configuration_manager.patch_size))
    expected = _stock(predictor, image, properties)
    events = []
    # A budget that forces many slabs: every slab boundary must be seamless.
    labels = predict_bounded(predictor, image, properties, max_memory_gb=0.25, progress=events.append)
    np.testing.assert_array_equal(labels, expected)
    assert set(np.unique(expected)) >= {0}
    tiles = [e.data for e in events if e.kind == "progress" and e.data.get("phase") == "tiles"]
    slabs = [e.data for e in events if e.kind == "progress" and e.data.get("phase") == "export"]
    assert [t["tiles_done"] for t in tiles] == list(range(1, tiles[0]["tiles_total"] + 1))
    assert tiles[-1]["fraction"] == 1.0 and tiles[0]["tiles_total"] > 8
    assert slabs and slabs[-1]["slabs_done"] == slabs[-1]["slabs_total"]


def test_mirroring_and_probabilities_equal_stock(trained_model, hippocampus_images, tmp_path):
    predictor = _nnunet_predictor(trained_model, mirroring=True)
    image, properties = hippocampus_images[0]
    expected_labels, expected_probabilities = _stock(predictor, image, properties, probabilities=True)
    path = tmp_path / "case.npy"
    labels = predict_bounded(predictor, image, properties, save_probabilities=path)
    np.testing.assert_array_equal(labels, expected_labels)
    probabilities = np.load(path, mmap_mode="r")
    assert probabilities.dtype == np.float32 and probabilities.shape == expected_probabilities.shape
    # Softmax over a slab vs over the whole volume: torch's vectorised kernel may round the last bit
    # differently (measured: relative 1.1e-7 at most); the labels above are equal.
    np.testing.assert_allclose(np.asarray(probabilities), expected_probabilities, rtol=1e-6, atol=1e-9)


def test_slab_resampling_equals_nnunet_bit_for_bit():
    from nnunetv2.preprocessing.resampling.default_resampling import resample_data_or_seg_to_shape

    rng = np.random.default_rng(3)
    cases = [  # (source, target, current spacing, new spacing): up, down, anisotropic along each axis
        ((20, 30, 25), (50, 70, 33), (2, 2, 2), (0.8, 0.85, 1.5)),
        ((20, 30, 25), (13, 30, 19), (1, 1, 1), (1.5, 1, 1.3)),
        ((10, 30, 25), (40, 60, 50), (4, 1, 1), (1, 0.5, 0.5)),
        ((10, 30, 25), (40, 60, 50), (1, 1, 4), (0.5, 0.5, 1)),
        ((10, 30, 25), (40, 60, 50), (1, 4, 1), (0.5, 1, 0.5)),
    ]
    from AutoNNUNetLib.bounded.resample import slab_resampler

    class Configuration:
        configuration = {"resampling_fn_probabilities": "resample_data_or_seg_to_shape",
                         "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0,
                                                                "force_separate_z": None}}

    for source, target, current, new in cases:
        logits = (rng.standard_normal((3, *source)) * 3).astype(np.float16)
        expected = resample_data_or_seg_to_shape(logits, target, current, new, is_seg=False, order=1, order_z=0,
                                                 force_separate_z=None)
        resampler = slab_resampler(Configuration, source, target, current, new)
        assert isinstance(resampler, SlabResampler)
        for rows in (1, 7, target[0]):
            slabs = [resampler.slab(logits, s, min(s + rows, target[0])) for s in range(0, target[0], rows)]
            np.testing.assert_array_equal(np.concatenate(slabs, axis=1), expected)


def test_cancel_stops_between_tiles(predictor):
    image, properties = _large_volume(predictor, seed=1)
    seen = []

    def cancel() -> bool:
        return len(seen) >= 3  # after three finished tiles

    with pytest.raises(PredictionCancelled, match="after 3 of"):
        predict_bounded(predictor, image, properties,
                        progress=lambda e: seen.append(e) if e.data.get("phase") == "tiles" else None,
                        cancel=cancel)
    assert len(seen) == 3
