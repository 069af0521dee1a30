"""Built-in steps: small file work the supervisor does itself (no heavy imports).

Each is called as ``BUILTINS[name](supervisor, **step.kwargs)``. Work that needs torch (zipping a
model checks its checkpoints) runs as a separate ``autonnunet`` process so the supervisor stays
small and fast to start.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Union

from .spec import JobError

if TYPE_CHECKING:
    from .supervisor import Supervisor


def find_model_dir(root: Union[str, Path]) -> Path:
    """The nnU-Net model folder (the one holding ``plans.json``) at or below ``root``, or ``root``
    itself when it is a selection root (its members' folders are below it, but predicting with one
    of them would drop the ensemble and the postprocessing)."""
    from ..selection.archive import is_selection_root

    root = Path(root)
    if (root / "plans.json").is_file() or is_selection_root(root):
        return root
    candidates = sorted(p.parent for p in root.rglob("plans.json"))
    if not candidates:
        raise JobError(f"no model folder (plans.json) under {root}")
    return candidates[0]


def _run_verb(sup: "Supervisor", *argv: str) -> None:
    code = subprocess.call([sup.spec.python, "-m", "AutoNNUNetLib", *argv], env={**os.environ, **sup.spec.env},
                           stdin=subprocess.DEVNULL, **sup.child_flags())
    if code != 0:
        raise JobError(f"{argv[0]} {argv[1]} failed with exit code {code}")


def _builtin_export_model(sup: "Supervisor", source: str, dest: str) -> None:
    """Zip a model folder with the library's exporter (a separate process: it imports torch)."""
    model_dir = find_model_dir(source)
    Path(dest).parent.mkdir(parents=True, exist_ok=True)
    _run_verb(sup, "export-model", str(model_dir), dest)


def _builtin_import_model(sup: "Supervisor", source: str, dest: str) -> None:
    _run_verb(sup, "import-model", source, dest)


def _builtin_copy(sup: "Supervisor", source: str, dest: str, missing_ok: bool = False) -> None:
    src = Path(source)
    if not src.exists():
        if missing_ok:
            return
        raise JobError(f"{src} was not produced")
    Path(dest).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest)


def _builtin_trials_table(sup: "Supervisor", results: str, dest: str) -> None:
    """``results.json``'s trials as CSV: one row per trial, nested values as JSON text."""
    data = json.loads(Path(results).read_text())
    trials = data.get("trials", []) if isinstance(data, dict) else data
    rows = [flatten(t) for t in trials if isinstance(t, dict)]
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    Path(dest).parent.mkdir(parents=True, exist_ok=True)
    with open(dest, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def flatten(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as dotted columns, lists as JSON text (one CSV row)."""
    flat: dict[str, Any] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        elif isinstance(value, list):
            flat[name] = json.dumps(value)
        else:
            flat[name] = value
    return flat


def _builtin_zip_folder(sup: "Supervisor", source: str, dest: str) -> None:
    src = Path(source)
    Path(dest).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(dest).with_suffix(".zip.tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(src.rglob("*")):
            if path.is_file():
                archive.write(path, path.relative_to(src).as_posix())
    os.replace(tmp, dest)


BUILTINS: dict[str, Callable[..., None]] = {
    "export_model": _builtin_export_model,
    "copy": _builtin_copy,
    "trials_table": _builtin_trials_table,
    "zip_folder": _builtin_zip_folder,
    "import_model": _builtin_import_model,
}
