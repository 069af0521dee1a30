"""The search request record, the CLI's reading of it, and the workers' GPUs (no training here)."""

from __future__ import annotations

import json
import math

import pytest

from AutoNNUNetLib.errors import AutoNNUNetError
from AutoNNUNetLib.search.settings import SearchError, SearchSettings


def _full() -> SearchSettings:
    """A record with every field away from its default."""
    return SearchSettings(
        space="hpo_nas", profile="quick", min_epochs=2, max_epochs=20, eta=2, prior_confidence="high",
        prior_first=True, folds=[0, 2], iterations_per_epoch=25, max_validation_cases=3, runtime_weight=0.5,
        optimizer="priorband", configuration="3d_fullres", configurations=["2d", "3d_fullres"], seed=7, portfolio=False, budget=3.5,
        total_epochs=500, max_trials=40, wall_time=3600.5, confirm_fold=1, confirm_seeds=3, workers=2,
        launcher="process", executor="slurm", slurm={"slurm_partition": "gpu", "mem_gb": 32}, device="cuda:1",
        gpus=["2", "3"], retries=2, stale_after=120.0, events="/tmp/events.jsonl", final_folds=[3, 4])


def test_round_trip_through_json_and_argv():
    settings = _full()
    assert SearchSettings.from_json(settings.to_json()) == settings
    assert SearchSettings.from_dict(json.loads(json.dumps(settings.to_dict()))) == settings
    assert SearchSettings.from_argv(settings.to_argv()) == settings
    plain = SearchSettings()
    assert SearchSettings.from_argv(plain.to_argv()) == plain == SearchSettings.from_dict(plain.to_dict())


def test_profile_fills_only_what_is_not_given():
    quick = SearchSettings.from_profile("quick", max_epochs=6)
    assert (quick.min_epochs, quick.max_epochs, quick.iterations_per_epoch, quick.max_validation_cases) == (1, 6, 3, 4)
    default = SearchSettings()
    assert (default.min_epochs, default.max_epochs, default.eta, default.iterations_per_epoch) == (10, 1000, 3, 250)
    # a budget in F switches the default-first training and the portfolio on, unless told otherwise
    assert SearchSettings(budget=4).prior_first and SearchSettings(budget=4).portfolio
    assert not SearchSettings(budget=4, portfolio=False).portfolio and not SearchSettings().prior_first


@pytest.mark.parametrize("field, value, words", [
    ("runtime_weight", math.inf, "finite"),
    ("runtime_weight", math.nan, "finite"),
    ("runtime_weight", -1.0, ">= 0"),
    ("budget", 0.0, "> 0"),
    ("budget", math.inf, "finite"),
    ("wall_time", -5.0, "> 0"),
    ("max_epochs", 10 ** 30, "between"),
    ("max_epochs", True, "whole number"),
    ("workers", 0, "between"),
    ("workers", 2.0, "whole number"),
    ("total_epochs", -3, "between"),
    ("seed", 2 ** 32, "between"),
    ("seed", -1, "between"),
    ("eta", 1, "between"),
    ("space", "hpo_everything", "unknown value"),
    ("optimizer", "bohb", "unknown value"),
    ("launcher", "ssh", "unknown value"),
    ("device", "tpu", "device must be"),
    ("prior_first", "yes", "true or false"),
    ("folds", [7], "0..4"),
    ("folds", "everything", "folds"),
    ("confirm_fold", 0, "search fold"),
    ("profile", "turbo", "unknown profile"),
    ("configuration", "3d_fulres", "unknown nnU-Net configuration '3d_fulres'"),
    ("configuration", "3d_cascade_fullres", "unknown nnU-Net configuration"),
    ("configurations", ["2d", "4d"], "unknown nnU-Net configuration '4d'"),
    ("configurations", "2d", "expected a list"),
    ("configurations", [], "at least one"),
    ("configurations", ["2d"], "prior's configuration '3d_fullres'"),
])
def test_invalid_values_are_refused_at_creation_naming_the_field(field, value, words):
    with pytest.raises(SearchError, match=words) as caught:
        SearchSettings(**{field: value})
    assert str(caught.value).startswith(f"{field}:") or field in str(caught.value)
    assert isinstance(caught.value, AutoNNUNetError)


