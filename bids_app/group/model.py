"""Group level, step 3b: the general linear model behind the corrected statistics.

``--group-by COLUMN`` gives the question: with two groups, the difference of their means (the first
sorted level minus the second); with a numeric column (``design.is_numeric_column``), the slope of
the log-Jacobian on that column; with three or more groups, any difference between them (an F
test). ``--covariates`` add nuisance columns: numbers enter as they are (centred), text is coded
with one indicator per level but the first. ``brain_volume`` (when participants.tsv has no column
of that name) is the brain volume mninorm measured (ml, the QC table's ``brain_volume_ml``, the
mean over a participant's T1w in the space).

A participant with ``n/a`` in any model column is left out and listed. A matrix that is rank
deficient or leaves fewer than ``MIN_RESIDUAL_DF`` residual degrees of freedom is a ``problem``
(exit 65), never a crash: the other group outputs are still written.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from bids_app.group.design import Design, ParticipantsTable

# Chosen on `python -m benchmarks stats` (docs/group.md)
DEFAULT_SMOOTHING_FWHM = 6.0  # mm
DEFAULT_PERMUTATIONS = 1000
BRAIN_VOLUME = "brain_volume"  # the covariate mninorm measures itself
MIN_RESIDUAL_DF = 2
_MISSING = ("", "n/a")


@dataclass(frozen=True)
class ModelSpec:
    """The command line's model and inference settings (``--covariates`` ... ``--atlas``)."""

    seed: int  # the run's --random-seed
    covariates: tuple[str, ...] = ()
    smoothing_fwhm: float = DEFAULT_SMOOTHING_FWHM  # mm
    n_permutations: int = DEFAULT_PERMUTATIONS  # 0: parametric maps only
    tfce: bool = True  # threshold-free cluster enhancement (besides voxel-wise max-t)
    atlas: str | None = None  # FILE[:LABELS], or a TemplateFlow id atlas-<Name>[_desc-..]
    n_jobs: int = 1  # processes for the permutations
    jacobians: tuple[str, ...] = ()  # the log-Jacobians modelled; (): both (total, nonlinear)


@dataclass(frozen=True)
class Model:
    """The design matrix of one space's participants."""

    column: str
    kind: str  # "groups" (two), "anova" (three or more groups) or "correlation"
    subjects: tuple[str, ...] = ()
    matrix: np.ndarray | None = field(default=None, compare=False, hash=False)  # subjects x terms
    terms: tuple[str, ...] = ()  # the matrix's column names
    tested: tuple[int, ...] = ()  # the tested columns (one for t, k - 1 for F)
    contrast: str = ""  # in words
    covariates: tuple[str, ...] = ()
    excluded: dict = field(default_factory=dict, compare=False, hash=False)  # subject -> why
    counts: dict = field(default_factory=dict, compare=False, hash=False)  # level -> n
    problem: str | None = None

    @property
    def usable(self) -> bool:
        return self.problem is None

    @property
    def statistic(self) -> str:
        return "F" if self.kind == "anova" else "t"

    @property
    def residual_df(self) -> int:
        return len(self.subjects) - len(self.terms)

    def record(self) -> dict:
        """The sidecars' description of the model."""
        return {
            "Kind": {
                "groups": "two-group comparison",
                "anova": "comparison of three or more groups",
                "correlation": "correlation (slope)",
            }[self.kind],  # fmt: skip
            "Formula": "logJacobian ~ " + " + ".join(self.terms),
            "Tested": [self.terms[i] for i in self.tested],
            "Contrast": self.contrast,
            "Covariates": list(self.covariates),
            "ParticipantCount": len(self.subjects),
            "Counts": self.counts,
            "Participants": [f"sub-{s}" for s in self.subjects],
            "LeftOut": {f"sub-{s}": why for s, why in self.excluded.items()},
            "ResidualDegreesOfFreedom": self.residual_df,
        }


