"""Collecting a remote model needs no torch: the module's collect path in a Python without it.

A remote-only user has ``requests`` and the library's pure-Python parts in Slicer, nothing else.
The zip here is a real export of the session's trained model (what the runner offers); the child
Python cannot import torch or nnunetv2 (a ``sitecustomize`` blocker on its PYTHONPATH) and may not
start a process, and still installs the model folder the panel then uses.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODULE_DIR = ROOT / "AutoNNUNet"
sys.path.insert(0, str(MODULE_DIR))

#: Installed as sitecustomize.py: torch and nnunetv2 do not exist, and no process may start.
BLOCKER = '''
import subprocess
import sys


class _NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("torch", "nnunetv2"):
            raise ImportError(f"No module named {name!r} (blocked: a remote-only Slicer)")
        return None


def _no_process(*args, **kwargs):
    raise RuntimeError("the collect path started a process")


sys.meta_path.insert(0, _NotInstalled())
subprocess.Popen = _no_process
'''

CHILD = '''
import json
import sys

for name in ("torch", "nnunetv2"):
    try:
        __import__(name)
    except ImportError:
        continue
    raise SystemExit(f"{name} could be imported: the blocker does not work")

from AutoNNUNetSlicerLib.collect import collect_remote_model

described = collect_remote_model(sys.argv[1], sys.argv[2])
loaded = sorted(m for m in sys.modules if m.partition(".")[0] in ("torch", "nnunetv2"))
print(json.dumps({"path": str(described.path), "selection": described.selection, "channels": described.channel_names,
                  "classes": described.classes, "folds": described.folds, "loaded": loaded}))
'''


def _run_without_torch(tmp_path: Path, *argv: str) -> subprocess.CompletedProcess:
    blocker = tmp_path / "blocker"
    blocker.mkdir(exist_ok=True)
    (blocker / "sitecustomize.py").write_text(BLOCKER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker), str(ROOT), str(MODULE_DIR)])}
    return subprocess.run([sys.executable, "-c", CHILD, *argv], env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def runner_zip(trained_model, tmp_path_factory):
    """What a runner's search offers for download: the model zip and its .sha256 sidecar."""
    from AutoNNUNetLib.model import export_model

    return export_model(trained_model, tmp_path_factory.mktemp("runner") / "model.zip")


def test_a_remote_model_is_collected_in_a_python_without_torch(runner_zip, trained_model, tmp_path):
    from AutoNNUNetLib.files import sha256_file
    from AutoNNUNetLib.model import read_model_info

    download = tmp_path / "jobs" / "remote-search-1"  # RemoteJob's download folder
    download.mkdir(parents=True)
    for source in (runner_zip, runner_zip.with_name(runner_zip.name + ".sha256")):
        shutil.copy2(source, download / source.name)
    dest = download / "model"
    expected = read_model_info(trained_model)
    for attempt in range(2):  # collecting again replaces the first collect
        done = _run_without_torch(tmp_path, str(download / "model.zip"), str(dest))
        assert done.returncode == 0, done.stderr
        found = json.loads(done.stdout.strip().splitlines()[-1])
        assert found["loaded"] == [] and found["selection"] is False
        model_dir = Path(found["path"])
        assert model_dir == dest / expected.dataset_name / expected.folder_name
        assert found["channels"] == expected.channel_names and found["folds"] == [0]
        assert found["classes"] == {k: int(v) for k, v in expected.labels.items()}
    checkpoint = "fold_0/checkpoint_final.pth"
    assert sha256_file(model_dir / checkpoint) == sha256_file(trained_model / checkpoint)
    for name in ("plans.json", "dataset.json"):
        assert json.loads((model_dir / name).read_text()) == json.loads((trained_model / name).read_text())
    assert sorted(p.name for p in dest.iterdir()) == [expected.dataset_name]  # no staging folder left

    from AutoNNUNetSlicerLib import jobs as modulejobs

    assert modulejobs.imported_model_dir(dest) == model_dir  # what the panel then selects


def test_a_damaged_download_is_refused_and_installs_nothing(runner_zip, tmp_path):
    from AutoNNUNetLib.model import ModelError
    from AutoNNUNetSlicerLib.collect import collect_remote_model

    damaged = tmp_path / "model.zip"
    data = bytearray(runner_zip.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside a checkpoint
    damaged.write_bytes(bytes(data))
    shutil.copy2(runner_zip.with_name(runner_zip.name + ".sha256"), tmp_path / "model.zip.sha256")
    with pytest.raises(ModelError, match="SHA-256"):
        collect_remote_model(damaged, tmp_path / "model")
    assert not (tmp_path / "model").exists() or not any((tmp_path / "model").iterdir())
