"""Every NePS 0.17 internal the search relies on, in one file.

NePS's public API (``neps.run``, ``neps.PipelineSpace`` and its parameter types) is used where it
belongs (worker.py, space.py). What is *not* public - its on-disk state, trial objects, bracket
layouts, PriorBand's sampler, the space resolver - is reached only through the functions here,
so a NePS upgrade is checked against this file alone. Trials leave this module as plain
:class:`TrialView` records.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from .layout import neps_root

#: NePS's trial states -> ours (states.TrialState values). NePS says "success" where we say
#: "succeeded"; "submitted" is waiting like "pending"; "corrupted" is a crash.
NEPS_STATES = {"pending": "pending", "submitted": "pending", "evaluating": "evaluating", "success": "succeeded",
               "failed": "failed", "crashed": "crashed", "corrupted": "crashed"}


@dataclass
class TrialView:
    """A NePS trial as plain data."""

    trial_id: str
    state: str  # a TrialState value (mapped from NePS's)
    neps_state: str
    worker: Optional[str]
    location: Path
    time_started: Optional[float]
    time_end: Optional[float]
    config: dict[str, Any]
    previous_id: Optional[str] = None
    reported: bool = False
    objective: Optional[float] = None
    cost: Optional[float] = None
    extra: dict[str, Any] = field(default_factory=dict)
    error: Optional[str] = None


def open_state(root: Path) -> Any:
    """The NePS state of the search at ``root`` (it must exist)."""
    from neps.state import NePSState

    return NePSState.create_or_load(path=neps_root(root), load_only=True)


def _raw_trials(state: Any) -> dict[str, Any]:
    """All trials of a NePS state.

    NePS 0.17 deletes its trial cache when a trial is reset, and the next read rebuilds the cache
    but returns no trials; read again in that case (and so leave a warm cache for NePS itself).
    """
    trials = state.lock_and_read_trials()
    if not trials and any((state.path / "configs").glob("config_*")):
        trials = state.lock_and_read_trials()
    return trials


def _view(trial_id: str, trial: Any) -> TrialView:
    meta = trial.metadata
    report = trial.report
    neps_state = str(meta.state.value if hasattr(meta.state, "value") else meta.state)
    view = TrialView(
        trial_id=trial_id, state=NEPS_STATES.get(neps_state, neps_state), neps_state=neps_state,
        worker=meta.evaluating_worker_id, location=Path(meta.location), time_started=meta.time_started,
        time_end=meta.time_end, config=dict(trial.config), previous_id=meta.previous_trial_id,
    )
    if report is not None:
        view.reported = True
        view.objective = _finite(report.objective_to_minimize)
        view.cost = _finite(report.cost)
        view.extra = dict(report.extra or {})
        if report.err is not None:
            view.error = f"{type(report.err).__name__}: {report.err}"
    return view


def _finite(value: Any) -> Optional[float]:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def read_trials(root: Path) -> dict[str, TrialView]:
    """Every trial of the search at ``root`` (empty before NePS created its state)."""
    if not (neps_root(root) / "optimizer_info.yaml").is_file():
        return {}
    return {trial_id: _view(trial_id, trial) for trial_id, trial in _raw_trials(open_state(root)).items()}


def search_space(root: Path) -> Any:
    """The space NePS stored for the search at ``root``."""
    return open_state(root).lock_and_get_search_space()


def reset_trial(root: Path, trial_id: str) -> None:
    """Return a trial to pending (NePS retrains it next)."""
    state = open_state(root)
    state.lock_and_reset_trial_by_id(trial_id)
    _raw_trials(state)  # rebuild NePS's trial cache now (see _raw_trials)


def fail_trial(root: Path, trial_id: str, error: str, now: float) -> None:
    """Record a trial as failed with ``error`` (it is not retried)."""
    state = open_state(root)
    trial = _raw_trials(state)[trial_id]
    worker = str(trial.metadata.evaluating_worker_id)
    report = trial.set_complete(
        report_as="failed", time_end=now, objective_to_minimize=None, cost=None, learning_curve=None,
        err=RuntimeError(error), tb=None, extra={"error": error}, evaluation_duration=None,
    )
    state.lock_and_report_trial_evaluation(trial, report, worker_id=worker)


def clear_running_mark() -> None:
    """Forget NePS's "a trial is running in this process" mark.

    NePS sets it without try/finally; unwinding a stopped trial through it leaves it set and the
    next ``neps.run`` in this process would refuse to start.
    """
    import neps.runtime

    neps.runtime._CURRENTLY_RUNNING_TRIAL_IN_PROCESS = None


# -- brackets and optimizers ----------------------------------------------------------------


def hyperband_layout(min_epochs: int, max_epochs: int, eta: int) -> tuple[dict[int, int], list[dict[int, int]]]:
    """NePS's Hyperband rungs (rung -> epochs) and bracket layouts (rung -> trials), in NePS's order."""
    from neps.optimizers.utils.brackets import calculate_hb_bracket_layouts

    rungs, layouts = calculate_hb_bracket_layouts((min_epochs, max_epochs), eta)
    return ({int(r): int(f) for r, f in rungs.items()},
            [{int(r): int(n) for r, n in layout.items()} for layout in layouts])


def random_search_optimizer() -> Callable:
    """NePS's random search at full fidelity (the baseline optimizer)."""
    import functools

    from neps.optimizers.algorithms import neps_random_search

    return functools.partial(neps_random_search, ignore_fidelity="highest_fidelity")


