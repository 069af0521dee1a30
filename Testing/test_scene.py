"""AutoNNUNetLib.scene: the Slicer module's rules, tested without Slicer.

Geometry must survive scene -> files -> scene exactly (a prediction has to land on the input's
voxels), classes must get the same label value in every case whatever the segment order, and the
background machinery (child processes, remote jobs) must report and cancel correctly.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from AutoNNUNetLib import scene
from AutoNNUNetLib.events import ProgressEvent
from AutoNNUNetLib.processes import pid_alive

sitk = pytest.importorskip("SimpleITK")


def rotation(axis: str, degrees: float) -> np.ndarray:
    a = np.deg2rad(degrees)
    c, s = np.cos(a), np.sin(a)
    return {
        "x": np.array([[1, 0, 0], [0, c, -s], [0, s, c]]),
        "y": np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]]),
        "z": np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]),
    }[axis]


#: Oblique, non-unit-spacing grids as a Slicer volume node stores them (RAS directions as columns).
GRIDS = [
    ((0.8, 1.1, 2.7), (-12.5, 30.25, 4.0), rotation("z", 20) @ rotation("x", -35)),
    ((0.35, 0.35, 5.0), (101.0, -7.125, -250.5), rotation("y", 73) @ rotation("z", 11)),
    ((1.0, 2.0, 3.0), (0.0, 0.0, 0.0), np.diag([-1.0, 1.0, 1.0]) @ rotation("x", 90)),  # left-handed grid
]


# ---------------------------------------------------------------------------------------------
# geometry


@pytest.mark.parametrize("spacing, origin, directions", GRIDS)
def test_ras_lps_round_trip_is_exact(spacing, origin, directions):
    lps = scene.lps_from_ras(spacing, origin, directions)
    back_spacing, back_origin, back_directions = scene.ras_from_lps(*lps)
    assert back_spacing == tuple(spacing)
    assert back_origin == tuple(origin)
    assert np.array_equal(back_directions, directions)  # bit for bit: only signs change
    # LPS is RAS with the first two axes negated.
    assert lps[1] == (-origin[0], -origin[1], origin[2])
    assert np.array_equal(np.reshape(lps[2], (3, 3)), np.diag([-1.0, -1.0, 1.0]) @ directions)


@pytest.mark.parametrize("spacing, origin, directions", GRIDS)
def test_geometry_record_round_trip_and_matrix(spacing, origin, directions):
    geometry = scene.geometry_from_ras(spacing, origin, directions)
    assert geometry.spacing == tuple(spacing)
    spacing2, origin2, directions2 = scene.ras_from_geometry(geometry)
    assert spacing2 == tuple(spacing) and origin2 == tuple(origin) and np.array_equal(directions2, directions)
    # The 4x4 matrix is the one Slicer composes from the same fields, exactly.
    matrix = scene.ijk_to_ras_from_geometry(geometry)
    assert np.array_equal(matrix, scene.ijk_to_ras_matrix(spacing, origin, directions))
    # From a matrix alone (spacing recovered as column norms) we get back the same grid to rounding.
    again = scene.geometry_from_ijk_to_ras(matrix, shape_kji=(5, 6, 7))
    np.testing.assert_allclose(again.spacing, spacing, rtol=1e-14)
    np.testing.assert_allclose(again.origin, geometry.origin, rtol=0, atol=1e-12)
    np.testing.assert_allclose(again.direction, geometry.direction, rtol=0, atol=1e-14)
    np.testing.assert_allclose(scene.ijk_to_ras_from_geometry(again), matrix, rtol=0, atol=1e-12)


@pytest.mark.parametrize("spacing, origin, directions", GRIDS)
def test_geometry_matches_simpleitk_index_to_physical(spacing, origin, directions):
    """SimpleITK's own voxel -> physical mapping, converted LPS -> RAS, equals Slicer's IJK-to-RAS."""
    geometry = scene.geometry_from_ras(spacing, origin, directions)
    shape_kji = (4, 5, 6)
    image = geometry.apply_to(sitk.GetImageFromArray(np.zeros(shape_kji, dtype=np.float32)))
    assert image.GetSize() == (6, 5, 4)  # SimpleITK sizes are (i, j, k): the array is (k, j, i)
    ijk_to_ras = scene.ijk_to_ras_from_geometry(geometry)
    for ijk in [(0, 0, 0), (5, 0, 0), (0, 4, 0), (0, 0, 3), (5, 4, 3), (2.5, 1.25, 0.5)]:
        lps = np.array(image.TransformContinuousIndexToPhysicalPoint(ijk))
        ras = np.array([-lps[0], -lps[1], lps[2]])
        expected = ijk_to_ras @ np.array([*ijk, 1.0])
        np.testing.assert_allclose(ras, expected[:3], rtol=0, atol=1e-9)


def test_kji_array_order_is_simpleitk_order(tmp_path):
    """A voxel at Slicer's [k, j, i] is SimpleITK's pixel (i, j, k), at the same physical point."""
    from AutoNNUNetLib.dataset import Volume

    spacing, origin, directions = GRIDS[0]
    array = np.zeros((4, 5, 6), dtype=np.int16)
    array[3, 1, 4] = 7
    volume = Volume(array=array, geometry=scene.geometry_from_ras(spacing, origin, directions))
    path = volume.write(tmp_path / "marker.nrrd")  # NRRD keeps the geometry in full precision
    image = sitk.ReadImage(str(path))
    assert image.GetPixel(4, 1, 3) == 7
    read = Volume.read(path)
    assert np.array_equal(read.array, array)
    spacing2, origin2, directions2 = scene.ras_from_geometry(read.geometry)
    np.testing.assert_allclose(spacing2, spacing, rtol=1e-12)
    np.testing.assert_allclose(origin2, origin, atol=1e-9)
    np.testing.assert_allclose(directions2, directions, atol=1e-12)
    lps = image.TransformIndexToPhysicalPoint((4, 1, 3))
    ras = scene.ijk_to_ras_matrix(spacing, origin, directions) @ np.array([4, 1, 3, 1.0])
    np.testing.assert_allclose([-lps[0], -lps[1], lps[2]], ras[:3], atol=1e-9)


def test_geometry_input_validation():
    with pytest.raises(ValueError):
        scene.lps_from_ras((1.0, 0.0, 1.0), (0, 0, 0), np.eye(3))
    with pytest.raises(ValueError):
        scene.geometry_from_ijk_to_ras(np.eye(3))
    with pytest.raises(ValueError):
        scene.geometry_from_ijk_to_ras(np.eye(4), shape_kji=(4, 4))


# ---------------------------------------------------------------------------------------------
# classes from segment names


CASES = [
    ["Liver", "Tumor"],
    ["Tumor", "Liver"],
    ["tumor ", "Vessel", "LIVER"],
    ["Vessel"],
]


def test_class_table_is_consistent_across_segment_orders():
    classes = scene.class_table_from_segment_names(CASES)
    assert classes == {"background": 0, "Liver": 1, "Tumor": 2, "Vessel": 3}
    # Each case's export values (segment position + 1) name the right class...
    assert scene.case_label_names(CASES[0]) == {1: "Liver", 2: "Tumor"}
    assert scene.case_label_names(CASES[1]) == {1: "Tumor", 2: "Liver"}
    # ...and map to the same class value whatever the order.
    assert scene.segment_label_lookup(CASES[1], classes).tolist() == [0, 2, 1]
    assert scene.segment_label_lookup(CASES[2], classes).tolist() == [0, 2, 3, 1]
    assert scene.segment_label_lookup(CASES[3], classes).tolist() == [0, 3]


def test_remapped_label_maps_agree_voxel_for_voxel():
    """The same anatomy exported with different segment orders becomes the same class map."""
    classes = scene.class_table_from_segment_names(CASES)
    truth = np.zeros((3, 4, 5), dtype=np.uint8)  # class values
    truth[0, :2] = classes["Liver"]
    truth[1, 1:] = classes["Tumor"]
    truth[2, :, 3:] = classes["Vessel"]
    for names in CASES[:3]:
        present = [scene.class_key(n) for n in names]
        expected = np.where(
            np.isin(truth, [v for n, v in classes.items() if scene.class_key(n) in present]), truth, 0
        )
        # What ExportSegmentsToLabelmapNode writes for this segment order: position + 1.
        exported = np.zeros_like(truth)
        for position, name in enumerate(names):
            exported[truth == classes[next(k for k in classes if scene.class_key(k) == scene.class_key(name))]] = position + 1
        remapped = scene.remap_case_labels(exported, names, classes)
        assert remapped.dtype == np.uint8
        assert np.array_equal(remapped, expected)


def test_library_writes_the_same_class_values_for_any_segment_order(tmp_path):
    """End to end through dataset.build_dataset: per-case label_names -> one value per class."""
    from AutoNNUNetLib.dataset import Case, DatasetSource, Volume, build_dataset

    segment_orders = [["Liver", "Tumor"], ["Tumor", "Liver"], ["tumor", "LIVER"]]
    classes = scene.class_table_from_segment_names(segment_orders)
    geometry = scene.geometry_from_ras(*GRIDS[0])
    cases = []
    for index, names in enumerate(segment_orders):
        liver = np.zeros((6, 6, 6), dtype=bool)
        liver[1:3] = True
        tumor = np.zeros_like(liver)
        tumor[4:6, 2:4] = True
        exported = np.zeros((6, 6, 6), dtype=np.uint8)
        for position, name in enumerate(names):
            exported[liver if scene.class_key(name) == "liver" else tumor] = position + 1
        image = Volume(array=np.random.default_rng(index).normal(size=(6, 6, 6)).astype(np.float32), geometry=geometry)
        cases.append(Case(f"case{index}", [image], Volume(array=exported, geometry=geometry), scene.case_label_names(names)))
    folder = build_dataset(DatasetSource(cases=cases, classes=classes, channel_names=["CT"]), tmp_path, 7, "Order")
    labels = json.loads((folder / "dataset.json").read_text())["labels"]
    assert labels == {"background": 0, "Liver": 1, "Tumor": 2}
    written = [sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "labelsTr" / f"case{i}.nii.gz"))) for i in range(3)]
    for array in written:
        assert np.array_equal(array, written[0])
        assert set(np.unique(array)) == {0, 1, 2}
        assert np.all(array[1:3] == 1) and np.all(array[4:6, 2:4] == 2)


def test_aliases_merge_and_rename_classes():
    cases = [["Tumour", "Liver"], ["Tumor"], ["Kidney L", "Kidney R"]]
    aliases = {"tumour": "Tumor", "Kidney R": "Kidney", "Kidney L": "Kidney"}
    classes = scene.class_table_from_segment_names(cases, aliases)
    assert classes == {"background": 0, "Tumor": 1, "Liver": 2, "Kidney": 3}
    assert scene.case_label_names(cases[0], aliases) == {1: "Tumor", 2: "Liver"}
    assert scene.segment_label_lookup(cases[2], classes, aliases).tolist() == [0, 3, 3]
    rows = scene.class_rows(cases, aliases)
    assert [(r.segment_name, r.class_name, r.value, r.cases) for r in rows] == [
        ("Tumor", "Tumor", 1, 1),
        ("Tumour", "Tumor", 1, 1),
        ("Liver", "Liver", 2, 1),
        ("Kidney L", "Kidney", 3, 1),
        ("Kidney R", "Kidney", 3, 1),
    ]


def test_background_segment_and_bad_names():
    classes = scene.class_table_from_segment_names([["Background", "Organ"]])
    assert classes == {"background": 0, "Organ": 1}
    assert scene.segment_label_lookup(["Background", "Organ"], classes).tolist() == [0, 0, 1]
    with pytest.raises(ValueError, match="empty name"):
        scene.class_table_from_segment_names([["  "]])
    with pytest.raises(ValueError, match="not in the class table"):
        scene.segment_label_lookup(["Spleen"], classes)
    with pytest.raises(ValueError, match="outside"):
        scene.remap_case_labels(np.array([0, 3]), ["Organ"], classes)


def test_case_ids_are_safe_and_unique():
    assert scene.case_id_from_name("Patient 1: seg") == "Patient_1_seg"
    assert scene.case_id_from_name("a/b", taken=["a_b"]) == "a_b_2"
    assert scene.case_id_from_name("", taken=[]) == "case"


def test_distinct_colors():
    colors = scene.distinct_colors(40)
    assert len(set(colors)) == 40
    assert all(0.0 <= c <= 1.0 for color in colors for c in color)
    # The first classes are clearly apart (not just different by rounding).
    first = np.array(colors[:10])
    distances = np.linalg.norm(first[:, None] - first[None], axis=-1) + np.eye(10)
    assert distances.min() > 0.2
    assert scene.distinct_colors(3) == colors[:3]  # stable
    by_class = scene.class_colors({"background": 0, "B": 2, "A": 1})
    assert set(by_class) == {"A", "B"} and by_class["A"] == colors[0] and by_class["B"] == colors[1]


# ---------------------------------------------------------------------------------------------
# progress events -> UI


def test_progress_state_and_formatting():
    events = [
        ProgressEvent("stage", {"name": "search", "message": "starting"}),
        ProgressEvent("trial_started", {"trial": "1_0", "rung": 0, "epochs": 12}),
        ProgressEvent("epoch", {"trial": "1_0", "fold": 0, "epoch": 6, "max_epochs": 12, "loss": 0.51234, "seconds": 3.2}),
        ProgressEvent("trial_finished", {"trial": "1_0", "rung": 0, "epochs": 12, "dice": 0.7, "train_seconds": 600,
                                         "dice_per_class": {"A": 0.8, "B": 0.6}, "state": "succeeded"}),
        ProgressEvent("trial_started", {"trial": "2_0", "rung": 0, "epochs": 12}),
        ProgressEvent("trial_finished", {"trial": "2_0", "epochs": 12, "state": "failed", "error": "CUDA out of memory"}),
        ProgressEvent("trial_started", {"trial": "1_1", "rung": 1, "epochs": 37}),
        ProgressEvent("trial_finished", {"trial": "1_1", "rung": 1, "epochs": 37, "dice": 0.82, "train_seconds": 1900}),
        ProgressEvent("progress", {"fraction": 0.25, "eta_seconds": 3725, "message": "budget 25% used"}),
    ]
    state = scene.ProgressState()
    lines = []
    for event in events:
        state.update(event)
        lines.append(scene.format_event(event))
    assert lines[0] == "[search] starting"
    assert lines[1] == "Trial 1_0 started (rung 0, 12 epochs)"
    assert lines[2] == "Trial 1_0 fold 0 epoch 6/12 loss 0.5123 (3s)"
    assert lines[3] == "Trial 1_0 finished: Dice 0.7000 after 12 epochs, training 10m 00s (A 0.8000, B 0.6000)"
    assert lines[5] == "Trial 2_0 failed: CUDA out of memory"
    assert lines[8] == "budget 25% used - 25% - ETA 1h 02m"
    assert state.best_dice == 0.82 and state.best_trial == "1_1"
    assert state.best_text() == "0.8200 (trial 1_1)"
    assert state.percent() == 25
    assert state.status_text() == "Trial 1_1 (rung 1, 37 epochs), ETA 1h 02m"
    points = state.finished_points()
    assert [(p.trial, p.epochs, p.dice) for p in points] == [("1_0", 12, 0.7), ("1_1", 37, 0.82)]
    state.update(ProgressEvent("finished", {"state": "succeeded", "message": "budget spent"}))
    assert state.status_text() == "Finished (succeeded): budget spent"
    assert state.percent() == 100


def test_percent_falls_back_to_epochs():
    state = scene.ProgressState()
    state.update(ProgressEvent("epoch", {"epoch": 3, "max_epochs": 12}))
    assert state.percent() == 25


def test_pareto_front():
    #            time   dice
    points = [(100.0, 0.80), (50.0, 0.70), (200.0, 0.85), (120.0, 0.75), (50.0, 0.60), (300.0, 0.85)]
    assert scene.pareto_front(points) == [1, 0, 2]
    assert scene.pareto_front([]) == []


def test_trial_rows_from_search_results(tmp_path):
    root = tmp_path / "search"
    model = root / "incumbent" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    model.mkdir(parents=True)
    (model / "plans.json").write_text("{}")
    results = {
        "trials": [
            {"trial_id": "1_0", "epochs": 3, "mean_dice": 0.6, "train_seconds": 30, "state": "success", "config": {"lr": 0.01},
             "model_dir": "configs/1_0/model"},
            {"trial_id": "2_0", "epochs": 3, "mean_dice": 0.7, "train_seconds": 90, "state": "success", "config": {}},
            {"trial_id": "3_0", "epochs": 3, "mean_dice": None, "train_seconds": None, "state": "failed", "config": {}},
            {"trial_id": "2_1", "epochs": 9, "mean_dice": 0.75, "train_seconds": 260, "state": "success", "config": {},
             "model_dir": str(tmp_path / "elsewhere")},
        ],
        "incumbent": "2_1",
        "incumbent_model_dir": str(model),
        "pareto_front": ["1_0", "2_0", "2_1"],
    }
    (root / "results.json").write_text(json.dumps(results))
    rows = scene.trial_rows_from_results(scene.load_results(root), root)
    assert [r.trial for r in rows] == ["1_0", "2_0", "3_0", "2_1"]
    assert [r.pareto for r in rows] == [True, True, False, True]
    assert [r.incumbent for r in rows] == [False, False, False, True]
    assert [r.state for r in rows] == ["succeeded", "succeeded", "failed", "succeeded"]
    assert rows[0].model_dir == root / "configs/1_0/model"  # relative to the search root
    assert rows[3].model_dir == model  # the incumbent's kept copy
    assert scene.incumbent_model_dir(root, results) == model
    # Without the search's own front, it is computed from Dice and time.
    del results["pareto_front"]
    rows = scene.trial_rows_from_results(results, root)
    assert [r.pareto for r in rows] == [True, True, False, True]
    assert scene.load_results(tmp_path / "none") == {}


# ---------------------------------------------------------------------------------------------
# background processes


CHILD = textwrap.dedent(
    """
    import signal, subprocess, sys, time
    from AutoNNUNetLib.events import EventWriter
    write = EventWriter(sys.argv[1])
    write.emit("stage", name="test", message="child up")
    if sys.argv[2] == "stubborn":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a child that will not stop politely
        print("ignoring SIGTERM", flush=True)
        time.sleep(60)
    if sys.argv[2] == "spawn":
        grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        open(sys.argv[3], "w").write(str(grandchild.pid))
        print("spawned", grandchild.pid, flush=True)
        time.sleep(60)
    write.emit("trial_finished", trial="1", epochs=3, dice=0.5, train_seconds=12.0, state="succeeded")
    print("done", flush=True)
    sys.exit(int(sys.argv[2]))
    """
)


def _job(tmp_path, mode: str, stopped=()):
    tmp_path.mkdir(parents=True, exist_ok=True)
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    events = tmp_path / "events.jsonl"
    env = scene.subprocess_environment(os.environ, scene.library_parent())
    command = [sys.executable, str(script), str(events), mode, str(tmp_path / "grandchild.pid")]
    process = scene.BackgroundProcess(command, env, tmp_path / "job.log")
    return scene.ProcessJob("test", process, events, stopped_exit_codes=stopped).start()


def test_process_job_reports_events_log_and_success(tmp_path):
    update = _job(tmp_path, "0").wait(timeout=20, interval=0.05)
    assert update.finished and update.state == "succeeded"
    assert [e.kind for e in update.events] == ["stage", "trial_finished"]
    assert "done" in update.log


def test_process_job_failure_and_stopped_codes(tmp_path):
    failed = _job(tmp_path / "a", "5").wait(timeout=20, interval=0.05)
    assert failed.state == "failed" and failed.message.startswith("exit code 5") and "done" in failed.message
    stopped = _job(tmp_path / "b", "3", stopped=(3,)).wait(timeout=20, interval=0.05)
    assert stopped.state == "stopped"


def test_cancel_kills_the_whole_process_tree(tmp_path):
    job = _job(tmp_path, "spawn")
    pid_file = tmp_path / "grandchild.pid"
    deadline = time.monotonic() + 20
    while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    grandchild = int(pid_file.read_text())
    assert pid_alive(grandchild)
    job.cancel()
    update = job.wait(timeout=10, interval=0.05)
    assert update.state == "cancelled"
    deadline = time.monotonic() + 5
    while pid_alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pid_alive(grandchild), "the grandchild survived Cancel"


@pytest.mark.skipif(os.name == "nt", reason="POSIX signals")
def test_cancel_escalates_to_sigkill_without_blocking(tmp_path):
    job = _job(tmp_path, "stubborn")
    deadline = time.monotonic() + 20
    log = ""
    while "ignoring SIGTERM" not in log and time.monotonic() < deadline:
        log += job.poll().log
        time.sleep(0.05)
    started = time.monotonic()
    job.process.cancel(grace=0.3)
    assert time.monotonic() - started < 0.2  # cancel itself returns at once
    assert job.process.poll() is None  # SIGTERM ignored: still running within the grace period
    update = job.wait(timeout=10, interval=0.05)
    assert update.state == "cancelled"
    assert time.monotonic() - started < 5


def test_subprocess_environment_is_a_copy():
    base = {"PATH": "/bin", "PYTHONPATH": "/x"}
    env = scene.subprocess_environment(base, "/lib/parent", {"nnUNet_n_proc_DA": "0", "PATH": None})
    assert base == {"PATH": "/bin", "PYTHONPATH": "/x"}
    assert env["PYTHONPATH"] == os.pathsep.join(["/lib/parent", "/x"])
    assert env["PYTHONUNBUFFERED"] == "1" and env["nnUNet_n_proc_DA"] == "0" and "PATH" not in env


def test_autonnunet_command_and_verb_options():
    command = scene.autonnunet_command("/py", "search", ["--root", Path("/r")], "/e.jsonl")
    assert command == ["/py", "-m", "AutoNNUNetLib", "search", "--root", "/r", "--events", "/e.jsonl"]
    assert {"--workdir"} <= scene.verb_options("fingerprint")
    assert scene.verb_options("no-such-verb") == set()


# ---------------------------------------------------------------------------------------------
# remote job (fake client: the real one is tested with the server)


class FakeClient:
    """Records which thread each call runs on; a job that runs two polls, then succeeds."""

    def __init__(self, fail_status: bool = False):
        self.threads: set[str] = set()
        self.calls: list[str] = []
        self.status_calls = 0
        self.fail_status = fail_status

    def _note(self, name: str) -> None:
        self.threads.add(threading.current_thread().name)
        self.calls.append(name)

    def upload_dataset(self, folder):
        self._note("upload_dataset")
        return {"id": "up1", "state": "ready"}

    def submit_search(self, upload_id, **params):
        self._note("submit_search")
        assert upload_id == "up1" and params["space"] == "hpo"
        return {"id": "job1", "state": "queued"}

    def status(self, job_id):
        self._note("status")
        if self.fail_status:
            raise ConnectionError("runner unreachable")
        self.status_calls += 1
        return {"id": job_id, "state": "running" if self.status_calls < 3 else "succeeded"}

    def logs(self, job_id, offset=0):
        self._note("logs")
        return {"text": f"line {offset}\n", "next_offset": offset + 1, "complete": False}

    def events(self, job_id, offset=0):
        self._note("events")
        if offset == 0:
            return [ProgressEvent("best", {"trial": "1", "dice": 0.6})], 1, False
        return [], offset, False

    def download(self, job_id, artifact="model.zip", dest=None):
        self._note(f"download {artifact}")
        path = Path(dest) / artifact
        path.write_text("zip")
        return path

    def cancel(self, job_id):
        self._note("cancel")
        return {"state": "cancelled"}


def _poll_until_done(job, timeout=10.0):
    total = scene.JobUpdate()
    deadline = time.monotonic() + timeout
    while job.running and time.monotonic() < deadline:
        update = job.poll()
        total.events += update.events
        total.log += update.log
        if update.finished:
            total.finished, total.state, total.message = True, update.state, update.message
        time.sleep(0.01)
    return total


def test_remote_job_runs_client_calls_off_the_calling_thread(tmp_path):
    client = FakeClient()
    job = scene.RemoteSearchJob(client, tmp_path, {"space": "hpo"}, tmp_path / "download")
    total = _poll_until_done(job)
    assert total.state == "succeeded"
    assert job.output == tmp_path / "download" / "model.zip"
    assert client.calls[:2] == ["upload_dataset", "submit_search"]
    assert "download results.json" in client.calls
    assert threading.current_thread().name not in client.threads
    assert all(name.startswith("autonnunet-remote") for name in client.threads)
    assert job.state.best_dice == 0.6
    assert "Submitted remote job job1" in total.log and "line 0" in total.log


def test_remote_job_errors_and_cancel(tmp_path):
    failing = scene.RemoteSearchJob(FakeClient(fail_status=True), tmp_path, {"space": "hpo"}, tmp_path / "d1")
    total = _poll_until_done(failing)
    assert total.state == "failed" and "runner unreachable" in total.message

    client = FakeClient()
    job = scene.RemoteSearchJob(client, tmp_path, {"space": "hpo"}, tmp_path / "d2")
    job.cancel()  # before the submit returned: cancelled right after it
    total = _poll_until_done(job)
    assert total.state == "cancelled" and "cancel" in client.calls
