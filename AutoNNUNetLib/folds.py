"""Cross-validation folds as users write them (``0 2``, ``all``) and as records hold them."""

from __future__ import annotations

from typing import Sequence, Union

from .errors import UserInputError

#: nnU-Net's default split is 5-fold cross-validation.
ALL_FOLDS = (0, 1, 2, 3, 4)

FoldsArg = Union[str, int, Sequence[Union[str, int]], None]


def parse_folds(values: FoldsArg, allow_all: bool = True) -> list[int]:
    """``"all"`` -> [0..4]; ``["0", "2"]`` / ``"0,2"`` / ``2`` -> [0, 2] / [2].

    Folds are distinct integers in 0..4 (nnU-Net's split). ``None`` and empty are refused: a caller
    with a default passes it explicitly.
    """
    if values is None:
        raise UserInputError("folds: give fold numbers (0-4) or 'all'")
    if isinstance(values, (str, int)):
        values = [values]
    words = [w for v in values for w in str(v).replace(",", " ").split()]
    if allow_all and len(words) == 1 and words[0].lower() == "all":
        return list(ALL_FOLDS)
    if not words:
        raise UserInputError("folds: give fold numbers (0-4) or 'all'")
    try:
        folds = [int(w) for w in words]
    except ValueError:
        raise UserInputError(f"folds must be numbers 0-4 or 'all', got {' '.join(words)}") from None
    if any(isinstance(v, bool) for v in values):
        raise UserInputError("folds must be numbers 0-4 or 'all', got a boolean")
    bad = [f for f in folds if f not in ALL_FOLDS]
    if bad:
        raise UserInputError(f"fold numbers must be in 0..4, got {bad}")
    if len(set(folds)) != len(folds):
        raise UserInputError(f"folds repeat: {folds}")
    return folds
