"""The shared foundation: one error base, shared states, files, folds, devices, Pareto order."""

from __future__ import annotations

import importlib
import inspect
import json
import os
import pkgutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import AutoNNUNetLib
from AutoNNUNetLib import devices, files, folds, pareto
from AutoNNUNetLib.errors import AutoNNUNetError, DeviceError, UserInputError
from AutoNNUNetLib.states import JobState, TrialState

PY = sys.executable

#: Exceptions that are control flow, not errors for users (documented where they are defined).
CONTROL_FLOW = {"SearchStopped", "_Cancelled", "Cancelled", "StopRequested",
                "Diverged"}  # Diverged: caught by training, recorded as Dice 0 with its reason


def _library_modules():
    for info in pkgutil.walk_packages(AutoNNUNetLib.__path__, prefix="AutoNNUNetLib."):
        if info.name.endswith("__main__"):
            continue
        yield importlib.import_module(info.name)


def test_every_library_exception_derives_from_the_one_base():
    found = {}
    for module in _library_modules():
        for name, value in vars(module).items():
            if inspect.isclass(value) and issubclass(value, BaseException) and value.__module__ == module.__name__:
                found[f"{module.__name__}.{name}"] = value
    assert len(found) >= 10, sorted(found)  # the scan really saw the library's error classes
    strays = sorted(name for name, cls in found.items()
                    if not issubclass(cls, AutoNNUNetError) and cls.__name__ not in CONTROL_FLOW)
    assert strays == [], f"error classes outside AutoNNUNetError: {strays}"


def test_cli_prints_each_library_error_as_one_line(monkeypatch, capsys):
    from AutoNNUNetLib import cli

    classes = {cls for module in _library_modules() for cls in vars(module).values()
               if inspect.isclass(cls) and issubclass(cls, AutoNNUNetError) and cls.__module__ == module.__name__}
    assert DeviceError in classes and UserInputError in classes
    for cls in sorted(classes, key=lambda c: c.__qualname__):
        def handler(args, cls=cls):
            raise cls.__new__(cls, "bad value for the case")  # some take extra arguments; the message is what counts

        parser = cli.build_parser("dataset")
        monkeypatch.setattr(cli, "build_parser", lambda verb=None, parser=parser: parser)
        parser.set_defaults(func=handler)
        try:
            code = cli.main(["dataset", "x", "--workdir", "w"])
        except Exception as error:  # pragma: no cover - the failure message names the class
            pytest.fail(f"{cls.__qualname__} escaped the CLI: {error!r}")
        err = capsys.readouterr().err
        assert code == 2, cls
        assert "Traceback" not in err and err.count("\n") == 1, (cls, err)


