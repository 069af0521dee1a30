"""What the panel shows, as text: table cells, labels and messages (no widgets here).

AutoNNUNet.py puts these strings into Qt widgets; keeping them here lets pytest check what a user
reads (for instance that an unset model folder shows empty, not ".").
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Sequence

from AutoNNUNetLib.progress import format_duration

DOCUMENTATION_URL = "https://github.com/AutoNNUNet/SlicerAutoNNUNet/blob/main/docs/slicer.md"

HELP_TEXT = f"""
Finds the best nnU-Net for your labeled volumes. Add the segmentations of the scene as training
cases, export them as an nnU-Net dataset, fingerprint it, then run a PriorBand search over nnU-Net
hyperparameters (and optionally architectures) on this computer or on a remote GPU runner.
Use the best model (or any point of the Dice / training time Pareto front) to segment new volumes.
See the <a href="{DOCUMENTATION_URL}">documentation</a> for the step-by-step flow.
"""

#: Shown next to the token field: Slicer's settings file is plain text.
TOKEN_STORAGE_NOTE = ("The token is kept in Slicer's settings file (Slicer.ini) in plain text, never in a saved "
                      "scene. Use a token made for this computer, and revoke it on the runner if the file leaks.")

TRIAL_COLUMNS = ("Trial", "Epochs", "Dice", "Training time", "Pareto", "Incumbent", "Configuration")
CASE_FIXED_COLUMNS = ("Case", "Segmentation")


def channel_names(text: str) -> list[str]:
    """The channel names typed as ``T1, FLAIR`` (one channel "Image" when empty)."""
    return [n.strip() for n in str(text).split(",") if n.strip()] or ["Image"]


def cases_record(cases: Sequence[Any]) -> str:
    """The cases table as the parameter node keeps it (node IDs: a saved scene keeps them)."""
    def node_id(node):
        return node.GetID() if node is not None else None

    return json.dumps([{"case": c.case_id, "segmentation": node_id(c.segmentation_node),
                        "volumes": [node_id(v) for v in c.volume_nodes]} for c in cases])


def parse_cases_record(text: str) -> list[dict]:
    """Rows of :func:`cases_record`; anything unreadable is no rows (a hand-edited scene file)."""
    try:
        rows = json.loads(text or "[]")
    except ValueError:
        return []
    if not isinstance(rows, list):
        return []
    return [{"case": str(r.get("case") or f"case{i + 1}"), "segmentation": r.get("segmentation") or None,
             "volumes": [v or None for v in r.get("volumes") or []]}
            for i, r in enumerate(rows) if isinstance(r, dict)]


def url_history(saved: str, new_url: str = "", limit: int = 10) -> list[str]:
    """The runner URLs used before, newest first, each once (``saved`` as kept in the settings)."""
    try:
        urls = json.loads(saved or "[]")
    except ValueError:
        urls = []
    urls = [str(u) for u in urls if isinstance(u, str) and u.strip()] if isinstance(urls, list) else []
    if new_url.strip():
        urls = [new_url.strip(), *[u for u in urls if u != new_url.strip()]]
    return urls[:limit]


def parse_class_aliases(text: str) -> dict[str, str]:
    try:
        aliases = json.loads(text or "{}")
    except ValueError:
        return {}
    return {str(k): str(v) for k, v in aliases.items()} if isinstance(aliases, dict) else {}


def predict_folds(text: str):
    """The inference folds as typed ("0 2", "all"; empty: every fold the model has -> None)."""
    from AutoNNUNetLib.folds import parse_folds

    text = str(text or "").replace(",", " ").strip()
    if not text or text.lower() == "all":
        return None  # the model's own folds (a model trained on fold 0 has no fold 1)
    return parse_folds(text, allow_all=False)


def case_columns(channels: Sequence[str]) -> list[str]:
    return [*CASE_FIXED_COLUMNS, *channels]


def model_folder_text(path: Any) -> str:
    """The model folder as shown: empty when unset (the parameter node stores ``Path()``, i.e. ".")."""
    if path is None or str(path) in ("", "."):
        return ""
    return str(path)


def is_model_folder_set(path: Any) -> bool:
    return bool(model_folder_text(path))


def trial_cells(row: Any) -> list[str]:
    """One row of the trials table (a results row: trial, epochs, dice, train_seconds, pareto, incumbent, config)."""
    return [
        str(row.trial),
        "" if row.epochs is None else str(row.epochs),
        "" if row.dice is None else f"{row.dice:.4f}",
        format_duration(row.train_seconds),
        "yes" if row.pareto else "",
        "yes" if row.incumbent else "",
        json.dumps(row.config, sort_keys=True),
    ]


def trial_tooltip(row: Any, column: int) -> str:
    if column == TRIAL_COLUMNS.index("Configuration"):
        return json.dumps(row.config, sort_keys=True, indent=1)
    return str(row.model_dir) if row.model_dir else "no model folder kept"


def class_table_rows(segment_names_per_case: Sequence[Sequence[str]], aliases=None) -> list:
    """The class table's rows (``dataset.classes``, the library's one class-name rule)."""
    from AutoNNUNetLib.dataset.classes import class_rows

    return class_rows(segment_names_per_case, aliases)


def class_cells(row: Any) -> list[str]:
    return [row.segment_name, row.class_name, str(row.value), str(row.cases)]


def job_end_text(kind: str, state: str, message: str = "", stopped: bool = False,
                 by_scene_close: bool = False) -> str:
    """The status line once a job has ended."""
    if by_scene_close:
        return f"{kind.capitalize()} cancelled: the scene it belonged to was closed."
    if stopped:
        return "Search stopped (wall time); Resume continues it."
    if state == "succeeded":
        return {"search": "Search finished.", "fingerprint": "Fingerprint and plans ready.",
                "predict": "Segmentation finished.",
                "select": "Selection finished: it is the model folder now."}.get(kind, f"{kind} finished.")
    text = f"{kind.capitalize()} {state}"
    if kind == "search" and state == "cancelled":
        return text + "; use Resume to continue."
    return text + (f": {message}" if message else ".")


def predict_status_text(progress: Any) -> str:
    """The Inference status while a prediction runs: its stage or slab message, and the share done."""
    text = progress.status_text()
    if progress.fraction is not None and not progress.finished_state:
        text += f" ({progress.percent()}%)"
    return text


def collected_text(description: Any, needs_install: bool = False) -> str:
    """The status line once a runner's model is collected (a models.ModelDescription)."""
    what = (f"selection ({', '.join(description.member_names)})" if description.selection else "model")
    folds = " ".join(str(f) for f in description.folds)
    text = f"Search finished; the runner's {what} (folds {folds}) is in {description.path}."
    if needs_install:
        text += " Install the dependencies (Setup) to segment with it on this computer."
    return text


