"""A search budget in units of F, one default training, and what it costs before it starts.

F is one training of ``max_epochs`` epochs on the search's folds (nnU-Net's default: 1000). A
search with ``budget = N`` trains at most ``N * max_epochs`` epochs in all, the final model
included:

- ``final_reserve``: the final model is the incumbent continued from the highest rung below F to
  F (prefix-exact schedule), so ``F - that rung`` epochs are kept back for it;
- ``search_epochs = N * F - final_reserve``: what the trials may train (the prior's run to F
  included). The trial runner checks every trial's missing epochs against it *before* training,
  so unlike NePS's own cost budget it never overshoots, and a resumed search counts what earlier
  runs trained.

:func:`plan_budget` also lays out how many trials per rung that buys (NePS's Hyperband brackets
in NePS's order, trial by trial), which is what the estimate shows. :func:`estimate_search`
measures F's cost with a short probe training of the default configuration and turns the plan
into time: "about 3h 10m on cpu; 1 F = 48m 00s".
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from ..progress import format_duration
from .settings import SearchError, SearchSettings


@dataclass
class BudgetPlan:
    """Rungs and trial counts that fit ``budget`` F (epochs count once per fold set)."""

    budget: Optional[float]  # N (None: no budget in F; NePS's budgets alone)
    max_epochs: int  # F
    rungs: dict[int, int]  # rung -> epochs
    total_epochs: int  # N * F
    final_reserve: int  # epochs kept for continuing the incumbent to F
    prior_epochs: int  # the prior trained to F first
    search_epochs: int  # what trials may train in all (prior included)
    trials_per_rung: dict[int, int] = field(default_factory=dict)
    planned_epochs: int = 0  # what the planned trials cost (<= search_epochs)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["rungs"] = {str(k): v for k, v in self.rungs.items()}
        data["trials_per_rung"] = {str(k): v for k, v in self.trials_per_rung.items()}
        return data


def plan_budget(budget: Optional[float], min_epochs: int, max_epochs: int, eta: int, *,
                prior_first: bool = True, layout: Optional[tuple[dict[int, int], list[dict[int, int]]]] = None
                ) -> BudgetPlan:
    """The plan for ``budget`` F (see the module docstring). ``layout`` overrides NePS's brackets."""
    if layout is None:
        from .neps_adapter import hyperband_layout

        layout = hyperband_layout(min_epochs, max_epochs, eta)
    rungs, brackets = layout
    below = [e for e in rungs.values() if e < max_epochs]
    final_reserve = max_epochs - max(below) if below else 0
    prior_epochs = max_epochs if prior_first else 0
    if budget is None:
        return BudgetPlan(None, max_epochs, rungs, 0, final_reserve, prior_epochs, 0)
    total = int(budget * max_epochs)
    search = total - final_reserve
    needed = prior_epochs + min(rungs.values())
    if search < needed:
        least = (needed + final_reserve) / max_epochs
        raise SearchError(f"budget: {budget:g} F does not fit the default training, one trial and the final "
                          f"model; give at least {least:.2f}")
    plan = BudgetPlan(budget, max_epochs, rungs, total, final_reserve, prior_epochs, search)
    left = search - prior_epochs
    counts = {r: 0 for r in rungs}
    spent = 0
    # NePS's order, trial by trial: a bracket's base rung fills first, then its promotions, then the
    # next bracket (cycling). The runner stops at the first trial that does not fit, so does this.
    fits = bool(brackets)
    while fits:
        for bracket in brackets:
            previous = 0
            for rung in sorted(bracket):
                cost = rungs[rung] - previous
                for _ in range(bracket[rung]):
                    if spent + cost > left:
                        fits = False
                        break
                    counts[rung] += 1
                    spent += cost
                if not fits:
                    break
                previous = rungs[rung]
            if not fits:
                break
    if prior_first:
        top = max(rungs)
        counts[top] += 1
    plan.trials_per_rung = {r: n for r, n in counts.items()}
    plan.planned_epochs = spent + prior_epochs
    return plan


def plan_for(settings: SearchSettings) -> BudgetPlan:
    """The plan of a search's settings (rungs only when it has no budget in F)."""
    return plan_budget(settings.budget, int(settings.min_epochs), int(settings.max_epochs),  # type: ignore[arg-type]
                       int(settings.eta), prior_first=bool(settings.prior_first))  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# the estimate