def build_model(
    design: Design,
    table: ParticipantsTable,
    covariates: tuple[str, ...],
    brain_volumes: Mapping[str, float],
) -> Model:
    """The model of ``design``'s participants (those with a --group-by value and usable results),
    less those without a value for a covariate."""
    column = design.column
    kind = "correlation" if design.numeric else ("groups" if len(design.levels) == 2 else "anova")
    excluded = dict(design.excluded)
    values = {}  # covariate -> subject -> text
    for name in covariates:
        found = _covariate_values(name, table, design.level_of, brain_volumes)
        if isinstance(found, str):
            return Model(column, kind, covariates=covariates, problem=found)
        values[name] = found
    subjects = []
    for subject in sorted(design.level_of):
        missing = [name for name in covariates if values[name].get(subject) in (None, *_MISSING)]
        if missing:
            excluded[subject] = f"no value (n/a) for {', '.join(map(repr, missing))}"
        else:
            subjects.append(subject)
    terms, columns, tested, contrast, counts = _tested_columns(design, subjects)
    for name in covariates:
        more_terms, more_columns = _covariate_columns(name, [values[name][s] for s in subjects])
        terms += more_terms
        columns += more_columns
    matrix = np.column_stack([np.ones(len(subjects)), *columns]) if subjects else np.zeros((0, 1))
    terms = ["intercept", *terms]
    tested = tuple(i + 1 for i in tested)
    model = Model(column, kind, tuple(subjects), matrix, tuple(terms), tested, contrast,
                  tuple(covariates), excluded, counts)  # fmt: skip
    problem = _why_not_estimable(model)
    if problem:
        return Model(column, kind, tuple(subjects), matrix, tuple(terms), tested, contrast,
                     tuple(covariates), excluded, counts, problem)  # fmt: skip
    return model


def _covariate_values(name, table, level_of, brain_volumes) -> dict | str:
    """subject -> value (text), or why the covariate cannot be used."""
    if name in table.columns:
        return {s: (table.values.get(s, {}).get(name) or "").strip() for s in level_of}
    if name == BRAIN_VOLUME:
        return {
            s: ("n/a" if not np.isfinite(brain_volumes.get(s, np.nan)) else repr(brain_volumes[s]))
            for s in level_of
        }
    others = ", ".join(c for c in table.columns if c != "participant_id") or "none"
    return (
        f"--covariates {name}: {table.path} has no column {name!r} (its columns: {others}; "
        f"{BRAIN_VOLUME!r} is the brain volume mninorm measured); name one of them"
    )


def _tested_columns(design: Design, subjects: list[str]):
    """(terms, columns, indices of the tested ones, the contrast in words, counts)."""
    value = design.level_of
    if design.numeric:
        x = np.array([float(value[s]) for s in subjects])
        x = x - x.mean() if len(x) else x
        contrast = f"slope of the log-Jacobian per unit of {design.column!r}"
        return [design.column], [x], (0,), contrast, {"n": len(subjects)}
    levels = design.levels
    counts = {level: sum(value[s] == level for s in subjects) for level in levels}
    if len(levels) == 2:
        first, second = levels
        x = np.array([1.0 if value[s] == first else 0.0 for s in subjects])
        contrast = f"{first} minus {second} (mean log-Jacobian difference)"
        return [f"{design.column}[{first}]"], [x], (0,), contrast, counts
    columns = [
        np.array([1.0 if value[s] == level else 0.0 for s in subjects]) for level in levels[1:]
    ]
    terms = [f"{design.column}[{level}]" for level in levels[1:]]
    contrast = f"any difference between the {len(levels)} levels' means"
    return terms, columns, tuple(range(len(columns))), contrast, counts


def _covariate_columns(name: str, texts: list[str]) -> tuple[list[str], list[np.ndarray]]:
    """Numbers centred; text as one indicator per level but the first (sorted)."""
    try:
        numbers = np.array([float(text) for text in texts])
    except ValueError:
        levels = sorted(set(texts))
        columns = [np.array([1.0 if t == level else 0.0 for t in texts]) for level in levels[1:]]
        return [f"{name}[{level}]" for level in levels[1:]], columns
    return [name], [numbers - numbers.mean() if len(numbers) else numbers]


def _why_not_estimable(model: Model) -> str | None:
    n, p = model.matrix.shape
    small = [level for level, count in model.counts.items() if model.kind != "correlation"
             and count < 1]  # fmt: skip
    if small:
        return (
            f"--group-by {model.column}: no participant of level(s) {', '.join(map(repr, small))} "
            f"has a value for every covariate ({', '.join(model.covariates)}); drop a covariate"
        )
    if n - p < MIN_RESIDUAL_DF:
        return (
            f"--group-by {model.column}: {n} participant(s) with every model value for {p} model "
            f"terms ({', '.join(model.terms)}): the model needs at least {p + MIN_RESIDUAL_DF}; "
            "use fewer covariates or add participants"
        )
    rank = np.linalg.matrix_rank(model.matrix)
    if rank < p:
        return (
            f"--group-by {model.column}: the design matrix ({', '.join(model.terms)}) is rank "
            f"deficient (rank {rank} of {p}): a covariate is constant or duplicates the "
            "comparison or another covariate; drop it"
        )
    return None