def priorband(space: Any, *, eta: int, sample_prior_first: Any, inc_ratio: float, base: str) -> Any:
    """NePS's PriorBand for a ``PipelineSpace`` (``neps_priorband``; plain ``priorband`` fails on it)."""
    from neps.optimizers.algorithms import neps_priorband

    return neps_priorband(space, eta=eta, sample_prior_first=sample_prior_first, inc_ratio=inc_ratio, base=base)


def sampled_config(config_id: str, config: Mapping[str, Any], previous_config_id: Optional[str]) -> Any:
    """A NePS ``SampledConfig`` (what an optimizer returns)."""
    from neps.optimizers.optimizer import SampledConfig

    return SampledConfig(id=config_id, config=dict(config), previous_config_id=previous_config_id)


_SAMPLER_CLASS: Optional[type] = None


def incumbent_sampler(sampler: Any, rewrite: Callable[[Any], Any]) -> Any:
    """A copy of PriorBand's sampler that mutates the incumbent of ``rewrite(table)`` instead."""
    from dataclasses import dataclass as _dataclass, fields

    from neps.optimizers.neps_priorband import NePSPriorBandSampler

    global _SAMPLER_CLASS
    if _SAMPLER_CLASS is None:
        @_dataclass
        class IncumbentSampler(NePSPriorBandSampler):
            """PriorBand's sampler fed a table whose argmin is the regularized incumbent."""

            rewrite: Optional[Callable[[Any], Any]] = None

            def sample_config(self, table, rung):  # type: ignore[override]
                return super().sample_config(self.rewrite(table) if self.rewrite else table, rung)

        _SAMPLER_CLASS = IncumbentSampler
    if not isinstance(sampler, NePSPriorBandSampler):
        raise TypeError(f"unexpected PriorBand sampler {type(sampler).__name__} (NePS changed?)")
    return _SAMPLER_CLASS(**{f.name: getattr(sampler, f.name) for f in fields(sampler)}, rewrite=rewrite)


def trials_table(trials: Mapping[str, Any]) -> Any:
    """NePS's bracket table of trials (index (config id, rung), column ``perf``)."""
    from neps.optimizers.bracket_optimizer import trials_to_table

    return trials_to_table(trials)


# -- resolving configurations -----------------------------------------------------------------


def resolve_config(space: Any, neps_config: Mapping[str, Any]) -> dict[str, Any]:
    """A stored NePS config resolved against ``space`` into the pipeline's attribute values."""
    import neps
    from neps.space.neps_spaces.neps_space import NepsCompatConverter, convert_operation_to_callable, resolve
    from neps.space.neps_spaces.sampling import OnlyPredefinedValuesSampler

    data = NepsCompatConverter.from_neps_config(config=neps_config)
    resolved, _ = resolve(
        pipeline=space,
        domain_sampler=OnlyPredefinedValuesSampler(predefined_samplings=data.predefined_samplings),
        environment_values=data.environment_values,
    )
    values = dict(resolved.get_attrs())
    for name, value in values.items():
        if isinstance(value, neps.Operation):
            values[name] = convert_operation_to_callable(value)
    return values


def prior_sample_config(space: Any, environment: Mapping[str, Any]) -> dict[str, Any]:
    """The NePS config (``SAMPLING__``/``ENVIRONMENT__`` keys) of ``space``'s prior sample."""
    from neps.space.neps_spaces.neps_space import NepsCompatConverter, resolve
    from neps.space.neps_spaces.sampling import PriorOrFallbackSampler, RandomSampler

    _, context = resolve(
        pipeline=space,
        domain_sampler=PriorOrFallbackSampler(fallback_sampler=RandomSampler({}), always_use_prior=True),
        environment_values=dict(environment),
    )
    return dict(NepsCompatConverter.to_neps_config(context))
