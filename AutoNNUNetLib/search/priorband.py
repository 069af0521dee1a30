"""Regularized PriorBand: PriorBand whose promotions and incumbent also weigh training time.

NePS 0.17's PriorBand is single-objective, so the runtime-aware variant of the Auto-nnU-Net
reference is built on NePS's optimizer interface: :class:`RegularizedPriorBand` wraps
``neps.optimizers.algorithms.neps_priorband`` (the PipelineSpace version) and changes exactly two
decisions, leaving sampling, brackets, rung sizes and random state untouched:

1. **Promotion** within a rung of a successive-halving bracket: candidates are ordered by their
   Pareto rank (non-dominated sorting) of ``(loss, runtime)``, ties within a rank broken by lower
   loss. A slower configuration is promoted only if no faster one is at least as good.
2. **Incumbent for PriorBand's incumbent-based sampling**: among the Pareto front of all completed
   trials, the point minimising ``(1 + loss_n) * (1 + runtime_n) ** runtime_weight`` where ``_n``
   is min-max normalisation over all completed trials (so a loss gap counts relative to the spread
   of losses seen, and ``1 +`` keeps the extremes of the front from scoring 0); ties go to the
   lower loss. ``runtime_weight = 1`` is the reference's normalized product.

``loss`` is the trial's ``objective_to_minimize`` (1 - mean Dice in the search); ``runtime`` is the
trial's ``report.extra[runtime_key]`` (seconds of training per epoch by default: unlike total
training time it is comparable across rungs). ``runtime_weight = 0`` delegates every call
unchanged to the wrapped PriorBand, so it *is* plain PriorBand. Failed trials (loss ``inf``) and
pending ones (``nan``) keep their values, so they are never promoted, exactly as in PriorBand.
The final incumbent of a search is chosen on Dice alone (see :mod:`AutoNNUNetLib.search`).

Use it with ``neps.run(optimizer=functools.partial(RegularizedPriorBand, eta=3, ...))``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable, Literal, Mapping, Optional, Sequence

from ..pareto import pareto_ranks
from . import neps_adapter

if TYPE_CHECKING:
    import pandas as pd

#: Where the runtime of a trial is read from (``report.extra``), and the fallback.
DEFAULT_RUNTIME_KEY = "seconds_per_epoch"


def promotion_scores(points: Sequence[tuple[float, float]]) -> list[float]:
    """Scores whose order is (Pareto rank, loss): ``rank + 0.5 * normalised loss``."""
    if not points:
        return []
    ranks = pareto_ranks(points)
    losses = [p[0] for p in points]
    lo, hi = min(losses), max(losses)
    span = hi - lo
    return [r + (0.5 * (p[0] - lo) / span if span > 0 else 0.0) for r, p in zip(ranks, points)]


def incumbent_scores(points: Sequence[tuple[float, float]], runtime_weight: float) -> list[float]:
    """Lower is better; the argmin is the Pareto point with the best normalised product.

    Points off the Pareto front score above every front point (``10 +``) so they stay "completed"
    for PriorBand's bookkeeping but are never the incumbent.
    """
    if not points:
        return []
    ranks = pareto_ranks(points)

    def normalise(values: list[float], value: float) -> float:
        finite = [v for v in values if math.isfinite(v)]
        if not finite or not math.isfinite(value):
            return 1.0
        lo, hi = min(finite), max(finite)
        return (value - lo) / (hi - lo) if hi > lo else 0.0

    losses = [p[0] for p in points]
    times = [p[1] for p in points]
    scores = []
    for point, rank in zip(points, ranks):
        score = (1.0 + normalise(losses, point[0])) * (1.0 + normalise(times, point[1])) ** runtime_weight
        # A tiny loss term makes equal products prefer the more accurate point.
        score += 1e-9 * point[0]
        scores.append(score if rank == 0 else 10.0 + score)
    return scores


def _split_trial_id(trial_id: str) -> tuple[int, int]:
    config_id, rung = trial_id.split("_rung_")
    return int(config_id), int(rung)


def _runtime_of(trial: Any, runtime_key: str) -> float:
    report = trial.report
    value = (report.extra or {}).get(runtime_key)
    if value is None or not math.isfinite(float(value)):
        return math.inf  # unknown runtime: never preferred for being fast
    return float(value)


class RegularizedPriorBand:
    """PriorBand (NePS, PipelineSpace) with runtime-aware promotion and incumbent.

    Args:
        space: the NePS ``PipelineSpace`` (with one fidelity).
        eta: successive-halving reduction factor.
        sample_prior_first: ``False``, ``True`` (prior at the lowest fidelity) or
            ``"highest_fidelity"`` (nnU-Net's default trained fully first, as the reference).
        runtime_weight: 0 = plain PriorBand; > 0 = Pareto promotion and incumbent by
            ``(1 + loss_n) * (1 + runtime_n) ** runtime_weight`` (see the module docstring).
        inc_ratio: PriorBand's share of incumbent (vs prior) sampling once it is active.
        base: ``"hyperband"`` or ``"successive_halving"`` bracket structure.
        runtime_key: the ``report.extra`` key holding a trial's runtime.
    """

    def __init__(
        self,
        space: Any,
        *,
        eta: int = 3,
        sample_prior_first: bool | Literal["highest_fidelity"] = False,
        runtime_weight: float = 1.0,
        inc_ratio: float = 0.9,
        base: Literal["hyperband", "successive_halving"] = "hyperband",
        runtime_key: str = DEFAULT_RUNTIME_KEY,
        portfolio: Sequence[Mapping[str, Any]] = (),
    ):
        if runtime_weight < 0 or not math.isfinite(runtime_weight):
            raise ValueError(f"runtime_weight must be a finite number >= 0, got {runtime_weight}")
        if base not in ("hyperband", "successive_halving"):
            raise ValueError(f"base must be 'hyperband' or 'successive_halving', got {base!r}")
        self.space = space  # NePS looks the fidelity name up here
        self.runtime_weight = float(runtime_weight)
        self.runtime_key = runtime_key
        self._inner = neps_adapter.priorband(
            space, eta=eta, sample_prior_first=sample_prior_first, inc_ratio=inc_ratio, base=base
        )
        #: Warm-start candidates (NePS configs without the fidelity): see _warm_start.
        self.portfolio = [dict(c) for c in portfolio]
        self.derived_info = getattr(self._inner, "derived_info", {})
        self._runtimes: dict[tuple[int, int], float] = {}
        if self.runtime_weight > 0:
            original_brackets = self._inner.create_brackets
            self._inner.create_brackets = lambda table: self._rerank_brackets(original_brackets(table))
            self._inner.sampler = neps_adapter.incumbent_sampler(self._inner.sampler, self._incumbent_table)

    @property
    def rung_to_fidelity(self) -> Mapping[int, int | float]:
        return self._inner.rung_to_fid

    def __call__(self, trials: Mapping[str, Any], budget_info: Any, n: Optional[int] = None) -> Any:
        if self.runtime_weight > 0:
            self._runtimes = {
                _split_trial_id(trial_id): _runtime_of(trial, self.runtime_key)
                for trial_id, trial in trials.items()
                if trial.report is not None
            }
        sample = self._inner(trials, budget_info, n)
        return self._warm_start(trials, sample) if self.portfolio and n is None else sample

    # -- warm start ---------------------------------------------------------------------------

    def _warm_start(self, trials: Mapping[str, Any], sample: Any) -> Any:
        """Every second new configuration becomes the next unused portfolio candidate.

        Only new samples (not promotions) are replaced, and not the very first one (the prior
        when it is sampled first); alternating keeps PriorBand's own prior/incumbent sampling
        going. The replaced sample keeps its id and fidelity, so the bracket is unchanged.
        """
        if sample.previous_config_id is not None or not trials:
            return sample
        config_id = str(sample.id).split("_rung_")[0]
        if any(str(t).split("_rung_")[0] == config_id for t in trials):
            return sample  # a promotion of a known configuration
        new_configs = len({str(t).split("_rung_")[0] for t in trials})
        if new_configs % 2 == 0:
            return sample
        used = [{k: v for k, v in trial.config.items() if not k.startswith("ENVIRONMENT__")}
                for trial in trials.values()]
        for candidate in self.portfolio:
            plain = {k: v for k, v in candidate.items() if not k.startswith("ENVIRONMENT__")}
            if plain not in used:
                environment = {k: v for k, v in sample.config.items() if k.startswith("ENVIRONMENT__")}
                return neps_adapter.sampled_config(sample.id, {**plain, **environment}, None)
        return sample

    # -- promotion --------------------------------------------------------------------------

    def _rerank_brackets(self, brackets: Any) -> Any:
        for bracket in brackets if isinstance(brackets, (list, tuple)) else [brackets]:
            for sh_bracket in getattr(bracket, "sh_brackets", [bracket]):
                for rung in sh_bracket.rungs:
                    rung.table = self._rerank_rung(rung.table)
        return brackets

    def _rerank_rung(self, table: "pd.DataFrame") -> "pd.DataFrame":
        """Replace finite losses of one rung by their (Pareto rank, loss) promotion score."""
        if table.empty:
            return table
        table = table.copy()
        finite = [ix for ix, perf in table["perf"].items() if _is_finite(perf)]
        points = [(float(table.at[ix, "perf"]), self._runtimes.get(ix, math.inf)) for ix in finite]
        for ix, score in zip(finite, promotion_scores(points)):
            table.at[ix, "perf"] = score
        return table

    # -- incumbent --------------------------------------------------------------------------

    def _incumbent_table(self, table: "pd.DataFrame") -> "pd.DataFrame":
        table = table.copy()
        finite = [ix for ix, perf in table["perf"].items() if _is_finite(perf)]
        points = [(float(table.at[ix, "perf"]), self._runtimes.get(ix, math.inf)) for ix in finite]
        for ix, score in zip(finite, incumbent_scores(points, self.runtime_weight)):
            table.at[ix, "perf"] = score
        return table

    def incumbent(self, trials: Mapping[str, Any]) -> Optional[str]:
        """The trial id PriorBand's incumbent-based sampling would mutate (None before any result)."""
        import numpy as np

        self._runtimes = {
            _split_trial_id(t): _runtime_of(trial, self.runtime_key) for t, trial in trials.items() if trial.report
        }
        table = neps_adapter.trials_table(trials)
        if self.runtime_weight > 0:
            table = self._incumbent_table(table)
        completed = table[table["perf"].notna()]
        if completed.empty:
            return None
        config_id, rung = completed["perf"].astype(float).idxmin()
        return f"{config_id}_rung_{rung}" if np.isfinite(completed["perf"].min()) else None


def _is_finite(value: Any) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False