def log_tail(text: str, lines: int = 3) -> str:
    kept = [line for line in text.splitlines() if line.strip()][-lines:]
    return " | ".join(kept)


def summary_from_log(text: str) -> str:
    """The fingerprint summary a ``fingerprint`` job printed (its log after the supervisor's lines)."""
    lines = [line for line in text.splitlines() if not line.startswith(("=== ", "[supervisor]"))]
    return "\n".join(lines).strip()



@dataclass
class PanelFacts:
    """What decides which actions can run now."""

    cases: int = 0  # rows in the cases table
    dataset: bool = False  # the working folder holds an exported dataset
    planned: bool = False  # ... fingerprinted and planned
    search: bool = False  # ... and a search folder (Resume)
    model: bool = False  # a model folder is chosen
    remote: bool = False  # Run on: remote runner
    remote_search: bool = False  # a search ran on the runner (its job id is kept)
    running: set = field(default_factory=set)  # kinds of the jobs running now


def button_states(facts: PanelFacts) -> dict[str, bool]:
    """Each action's button enabled only when its inputs are there and nothing it would disturb runs.

    A remote search needs the exported dataset only (the runner plans it); a local one the plans.
    """
    # A selection reads the search folder a new search would rename: they exclude each other.
    busy = bool({"search", "fingerprint", "select"} & facts.running)
    return {
        "exportDatasetButton": facts.cases > 0 and not busy,
        "runAllButton": facts.cases > 0 and not busy,
        "runFingerprintButton": facts.dataset and not busy,
        "showFingerprintButton": facts.planned and not busy,
        "startButton": not busy and (facts.dataset if facts.remote else facts.planned),
        "resumeButton": not busy and facts.search and not facts.remote,
        "selectModelButton": not busy and (facts.remote_search if facts.remote else facts.search),
        "stopButton": busy,
        "segmentButton": facts.model and "predict" not in facts.running,
        "cancelSegmentButton": "predict" in facts.running,
        "exportModelButton": facts.model and "model" not in facts.running,
        "importModelButton": "model" not in facts.running,
    }


def versions_from_log(text: str, mark: str = "AUTONNUNET_VERSIONS ") -> str:
    """``torch 2.6.0 (CUDA: NVIDIA A100), nnunetv2 2.8.1, NePS 0.17.0`` from a versions check's log."""
    line = next((line for line in text.splitlines() if line.startswith(mark)), None)
    if line is None:
        return "Could not read the installed versions (see the job's log)."
    try:
        found = json.loads(line[len(mark):])
    except ValueError:
        return "Could not read the installed versions (see the job's log)."
    torch = found.get("torch") or "missing"
    if found.get("cuda"):
        torch += " (CUDA: " + ", ".join(found["cuda"]) + ")"
    elif found.get("mps"):
        torch += " (Apple MPS)"
    elif found.get("torch"):
        torch += " (CPU only)" if not found.get("error") else f" (cannot load: {found['error']})"
    return (f"torch {torch}, nnunetv2 {found.get('nnunetv2') or 'missing'}, "
            f"NePS {found.get('neural-pipeline-search') or 'missing'}")
