"""Running a search: :func:`run_search` from a request record to a final model trained to F.

One search lives in one root directory::

    ROOT/search.json          settings of the search (resuming reads them back)
    ROOT/events.jsonl         progress events (JSON lines, see AutoNNUNetLib.events)
    ROOT/results.json         trials table, incumbents, Pareto front, budget (rewritten after each trial)
    ROOT/incumbent/<model>/   the final model's folder (nnU-Net layout, stock loaders read it)
    ROOT/final/<model>/       the incumbent continued to F (when it was found below F)
    ROOT/confirm/             incumbent and default trained to F on the confirmation fold
    ROOT/neps/                NePS's root directory (its state, locks and summary)
    ROOT/neps/configs/config_<id>_rung_<r>/   one folder per trial; ours adds <model>/ and trial.json

Order of a run: check the request, estimate the cost (a budget in F: probe, print, ``estimate``
event), run the workers (:mod:`.worker`) until a budget is spent, then the final model is trained
to F (:mod:`.final`) and, on request, confirmed on a fold the search did not use.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

from ..events import EventWriter, ProgressCallback, ProgressEvent, fanout
from ..files import atomic_write_json, read_json
from ..workspace import Workspace
from .layout import EVENTS_NAME, RESULTS_NAME, SESSION_NAME, SETTINGS_NAME, neps_root  # noqa: F401 (re-exported)
from .results import SearchResults, collect_results, update_results, write_results_field
from .settings import IDENTITY_FIELDS, SearchError, SearchSettings

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# the space and the optimizer of a search


def _planned_stages(workspace: Workspace, settings: SearchSettings) -> Any:
    """What ``hpo_hnas`` needs: the planner's stage count (per configuration when several are searched)."""
    from .space import planned_stage_count

    if settings.space != "hpo_hnas":
        return None
    plans = workspace.load_plans()
    counts = {name: planned_stage_count(plans, name) for name in settings.configurations or ()}
    return counts if len(counts) > 1 else counts[settings.configuration]


def check_configurations(settings: SearchSettings, workspace: Workspace) -> None:
    """Every searched configuration is planned and preprocessed (else ConfigurationNotPlanned)."""
    from ..config import check_planned

    check_planned(workspace.load_plans(), list(settings.configurations or ()), workspace.preprocessed_dataset)


def make_space(settings: SearchSettings, workspace: Workspace, prior: Any = None):
    from .space import build_space

    return build_space(
        settings.space,  # type: ignore[arg-type]
        min_epochs=settings.min_epochs,
        max_epochs=settings.max_epochs,
        prior_confidence=settings.prior_confidence,  # type: ignore[arg-type]
        planned_stages=_planned_stages(workspace, settings),
        prior=prior if prior is not None else settings.prior_config(),
        configurations=settings.configurations,
    )


def portfolio_configs(settings: SearchSettings, workspace: Workspace) -> list[dict[str, Any]]:
    """The warm-start candidates as NePS configs of the searched space (empty when switched off)."""
    if not settings.portfolio:
        return []
    from .portfolio import portfolio
    from .space import neps_config_from_trial

    stages = _planned_stages(workspace, settings)
    configs = []
    for config in portfolio(settings.space, workspace.require_dataset()):
        # The reference searched 3d_fullres only; its incumbents start in the prior's configuration.
        config = config.replace(configuration=settings.configuration)
        configs.append(neps_config_from_trial(settings.space, config, int(settings.min_epochs),  # type: ignore
                                              min_epochs=int(settings.min_epochs),  # type: ignore[arg-type]
                                              max_epochs=int(settings.max_epochs), planned_stages=stages,
                                              configurations=settings.configurations))
    return configs


def make_optimizer(settings: SearchSettings, workspace: Optional[Workspace] = None) -> Callable:
    """The callable NePS builds the optimizer from (``optimizer(space)``)."""
    import functools

    from . import neps_adapter

    if settings.optimizer == "random":
        return neps_adapter.random_search_optimizer()
    from .priorband import RegularizedPriorBand

    return functools.partial(
        RegularizedPriorBand,
        eta=settings.eta,
        sample_prior_first="highest_fidelity" if settings.prior_first else False,
        runtime_weight=settings.runtime_weight,
        portfolio=portfolio_configs(settings, workspace) if workspace is not None else [],
    )


def rung_fidelities(settings: SearchSettings) -> dict[int, int]:
    """Rung -> epochs (``{0: 12, 1: 37, 2: 111, 3: 333, 4: 1000}`` for 10..1000, eta 3)."""
    from .neps_adapter import hyperband_layout

    return hyperband_layout(int(settings.min_epochs), int(settings.max_epochs), int(settings.eta))[0]  # type: ignore