@dataclass
class Probe:
    """What a short training of nnU-Net's default configuration measured on this machine."""

    seconds_per_iteration: float
    seconds_per_validation: float  # one validation of a fold (all its validation cases)
    device: str
    probe_seconds: float = 0.0


@dataclass
class Estimate:
    """The cost of a search before it starts."""

    budget_f: Optional[float]
    seconds_per_f: float
    estimated_seconds: float
    device: str
    plan: dict[str, Any]
    probe: dict[str, Any]
    text: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def event_data(self) -> dict[str, Any]:
        """The data of the ``stage`` event named ``estimate`` (shown by the CLI and Slicer)."""
        return {"name": "estimate", "message": self.text, "budget_f": self.budget_f,
                "seconds_per_f": self.seconds_per_f, "estimated_seconds": self.estimated_seconds,
                "device": self.device, "trials_per_rung": self.plan.get("trials_per_rung"),
                "rungs": self.plan.get("rungs")}


def _validation_cases(workspace: Any) -> int:
    try:
        return max(1, int(workspace.load_dataset_json().get("numTraining", 5)) // 5)
    except Exception:  # noqa: BLE001 - an estimate, not a check
        return 1


def probe_cost(workspace: Any, settings: SearchSettings, *, trainer: Optional[Callable[..., Any]] = None,
               iterations: int = 4) -> Probe:
    """Train the default configuration for two short epochs and time the second (the first warms up)."""
    from ..config import TrialConfig
    from ..devices import resolve_device

    train = trainer
    if train is None:
        from ..trainer import train
    iterations = max(1, min(iterations, int(settings.iterations_per_epoch)))  # type: ignore[arg-type]
    cases = 1
    seconds: list[float] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=".probe-", dir=str(workspace.root)) as scratch:
        result = train(
            workspace, TrialConfig(), Path(scratch) / "probe", folds=[settings.folds[0]], epochs=2, max_epochs=2,
            iterations_per_epoch=iterations, device=settings.device, seed=settings.seed,
            configuration=settings.configuration, max_validation_cases=cases,
            progress=lambda e: seconds.append(float(e.data["seconds"])) if e.kind == "epoch" else None,
        )
    per_iteration = (seconds[-1] if seconds else result.train_seconds / 2) / iterations
    per_case = sum(f.validation_seconds for f in result.folds) / max(1, len(result.folds)) / cases
    validated = settings.max_validation_cases or _validation_cases(workspace)
    try:
        device = str(resolve_device(settings.device))
    except Exception:  # noqa: BLE001 - the probe itself ran, so the device exists
        device = settings.device
    return Probe(per_iteration, per_case * validated, device, time.perf_counter() - started)


def estimate_search(workspace: Any, settings: SearchSettings, *, probe: Optional[Probe] = None,
                    trainer: Optional[Callable[..., Any]] = None) -> Estimate:
    """The estimate printed before a search starts (a probe is run unless one is given)."""
    plan = plan_for(settings)
    if probe is None:
        probe = probe_cost(workspace, settings, trainer=trainer)
    folds = len(settings.folds)
    f_seconds = (int(settings.max_epochs) * int(settings.iterations_per_epoch)  # type: ignore[arg-type]
                 * probe.seconds_per_iteration * folds + probe.seconds_per_validation * folds)
    validations = sum(plan.trials_per_rung.values()) + 1  # one per trial, and the final model
    if plan.budget is not None:
        seconds = plan.budget * f_seconds + validations * probe.seconds_per_validation * folds
        text = (f"about {format_duration(seconds)} on {probe.device}; 1 F = {format_duration(f_seconds)} "
                f"({settings.max_epochs} epochs x {settings.iterations_per_epoch} iterations, "
                f"{folds} fold{'s' if folds > 1 else ''}); budget {plan.budget:g} F")
    else:
        epochs = settings.effective_total_epochs()
        seconds = (epochs / int(settings.max_epochs) * f_seconds) if epochs else float("nan")  # type: ignore[arg-type]
        text = f"1 F = {format_duration(f_seconds)} on {probe.device}" + (
            f"; the epoch budget is about {format_duration(seconds)}" if epochs else "")
    return Estimate(plan.budget, f_seconds, seconds, probe.device, plan.to_dict(), asdict(probe), text)
