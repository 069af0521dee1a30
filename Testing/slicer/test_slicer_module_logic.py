"""AutoNNUNetSlicerLib without Slicer: the request record, the install flow, the job board,
background calls and the panel's texts.

What Slicer would do is played by small fakes of the one seam each piece has (an Installer, a Job
following the library's protocol); everything else is the real code. Real local jobs run through
the same glue the panel uses.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import pytest

from AutoNNUNetLib.errors import AutoNNUNetError
from AutoNNUNetLib.events import ProgressEvent
from AutoNNUNetLib.jobs.job import JobUpdate
from AutoNNUNetLib.states import JobState

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "AutoNNUNet"))
from AutoNNUNetSlicerLib import install, parameters, tasks, widget  # noqa: E402
from AutoNNUNetSlicerLib import jobs as modulejobs  # noqa: E402

PANEL = {"searchSpace": "HPO + NAS", "profile": "default", "totalEpochs": 300, "wallTimeHours": 1.5, "maxTrials": 0,
         "minEpochs": 10, "maxEpochs": 100, "folds": "all", "iterationsPerEpoch": 0, "priorFirst": True,
         "runtimeWeight": 0.5, "device": "cpu"}


# -- the one search request ----------------------------------------------------------------------


def test_panel_values_become_the_one_search_record():
    settings = parameters.search_settings(PANEL)
    assert (settings.space, settings.profile, settings.folds) == ("hpo_nas", "default", [0, 1, 2, 3, 4])
    assert (settings.min_epochs, settings.max_epochs, settings.total_epochs) == (10, 100, 300)
    assert settings.wall_time == 5400.0 and settings.max_trials is None and settings.prior_first
    assert settings.runtime_weight == 0.5 and settings.device == "cpu"
    # The record round-trips through what the child reads (--request FILE is its to_dict).
    assert type(settings).from_dict(json.loads(json.dumps(settings.to_dict()))) == settings
    request = parameters.search_request(settings)
    assert request["space"] == "hpo_nas" and request["total_epochs"] == 300 and "device" not in request
    quick = parameters.search_settings({**PANEL, "profile": "quick"})
    assert quick.max_epochs != 100  # the quick profile brings its own epoch range


@pytest.mark.parametrize("change", [{"runtimeWeight": float("inf")}, {"runtimeWeight": float("nan")},
                                    {"device": "tpu"}, {"searchSpace": "everything"}, {"minEpochs": 200}])
def test_values_that_cannot_run_are_refused_before_anything_starts(change):
    with pytest.raises(AutoNNUNetError):
        parameters.search_settings({**PANEL, **change})


# -- dependencies --------------------------------------------------------------------------------


REQUIREMENTS = ["torch>=2.5,!=2.9.*,<=2.14.1", "nnunetv2>=2.8.1,<2.9", "neural-pipeline-search>=0.17,<0.18",
                "SimpleITK>=2.3,<3", "numpy>=1.26,<3", "requests>=2.31,<3", "filelock>=3.12"]


class FakeInstaller:
    """The Slicer side of the install: records what was asked; installs into ``versions``."""

    def __init__(self, versions, has_utils=True, extension=False, accept=True, installs=True):
        self.versions = versions
        self.has_utils, self.extension, self.accept, self.installs = has_utils, extension, accept, installs
        self.calls: list = []

    def pytorch_utils_available(self):
        return self.has_utils

    def extension_installed(self, name):
        return self.extension

    def install_extension(self, name):
        self.calls.append(("extension", name))
        return self.installs

    def install_torch(self, specifier):
        self.calls.append(("torch", specifier))
        self.versions["torch"] = "2.6.0"
        return True

    def pip_install(self, arguments):
        split = arguments.index("--constraint")
        requirements, constraints = arguments[:split], Path(arguments[split + 1]).read_text()
        self.calls.append(("pip", requirements, constraints))
        for requirement in requirements:
            name = install.requirement_name(requirement)
            self.versions[name] = {"nnunetv2": "2.8.1", "neural-pipeline-search": "0.17.0", "filelock": "3.13.0",
                                   "requests": "2.32.0"}[name]

    def confirm(self, question):
        self.calls.append(("confirm", question))
        return self.accept

    def log(self, text):
        pass


def test_requirement_checks_follow_the_metadata():
    versions = {"torch": "2.9.0", "nnunetv2": "2.8.1", "requests": "2.32.0"}
    missing = install.missing_requirements(REQUIREMENTS, versions.get)
    assert missing[0] == REQUIREMENTS[0]  # torch 2.9 is excluded by nnunetv2
    assert "neural-pipeline-search>=0.17,<0.18" in missing and "SimpleITK>=2.3,<3" not in missing
    assert install.missing_requirements(REQUIREMENTS, versions.get, remote_only=True) == []
    assert install.missing_requirements(REQUIREMENTS, {}.get, remote_only=True) == ["requests>=2.31,<3"]
    assert install.torch_version_specifier(REQUIREMENTS) == ">=2.5,!=2.9.*,<=2.14.1"


def test_declining_the_pytorch_extension_is_a_result_not_a_failure():
    installer = FakeInstaller({}, has_utils=False, accept=False)
    result = install.install_dependencies(installer, REQUIREMENTS, {}.get)
    assert result.declined and not result.needs_restart and "not installed" in result.message
    assert [c[0] for c in installer.calls] == ["confirm"]  # asked once, nothing installed


def test_the_pytorch_extension_installs_once_and_the_module_offers_the_restart():
    installer = FakeInstaller({}, has_utils=False, accept=True)
    result = install.install_dependencies(installer, REQUIREMENTS, {}.get)
    assert result.needs_restart and result.installed == ["PyTorch extension"]
    assert [c[0] for c in installer.calls] == ["confirm", "extension"]
    with pytest.raises(install.InstallError, match="Extensions Manager"):
        install.install_dependencies(FakeInstaller({}, has_utils=False, installs=False), REQUIREMENTS, {}.get)


def test_torch_through_pytorch_utils_and_the_rest_with_pip_keeping_slicers_builds():
    versions = {"numpy": "1.26.4", "SimpleITK": "2.4.0", "requests": "2.32.0"}
    installer = FakeInstaller(versions)
    result = install.install_dependencies(installer, REQUIREMENTS, versions.get, loaded_modules=["numpy"])
    torch_call = next(c for c in installer.calls if c[0] == "torch")
    assert torch_call[1] == ">=2.5,!=2.9.*,<=2.14.1"  # the derived requirement, not a copy
    pip_call = next(c for c in installer.calls if c[0] == "pip")
    assert "torch==2.6.0" in pip_call[2] and "SimpleITK==2.4.0" in pip_call[2] and "numpy==1.26.4" in pip_call[2]
    assert not result.needs_restart and result.installed[0] == "torch"
    assert install.missing_requirements(REQUIREMENTS, versions.get) == []
    # Everything present: nothing is asked or installed.
    again = FakeInstaller(versions)
    install.install_dependencies(again, REQUIREMENTS, versions.get)
    assert again.calls == []


def test_a_package_slicer_already_loaded_that_changed_asks_for_a_restart():
    versions = {"numpy": "1.26.4", "SimpleITK": "2.4.0", "torch": "2.4.0"}
    result = install.install_dependencies(FakeInstaller(versions), REQUIREMENTS, versions.get, loaded_modules=["torch"])
    assert result.needs_restart and "torch" in result.message


# -- the job board -------------------------------------------------------------------------------


class FakeJob:
    """A job following the library's protocol, fed by the test."""

    def __init__(self):
        self.updates: list[JobUpdate] = []
        self.cancelled = False

    @property
    def job_id(self):
        return "fake"

    def poll(self):
        return self.updates.pop(0) if self.updates else JobUpdate(JobState.RUNNING)

    def cancel(self):
        self.cancelled = True
        self.updates.append(JobUpdate(JobState.CANCELLED, message="cancelled"))

    def wait(self, timeout=None):
        return self.poll()


