"""The search: (Regularized) PriorBand over nnU-Net trainings with NePS, fidelity = epochs.

The package reads as the pipeline of one search:

- ``settings``: :class:`SearchSettings`, the one request record (validated at creation).
- ``space``: the NePS search spaces (hpo, hpo_nas, hpo_hnas) and the mapping to ``TrialConfig``.
- ``priorband``: Regularized PriorBand (runtime-aware promotion and incumbent).
- ``neps_adapter``: every NePS internal the search touches, in one file.
- ``budget``, ``portfolio``: a budget in units of one default training; warm-start candidates.
- ``stop``, ``trial``, ``worker``: stopping and recovery; one trial; one NePS worker.
- ``results``: ``ROOT/results.json`` (writing and reading, also for the Slicer module).
- ``run``: :func:`run_search`, final training and confirmation.  ``report``, ``cli``: the views.

Names are imported lazily, so ``import AutoNNUNetLib.search`` stays cheap (no NePS, no torch).
"""

from __future__ import annotations

import importlib
from typing import Any

#: Public name -> the submodule that defines it.
_EXPORTS = {
    "SearchSettings": "settings", "SearchError": "settings", "PROFILES": "settings", "IDENTITY_FIELDS": "settings",
    "RESULTS_NAME": "run", "EVENTS_NAME": "run", "SETTINGS_NAME": "run", "SearchStopped": "run",
    "SearchResults": "run", "TrialRecord": "run", "load_results": "run", "collect_results": "run",
    "update_results": "run", "neps_root": "run", "run_search": "run", "run_worker": "run",
    "retrain_incumbent": "run", "prepare_workspace": "run", "load_settings": "run", "rung_fidelities": "run",
    "recover_abandoned_trials": "run", "split_trial_id": "run", "ProgressBar": "run", "make_space": "run",
    "make_optimizer": "run", "_read_trials": "run", "add_commands": "run",
}

__all__ = sorted(name for name in _EXPORTS if not name.startswith("_"))


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
