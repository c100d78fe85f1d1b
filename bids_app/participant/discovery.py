"""pybids -> the T1w images to process, grouped by participant."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from bids_app.errors import InvalidBIDSError, MissingInputError, NothingMatchedError, UsageError
from bids_app.outputs.source import T1wInput, strip_prefix

log = logging.getLogger(__name__)

# The one query this app makes; --bids-filter-file entries refine it.
T1W_QUERY = {"datatype": "anat", "suffix": "T1w", "extension": [".nii", ".nii.gz"]}


@dataclass(frozen=True)
class Selection:
    t1w_by_subject: dict  # subject label -> tuple[T1wInput, ...]
    subjects_without_t1w: tuple[str, ...]


def load_filter_file(path: Path | None) -> dict:
    """Read ``--bids-filter-file``: pybids entities for the T1w query (``null`` = entity absent).

    Both ``{"t1w": {...}}`` (as fMRIPrep/sMRIPrep take it) and a bare ``{...}`` are accepted.
    """
    if path is None:
        return {}
    if not path.is_file():
        raise MissingInputError(f"--bids-filter-file {path} does not exist")
    try:
        content = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UsageError(f"--bids-filter-file {path} is not valid JSON: {err}") from err
    if not isinstance(content, dict):
        raise UsageError(f"--bids-filter-file {path} must hold a JSON object of entity filters")
    filters = content.get("t1w", content)
    if not isinstance(filters, dict):
        raise UsageError(f"--bids-filter-file {path}: 't1w' must be an object of entity filters")
    return filters


def collect_t1w(
    bids_dir: Path,
    participant_labels: tuple[str, ...] = (),
    session_labels: tuple[str, ...] = (),
    filters: dict | None = None,
    validate: bool = True,
    database_dir: Path | None = None,
) -> Selection:
    """Every T1w of the selected participants and sessions, each run separately.

    Only the selected participants' folders are indexed (pybids ignores the others'), and with
    ``database_dir`` the index is saved there and reused (``indexing.open_layout``).
    """
    from bids_app.participant.indexing import open_layout, requested_subjects

    _check_dataset(bids_dir)
    wanted = requested_subjects(bids_dir, participant_labels)
    layout = open_layout(bids_dir, wanted, validate, database_dir)
    subjects = _select_subjects(layout, wanted, bids_dir)
    query = {**T1W_QUERY, **_pybids_filters(filters or {})}
    if session_labels:
        query["session"] = [strip_prefix(s, "ses-") for s in session_labels]
    by_subject: dict[str, tuple[T1wInput, ...]] = {}
    missing: list[str] = []
    for subject in subjects:
        files = layout.get(subject=subject, return_type="object", **query)
        inputs = tuple(
            T1wInput(
                subject=subject,
                path=Path(f.path),
                relpath=Path(f.path).relative_to(bids_dir.resolve()).as_posix(),
                entities=dict(f.get_entities()),
            )
            for f in sorted(files, key=lambda f: f.path)
        )
        if inputs:
            by_subject[subject] = inputs
        else:
            missing.append(subject)
    if not by_subject:
        raise NothingMatchedError(
            f"no T1w image in {bids_dir} matches participants {', '.join(subjects)}"
            + (f", sessions {', '.join(session_labels)}" if session_labels else "")
            + (f" and filters {filters}" if filters else "")
            + ": check the labels and --bids-filter-file"
        )
    return Selection(by_subject, tuple(missing))


def _check_dataset(bids_dir: Path) -> None:
    if not (bids_dir / "dataset_description.json").is_file():
        raise InvalidBIDSError(
            f"{bids_dir} is not a BIDS dataset: it has no dataset_description.json; point bids_dir "
            "at the dataset's top folder (the one holding sub-* folders)"
        )


def _select_subjects(layout, wanted: tuple[str, ...] | None, bids_dir: Path) -> list[str]:
    """The requested participants (their folders checked by ``requested_subjects``), or every
    participant pybids indexed; one without T1w is then reported as such, not as unknown."""
    if wanted is not None:
        return list(wanted)
    existing = sorted(layout.get_subjects())
    if not existing:
        raise NothingMatchedError(f"{bids_dir} has no participants (no sub-* folders with data)")
    return existing


def _pybids_filters(filters: dict) -> dict:
    """JSON filters -> pybids query values: null -> Query.NONE, "*" -> Query.ANY."""
    from bids.layout import Query

    converted = {}
    for entity, value in filters.items():
        if value is None:
            converted[entity] = Query.NONE
        elif value == "*":
            converted[entity] = Query.ANY
        else:
            converted[entity] = value
    return converted