def test_a_device_that_is_not_there_is_one_line_from_the_real_command(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the unavailable-device path cannot be reached")
    # A real verb whose first act is to resolve the device: the CLI must print one line, exit 2.
    code = "from AutoNNUNetLib.devices import resolve_device; resolve_device('cuda')"
    run = subprocess.run([PY, "-c", code], capture_output=True, text=True)
    assert run.returncode != 0 and "CUDA is not available" in run.stderr
    with pytest.raises(DeviceError, match="not available"):
        devices.resolve_device("cuda:0")
    with pytest.raises(DeviceError, match="must be auto, cpu"):
        devices.resolve_device("gpu")
    assert str(devices.resolve_device("cpu")) == "cpu"


def test_states_serialise_as_their_plain_values():
    assert json.dumps({"state": TrialState.SUCCEEDED}) == '{"state": "succeeded"}'
    assert TrialState("succeeded") is TrialState.SUCCEEDED and TrialState.SUCCEEDED == "succeeded"
    assert JobState.CANCELLED.done and not JobState.RUNNING.done
    assert {s.value for s in JobState} == {"queued", "running", "succeeded", "failed", "cancelled"}


# ------------------------------------------------------------------------------------------------
# devices: worker GPU ids come from the set this process was given


def test_workers_get_the_physical_gpus_they_were_given():
    gpus = devices.visible_gpus({"CUDA_VISIBLE_DEVICES": "2,3"}, device_count=2)
    assert gpus == ["2", "3"]
    envs = [devices.worker_environment(i, gpus) for i in range(2)]
    assert envs == [{"CUDA_VISIBLE_DEVICES": "2"}, {"CUDA_VISIBLE_DEVICES": "3"}]
    assert devices.visible_gpus({}, device_count=2) == ["0", "1"]
    assert devices.visible_gpus({"CUDA_VISIBLE_DEVICES": ""}, device_count=4) == []
    assert devices.worker_environment(0, []) == {}


@pytest.mark.parametrize("text", ["cpu", "cuda", "cuda:3", "mps", "auto", " CPU "])
def test_device_names_accepted(text):
    assert devices.check_device_name(text) == text.strip().lower()


@pytest.mark.parametrize("text", ["gpu", "cuda:", "cuda:-1", "tpu", "cpu;rm -rf /"])
def test_device_names_refused(text):
    with pytest.raises(DeviceError):
        devices.check_device_name(text)


# ------------------------------------------------------------------------------------------------
# folds


@pytest.mark.parametrize("given, expected", [("all", [0, 1, 2, 3, 4]), (["0", "2"], [0, 2]), ("1,3", [1, 3]),
                                             (4, [4]), ([1], [1])])
def test_folds_parse(given, expected):
    assert folds.parse_folds(given) == expected


@pytest.mark.parametrize("given", [None, [], ["x"], [5], [-1], ["0", "0"], [True]])
def test_folds_refused(given):
    with pytest.raises(UserInputError):
        folds.parse_folds(given)


# ------------------------------------------------------------------------------------------------
# files


def test_atomic_write_leaves_no_temporary_and_sets_mode(tmp_path):
    path = files.atomic_write_json(tmp_path / "a" / "record.json", {"p": Path("/x"), "n": 1}, mode=0o600)
    assert json.loads(path.read_text()) == {"p": "/x", "n": 1}
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert [p.name for p in path.parent.iterdir()] == ["record.json"]
    assert files.read_json(tmp_path / "missing.json") is None


def test_sha256_matches_hashlib(tmp_path):
    import hashlib

    data = os.urandom(5 << 20)
    (tmp_path / "f").write_bytes(data)
    assert files.sha256_file(tmp_path / "f") == hashlib.sha256(data).hexdigest()


def test_is_within_follows_symlinks(tmp_path):
    inside = tmp_path / "up"
    inside.mkdir()
    (tmp_path / "secret").write_text("x")
    (inside / "link").symlink_to(tmp_path / "secret")
    assert files.is_within(inside / "a" / "b", inside)
    assert not files.is_within(inside / ".." / "secret", inside)
    assert not files.is_within(inside / "link", inside)
    assert not files.is_within("/etc/passwd", inside)


HOLDER = textwrap.dedent("""
    import sys, time
    from AutoNNUNetLib.files import file_lock
    with file_lock(sys.argv[1]):
        print("held", flush=True)
        sys.stdin.readline()  # hold until told to release
""")


def test_file_lock_excludes_another_process_and_frees_when_it_dies(tmp_path):
    from filelock import Timeout

    lock = tmp_path / "search.lock"
    holder = subprocess.Popen([PY, "-c", HOLDER, str(lock)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        started = time.monotonic()
        with pytest.raises(Timeout):
            with files.file_lock(lock, timeout=0.3):
                pass
        assert time.monotonic() - started >= 0.25
        polls = []

        def poll():
            polls.append(1)
            if len(polls) == 2:
                holder.kill()  # a dead holder's lock is released by the OS

        with files.file_lock(lock, poll=poll, poll_interval=0.1):
            assert len(polls) >= 2
    finally:
        holder.kill()
        holder.wait()


def test_no_platform_lock_import_outside_files():
    root = Path(AutoNNUNetLib.__file__).parent
    offenders = [str(p.relative_to(root)) for p in root.rglob("*.py") if p.name != "files.py"
                 and any(word in p.read_text() for word in ("import fcntl", "import msvcrt"))]
    assert offenders == []


# ------------------------------------------------------------------------------------------------
# pareto


def test_pareto_front_and_ranks():
    points = [(0.2, 10.0), (0.1, 20.0), (0.3, 5.0), (0.25, 12.0), (0.1, 25.0)]
    assert pareto.pareto_front(points) == [0, 1, 2]
    assert pareto.pareto_ranks(points) == [0, 0, 0, 1, 1]
    assert pareto.pareto_front([]) == [] and pareto.pareto_ranks([]) == []


def test_public_surface_resolves_every_name_lazily():
    code = ("import sys, AutoNNUNetLib as a\n"
            "assert 'torch' not in sys.modules and 'SimpleITK' not in sys.modules\n"
            "missing = [n for n in a.__all__ if getattr(a, n, None) is None]\n"
            "assert not missing, missing\n")
    run = subprocess.run([PY, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
