"""Group level, step 3: which participant is in which group (``--group-by COLUMN``).

The groups come from the input dataset's ``participants.tsv`` (the only thing the group level
reads outside ``output_dir``). Values are compared as text; BIDS' ``n/a`` (or an empty cell) means
"no value": that participant is left out of the comparison and the statistics' sidecars say so.
Levels are sorted, so a two-level comparison is always "first level minus second level". A column
of numbers with three or more distinct values (age, a score) is continuous: ``--group-by`` then
tests a correlation (see ``model.py``), with no groups.

A design that cannot be compared (no table, no such column, fewer than two levels with at least
two participants each) is not an error that stops the group level: it carries a ``problem`` that
the command reports, and the other group outputs are still written.
"""

from __future__ import annotations

import csv
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

MIN_PER_LEVEL = 2  # a level's variance needs two participants
MIN_NUMERIC = 4  # a correlation: intercept and slope, and two residual degrees of freedom
NUMERIC_MIN_DISTINCT = 3  # numbers with fewer distinct values are group labels (e.g. 1 / 2)
_MISSING = ("", "n/a")


@dataclass(frozen=True)
class ParticipantsTable:
    path: Path | None
    columns: tuple[str, ...] = ()
    values: dict = field(default_factory=dict, compare=False, hash=False)  # subject -> row
    problem: str | None = None


@dataclass(frozen=True)
class Design:
    column: str
    levels: tuple[str, ...] = ()  # sorted; a t map is levels[0] minus levels[1]
    level_of: dict = field(default_factory=dict, compare=False, hash=False)  # subject -> level
    excluded: dict = field(default_factory=dict, compare=False, hash=False)  # subject -> why
    source: Path | None = None  # the participants.tsv read
    problem: str | None = None  # why there is no comparison; None: there is one
    numeric: bool = False  # a continuous column (a correlation, no groups): see is_numeric_column

    @property
    def usable(self) -> bool:
        return self.problem is None

    @property
    def contrast(self) -> str:
        """The column as a BIDS label (alphanumerics), for the ``contrast-`` entity."""
        return re.sub(r"[^A-Za-z0-9]", "", self.column) or "groupby"

    def members(self, level: str) -> tuple[str, ...]:
        return tuple(sorted(s for s, value in self.level_of.items() if value == level))

    @property
    def counts(self) -> dict[str, int]:
        return {level: len(self.members(level)) for level in self.levels}


def read_participants(bids_dir: Path | None, column: str) -> ParticipantsTable:
    """``bids_dir/participants.tsv``, or a table whose ``problem`` says why it cannot be used."""
    fix = "give the BIDS dataset (with its participants.tsv) as bids_dir, or leave out --group-by"
    if bids_dir is None or not Path(bids_dir).is_dir():
        return ParticipantsTable(
            None, problem=f"--group-by {column}: bids_dir {bids_dir} is not here to read "
            f"participants.tsv from; {fix}",
        )  # fmt: skip
    path = Path(bids_dir) / "participants.tsv"
    if not path.is_file():
        return ParticipantsTable(path, problem=f"--group-by {column}: {path} does not exist; {fix}")
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle, delimiter="\t")
            columns = tuple(reader.fieldnames or ())
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        return ParticipantsTable(path, problem=f"--group-by {column}: {path} cannot be read: {err}")
    if "participant_id" not in columns:
        return ParticipantsTable(
            path, columns,
            problem=f"--group-by {column}: {path} has no participant_id column (BIDS requires it "
            "first); add it",
        )  # fmt: skip
    values = {}
    for row in rows:
        label = (row.get("participant_id") or "").strip()
        if label:
            values[label.removeprefix("sub-")] = row
    return ParticipantsTable(path, columns, values)


def build_design(column: str, table: ParticipantsTable, subjects: Iterable[str]) -> Design:
    """The groups of ``subjects`` (participants with usable results) by ``column``."""
    if table.problem:
        return Design(column, source=table.path, problem=table.problem)
    if column not in table.columns:
        others = ", ".join(c for c in table.columns if c != "participant_id") or "none"
        return Design(
            column, source=table.path,
            problem=f"--group-by {column}: {table.path} has no column {column!r} (its columns: "
            f"{others}); name one of them",
        )  # fmt: skip
    level_of, excluded = {}, {}
    for subject in sorted(subjects):
        row = table.values.get(subject)
        if row is None:
            excluded[subject] = f"not in {table.path.name}"
            continue
        value = (row.get(column) or "").strip()
        if value in _MISSING:
            excluded[subject] = f"no value (n/a) for {column!r} in {table.path.name}"
        else:
            level_of[subject] = value
    if is_numeric_column(level_of.values()):
        problem = None
        if len(level_of) < MIN_NUMERIC:
            problem = (
                f"--group-by {column}: only {len(level_of)} participant(s) with a value and usable "
                f"results; a correlation needs {MIN_NUMERIC}"
            )
        return Design(column, (), level_of, excluded, table.path, problem, numeric=True)
    levels = tuple(sorted(set(level_of.values())))
    design = Design(column, levels, level_of, excluded, table.path)
    problem = _why_not_comparable(design)
    if problem:
        return Design(column, levels, level_of, excluded, table.path, problem)
    return design


def is_numeric_column(values: Iterable[str]) -> bool:
    """True when every value is a number and there are at least ``NUMERIC_MIN_DISTINCT`` of them:
    the column is a continuous variable (age, a score) and --group-by tests a correlation."""
    numbers = set()
    for value in values:
        try:
            number = float(value)
        except ValueError:
            return False
        if number != number:  # nan
            return False
        numbers.add(number)
    return len(numbers) >= NUMERIC_MIN_DISTINCT


def _why_not_comparable(design: Design) -> str | None:
    counts = design.counts
    summary = ", ".join(f"{level!r}: {n}" for level, n in counts.items()) or "none"
    if len(design.levels) < 2:
        return (
            f"--group-by {design.column}: only {len(design.levels)} level among the participants "
            f"with usable results ({summary}; {len(design.excluded)} without a value): nothing "
            "to compare; choose a column with two or more groups"
        )
    small = [level for level, n in counts.items() if n < MIN_PER_LEVEL]
    if small:
        return (
            f"--group-by {design.column}: level(s) {', '.join(map(repr, small))} have fewer than "
            f"{MIN_PER_LEVEL} participants with usable results ({summary}); every group needs "
            f"{MIN_PER_LEVEL} to estimate its variance (is {design.column!r} a continuous "
            "variable? --group-by compares groups)"
        )
    return None
