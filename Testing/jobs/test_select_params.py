"""The select job kind's request record: validation, JSON and argv round trips, the recipe's steps."""

from __future__ import annotations

import pytest

from AutoNNUNetLib.errors import UserInputError
from AutoNNUNetLib.jobs import PARAMS_TYPES, RequestError, SelectParams, kind_of, local_spec, params_from_dict


@pytest.mark.parametrize("values, field", [
    ({"epochs": 0}, "epochs"),
    ({"epochs": True}, "epochs"),
    ({"epochs": 10 ** 30}, "epochs"),
    ({"top": -1}, "top"),
    ({"top": 21}, "top"),
    ({"iterations_per_epoch": 0}, "iterations_per_epoch"),
    ({"seed": 2 ** 32}, "seed"),
    ({"configurations": ["3d_cascade_fullres"]}, "configurations"),
    ({"configurations": "2d"}, "configurations"),
    ({"folds": [5]}, "folds"),
    ({"device": "tpu"}, "device"),
    ({"tta": 1}, "tta"),
    ({"ensembles": "no"}, "ensembles"),
    ({"search_job_id": ""}, "search_job_id"),
    ({"search_job_id": 7}, "search_job_id"),
])
def test_select_requests_that_cannot_run_are_refused(values, field):
    with pytest.raises(RequestError, match=field) as caught:
        params_from_dict("select", {"search_job_id": "j1", **values})
    assert isinstance(caught.value, UserInputError)


def test_select_request_round_trips_json_and_is_a_job_kind():
    params = SelectParams(search_job_id="j1", epochs=5, iterations_per_epoch=3, top=2, configurations=["2d"],
                          folds=[0, 2], seed=4, device="cpu", tta=True, ensembles=False)
    again = SelectParams.from_json(params.to_json())
    assert again == params and again.remote
    assert PARAMS_TYPES["select"] is SelectParams and kind_of(params) == "select"
    assert SelectParams().configurations == ["2d", "3d_lowres"] and SelectParams().folds == "all"
    assert not SelectParams().remote
    assert SelectParams(configurations=["2d", "2d"]).configurations == ["2d"]
    with pytest.raises(RequestError, match="unknown SelectParams field"):
        SelectParams.from_dict({"epochs": 3, "epoch": 4})


@pytest.mark.parametrize("params", [
    SelectParams(epochs=5, iterations_per_epoch=3, top=2, configurations=["2d"], folds=[0, 2], seed=4,
                 device="cpu", tta=True, ensembles=False),
    SelectParams(epochs=7, top=0, configurations=[]),
    SelectParams(),
])
def test_finalize_argv_parses_back_into_the_same_request(params):
    """What the recipe runs is what the record says: finalize's own parser reads it back."""
    from AutoNNUNetLib.cli import build_parser

    argv = params.to_argv("/ws", "/search", "/sel")
    args = build_parser("finalize").parse_args(argv)
    assert (args.workdir, args.search, args.output) == ("/ws", "/search", "/sel")
    assert SelectParams.from_args(args) == params
    select = build_parser("select").parse_args(params.select_argv("/sel"))
    assert str(select.root) == "/sel" and select.no_ensembles == (not params.ensembles)


def test_finalize_flags_are_checked_by_the_record(tmp_path, capsys):
    from AutoNNUNetLib import cli

    code = cli.main(["finalize", "--workdir", str(tmp_path), "--search", str(tmp_path), "--epochs", "3",
                     "--seed", str(2 ** 32)])
    err = capsys.readouterr().err
    assert code == 2 and "seed" in err and "Traceback" not in err
    code = cli.main(["finalize", "--workdir", str(tmp_path), "--search", str(tmp_path), "--epochs", "3",
                     "--configurations", "3d_cascade_fullres"])
    assert code == 2 and "configurations" in capsys.readouterr().err


def test_local_select_recipe_runs_finalize_then_select(tmp_path):
    spec = local_spec(SelectParams(epochs=3, top=0, configurations=[], folds=[0], device="cpu"), tmp_path / "job",
                      workspace=tmp_path / "ws", root=tmp_path / "search", output=tmp_path / "sel")
    assert [s.name for s in spec.steps] == ["finalize", "select"]
    finalize, select = spec.steps
    joined = " ".join(finalize.argv)
    assert finalize.argv[0] == "finalize" and "--epochs 3" in joined and "--folds 0" in joined
    assert "--configurations none" in joined and "--top 0" in joined and "--device cpu" in joined
    assert finalize.argv[finalize.argv.index("--search") + 1] == str((tmp_path / "search").resolve())
    assert finalize.argv[finalize.argv.index("--events") + 1] == str((tmp_path / "job" / "events.jsonl").resolve())
    assert select.argv == ["select", str((tmp_path / "sel").resolve())]
    with pytest.raises(RequestError, match="needs root"):
        local_spec(SelectParams(), tmp_path / "j2", workspace=tmp_path / "ws", output=tmp_path / "sel")
