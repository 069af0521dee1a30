"""nnU-Net's own model selection after a search: finalize, cross-validate, ensemble, postprocess.

The search stops at one configuration trained on the folds it was evaluated on. nnU-Net itself
goes further (``nnUNetv2_find_best_configuration``): every candidate is trained on all five folds,
the cross-validation predictions decide between single models and pairwise ensembles (softmax
averaging), and then whether keeping only the largest connected component helps. This package
does the same for the search's candidates and writes nnU-Net's own files, so that stock
``nnUNetv2_predict`` + ``nnUNetv2_ensemble`` + ``nnUNetv2_apply_postprocessing`` reproduce the
result without our code.

Modules (one concept each):

- :mod:`.candidates` - which configurations compete (incumbent, Pareto points, 2d / 3d_lowres).
- :mod:`.finalize` - train each candidate on all folds to the final length F (resumable).
- :mod:`.crossval` - predict each fold's validation cases with that fold's checkpoint (probabilities).
- :mod:`.scores` - Dice per case and class, means as nnU-Net's evaluation computes them.
- :mod:`.ensemble` - softmax averaging.
- :mod:`.postprocessing` - largest-component decisions and ``postprocessing.pkl``.
- :mod:`.choose` - the selection itself (best single model or pairwise ensemble, then postprocessing).
- :mod:`.instructions` - ``inference_information.json`` / ``inference_instructions.txt``.
- :mod:`.predictor` - :class:`Selection`: predict with the selection (every member on the bounded path).
- :mod:`.report` - the candidates table (text / markdown / HTML).
- :mod:`.archive` - a whole selection as one zip (``export-model`` / ``import-model``).
- :mod:`.cli` - ``autonnunet finalize`` and ``autonnunet select``.

Imports are lazy so that ``autonnunet --help`` does not load numpy or torch.
"""

from __future__ import annotations

from ..lazy import lazy_exports

_EXPORTS = {
    "Candidate": "candidates",
    "candidates_from_search": "candidates",
    "candidates_from_models": "candidates",
    "other_configurations": "candidates",
    "finalize": "finalize",
    "FinalizeResult": "finalize",
    "predict_fold_validation": "crossval",
    "dice_per_label": "scores",
    "CVScore": "scores",
    "average_probabilities": "ensemble",
    "keep_largest_component": "postprocessing",
    "PostprocessingPlan": "postprocessing",
    "decide_postprocessing": "postprocessing",
    "select": "choose",
    "write_selection": "choose",
    "SelectionResult": "choose",
    "Selection": "predictor",
    "format_report": "report",
    "export_selection": "archive",
    "import_selection": "archive",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