# ----------------------------------------------------------------------------------------------
# settings of a root


def _write_settings(root: Path, workspace: Workspace, settings: SearchSettings) -> SearchSettings:
    """Create or check ROOT/search.json; returns the settings to use."""
    path = root / SETTINGS_NAME
    stored = read_json(path)
    if stored is not None:
        old = SearchSettings.from_dict(stored["settings"])
        changed = [name for name in IDENTITY_FIELDS if getattr(old, name) != getattr(settings, name)]
        if changed:
            raise SearchError(
                f"{root} holds a search with other settings ({', '.join(changed)} differ); "
                "use another --root or the stored settings")
        if stored.get("dataset") != workspace.require_dataset():
            raise SearchError(f"{root} holds a search on {stored.get('dataset')}, not {workspace.require_dataset()}")
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, {
        "kind": "autonnunet-search", "workspace": str(workspace.root), "dataset": workspace.require_dataset(),
        "created": (stored or {}).get("created", time.time()), "settings": settings.to_dict(),
    })
    return settings


def load_settings(root: Union[str, Path]) -> tuple[SearchSettings, Workspace]:
    """The settings and workspace of an existing search root (for resuming)."""
    stored = read_json(Path(root) / SETTINGS_NAME)
    if stored is None:
        raise SearchError(f"{root} is not a search root (no {SETTINGS_NAME})")
    return SearchSettings.from_dict(stored["settings"]), Workspace(Path(stored["workspace"]), stored.get("dataset"))


# ----------------------------------------------------------------------------------------------
# the search


def estimate_search(workspace: Workspace, settings: SearchSettings, **kwargs: Any):
    """The cost estimate of a search (see :func:`AutoNNUNetLib.search.budget.estimate_search`)."""
    from .budget import estimate_search as estimate

    return estimate(workspace, settings, **kwargs)


def run_search(
    workspace: Optional[Workspace],
    root: Union[str, Path],
    settings: Optional[SearchSettings] = None,
    *,
    progress: Optional[ProgressCallback] = None,
    trainer: Optional[Callable[..., Any]] = None,
    probe: Any = None,
) -> SearchResults:
    """Run (or resume) a search at ``root`` and return its results.

    ``settings=None`` resumes with the settings stored in ``root`` (``workspace=None`` too).
    Budgets may change between runs; what is searched may not. ``progress`` receives the events
    this process emits (with workers in other processes, read ``ROOT/events.jsonl`` instead).
    ``probe`` (a :class:`~AutoNNUNetLib.search.budget.Probe`) replaces the cost probe.
    Scripts calling this with ``workers > 1`` need an ``if __name__ == "__main__"`` guard.
    """
    from .budget import plan_for
    from .final import confirm_search, finish_search
    from .stop import recover_abandoned_trials
    from .worker import run_inline, run_workers, search_gpus

    root = Path(root).expanduser().resolve()
    if settings is None or workspace is None:
        stored_settings, stored_workspace = load_settings(root)
        settings = settings or stored_settings
        workspace = workspace or stored_workspace
    plan = plan_for(settings)  # a budget too small for one trial fails here, before anything runs
    check_configurations(settings, workspace)  # an unplanned 3d_lowres fails here too
    settings = _write_settings(root, workspace, settings)
    if settings.workers > 1 and settings.launcher == "inline":
        settings = settings.replace(launcher="submitit")
    if settings.workers > 1 and settings.gpus is None:
        # Decided here, from the GPUs this process was given, and handed to every worker.
        settings = settings.replace(gpus=search_gpus(settings))

    writers: list[ProgressCallback] = [EventWriter(root / EVENTS_NAME)]
    if settings.events:
        writers.append(EventWriter(settings.events))
    emit = fanout(*writers, progress)
    session_start = time.time()
    before = collect_results(root)
    atomic_write_json(root / SESSION_NAME, {
        "start": session_start, "epochs_used_at_start": before.budget["epochs_used"],
        "trials_at_start": before.budget["trials"]})
    if plan.budget is not None and before.estimate is None:
        estimate = estimate_search(workspace, settings, probe=probe, trainer=trainer if probe is None else None)
        emit(ProgressEvent("stage", estimate.event_data()))
        write_results_field(root, estimate=estimate.to_dict())
    emit(ProgressEvent("stage", {"name": "search", "message": (
        f"{'resuming' if before.trials else 'starting'} {settings.optimizer} search ({settings.space}) in {root}"
        + (f"; budget {plan.budget:g} F = {plan.total_epochs} epochs, trials per rung "
           f"{ {plan.rungs[r]: n for r, n in plan.trials_per_rung.items()} }" if plan.budget else ""))}))
    recover_abandoned_trials(root, retries=settings.retries, stale_after=settings.stale_after, events=emit)

    outcome = "finished"
    try:
        if settings.workers == 1 and settings.launcher == "inline":
            outcome = run_inline(workspace, root, settings, session_start, trainer, progress, root / EVENTS_NAME)
        else:
            outcome = run_workers(workspace, root, settings, session_start)
    finally:
        state = "stopped" if outcome == "stopped" else "finished"
        results = update_results(root, emit=emit, session_start=session_start, state=state)

    if state == "finished" and plan.budget is not None:
        results = finish_search(root, progress=progress, trainer=trainer)
    if state == "finished" and settings.confirm_fold is not None:
        results = confirm_search(root, progress=progress, trainer=trainer)
    if state == "finished" and settings.final_folds:
        results = retrain_incumbent(root, folds=settings.final_folds, progress=progress)
    emit(ProgressEvent("finished", {
        "state": "succeeded" if state == "finished" else "cancelled",
        "message": results.to_text(), "incumbent": results.incumbent,
        "dice": results.best.mean_dice if results.best else None,
        "cost_f": results.budget.get("cost_f")}))
    return results


