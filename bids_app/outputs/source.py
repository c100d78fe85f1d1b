"""The input T1w an output belongs to: what discovery finds, and what outputs, reports and the
group level name their files after (they rebuild it from a run record's name and ``Source``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class T1wInput:
    subject: str
    path: Path
    relpath: str  # relative to bids_dir, POSIX style, for BIDS URIs
    entities: dict = field(hash=False, compare=False)  # pybids entities of the source file

    @property
    def session(self) -> str | None:
        return self.entities.get("session")


def strip_prefix(label: str, prefix: str) -> str:
    """``sub-01`` -> ``01`` (a label given with or without its prefix)."""
    return label[len(prefix) :] if label.startswith(prefix) else label
