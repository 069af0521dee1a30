"""What the panel's settings mean in the library's terms: one request record per job kind.

The parameter node (AutoNNUNet.py, saved with the scene) holds what the user typed, in the UI's
words ("HPO + NAS", 0 = no limit, hours). :func:`search_settings` turns it into the library's one
search record, :class:`AutoNNUNetLib.search.settings.SearchSettings`, which validates every value
(inf, NaN, negative, unknown space or device are refused here, before anything starts). A local
search child reads that record from a request file; a remote search submits its fields. No
command line is assembled by hand in the module.
"""

from __future__ import annotations

from typing import Any, Mapping

#: Search spaces as shown -> as the library names them.
SEARCH_SPACES = {"HPO": "hpo", "HPO + NAS": "hpo_nas", "HPO + hierarchical NAS": "hpo_hnas"}
PROFILES = ("default", "quick")
FOLD_CHOICES = ("0", "all")
DEVICES = ("auto", "cuda", "mps", "cpu")
RUN_LOCAL = "This computer"
RUN_REMOTE = "Remote runner"

#: The parameter node's fields the search reads (names as in AutoNNUNetParameterNode).
SEARCH_FIELDS = ("searchSpace", "profile", "totalEpochs", "wallTimeHours", "maxTrials", "minEpochs", "maxEpochs",
                 "folds", "iterationsPerEpoch", "priorFirst", "runtimeWeight", "device")


#: The parameter node's fields a model selection reads.
SELECT_FIELDS = ("selectEpochs", "selectTop", "iterationsPerEpoch", "device")


def node_values(node: Any, names=SEARCH_FIELDS) -> dict[str, Any]:
    """The named fields of a parameter node (or any object with those attributes) as a dict."""
    return {name: getattr(node, name) for name in names}


def search_settings(values: Mapping[str, Any]):
    """The search record for the panel's values (``0`` budgets mean "no limit")."""
    from AutoNNUNetLib.folds import parse_folds
    from AutoNNUNetLib.search.settings import SearchSettings

    if values["searchSpace"] not in SEARCH_SPACES:
        from AutoNNUNetLib.errors import UserInputError

        raise UserInputError(f"unknown search space {values['searchSpace']!r}; choose one of {', '.join(SEARCH_SPACES)}")
    fields: dict[str, Any] = {
        "space": SEARCH_SPACES[values["searchSpace"]],
        "profile": str(values["profile"]),
        "folds": parse_folds(values["folds"]),
        "runtime_weight": float(values["runtimeWeight"]),
        "prior_first": bool(values["priorFirst"]),
        "device": str(values["device"]),
    }
    if values["profile"] != "quick":  # the quick profile brings its own tiny epoch range
        fields.update(min_epochs=int(values["minEpochs"]), max_epochs=int(values["maxEpochs"]))
    if values["totalEpochs"] > 0:
        fields["total_epochs"] = int(values["totalEpochs"])
    if values["wallTimeHours"] > 0:
        fields["wall_time"] = float(values["wallTimeHours"]) * 3600.0
    if values["maxTrials"] > 0:
        fields["max_trials"] = int(values["maxTrials"])
    if values["iterationsPerEpoch"] > 0:
        fields["iterations_per_epoch"] = int(values["iterationsPerEpoch"])
    return SearchSettings(**fields)


def search_request(settings) -> dict[str, Any]:
    """The fields of ``settings`` a job request carries (``jobs.params.SearchParams``; the server
    and the local recipe both build the search from it). The device is the job's, not the request's."""
    from AutoNNUNetLib.jobs.params import SEARCH_REQUEST_FIELDS

    values = settings.to_dict()
    return {name: values[name] for name in SEARCH_REQUEST_FIELDS if values.get(name) is not None}


def select_params(values: Mapping[str, Any]):
    """The selection request for the panel's values: the final training length, how many Pareto
    points besides the incumbent, the search's iterations per epoch (0: nnU-Net's) and device; the
    other configurations and folds as nnU-Net does (2d / 3d_lowres where planned, 5 folds)."""
    from AutoNNUNetLib.jobs.params import SelectParams

    iterations = int(values["iterationsPerEpoch"])
    return SelectParams(epochs=int(values["selectEpochs"]), top=int(values["selectTop"]),
                        iterations_per_epoch=iterations or None, device=str(values["device"]))
