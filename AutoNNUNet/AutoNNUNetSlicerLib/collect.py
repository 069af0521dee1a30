"""Collecting a remote runner's model inside Slicer with ``requests`` only: no torch, no child.

A remote-only user installs nothing but ``requests``. When the runner's search (or selection)
ends, its zip is downloaded by :class:`~AutoNNUNetLib.remote.job.RemoteJob`; here it becomes a
model folder (or a selection root) in the job's folder:

- the archive goes through the library's one import rule (names stay inside, no links, size
  limits, the ``.sha256`` sidecar, required files), with the checkpoint check skipped: the runner
  loaded every checkpoint before it offered the zip, and ``torch.load`` would need torch here;
- the model is described from its JSON files alone (:func:`AutoNNUNetLib.model.read_model_info`).

It runs in-process, off the UI thread (a :class:`~AutoNNUNetSlicerLib.tasks.BackgroundCall`):
unzipping is file work, and no process is started that would need torch or nnU-Net.
Testing/slicer/test_slicer_collect.py runs it in a Python where ``import torch`` fails.
Torch is needed only when the user segments on this computer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

from .models import ModelDescription, describe_model


def collect_remote_model(zip_path: Union[str, Path], dest: Union[str, Path]) -> ModelDescription:
    """Install the runner's model zip below ``dest`` (replacing an earlier collect there) without
    opening a checkpoint; raise the library's ModelError (a ValueError naming the archive) when
    the zip breaks a rule."""
    from AutoNNUNetLib.model import import_model
    from AutoNNUNetLib.selection.archive import import_selection, is_selection_archive

    zip_path, dest = Path(zip_path), Path(dest)
    if is_selection_archive(zip_path):
        path = import_selection(zip_path, dest, overwrite=True, check_checkpoints=False)
    else:
        path = import_model(zip_path, dest, overwrite=True, check_checkpoints=False)
    return describe_model(path)  # the JSON files alone (read_model_info)
