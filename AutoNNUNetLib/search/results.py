"""``ROOT/results.json``: written after every trial, read by the CLI, the report, the server and Slicer.

Writing: :func:`collect_results` reads every NePS trial and our own per-trial records into a
:class:`SearchResults`; :func:`update_results` rewrites the file, refreshes ``ROOT/incumbent/``
and emits ``best``/``progress`` events. Reading: :func:`load_results` (typed) and, for table
views that must survive files of older versions, :func:`read_results` + :func:`trial_rows_from_results`.
States are :class:`~AutoNNUNetLib.states.TrialState` values; a file written before the enum
(``"success"``) reads as succeeded.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from ..events import ProgressCallback, ProgressEvent
from ..files import atomic_write_json, file_lock, read_json
from ..pareto import pareto_front
from ..states import TrialState
from . import neps_adapter
from .layout import INCUMBENT_DIR, RESULTS_LOCK, RESULTS_NAME, SESSION_NAME
from .records import TrialRecord, read_attempts, read_trial_record, split_trial_id, trial_state
from .settings import SearchError, SearchSettings


@dataclass
class SearchResults:
    """What ``ROOT/results.json`` holds."""

    root: str
    settings: dict[str, Any]
    rungs: dict[int, int]
    trials: list[TrialRecord]
    incumbent: Optional[str]  # best mean Dice at the highest fidelity reached (trial id)
    incumbent_any_fidelity: Optional[str]
    pareto_front: list[str]  # non-dominated in (1 - Dice, training time, inference time)
    budget: dict[str, Any]
    state: str = "running"
    incumbent_model_dir: Optional[str] = None
    #: The final model (trained to F): see run.finish_search / retrain_incumbent.
    final: Optional[dict[str, Any]] = None
    #: The cost estimate made before the search started (search.budget.Estimate.to_dict()).
    estimate: Optional[dict[str, Any]] = None
    #: Incumbent vs default trained to F on a fold the search did not use (--confirm-fold).
    confirmation: Optional[dict[str, Any]] = None
    updated: float = field(default_factory=time.time)

    def trial(self, trial_id: Optional[str]) -> Optional[TrialRecord]:
        return next((t for t in self.trials if t.trial_id == trial_id), None)

    @property
    def best(self) -> Optional[TrialRecord]:
        return self.trial(self.incumbent)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["rungs"] = {str(k): v for k, v in self.rungs.items()}
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SearchResults":
        values = dict(data)
        values["rungs"] = {int(k): v for k, v in data.get("rungs", {}).items()}
        values["trials"] = [TrialRecord.from_dict(t) for t in data.get("trials", [])]
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    def to_text(self) -> str:
        lines = [f"search {self.root}: {self.state}, {len(self.trials)} trials"]
        best = self.best
        if best is not None and best.mean_dice is not None:
            lines.append(f"incumbent {best.trial_id}: Dice {best.mean_dice:.4f} at {best.epochs} epochs "
                         f"({best.seconds_per_epoch or float('nan'):.1f} s/epoch)")
        final = self.final or {}
        if final.get("mean_dice") is not None:
            line = f"final model ({final.get('trial_id')}, {final.get('epochs')} epochs): Dice {final['mean_dice']:.4f}"
            if final.get("default_dice") is not None:
                line += f"; nnU-Net default at the same epochs: {final['default_dice']:.4f}"
            lines.append(line)
        cost = self.budget.get("cost_f")
        if cost is not None:
            lines.append(f"cost: {cost:.2f} F ({self.budget.get('epochs_used')} epochs"
                         + (f", {self.budget['train_hours']:.2f} h" if self.budget.get("train_hours") else "") + ")")
        for name in ("incumbent", "default"):
            entry = (self.confirmation or {}).get(name)
            if entry and entry.get("mean") is not None:
                lines.append(f"confirmation fold {self.confirmation.get('fold')}: {name} "  # type: ignore[union-attr]
                             f"{entry['mean']:.4f} +- {entry.get('spread', 0.0):.4f} ({len(entry.get('dice', []))} seeds)")
        if self.incumbent_model_dir:
            lines.append(f"model: {self.incumbent_model_dir}")
        return "\n".join(lines)


def load_results(root: Union[str, Path]) -> SearchResults:
    path = Path(root) / RESULTS_NAME
    if not path.is_file():
        raise SearchError(f"no search results in {root} (missing {RESULTS_NAME})")
    data = read_json(path)
    if not isinstance(data, dict):
        raise SearchError(f"{path} is not a results file")
    return SearchResults.from_dict(data)


def _record_from_trial(trial: neps_adapter.TrialView, space: Any) -> TrialRecord:
    from .space import config_from_neps

    config_id, rung = split_trial_id(trial.trial_id)
    own = read_trial_record(trial.location)
    try:
        config, epochs = config_from_neps(space, trial.config)
        config_dict = config.to_dict()
    except Exception:  # noqa: BLE001 - a space change must not hide the trial
        config_dict, epochs = own.get("config", {}), own.get("epochs")
    state = trial_state(trial.state)
    own_state = trial_state(own["state"]) if own.get("state") else None
    if state == TrialState.EVALUATING and own_state in (TrialState.SUCCEEDED, TrialState.FAILED) \
            and own.get("worker") == trial.worker:
        state = own_state  # the worker finished training and is about to report: its record is final
    values = {k: v for k, v in own.items() if k in {f.name for f in dataclasses.fields(TrialRecord)}}
    values.update(trial_id=trial.trial_id, config_id=config_id, rung=rung, config=config_dict, state=state,
                  worker=trial.worker or own.get("worker"), started=trial.time_started or own.get("started"),
                  attempts=read_attempts(trial.location))
    values["epochs"] = own.get("epochs", epochs)
    if trial.reported:
        values["objective"] = trial.objective
        values["finished"] = trial.time_end or own.get("finished")
        for key in ("mean_dice", "train_seconds", "seconds_per_epoch", "inference_seconds", "epochs_trained",
                    "resumed_from", "reused_from", "epochs"):
            if trial.extra.get(key) is not None:
                values[key] = trial.extra[key]
        if "dice_per_class" in trial.extra:
            values["dice_per_class"] = dict(trial.extra["dice_per_class"])
        if trial.error is not None:
            values["error"] = own.get("error") or trial.error
    elif state == TrialState.EVALUATING:
        values["error"] = None
    if state != TrialState.SUCCEEDED:
        values["mean_dice"] = values.get("mean_dice") if state == TrialState.EVALUATING else None
    return TrialRecord.from_dict(values)


def collect_results(root: Union[str, Path], *, state: str = "running") -> SearchResults:
    """Read every trial of the search at ``root`` into a :class:`SearchResults`."""
    from .budget import plan_for
    from .run import load_settings

    root = Path(root)
    settings, _ = load_settings(root)
    records: list[TrialRecord] = []
    trials = neps_adapter.read_trials(root)
    if trials:
        space = neps_adapter.search_space(root)
        records = [_record_from_trial(trial, space) for trial in trials.values()]
    records.sort(key=lambda r: (r.config_id, r.rung if r.rung is not None else -1))
    done = [r for r in records if r.state == TrialState.SUCCEEDED and r.mean_dice is not None]

    def best_of(candidates: list[TrialRecord]) -> Optional[str]:
        if not candidates:
            return None
        return min(candidates, key=lambda r: (-(r.mean_dice or 0.0), r.finished or 0.0)).trial_id

    incumbent = None
    if done:
        top = max(r.epochs or 0 for r in done)
        incumbent = best_of([r for r in done if (r.epochs or 0) == top])
    points = [(1.0 - (r.mean_dice or 0.0), r.train_seconds or math.inf, r.inference_seconds or math.inf)
              for r in done]
    front = [done[i].trial_id for i in pareto_front(points)]
    previous = read_json(root / RESULTS_NAME) or {}
    plan = plan_for(settings)
    budget = _budget(records, settings, plan, previous.get("final"))
    model = root / INCUMBENT_DIR
    incumbent_dirs = [p for p in model.glob("*__*__*") if p.is_dir()] if model.is_dir() else []
    return SearchResults(
        root=str(root), settings=settings.to_dict(), rungs=dict(plan.rungs), trials=records,
        incumbent=incumbent, incumbent_any_fidelity=best_of(done), pareto_front=front, budget=budget,
        state=state, incumbent_model_dir=str(incumbent_dirs[0]) if incumbent_dirs else None,
        final=previous.get("final"), estimate=previous.get("estimate"), confirmation=previous.get("confirmation"),
    )


def _budget(records: list[TrialRecord], settings: SearchSettings, plan: Any, final: Optional[dict]) -> dict[str, Any]:
    succeeded = [r for r in records if r.state == TrialState.SUCCEEDED]
    epochs_used = sum(r.epochs_trained or 0 for r in succeeded)
    by_id = {r.trial_id: r for r in records}
    seconds = 0.0
    for r in succeeded:
        if r.reused_from:
            continue  # nothing was trained
        before = by_id.get(r.resumed_from) if r.resumed_from else None
        seconds += max(0.0, (r.train_seconds or 0.0) - ((before.train_seconds or 0.0) if before else 0.0))
    final_epochs = int((final or {}).get("epochs_trained_total") or 0)
    final_seconds = float((final or {}).get("train_seconds_added") or 0.0)
    f_epochs = int(settings.max_epochs)  # type: ignore[arg-type]
    return {
        "epochs_used": epochs_used,
        "final_epochs": final_epochs,
        "total_epochs": plan.search_epochs if plan.budget else settings.effective_total_epochs(),
        "budget_f": settings.budget,
        "cost_f": (epochs_used + final_epochs) / f_epochs,
        "trials": len([r for r in records if r.state in (TrialState.SUCCEEDED, TrialState.FAILED, TrialState.CRASHED)]),
        "trained_trials": len([r for r in succeeded if not r.reused_from]),
        "reused_trials": len([r for r in succeeded if r.reused_from]),
        "max_trials": settings.max_trials,
        "wall_time": settings.wall_time,
        "train_seconds": float(seconds),
        "train_hours": float(seconds + final_seconds) / 3600.0,
    }


def update_results(
    root: Union[str, Path], *, emit: Optional[ProgressCallback] = None, session_start: Optional[float] = None,
    state: str = "running",
) -> SearchResults:
    """Rewrite ``ROOT/results.json``, refresh ``ROOT/incumbent/`` and emit best/progress events."""
    root = Path(root)
    with file_lock(root / RESULTS_LOCK):
        previous = read_json(root / RESULTS_NAME) or {}
        results = collect_results(root, state=state)
        best = results.best
        final = results.final or {}
        if final.get("choice"):
            # The final model (trained to F) is the incumbent from now on.
            results.incumbent_model_dir = final.get("incumbent_model_dir") or results.incumbent_model_dir
        elif best is not None and best.model_dir and Path(best.model_dir).is_dir():
            marker = read_json(root / INCUMBENT_DIR / "incumbent.json") or {}
            if marker.get("trial_id") != best.trial_id:
                copy_incumbent(root, best)
                results.incumbent_model_dir = str(root / INCUMBENT_DIR / Path(best.model_dir).name)
                if emit is not None:
                    emit(ProgressEvent("best", {"trial": best.trial_id, "dice": best.mean_dice,
                                                "epochs": best.epochs, "dice_per_class": best.dice_per_class}))
        atomic_write_json(root / RESULTS_NAME, results.to_dict())
        if emit is not None and previous.get("budget") != results.budget:
            emit(ProgressEvent("progress", _progress_data(results, session_start)))
    return results


def write_results_field(root: Path, **fields: Any) -> SearchResults:
    """Set top-level fields of results.json (final, estimate, confirmation) under the results lock."""
    with file_lock(root / RESULTS_LOCK):
        data = read_json(root / RESULTS_NAME) or {}
        data.update(fields)
        atomic_write_json(root / RESULTS_NAME, data)
    return update_results(root, state=str(data.get("state") or "running"))


def copy_incumbent(root: Path, best: TrialRecord, source: Optional[Path] = None) -> None:
    """Copy a model folder to ROOT/incumbent/ (swapped in whole, never half-copied)."""
    source = Path(source or best.model_dir)  # type: ignore[arg-type]
    target_parent = root / INCUMBENT_DIR
    staging = root / f".{INCUMBENT_DIR}.{os.getpid()}.tmp"
    if staging.exists():
        shutil.rmtree(staging)
    # The final checkpoint is all a prediction needs; "latest"/"best" copies would double the size.
    shutil.copytree(source, staging / source.name, ignore=shutil.ignore_patterns(
        "checkpoint_latest.pth", "checkpoint_best.pth", ".nnunet-scratch-*"))
    atomic_write_json(staging / "incumbent.json", {"trial_id": best.trial_id, "mean_dice": best.mean_dice,
                                                   "epochs": best.epochs, "config": best.config})
    old = root / f".{INCUMBENT_DIR}.{os.getpid()}.old"
    if target_parent.exists():
        os.replace(target_parent, old)
    os.replace(staging, target_parent)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)


def _progress_data(results: SearchResults, session_start: Optional[float]) -> dict[str, Any]:
    """Fraction of the tightest budget spent and an ETA from this session's pace."""
    budget = results.budget
    now = time.time()
    fractions, etas = [], []
    elapsed = now - session_start if session_start else None
    session = read_json(Path(results.root) / SESSION_NAME) or {}
    for used_key, total_key, start_key in (("epochs_used", "total_epochs", "epochs_used_at_start"),
                                           ("trials", "max_trials", "trials_at_start")):
        if not budget.get(total_key):
            continue
        total, used = float(budget[total_key]), float(budget[used_key])
        fractions.append(min(1.0, used / total))
        done_now = used - float(session.get(start_key, 0.0))
        if elapsed and done_now > 0:
            etas.append(max(0.0, (total - used) * elapsed / done_now))
    if budget.get("wall_time") and elapsed is not None:
        fractions.append(min(1.0, elapsed / float(budget["wall_time"])))
        etas.append(max(0.0, float(budget["wall_time"]) - elapsed))
    best = results.best
    return {
        "fraction": max(fractions) if fractions else None,
        "eta_seconds": min(etas) if etas else None,
        "trials": budget.get("trials"),
        "epochs_used": budget.get("epochs_used"),
        "cost_f": budget.get("cost_f"),
        "best_dice": best.mean_dice if best else None,
        "message": (f"{budget.get('trials')} trials, {budget.get('epochs_used')} epochs"
                    + (f", best Dice {best.mean_dice:.4f} ({best.trial_id})" if best and best.mean_dice else "")),
    }