def test_each_job_keeps_its_context_progress_and_log(tmp_path):
    board = modulejobs.JobBoard()
    search, predict = FakeJob(), FakeJob()
    board.add("search", search, modulejobs.JobContext("search", tmp_path / "a", search_root=tmp_path / "a" / "search"))
    node = object()
    board.add("predict", predict, modulejobs.JobContext("predict", tmp_path / "b", reference_volume=node))
    search.updates.append(JobUpdate(JobState.RUNNING, [ProgressEvent("trial_finished", {
        "trial": "1_rung_0", "epochs": 1, "dice": 0.5, "train_seconds": 3.0, "state": "succeeded"})], "search log\n"))
    predict.updates.append(JobUpdate(JobState.SUCCEEDED, [ProgressEvent("stage", {"name": "predict", "message": "segment"})],
                                     "predict log\n"))
    board.poll()
    entry = board.get("search")
    assert entry.progress.best_dice == 0.5 and entry.log == "search log\n" and not entry.done
    finished = board.get("predict")
    assert finished.done and finished.log == "predict log\n"  # not in the search's log
    assert finished.context.reference_volume is node and finished.context.work_dir == tmp_path / "b"
    with pytest.raises(RuntimeError, match="already running"):
        board.add("search", FakeJob(), modulejobs.JobContext("search", tmp_path))


