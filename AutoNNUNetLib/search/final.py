"""After the search: the final model trained to F, and an honest confirmation of the gain.

**Final model** (:func:`finish_search`). Configurations are compared at the same epochs (a longer
training has a higher Dice, so comparing across rungs would favour whatever was trained
longest): at the highest rung epoch that at least two configurations reached, whichever validated
best wins. If it was found below F, it continues from its furthest checkpoint to F (the schedule
is prefix-exact, so this *is* a training to F); its Dice at F is then set beside the default's Dice
at F (known when the default was trained to F, as a budget search does first), and the better
of the two on the search folds becomes ``ROOT/incumbent/``.

**Confirmation** (:func:`confirm_search`, ``--confirm-fold K --confirm-seeds S``). The search
selected on its own folds, so their Dice is optimistic. The winner and nnU-Net's default are
each trained to F on fold K, S seeds each; results.json's ``confirmation`` holds every Dice, the
mean and the spread (sample standard deviation). Trainings already done are not repeated.
"""

from __future__ import annotations

import shutil
import statistics
from pathlib import Path
from typing import Any, Callable, Optional, Union

from ..config import TrialConfig
from ..events import EventWriter, ProgressCallback, ProgressEvent, fanout
from ..files import read_json
from ..states import TrialState
from .layout import CONFIRM_DIR, EVENTS_NAME, FINAL_DIR
from .records import TrialRecord
from .results import SearchResults, collect_results, copy_incumbent, write_results_field
from .trial import config_key


def _configurations(records: list[TrialRecord], folds: list[int]) -> dict[str, dict[str, Any]]:
    """Per configuration: Dice per validated epoch (and which trial), furthest own checkpoint."""
    from .trial import _has_checkpoints

    found: dict[str, dict[str, Any]] = {}
    for record in records:
        if record.state != TrialState.SUCCEEDED:
            continue
        entry = found.setdefault(config_key(record.config), {"config": record.config, "dice": {}, "checkpoint": None})
        for validation in record.validations or [{"epochs": record.epochs, "mean_dice": record.mean_dice}]:
            if validation.get("mean_dice") is not None:
                entry["dice"].setdefault(int(validation["epochs"]), (float(validation["mean_dice"]), record.trial_id))
        if not record.reused_from and record.epochs and _has_checkpoints(record.model_dir, folds):
            if entry["checkpoint"] is None or record.epochs > entry["checkpoint"][0]:
                entry["checkpoint"] = (int(record.epochs), str(record.model_dir), record.trial_id)
    return found


def choose_winner(records: list[TrialRecord], max_epochs: int, folds: list[int],
                  affordable: Optional[int] = None) -> Optional[tuple[dict[str, Any], int]]:
    """The configuration to train to F, and the epochs it was compared at (see the module docstring).

    ``affordable``: epochs left for continuing it to F; configurations that would need more are
    passed over.
    """
    found = _configurations(records, folds)
    levels = sorted({e for c in found.values() for e in c["dice"]}, reverse=True)
    for level in levels:
        compared = [c for c in found.values() if level in c["dice"]]
        if len(compared) < 2 and level != levels[-1]:
            continue
        for candidate in sorted(compared, key=lambda c: -c["dice"][level][0]):
            if max_epochs in candidate["dice"] or candidate["checkpoint"] is not None and (
                    affordable is None or max_epochs - candidate["checkpoint"][0] <= affordable):
                return candidate, level
    return None


def _train(workspace: Any, config: TrialConfig, target: Path, settings: Any, *, folds: list[int], seed: Optional[int],
           resume_from: Optional[Path], emit: ProgressCallback, tag: str, trainer: Optional[Callable[..., Any]]):
    train = trainer
    if train is None:
        from ..trainer import train
    return train(workspace, config, target, folds=folds, epochs=settings.max_epochs, max_epochs=settings.max_epochs,
                 iterations_per_epoch=settings.iterations_per_epoch, resume_from=resume_from, device=settings.device,
                 seed=seed, max_validation_cases=settings.max_validation_cases,
                 progress=lambda e: emit(ProgressEvent(e.kind, {**e.data, "trial": tag}, e.time)))