# ---------------------------------------------------------------------------------------------
# table views (the Slicer module's results table; tolerant of older files)


@dataclass
class TrialRow:
    """One row of the results table."""

    trial: str
    epochs: Optional[int]
    dice: Optional[float]
    train_seconds: Optional[float]
    state: str
    config: dict[str, Any]
    model_dir: Optional[Path]
    pareto: bool = False
    incumbent: bool = False


def _first(mapping: Mapping[str, Any], *keys: str) -> Any:
    for key in keys:
        if key in mapping and mapping[key] is not None:
            return mapping[key]
    return None


def _opt_float(value: Any) -> Optional[float]:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _opt_int(value: Any) -> Optional[int]:
    number = _opt_float(value)
    return int(number) if number is not None else None


def trial_rows_from_results(results: Mapping[str, Any], root: Union[str, Path]) -> list[TrialRow]:
    """Table rows from a search's ``results.json``, with the Pareto front and incumbent marked.

    Reads the search's own ``pareto_front`` (trial ids) and ``incumbent`` (a trial id) when the
    file has them; otherwise the front is computed here from Dice and training time. Tolerates a
    few spellings of the keys so the table survives small changes of the file format. Relative
    model folders are resolved against the search root.
    """
    root = Path(root)
    incumbent = results.get("incumbent")
    if isinstance(incumbent, Mapping):
        incumbent = _first(incumbent, "trial_id", "trial", "id")
    incumbent_trial = str(incumbent) if incumbent is not None else None
    rows: list[TrialRow] = []
    for raw in results.get("trials") or []:
        model_dir = _first(raw, "model_dir", "model", "output_dir")
        if model_dir is not None:
            model_dir = Path(model_dir)
            if not model_dir.is_absolute():
                model_dir = root / model_dir
        rows.append(TrialRow(
            trial=str(_first(raw, "trial_id", "trial", "id")),
            epochs=_opt_int(_first(raw, "epochs", "fidelity", "budget")),
            dice=_opt_float(_first(raw, "mean_dice", "dice")),
            train_seconds=_opt_float(_first(raw, "train_seconds", "training_seconds", "time")),
            state=trial_state(_first(raw, "state", "status") or TrialState.SUCCEEDED).value,
            config=dict(_first(raw, "config") or {}),
            model_dir=model_dir,
        ))
    front_ids = results.get("pareto_front")
    if isinstance(front_ids, list) and front_ids:
        wanted = {str(t) for t in front_ids}
        for row in rows:
            row.pareto = row.trial in wanted
    else:
        done = [i for i, row in enumerate(rows)
                if row.dice is not None and row.train_seconds is not None and row.state == TrialState.SUCCEEDED]
        points = [(rows[i].train_seconds, -rows[i].dice) for i in done]  # type: ignore[operator]
        for position in pareto_front(points):
            rows[done[position]].pareto = True
    for row in rows:
        row.incumbent = incumbent_trial is not None and row.trial == incumbent_trial
    incumbent_dir = incumbent_model_dir(root, results)
    if incumbent_dir is not None:
        for row in rows:
            if row.incumbent:
                row.model_dir = incumbent_dir  # the kept copy: trial folders may be cleaned up
    return rows


def incumbent_model_dir(root: Union[str, Path], results: Optional[Mapping[str, Any]] = None) -> Optional[Path]:
    """The incumbent's model folder: ``incumbent_model_dir`` of ``results.json``, else ``ROOT/incumbent/*``."""
    root = Path(root)
    results = results or {}
    named = results.get("incumbent_model_dir")
    if not named and isinstance(results.get("incumbent"), Mapping):
        named = _first(results["incumbent"], "model_dir", "model")
    if named:
        path = Path(named)
        path = path if path.is_absolute() else root / path
        if path.exists():
            return path
    folder = root / INCUMBENT_DIR
    candidates = sorted(p for p in folder.glob("*") if (p / "plans.json").exists()) if folder.is_dir() else []
    if candidates:
        return candidates[0]
    return folder if (folder / "plans.json").exists() else None


def read_results(root: Union[str, Path]) -> dict[str, Any]:
    """``ROOT/results.json`` as a dict (empty when the search has not written it yet)."""
    data = read_json(Path(root) / RESULTS_NAME)
    return data if isinstance(data, dict) else {}