def test_closing_the_scene_cancels_the_jobs_that_hold_its_nodes(tmp_path):
    board = modulejobs.JobBoard()
    search, predict = FakeJob(), FakeJob()
    board.add("search", search, modulejobs.JobContext("search", tmp_path))
    board.add("predict", predict, modulejobs.JobContext("predict", tmp_path, reference_volume=object(),
                                                         output_segmentation=object()))
    assert board.close_scene() == ["predict"]
    assert predict.cancelled and not search.cancelled
    entry = board.get("predict")
    assert entry.context.reference_volume is None and entry.context.output_segmentation is None
    board.poll()
    assert entry.state == JobState.CANCELLED and entry.cancelled_by_scene_close
    assert "scene" in widget.job_end_text("predict", entry.state, by_scene_close=True)
    assert board.running("search")


def test_a_search_stopped_by_its_wall_time_is_resumable_not_failed(tmp_path):
    board = modulejobs.JobBoard()
    job = FakeJob()
    board.add("search", job, modulejobs.JobContext("search", tmp_path))
    job.updates.append(JobUpdate(JobState.SUCCEEDED, exit_code=modulejobs.SEARCH_STOPPED_EXIT))
    board.poll()
    entry = board.get("search")
    assert entry.stopped and "Resume" in widget.job_end_text("search", entry.state, stopped=entry.stopped)


def test_a_local_search_job_hands_the_child_the_one_record(tmp_path):
    """The panel's start: a job folder with the request file; the child parses it (here it stops
    at once because the working folder holds no dataset, with the library's message)."""
    settings = parameters.search_settings({**PANEL, "profile": "quick", "maxTrials": 1})
    job, context = modulejobs.start_search(tmp_path, settings, python=sys.executable)
    board = modulejobs.JobBoard()
    board.add("search", job, context)
    entry = board.wait("search", timeout=120, interval=0.1)
    request = json.loads((Path(job.job_dir) / "search-request.json").read_text())
    assert type(settings).from_dict(request) == settings
    assert context.search_root == tmp_path.resolve() / "search"
    assert entry.state == JobState.FAILED
    assert "usage:" not in entry.log and "unrecognized arguments" not in entry.log  # the argv parsed
    assert "dataset" in entry.log.lower()


def test_a_second_fresh_start_keeps_the_earlier_search_renamed(tmp_path):
    root = modulejobs.search_root(tmp_path)
    root.mkdir()
    (root / "results.json").write_text("{}")
    settings = parameters.search_settings({**PANEL, "profile": "quick", "maxTrials": 1})
    job, _ = modulejobs.start_search(tmp_path, settings, python=sys.executable)
    job.wait(timeout=120)
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("search-")]
    assert len(kept) == 1 and (kept[0] / "results.json").is_file()


