"""Shared pytest fixtures: the real hippocampus data, planned once, trained once per session.

nnU-Net on a CPU is slow, so everything expensive is session-scoped and read-only for tests:
tests that need to change a workspace or model copy it first.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Augmentation in-process and no torch.compile: the fastest settings on a 2-core CPU.
os.environ.setdefault("nnUNet_compile", "false")

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED = PROJECT_ROOT.parent / "shared"
HIPPOCAMPUS = SHARED / "data" / "Task04_Hippocampus"

#: Budget of the session's trained model. Tuned on this machine so the validation Dice of both
#: hippocampus classes is reliably above 0.3 (see test_trainer.py): measured 0.79 / 0.80 with 360
#: iterations, 0.31 / 0.73 with 240. About 6 minutes on 2 idle CPU cores.
TRAINED_EPOCHS = 30
TRAINED_ITERATIONS = 12


@pytest.fixture(scope="session")
def hippocampus_dir() -> Path:
    if not (HIPPOCAMPUS / "dataset.json").is_file():
        pytest.skip(f"hippocampus data not found at {HIPPOCAMPUS} (CI provides ../shared beside the project)")
    return HIPPOCAMPUS


@pytest.fixture(scope="session")
def hippo_workspace(hippocampus_dir: Path, tmp_path_factory):
    """The 60 hippocampus cases as an nnU-Net dataset, fingerprinted, planned and preprocessed."""
    from AutoNNUNetLib.dataset import build_dataset, detect_source
    from AutoNNUNetLib.fingerprint import plan_and_preprocess
    from AutoNNUNetLib.workspace import Workspace

    workspace = Workspace(tmp_path_factory.mktemp("hippo_workspace"))
    build_dataset(detect_source(hippocampus_dir), workspace, dataset_id=4, name="Hippocampus")
    plan_and_preprocess(workspace, num_processes=2)
    return workspace


@pytest.fixture(scope="session")
def trained_result(hippo_workspace, tmp_path_factory):
    """nnU-Net's default configuration trained once on fold 0 with a short CPU budget."""
    from AutoNNUNetLib.config import TrialConfig
    from AutoNNUNetLib.trainer import model_dir_name, train

    model_dir = tmp_path_factory.mktemp("trained_model") / model_dir_name()
    return train(hippo_workspace, TrialConfig(), model_dir, folds=[0], epochs=TRAINED_EPOCHS,
                 iterations_per_epoch=TRAINED_ITERATIONS, device="cpu", seed=0)


@pytest.fixture(scope="session")
def trained_model(trained_result) -> Path:
    """The model folder (nnU-Net results layout) of :func:`trained_result`."""
    return Path(trained_result.model_dir)