def finish_search(root: Union[str, Path], *, progress: Optional[ProgressCallback] = None,
                  trainer: Optional[Callable[..., Any]] = None) -> SearchResults:
    """Train the winner to F (if it is not there yet) and make the better model at F the incumbent."""
    from ..trainer import model_dir_name
    from .budget import plan_for
    from .run import load_settings

    root = Path(root)
    settings, workspace = load_settings(root)
    results = collect_results(root, state="finished")
    F = int(settings.max_epochs)
    plan = plan_for(settings)
    previous = results.final or {}
    spent_before = int(previous.get("epochs_trained_total") or 0)  # finals of earlier runs of this search
    used = int(results.budget["epochs_used"])
    affordable = (plan.total_epochs - used - spent_before) if plan.budget is not None else None
    chosen = choose_winner(results.trials, F, list(settings.folds), affordable)
    if chosen is None:
        return results
    winner, level = chosen
    emit = fanout(EventWriter(root / EVENTS_NAME), progress)
    default_config = settings.prior_config().to_dict()  # nnU-Net's default in the prior's configuration
    default = _configurations(results.trials, list(settings.folds)).get(config_key(default_config))
    final: dict[str, Any] = {"config": winner["config"], "compared_at": level, "epochs": F,
                             "trial_id": winner["dice"][level][1], "is_default": winner is default,
                             "epochs_trained_total": spent_before}
    if F in winner["dice"]:
        dice, trial_id = winner["dice"][F]
        final.update(mean_dice=dice, from_trial=trial_id, epochs_trained=0,
                     model_dir=(results.trial(trial_id).model_dir if results.trial(trial_id) else None))
    elif previous.get("config") == winner["config"] and previous.get("mean_dice") is not None:
        final = previous  # trained by an earlier run of this search
    else:
        start, source, _ = winner["checkpoint"]
        target = root / FINAL_DIR / model_dir_name(TrialConfig.from_dict(winner["config"]).configuration)
        emit(ProgressEvent("stage", {"name": "final", "message": (
            f"final model: {final['trial_id']} (best at {level} epochs) continues from epoch {start} to {F}")}))
        result = _train(workspace, TrialConfig.from_dict(winner["config"]), target, settings,
                        folds=list(settings.folds), seed=settings.seed, resume_from=Path(source), emit=emit,
                        tag="final", trainer=trainer)
        before = next((t.train_seconds for t in results.trials if t.model_dir == source), 0.0) or 0.0
        final.update(mean_dice=float(result.mean_dice), dice_per_class=dict(result.dice_per_class),
                     epochs_trained=F - start, resumed_from_epoch=start, model_dir=str(target),
                     train_seconds=float(result.train_seconds),
                     train_seconds_added=max(0.0, float(result.train_seconds) - before),
                     seconds_per_epoch=float(result.train_seconds) / F, epochs_trained_total=spent_before + F - start)
    if default is not None and F in default["dice"]:
        final["default_dice"] = default["dice"][F][0]
        final["default_trial"] = default["dice"][F][1]
    # The better model at F (on the search folds) is what the user gets.
    use_default = final.get("default_dice") is not None and final["default_dice"] > (final.get("mean_dice") or -1.0)
    final["choice"] = "default" if use_default or final["is_default"] else "searched"
    model_dir = final.get("model_dir")
    if use_default:
        record = results.trial(final["default_trial"])
        model_dir = record.model_dir if record else None
    if model_dir and Path(model_dir).is_dir():
        best = TrialRecord(trial_id=f"final:{final['choice']}", config_id=0, rung=None, epochs=F,
                           state=TrialState.SUCCEEDED,
                           config=default_config if use_default else winner["config"],
                           mean_dice=final["default_dice"] if use_default else final.get("mean_dice"))
        copy_incumbent(root, best, Path(model_dir))
    final["incumbent_model_dir"] = str(next((p for p in (root / "incumbent").glob("*__*__*") if p.is_dir()), ""))
    emit(ProgressEvent("stage", {"name": "final", "message": _final_text(final)}))
    return write_results_field(root, final=final, state="finished")


