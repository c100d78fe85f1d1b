"""pybids' index of a large dataset: only the requested participants' folders, and optionally
saved in a folder (``--bids-database-dir``) to be reused by later calls with the same selection.

A 5,000-participant dataset takes minutes to index whole; the participants one call (or one
SLURM array task) processes take a second. Each selection's index is saved under its own key, so
concurrent array tasks never share (or half-write) one database.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

from bids_app.errors import InvalidBIDSError, NothingMatchedError

log = logging.getLogger(__name__)

DATABASE_FILE = "layout_index.sqlite"  # pybids' file name inside a database_path
_KEY_FILE = "mninorm_selection.json"  # what the saved index holds, for a reader and a check
_LISTED = 20  # participants named in an error before "and N more"
# What pybids ignores by default (its DEFAULT_LOCATIONS_TO_IGNORE): passing our own list
# replaces it, so it is repeated here.
_DEFAULT_IGNORE = (re.compile(r"^/(code|models|sourcedata|stimuli)"),)


def subject_folders(bids_dir: Path) -> list[str]:
    """The participant labels of the ``sub-*`` folders (one directory listing, no indexing)."""
    with os.scandir(bids_dir) as entries:
        return sorted(
            entry.name[4:] for entry in entries if entry.name.startswith("sub-") and entry.is_dir()
        )


def requested_subjects(bids_dir: Path, labels: tuple[str, ...]) -> tuple[str, ...] | None:
    """The requested labels (without 'sub-'), each checked to have a folder; None: all."""
    if not labels:
        return None
    wanted = tuple(dict.fromkeys(label.removeprefix("sub-") for label in labels))
    existing = set(subject_folders(bids_dir))
    unknown = [label for label in wanted if label not in existing]
    if unknown:
        raise NothingMatchedError(
            f"participant label(s) {', '.join(unknown)} not found in {bids_dir} (no sub-<label> "
            f"folder); the participants there are: {_some(sorted(existing))}"
        )
    return wanted


def ignore_other_subjects(subjects: tuple[str, ...]) -> re.Pattern:
    """One pattern matching every ``sub-*`` folder but the wanted ones: pybids tests each path
    against each pattern, so one pattern, not one per participant."""
    kept = "|".join(re.escape(subject) for subject in subjects)
    return re.compile(rf"^/sub-(?!(?:{kept})(?:/|$))")


def open_layout(
    bids_dir: Path, subjects: tuple[str, ...] | None, validate: bool, database_dir: Path | None
):
    """A ``BIDSLayout`` of ``subjects`` (None: all), from ``database_dir`` when it holds this
    selection's index, else indexed now (and saved there)."""
    from bids.exceptions import BIDSValidationError

    root = bids_dir.resolve()
    try:
        if database_dir is None:
            # pybids only reads; database_path=None keeps its index in memory, never in the dataset.
            return _index(root, subjects, validate, None)
        return _saved_layout(root, subjects, validate, database_dir)
    except BIDSValidationError as err:
        raise InvalidBIDSError(
            f"{bids_dir} is not a valid BIDS dataset ({err}); fix it or pass --skip-bids-validation"
        ) from err


def _index(root: Path, subjects, validate: bool, database_path: Path | None):
    from bids import BIDSLayout
    from bids.layout import BIDSLayoutIndexer

    ignore = list(_DEFAULT_IGNORE)
    if subjects is not None:
        ignore.append(ignore_other_subjects(subjects))
    indexer = BIDSLayoutIndexer(validate=validate, ignore=ignore)
    return BIDSLayout(
        str(root),
        validate=validate,
        database_path=None if database_path is None else str(database_path),
        indexer=indexer,
    )


def selection_key(root: Path, subjects, validate: bool) -> dict:
    return {
        "BIDSRoot": str(root),
        "Participants": None if subjects is None else sorted(subjects),
        "Validate": validate,
    }


def selection_folder(database_dir: Path, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    who = "all" if key["Participants"] is None else f"{len(key['Participants'])}sub"
    return database_dir / f"{who}-{digest}"


def _saved_layout(root: Path, subjects, validate: bool, database_dir: Path):
    from bids import BIDSLayout

    key = selection_key(root, subjects, validate)
    folder = selection_folder(database_dir, key)
    if (folder / DATABASE_FILE).is_file() and _read_key(folder) == key:
        log.info("pybids index of %s read from %s", root, folder)
        return BIDSLayout(database_path=str(folder))
    database_dir.mkdir(parents=True, exist_ok=True)
    # Built in a temporary folder and renamed: a concurrent task or a killed run never leaves a
    # half-written index where the next call would read it.
    building = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=database_dir))
    try:
        layout = _index(root, subjects, validate, building)
        (building / _KEY_FILE).write_text(json.dumps(key, indent=2) + "\n")
        try:
            os.rename(building, folder)
        except OSError:  # another task saved the same selection first: theirs is as good
            pass
        else:
            log.info("pybids index of %s saved in %s", root, folder)
    finally:
        if building.exists():
            shutil.rmtree(building, ignore_errors=True)
    return layout if not folder.exists() else BIDSLayout(database_path=str(folder))


def _read_key(folder: Path) -> dict | None:
    try:
        return json.loads((folder / _KEY_FILE).read_text())
    except (OSError, ValueError):
        return None


def _some(labels: list[str]) -> str:
    if len(labels) <= _LISTED:
        return ", ".join(labels)
    return f"{', '.join(labels[:_LISTED])} and {len(labels) - _LISTED} more"