def test_configurations_default_round_trips_and_comma_form():
    from AutoNNUNetLib.search.settings import IDENTITY_FIELDS

    plain = SearchSettings()
    assert plain.configurations == ["3d_fullres"] and "--configurations" not in plain.to_argv()
    assert SearchSettings.from_dict({**plain.to_dict(), "configurations": None}) == plain  # an older search.json
    both = SearchSettings(configurations=["2d", "3d_fullres", "2d"])
    assert both.configurations == ["2d", "3d_fullres"]  # each once, order kept
    assert both.to_argv()[-3:] == ["--configurations", "2d", "3d_fullres"]
    assert SearchSettings.from_argv(both.to_argv()) == both
    assert SearchSettings.from_argv(["--configurations", "2d,3d_fullres"]) == both
    assert SearchSettings.from_argv(["--configuration", "2d"]).configurations == ["2d"]
    lowres = SearchSettings(configuration="2d", configurations=["3d_lowres", "2d"])
    assert lowres.prior_config().configuration == "2d"
    assert SearchSettings.from_json(lowres.to_json()) == lowres
    assert "configurations" in IDENTITY_FIELDS  # a resumed search may not change what it chooses among


def test_unknown_keys_and_bad_requests_are_refused():
    with pytest.raises(SearchError, match="unknown search settings: epochz"):
        SearchSettings.from_dict({"epochz": 3})
    with pytest.raises(SearchError, match="not valid JSON"):
        SearchSettings.from_json("{")
    with pytest.raises(SearchError, match="min_epochs < max_epochs"):
        SearchSettings(min_epochs=50, max_epochs=50)


def test_request_file_then_flags(tmp_path):
    from AutoNNUNetLib.search.cli import build_parser, settings_from_args

    request = tmp_path / "request.json"
    request.write_text(_full().to_json())
    args = build_parser().parse_args(["--root", str(tmp_path / "r"), "--request", str(request), "--max-trials", "9"])
    settings = settings_from_args(args, stored=None)
    assert settings.max_trials == 9 and settings.replace(max_trials=40) == _full()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**_full().to_dict(), "runtime_weight": "inf"}))
    args = build_parser().parse_args(["--root", str(tmp_path / "r"), "--request", str(bad)])
    with pytest.raises(SearchError, match="runtime_weight"):
        settings_from_args(args, stored=None)


def test_cli_prints_a_bad_request_as_one_line(tmp_path, capsys):
    from AutoNNUNetLib.cli import main

    code = main(["search", "--workdir", str(tmp_path), "--root", str(tmp_path / "r"), "--runtime-weight", "inf"])
    err = capsys.readouterr().err
    assert code != 0 and "runtime_weight" in err and "Traceback" not in err


def test_workers_get_gpus_from_the_visible_set():
    from AutoNNUNetLib.search.worker import search_gpus, worker_overlay

    settings = SearchSettings(workers=2, device="cuda")
    environ = {"CUDA_VISIBLE_DEVICES": "2,3"}
    assert search_gpus(settings, environ) == ["2", "3"]
    assert [worker_overlay(settings, i, environ)["CUDA_VISIBLE_DEVICES"] for i in range(2)] == ["2", "3"]
    # no variable: every device torch counts; explicit ids win; a CPU search touches nothing
    assert search_gpus(settings, {}, device_count=2) == ["0", "1"]
    assert worker_overlay(settings.replace(gpus=["5"]), 1, environ)["CUDA_VISIBLE_DEVICES"] == "5"
    assert "CUDA_VISIBLE_DEVICES" not in worker_overlay(SearchSettings(workers=2, device="cpu"), 1, environ)
    # Slurm gives each job its own GPU already
    assert "CUDA_VISIBLE_DEVICES" not in worker_overlay(settings, 1, {**environ, "SLURM_JOB_ID": "1"})


def test_old_success_state_reads_as_succeeded(tmp_path):
    from AutoNNUNetLib.search.records import TrialRecord
    from AutoNNUNetLib.search.results import read_results, trial_rows_from_results
    from AutoNNUNetLib.states import TrialState

    assert TrialRecord(trial_id="1_rung_0", config_id=1, rung=0, epochs=1, state="success", config={}).state \
        == TrialState.SUCCEEDED
    (tmp_path / "results.json").write_text(json.dumps({"trials": [
        {"trial_id": "1_rung_0", "epochs": 3, "mean_dice": 0.6, "train_seconds": 30, "state": "success"},
        {"trial_id": "2_rung_0", "epochs": 3, "mean_dice": None, "train_seconds": 5, "state": "crashed"}],
        "incumbent": "1_rung_0"}))
    rows = trial_rows_from_results(read_results(tmp_path), tmp_path)
    assert [r.state for r in rows] == ["succeeded", "crashed"]
    assert rows[0].incumbent and rows[0].pareto