def _final_text(final: dict[str, Any]) -> str:
    text = f"final model at {final['epochs']} epochs: Dice {final.get('mean_dice', float('nan')):.4f}"
    if final.get("default_dice") is not None:
        text += f" (nnU-Net default: {final['default_dice']:.4f}); using the {final['choice']} model"
    return text


def confirm_search(root: Union[str, Path], *, progress: Optional[ProgressCallback] = None,
                   trainer: Optional[Callable[..., Any]] = None) -> SearchResults:
    """Train the winner and the default to F on ``confirm_fold``, ``confirm_seeds`` seeds each."""
    from ..trainer import model_dir_name
    from .run import load_settings

    root = Path(root)
    settings, workspace = load_settings(root)
    results = collect_results(root, state="finished")
    fold = settings.confirm_fold
    if fold is None:
        return results
    final = results.final or {}
    winner = final.get("config") or (results.best.config if results.best else None)
    if winner is None:
        return results
    emit = fanout(EventWriter(root / EVENTS_NAME), progress)
    base_seed = settings.seed or 0
    configs = {"incumbent": winner, "default": settings.prior_config().to_dict()}
    confirmation: dict[str, Any] = {"fold": fold, "seeds": settings.confirm_seeds, "epochs": settings.max_epochs,
                                    "same_config": config_key(winner) == config_key(configs["default"])}
    for name, config in configs.items():
        dice, seconds = [], []
        for s in range(int(settings.confirm_seeds)):
            source = "incumbent" if name == "default" and confirmation["same_config"] else name
            target = root / CONFIRM_DIR / f"{source}_seed{s}" / model_dir_name(
                TrialConfig.from_dict(config).configuration)
            record = read_json(target / "autonnunet.json") or {}
            if record.get("epochs") != settings.max_epochs or config_key(record.get("config") or {}) != config_key(config):
                if target.exists():  # another winner's (the search went on), or an interrupted run
                    shutil.rmtree(target)
                emit(ProgressEvent("stage", {"name": "confirm", "message": (
                    f"confirmation: {name} to {settings.max_epochs} epochs on fold {fold}, seed {s + 1}/"
                    f"{settings.confirm_seeds}")}))
                _train(workspace, TrialConfig.from_dict(config), target, settings, folds=[fold],
                       seed=base_seed + 1000 * (s + 1), resume_from=None, emit=emit, tag=f"confirm:{name}:{s}",
                       trainer=trainer)
                record = read_json(target / "autonnunet.json") or {}
            dice.append(float(record.get("mean_dice", float("nan"))))
            seconds.append(float(record.get("train_seconds") or 0.0) / max(1, int(settings.max_epochs)))
        confirmation[name] = {"dice": dice, "mean": statistics.fmean(dice),
                              "spread": statistics.stdev(dice) if len(dice) > 1 else 0.0,
                              "seconds_per_epoch": statistics.fmean(seconds)}
    gain = confirmation["incumbent"]["mean"] - confirmation["default"]["mean"]
    spread = max(confirmation["incumbent"]["spread"], confirmation["default"]["spread"])
    confirmation.update(gain=gain, gain_exceeds_spread=bool(gain > spread))
    emit(ProgressEvent("stage", {"name": "confirm", "message": (
        f"confirmation on fold {fold}: incumbent {confirmation['incumbent']['mean']:.4f} +- "
        f"{confirmation['incumbent']['spread']:.4f}, default {confirmation['default']['mean']:.4f} +- "
        f"{confirmation['default']['spread']:.4f} (gain {gain:+.4f})")}))
    return write_results_field(root, confirmation=confirmation)
