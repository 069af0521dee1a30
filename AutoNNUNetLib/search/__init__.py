"""The search: (Regularized) PriorBand over nnU-Net trainings with NePS, fidelity = epochs.

The package reads as the pipeline of one search:

- ``settings``: :class:`SearchSettings`, the one request record (validated at creation).
- ``space``: the NePS search spaces (hpo, hpo_nas, hpo_hnas) and the mapping to ``TrialConfig``.
- ``priorband``: Regularized PriorBand (runtime-aware promotion and incumbent, portfolio warm start).
- ``neps_adapter``: every NePS internal the search touches, in one file.
- ``budget``: a budget in units of F (one default training), its plan and the estimate.
- ``portfolio`` (+ ``reference_incumbents``): warm-start candidates from the reference.
- ``stop``, ``records``, ``trial``, ``worker``: stopping and recovery; a trial's record; one
  trial (never the same training twice); NePS workers and their GPUs.
- ``results``: ``ROOT/results.json`` (writing, and reading for the CLI, server and Slicer).
- ``run``: :func:`run_search`; ``final``: the final model at F and the confirmation fold.
- ``report``, ``cli``: the views.  ``layout``: the names inside a search root.

Names are imported lazily, so ``import AutoNNUNetLib.search`` stays cheap (no NePS, no torch).
"""

from __future__ import annotations

from ..lazy import lazy_exports

#: Public name -> the submodule that defines it.
_EXPORTS = {
    "SearchSettings": "settings", "SearchError": "settings", "PROFILES": "settings", "IDENTITY_FIELDS": "settings",
    "RESULTS_NAME": "layout", "EVENTS_NAME": "layout", "SETTINGS_NAME": "layout", "neps_root": "layout",
    "SearchStopped": "stop", "recover_abandoned_trials": "stop",
    "TrialRecord": "records", "split_trial_id": "records",
    "SearchResults": "results", "load_results": "results", "collect_results": "results",
    "update_results": "results", "read_results": "results", "TrialRow": "results",
    "trial_rows_from_results": "results", "incumbent_model_dir": "results",
    "run_search": "run", "retrain_incumbent": "run", "prepare_workspace": "run", "load_settings": "run",
    "rung_fidelities": "run", "make_space": "run", "make_optimizer": "run", "estimate_search": "run",
    "run_worker": "worker", "worker_overlay": "worker",
    "BudgetPlan": "budget", "plan_budget": "budget", "Estimate": "budget", "Probe": "budget",
    "finish_search": "final", "confirm_search": "final",
    "portfolio": "portfolio",
    "ProgressBar": "cli", "add_commands": "cli",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