def test_child_environment_is_a_copy_with_the_library_first():
    base = {"PATH": "/bin", "PYTHONPATH": "/x"}
    env = modulejobs.child_environment(base, {"nnUNet_n_proc_DA": "0", "PATH": None})
    assert base == {"PATH": "/bin", "PYTHONPATH": "/x"}
    assert env["PYTHONPATH"].split(":")[0] == str(modulejobs.library_parent()) and env["PYTHONPATH"].endswith("/x")
    assert env["PYTHONUNBUFFERED"] == "1" and env["nnUNet_n_proc_DA"] == "0" and "PATH" not in env


# -- background calls ----------------------------------------------------------------------------


def test_a_background_call_never_blocks_the_caller():
    release = threading.Event()
    caller = threading.current_thread().name

    def slow():
        release.wait(10)
        return threading.current_thread().name

    started = time.monotonic()
    call = tasks.BackgroundCall("connection", slow)
    assert time.monotonic() - started < 0.5 and not call.done()
    release.set()
    deadline = time.monotonic() + 10
    while not call.done() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert call.result() != caller and call.result().startswith("autonnunet-connection")


def test_test_connection_against_a_real_server(tmp_path):
    """A real HTTP server on 127.0.0.1 answering health and whoami as the runner does."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            if self.path.endswith("/health"):
                body = {"status": "ok", "version": "0.1.0"}
            elif self.headers.get("Authorization") == "Bearer secret":
                body = {"user": "alice"}
            else:
                self.send_response(401)
                self.end_headers()
                return
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        call = tasks.BackgroundCall("connection", tasks.test_connection, url, "secret")
        deadline = time.monotonic() + 30
        while not call.done() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert "alice" in call.result()
    finally:
        server.shutdown()


# -- what the panel shows ------------------------------------------------------------------------


def test_panel_texts():
    assert widget.model_folder_text(Path()) == "" and widget.model_folder_text(None) == ""
    assert widget.model_folder_text(Path("/m/model")) == "/m/model" and not widget.is_model_folder_set(".")
    assert widget.channel_names(" T1, FLAIR ,") == ["T1", "FLAIR"] and widget.channel_names("") == ["Image"]
    assert widget.case_columns(["T1", "FLAIR"]) == ["Case", "Segmentation", "T1", "FLAIR"]
    assert widget.DOCUMENTATION_URL in widget.HELP_TEXT and "plain text" in widget.TOKEN_STORAGE_NOTE
    assert widget.job_end_text("search", "cancelled").endswith("use Resume to continue.")
    assert widget.job_end_text("predict", "failed", "exit code 2") == "Predict failed: exit code 2"
    assert widget.summary_from_log("=== start ===\nspacing 1 1 1\n") == "spacing 1 1 1"


def test_a_restarted_module_finds_its_local_job_again_from_the_record(tmp_path):
    """The record kept in Slicer's settings is enough: a new board re-attaches to the job folder
    and its first poll replays the job's log and events (here a fingerprint summary that ends at
    once: the folder holds no dataset)."""
    job, context = modulejobs.start_fingerprint(tmp_path, summary_only=True, python=sys.executable)
    board = modulejobs.JobBoard()
    entry = board.add("fingerprint", job, context)
    record = modulejobs.job_record(entry)
    assert record == {"kind": "fingerprint", "work_dir": str(tmp_path.resolve()), "remote": False,
                      "job_dir": str(job.job_dir)}
    json.dumps(record)  # what QSettings stores
    job.wait(timeout=120)  # Slicer was closed meanwhile; the job ended on its own

    restarted = modulejobs.JobBoard()
    lines: list = []
    records = modulejobs.parse_job_records(json.dumps([record, {"kind": "search", "remote": False,
                                                                "job_dir": str(tmp_path / "gone"), "work_dir": "."}]))
    modulejobs.reattach_all(restarted, records, "", background=None, log=lines.append)
    assert list(restarted.jobs) == ["fingerprint"] and lines == [f"Watching the fingerprint in {job.job_dir} again."]
    again = restarted.get("fingerprint")
    restarted.wait("fingerprint", timeout=60, interval=0.1)
    assert again.state == JobState.FAILED and "dataset" in again.log.lower()
    assert again.context.work_dir == tmp_path.resolve()
    assert modulejobs.job_record(again) is None  # ended: nothing left to find again
    assert modulejobs.reattach_local({**record, "job_dir": str(tmp_path / "gone")}) is None
    assert modulejobs.parse_job_records("garbage") == [] and modulejobs.parse_job_records('[{"x": 1}]') == []


class StoppableJob(FakeJob):
    def __init__(self):
        super().__init__()
        self.stopped = False
        self.closed = False

    def stop(self, grace=5.0):
        self.stopped = True
        return True

    def close(self):
        self.closed = True


@pytest.mark.parametrize("keep", [True, False])
def test_quitting_keeps_or_stops_local_jobs_and_always_stops_a_prediction(tmp_path, keep):
    board = modulejobs.JobBoard()
    jobs = {kind: StoppableJob() for kind in ("search", "predict", "fingerprint")}
    for kind, job in jobs.items():
        board.add(kind, job, modulejobs.JobContext(kind, tmp_path))
    remote = StoppableJob()
    board.jobs["remote"] = modulejobs.ModuleJob("search", remote, modulejobs.JobContext("search", tmp_path, remote=True))
    board.shutdown(keep_running=keep)
    assert jobs["predict"].stopped
    assert jobs["search"].stopped is (not keep) and jobs["fingerprint"].stopped is (not keep)
    assert remote.closed and not remote.stopped  # the runner's job goes on


def test_the_results_table_and_its_chart_points_come_from_results_json(tmp_path):
    from AutoNNUNetSlicerLib import chart
    from AutoNNUNetSlicerLib.session import ModuleSession

    root = tmp_path / "search"
    model = root / "incumbent" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    model.mkdir(parents=True)
    (model / "plans.json").write_text("{}")
    (root / "results.json").write_text(json.dumps({
        "trials": [{"trial_id": "1_rung_0", "epochs": 1, "mean_dice": 0.4, "train_seconds": 60, "state": "success"},
                   {"trial_id": "2_rung_0", "epochs": 1, "mean_dice": None, "state": "failed"},
                   {"trial_id": "1_rung_1", "epochs": 3, "mean_dice": 0.6, "train_seconds": 180, "state": "succeeded"}],
        "incumbent": "1_rung_1", "incumbent_model_dir": str(model)}))
    session = ModuleSession()
    rows = session.trialRows(root)
    assert [(r.trial, r.state) for r in rows] == [("1_rung_0", "succeeded"), ("2_rung_0", "failed"),
                                                  ("1_rung_1", "succeeded")]
    assert widget.trial_cells(rows[2])[:6] == ["1_rung_1", "3", "0.6000", "3m 00s", "yes", "yes"]
    data = chart.chart_data(session.trialPoints(rows))
    assert data.trial_minutes == [1.0, 3.0] and data.front_trials == ["1_rung_0", "1_rung_1"]
    assert session.incumbentModelDir(root) == model
    assert session.trialRows(tmp_path / "nothing") == []


def test_the_cases_table_is_kept_with_the_scene_by_node_ids():
    from AutoNNUNetSlicerLib.logic import SceneCase

    class Node:
        def __init__(self, node_id):
            self.node_id = node_id

        def GetID(self):  # noqa: N802 - Slicer's spelling
            return self.node_id

    cases = [SceneCase("liver_01", Node("vtkMRMLSegmentationNode4"), [Node("vtkMRMLScalarVolumeNode1"), None]),
             SceneCase("case2", None, [])]
    rows = widget.parse_cases_record(widget.cases_record(cases))
    assert rows == [{"case": "liver_01", "segmentation": "vtkMRMLSegmentationNode4",
                     "volumes": ["vtkMRMLScalarVolumeNode1", None]},
                    {"case": "case2", "segmentation": None, "volumes": []}]
    assert widget.parse_cases_record("not json") == [] and widget.parse_cases_record('{"a": 1}') == []
    assert widget.parse_class_aliases('{"Tumour": "Tumor"}') == {"Tumour": "Tumor"}
    assert widget.parse_class_aliases("[1]") == {} and widget.parse_class_aliases("") == {}


def test_runner_url_history_is_newest_first_and_bounded():
    history = widget.url_history("[]", "https://gpu1:8000")
    history = widget.url_history(json.dumps(history), "https://gpu2:8000")
    assert widget.url_history(json.dumps(history), " https://gpu1:8000 ") == ["https://gpu1:8000", "https://gpu2:8000"]
    many = json.dumps([f"https://h{i}" for i in range(20)])
    assert len(widget.url_history(many, "https://new")) == 10 and widget.url_history("garbage") == []


def test_an_imported_model_is_found_below_its_destination(tmp_path):
    model = tmp_path / "model" / "Dataset004_Hippocampus" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    model.mkdir(parents=True)
    (model / "plans.json").write_text("{}")
    assert modulejobs.imported_model_dir(tmp_path / "model") == model
    assert modulejobs.imported_model_dir(tmp_path / "empty") is None
    job, context = modulejobs.start_model_import(tmp_path, tmp_path / "missing.zip", dest=tmp_path / "into",
                                                 python=sys.executable)
    assert context.model_dir == (tmp_path / "into").resolve() and context.kind == "model"
    ended = job.wait(timeout=120)  # the child refuses a missing archive with the library's message
    assert ended.state == JobState.FAILED and "missing.zip" in ended.log


def test_buttons_are_enabled_only_when_their_inputs_are_there(tmp_path):
    nothing = widget.button_states(widget.PanelFacts())
    assert not any(nothing[b] for b in ("exportDatasetButton", "runAllButton", "runFingerprintButton", "startButton",
                                        "resumeButton", "stopButton", "segmentButton", "exportModelButton"))
    assert nothing["importModelButton"]
    exported = widget.PanelFacts(cases=6, dataset=True)
    assert widget.button_states(exported)["runFingerprintButton"] and not widget.button_states(exported)["startButton"]
    assert widget.button_states(widget.PanelFacts(cases=6, dataset=True, remote=True))["startButton"]  # the runner plans
    planned = widget.PanelFacts(cases=6, dataset=True, planned=True, search=True, model=True)
    assert all(widget.button_states(planned)[b] for b in ("startButton", "resumeButton", "segmentButton"))
    searching = widget.button_states(widget.PanelFacts(cases=6, dataset=True, planned=True, running={"search"}))
    assert searching["stopButton"] and not searching["startButton"] and not searching["exportDatasetButton"]
    # What the folder holds, read from the files the steps write.
    assert modulejobs.workspace_state(tmp_path) == {"dataset": False, "planned": False, "search": False}
    (tmp_path / "nnUNet_raw" / "Dataset001_A").mkdir(parents=True)
    (tmp_path / "nnUNet_raw" / "Dataset001_A" / "dataset.json").write_text("{}")
    (tmp_path / "nnUNet_preprocessed" / "Dataset001_A").mkdir(parents=True)
    (tmp_path / "nnUNet_preprocessed" / "Dataset001_A" / "nnUNetPlans.json").write_text("{}")
    assert modulejobs.workspace_state(tmp_path) == {"dataset": True, "planned": True, "search": False}


def test_inference_folds_as_typed():
    assert widget.predict_folds("") is None and widget.predict_folds(" all ") is None
    assert widget.predict_folds("0, 2") == [0, 2] and widget.predict_folds("4") == [4]
    with pytest.raises(AutoNNUNetError):
        widget.predict_folds("7")


def test_a_prediction_job_carries_its_inputs_options_and_node(tmp_path):
    import numpy as np

    from AutoNNUNetLib.imaging import Geometry, Volume

    model = tmp_path / "model"
    model.mkdir()
    (model / "plans.json").write_text("{}")
    geometry = Geometry(spacing=(1.0, 1.0, 2.0), origin=(0.0, 0.0, 0.0), direction=tuple(np.eye(3).ravel()))
    channels = [Volume(np.zeros((4, 5, 6), np.float32), geometry), Volume(np.ones((4, 5, 6), np.float32), geometry)]
    node = object()
    job, context = modulejobs.start_prediction(tmp_path / "work", model, channels, device="cpu", mirroring=True,
                                               folds=[0, 2], reference_volume=node, classes={"background": 0, "A": 1},
                                               show_3d=False, python=sys.executable)
    spec = json.loads((Path(job.job_dir) / "job.json").read_text())
    argv = spec["steps"][0]["argv"]
    assert argv[:2] == ["predict", "--model"] and "--mirroring" in argv
    assert argv[argv.index("--events") + 1] == str(Path(job.job_dir) / "events.jsonl")  # the status follows it
    assert argv[argv.index("--folds") + 1:argv.index("--folds") + 3] == ["0", "2"] and "cpu" in argv
    inputs = sorted(p.name for p in (Path(job.job_dir) / "inputs").iterdir())
    assert inputs == ["case_0000.nii.gz", "case_0001.nii.gz"]  # nnU-Net naming, one file per channel
    assert Volume.read(Path(job.job_dir) / "inputs" / "case_0001.nii.gz").geometry.close_to(geometry)
    assert context.reference_volume is node and not context.show_3d and context.classes == {"background": 0, "A": 1}
    assert context.output_file == Path(job.job_dir) / "output" / "case.nii.gz"
    job.wait(timeout=120)  # the fake model fails in the child; the job ends by itself
    before = sorted((tmp_path / "work" / "jobs").iterdir())
    with pytest.raises(AutoNNUNetError):
        modulejobs.start_prediction(tmp_path / "work", model, channels, device="tpu", python=sys.executable)
    assert sorted((tmp_path / "work" / "jobs").iterdir()) == before  # refused before writing anything


def test_test_connection_to_a_closed_port_fails_within_seconds():
    import socket

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = time.monotonic()
    call = tasks.BackgroundCall("connection", tasks.test_connection, f"http://127.0.0.1:{port}", "t")
    deadline = time.monotonic() + 30
    while not call.done() and time.monotonic() < deadline:
        time.sleep(0.02)
    with pytest.raises(AutoNNUNetError):
        call.result()
    assert time.monotonic() - started < 15


def test_the_versions_check_runs_in_a_child_and_reads_back(tmp_path):
    job, context = modulejobs.start_versions_check(tmp_path, python=sys.executable)
    board = modulejobs.JobBoard()
    board.add("versions", job, context)
    entry = board.wait("versions", timeout=180, interval=0.2)
    assert entry.state == JobState.SUCCEEDED, entry.log
    text = widget.versions_from_log(entry.log)
    import importlib.metadata

    assert text.startswith(f"torch {importlib.metadata.version('torch')} (")  # with what it runs on
    assert f"nnunetv2 {importlib.metadata.version('nnunetv2')}" in text
    assert widget.versions_from_log('AUTONNUNET_VERSIONS {"torch": "2.6.0", "cuda": ["A100"], "nnunetv2": "2.8.1"}') \
        == "torch 2.6.0 (CUDA: A100), nnunetv2 2.8.1, NePS missing"
    assert "Could not" in widget.versions_from_log("nothing here")


def test_a_second_job_of_a_kind_is_refused_before_it_starts(tmp_path):
    from AutoNNUNetSlicerLib.session import ModuleSession

    session = ModuleSession()
    session.board.add("fingerprint", FakeJob(), modulejobs.JobContext("fingerprint", tmp_path))
    with pytest.raises(RuntimeError, match="already running"):
        session.startFingerprint(tmp_path)
    assert not (tmp_path / "jobs").exists()  # nothing was started or written


def test_upgrade_stays_within_the_pins_and_keeps_torch_and_slicers_builds():
    versions = {"torch": "2.6.0", "numpy": "1.26.4", "SimpleITK": "2.4.0", "nnunetv2": "2.8.1",
                "neural-pipeline-search": "0.17.0", "requests": "2.31.0", "filelock": "3.12.0"}

    class Upgrading(FakeInstaller):
        def pip_install(self, arguments):
            split = arguments.index("--constraint")
            self.calls.append(("pip", arguments[:split], Path(arguments[split + 1]).read_text()))
            self.versions["requests"] = "2.32.3"

    installer = Upgrading(versions)
    result = install.upgrade_dependencies(installer, REQUIREMENTS, versions.get, loaded_modules=["requests"])
    _, arguments, constraints = installer.calls[0]
    assert "--upgrade" in arguments and "nnunetv2>=2.8.1,<2.9" in arguments
    assert not any(a.startswith(("torch", "numpy", "SimpleITK")) for a in arguments)
    assert {"torch==2.6.0", "numpy==1.26.4", "SimpleITK==2.4.0"} <= set(constraints.split())
    assert result.installed == ["requests 2.31.0 -> 2.32.3"] and result.needs_restart
    again = install.upgrade_dependencies(Upgrading(versions), REQUIREMENTS, versions.get, loaded_modules=[])
    assert not again.installed and "up to date" in again.message


# -- model selection from the panel ----------------------------------------------------------------


def test_the_panels_selection_runs_on_the_working_folders_search(tmp_path):
    """Select model: the request from the panel's values, a real local job on the working folder
    (preprocess the other configurations, finalize, select); its children parse their flags and
    stop with the library's own messages, since this folder holds no dataset and no trials."""
    from AutoNNUNetLib.jobs.params import SelectParams

    values = {**PANEL, "selectEpochs": 50, "selectTop": 1}
    params = parameters.select_params(values)
    assert (params.epochs, params.iterations_per_epoch, params.device, params.folds) == (50, None, "cpu", "all")
    assert params.configurations == ["2d", "3d_lowres"] and params.top == 1  # nnU-Net's candidates
    assert parameters.select_params({**values, "selectTop": 3}).top == 3
    with pytest.raises(ValueError, match="top"):
        parameters.select_params({**values, "selectTop": 21})
    assert parameters.select_params({**values, "iterationsPerEpoch": 25}).iterations_per_epoch == 25
    with pytest.raises(ValueError, match="epochs"):
        parameters.select_params({**values, "selectEpochs": 0})
    with pytest.raises(ValueError, match="holds no search yet"):
        modulejobs.start_selection(tmp_path, params, python=sys.executable)
    assert not (tmp_path / "jobs").exists()  # refused before any job folder

    (modulejobs.search_root(tmp_path) / "neps").mkdir(parents=True)
    board = modulejobs.JobBoard()
    job, context = modulejobs.start_selection(tmp_path, params, python=sys.executable)
    assert context.model_dir == tmp_path.resolve() / "selection" and context.search_root == tmp_path.resolve() / "search"
    spec = json.loads((Path(job.job_dir) / "job.json").read_text())
    assert [step["name"] for step in spec["steps"]] == ["preprocess", "finalize", "select"]
    entry = board.add("select", job, context)
    assert modulejobs.job_record(entry)["kind"] == "select"  # found again after a restart
    board.wait("select", timeout=120, interval=0.1)
    assert entry.state == JobState.FAILED and "usage:" not in entry.log and "Traceback" not in entry.log
    assert "dataset" in entry.log.lower()  # the preprocess step's own message

    fullres_only = SelectParams(epochs=1, configurations=[], device="cpu")
    job, context = modulejobs.start_selection(tmp_path, fullres_only, python=sys.executable)
    board.add("select", job, context)
    entry = board.wait("select", timeout=120, interval=0.1)
    assert entry.state == JobState.FAILED and "usage:" not in entry.log and "Traceback" not in entry.log
    assert "search" in entry.message.lower() or "search" in entry.log.lower()
    reattached = modulejobs.reattach_local({"kind": "select", "work_dir": str(tmp_path), "job_dir": str(job.job_dir)})
    assert reattached[1].model_dir == tmp_path / "selection"


def test_the_select_button_needs_a_search_here_or_on_the_runner():
    states = widget.button_states
    assert not states(widget.PanelFacts(cases=6, planned=True))["selectModelButton"]
    assert states(widget.PanelFacts(cases=6, planned=True, search=True))["selectModelButton"]
    assert not states(widget.PanelFacts(search=True, remote=True))["selectModelButton"]  # the runner's search counts
    assert states(widget.PanelFacts(remote=True, remote_search=True))["selectModelButton"]
    selecting = states(widget.PanelFacts(cases=6, dataset=True, planned=True, search=True, running={"select"}))
    # A new search would rename the folder the selection reads: it waits, and Stop stops the selection.
    assert not selecting["selectModelButton"] and not selecting["startButton"] and selecting["stopButton"]
    assert widget.job_end_text("select", "succeeded") == "Selection finished: it is the model folder now."