# ----------------------------------------------------------------------------------------------
# final training on other folds


def retrain_incumbent(
    root: Union[str, Path], *, folds: Any = (0, 1, 2, 3, 4),
    progress: Optional[ProgressCallback] = None, max_validation_cases: Optional[int] = None,
) -> SearchResults:
    """Train the incumbent configuration at ``max_epochs`` on ``folds`` into ``ROOT/final/``.

    Validation uses every validation case of each fold unless ``max_validation_cases`` is given.
    """
    from ..config import TrialConfig
    from ..files import file_lock
    from ..trainer import model_dir_name, train
    from .layout import FINAL_DIR, RESULTS_LOCK

    root = Path(root)
    settings, workspace = load_settings(root)
    results = collect_results(root, state="finished")
    best = results.best
    if best is None:
        raise SearchError(f"{root} has no successful trial to retrain")
    emit = fanout(EventWriter(root / EVENTS_NAME), progress)
    config = TrialConfig.from_dict(best.config)
    target = root / FINAL_DIR / model_dir_name(config.configuration)
    emit(ProgressEvent("stage", {"name": "train", "message": f"final training of {best.trial_id} on folds "
                                                              f"{', '.join(map(str, folds))}"}))
    result = train(workspace, config, target, folds=list(folds), epochs=settings.max_epochs,
                   max_epochs=settings.max_epochs, iterations_per_epoch=settings.iterations_per_epoch,
                   device=settings.device, seed=settings.seed, max_validation_cases=max_validation_cases,
                   progress=lambda e: emit(ProgressEvent(e.kind, {**e.data, "trial": "final"}, e.time)))
    final = {"trial_id": best.trial_id, "folds": list(folds), "epochs": int(result.epochs),
             "mean_dice": result.mean_dice, "dice_per_class": result.dice_per_class,
             "train_seconds": result.train_seconds, "model_dir": str(target)}
    with file_lock(root / RESULTS_LOCK):
        results = collect_results(root, state="finished")
        results.final = final
        atomic_write_json(root / RESULTS_NAME, results.to_dict())
    return results


# ----------------------------------------------------------------------------------------------
# one command from a source folder


def prepare_workspace(source: Union[str, Path], workdir: Union[str, Path], dataset: Optional[str] = None,
                      progress: Optional[ProgressCallback] = None,
                      configurations: Sequence[str] = ("3d_fullres",)) -> Workspace:
    """A planned workspace for ``source`` (MSD or nnU-Net raw folder), built only where missing.

    The dataset is assembled (and validated) when the workspace holds none; nnU-Net's fingerprint,
    plan and preprocessing run when there are no plans yet. A workspace that already holds a
    dataset is used as it is, so rerunning the same command resumes instead of rebuilding.
    ``configurations`` (the searched ones) are preprocessed where planned and not preprocessed yet;
    an unplanned one is left for the search's own check to name.
    """
    from ..dataset import build_dataset, detect_source
    from ..fingerprint import plan_and_preprocess, preprocess_missing

    workspace = Workspace(Path(workdir), dataset)
    if not any(workspace.raw.glob("Dataset*")):
        found = detect_source(Path(source))
        build_dataset(found, workspace, dataset_id=1, name=found.name or "AutoNNUNet", progress=progress)
    else:
        log.info("workspace %s already holds %s; using it (not rebuilt from %s)",
                 workspace.root, workspace.require_dataset(), source)
    if not workspace.plans_file.is_file():
        plan_and_preprocess(workspace, progress=progress)
    preprocess_missing(workspace, configurations, progress=progress)
    return workspace
