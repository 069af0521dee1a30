"""Shared helper of the benchmark scripts: replace one section of docs/benchmarks.md."""

from __future__ import annotations

import datetime
import re
from pathlib import Path

BENCHMARKS_MD = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
HEADER = "# Benchmarks\n\nEach section is written by the script named in it; numbers are measured, not edited.\n"


def write_section(title: str, body: str, path: Path = BENCHMARKS_MD) -> None:
    """Replace (or append) the ``## title`` section, leaving other sections untouched."""
    text = path.read_text() if path.exists() else HEADER
    stamp = datetime.date.today().isoformat()
    section = f"## {title}\n\nMeasured {stamp}.\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text)
    else:
        text = text.rstrip() + "\n\n" + section
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.rstrip() + "\n")
